"""Serve settings and API keys without a server: precedence, validation, redaction, the CLI."""
from __future__ import annotations

import json

import pytest

from facebce.cli import main
from facebce.errors import ConfigError
from facebce.serve import KeyStore, add_key, load_config
from facebce.serve.auth import scope_allows


def test_precedence_yaml_env_cli(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: m.onnx\nport: 9000\nmax_images: 8\nmean: [1, 2, 3]\nflip: false\n")
    env = {"FACEBCE_PORT": "9100", "FACEBCE_MAX_BATCH": "16", "FACEBCE_UNRELATED": "x"}
    c = load_config({"port": 9200, "gallery": "g.faiss", "workers": None}, config_file=cfg, environ=env)
    assert (c.model, c.gallery, c.port, c.max_images, c.max_batch, c.mean, c.flip) == (
        "m.onnx", "g.faiss", 9200, 8, 16, "1,2,3", False)
    assert load_config(config_file=cfg, environ=env).port == 9100
    with pytest.raises(ConfigError, match="FACEBCE_PORT"):
        load_config(environ={"FACEBCE_PORT": "eighty"})
    cfg.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_config(config_file=cfg, environ={})


def test_validation_and_loopback_rule():
    with pytest.raises(ConfigError, match="policy"):
        load_config({"policy": "all"}, environ={})
    with pytest.raises(ConfigError, match="port"):
        load_config({"port": 70000}, environ={})
    with pytest.raises(ConfigError, match="loopback only"):
        load_config({"model": "m.onnx", "gallery": "g", "host": "0.0.0.0"}, environ={}).check_ready()
    load_config({"model": "m.onnx", "gallery": "g", "host": "::1"}, environ={}).check_ready()


def test_keys_hold_only_salted_hashes(tmp_path, capsys):
    keys = tmp_path / "keys.json"
    assert main(["serve", "keys", "add", "ops", "--scope", "enrol", "--keys", str(keys)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("fbk_") and len(key) > 40
    text = keys.read_text()
    assert key not in text and key[4:] not in text
    store = KeyStore.load(keys)
    assert store.check(key).name == "ops" and store.check(key + "x") is None and store.check("") is None
    other = add_key(keys, "viewer", "read")
    assert KeyStore.load(keys).check(other).scope == "read"
    records = json.loads(keys.read_text())["keys"]
    assert records[0]["salt"] != records[1]["salt"]
    assert main(["serve", "keys", "add", "ops", "--scope", "read", "--keys", str(keys)]) == 1
    assert "exists already" in capsys.readouterr().err
    assert scope_allows("admin", "enrol") and not scope_allows("read", "enrol")
    # the resolved config printed at start names the keys file, never a key or a hash
    described = load_config({"keys": str(keys)}, environ={}).describe()
    assert "2 keys" in described and records[0]["hash"] not in described and key not in described


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--model", "m.onnx", "--gallery", "g"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loopback only" in err
    assert main(["serve", "--model", str(tmp_path / "missing.onnx"), "--gallery", str(tmp_path / "g.faiss")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.onnx" in err
    assert main(["serve", "keys", "remove", "x"]) == 1
