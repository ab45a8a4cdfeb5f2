"""`facebce serve` settings: defaults < YAML file < FACEBCE_* environment variables < command line.

Every setting has one name (`max_request_bytes`), spelt `max-request-bytes` on the command line,
`max_request_bytes:` in YAML and `FACEBCE_MAX_REQUEST_BYTES` in the environment. Values are
checked here, once, with one-line ConfigErrors naming the setting and where it came from.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from facebce.errors import ConfigError

__all__ = ["ENV_PREFIX", "POLICIES", "ServeConfig", "load_config"]

ENV_PREFIX = "FACEBCE_"
POLICIES = ("central", "largest", "best")  # one face per image; FaceAligner's 'all' is not offered


@dataclass(frozen=True)
class ServeConfig:
    model: str = ""
    gallery: str = ""
    detector: str | None = None
    keys: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # model preprocessing, as `facebce eval` takes it (None: the ONNX file's own)
    color: str = "rgb"
    mean: str | None = None
    std: str | None = None
    flip: bool = True
    intra_op_threads: int | None = None
    inference_sessions: int | None = None  # None: measured at start (Engine: choose_sessions)
    # the gallery's threshold when the server creates the gallery (a number; None: the model's metadata)
    threshold: str | None = None
    index: str = "flat"
    # detection
    policy: str = "central"
    det_size: int = 320
    det_thresh: float = 0.3
    min_score: float | None = None
    # limits
    max_request_bytes: int = 16 << 20
    max_image_pixels: int = 25_000_000
    max_images: int = 16
    max_k: int = 100
    # micro-batching
    max_batch: int = 32
    max_wait_ms: float = 3.0
    log_level: str = "warning"

    def __post_init__(self):
        for name in ("port", "workers", "det_size", "max_request_bytes", "max_image_pixels", "max_images",
                     "max_k", "max_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port={self.port}: expected 1..65535")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms={self.max_wait_ms}: expected >= 0")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.color not in ("rgb", "bgr"):
            raise ConfigError(f"color={self.color!r}: expected rgb or bgr")
        if self.det_size % 32:
            raise ConfigError(f"det_size={self.det_size}: expected a multiple of 32")
        for name in ("intra_op_threads", "inference_sessions"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a positive integer")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check_ready(self) -> None:
        """What a server needs before it starts: a model, a gallery, and auth unless on loopback."""
        if not self.model:
            raise ConfigError("model: not set (--model MODEL.onnx, `model:` in the YAML, or FACEBCE_MODEL)")
        if not self.gallery:
            raise ConfigError("gallery: not set (--gallery STORE, `gallery:` in the YAML, or FACEBCE_GALLERY)")
        if self.keys is None and not self.loopback:
            raise ConfigError(f"host={self.host}: a server without a keys file (--keys) has no authentication "
                              f"and binds to loopback only; use 127.0.0.1 or add keys with "
                              f"'facebce serve keys add NAME --scope admin --keys KEYS.json'")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        return cls(**json.loads(text))

    def describe(self) -> str:
        """The resolved settings, one `name: value` a line; secrets never appear (the keys file holds
        only salted hashes, and only its path and key count are shown)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "keys":
                value = ("(none: authentication off, loopback only)" if value is None
                         else f"{value} ({_key_count(value)})")
            elif _secret(f.name):
                value = "<redacted>"
            lines.append(f"  {f.name}: {value}")
        return "\n".join(lines)


def _secret(name: str) -> bool:
    return any(word in name for word in ("secret", "token", "password"))


def _key_count(path: str) -> str:
    from facebce.serve.auth import KeyStore
    try:
        return f"{len(KeyStore.load(path))} keys, hashes only"
    except ConfigError:
        return "unreadable"


_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _convert(name: str, raw, kind: str, where: str):
    """A raw value (YAML scalar or environment string) into the field's type."""
    if raw is None:
        return None
    try:
        if "bool" in kind:
            if isinstance(raw, bool):
                return raw
            return _BOOL[str(raw).strip().lower()]
        if "int" in kind:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if "float" in kind:
            return float(raw)
        if isinstance(raw, (list, tuple)):  # mean/std as a YAML list
            return ",".join(str(v) for v in raw)
        return str(raw)
    except (KeyError, ValueError, TypeError):
        raise ConfigError(f"{where}: {name}={raw!r} is not a valid {kind.split('|')[0].strip()}") from None


def load_config(cli: Mapping[str, object] | None = None, *, config_file: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Merge defaults, the YAML `config_file`, `FACEBCE_*` variables and `cli` (None values = not given)."""
    from facebce.fileio import load_yaml_file

    kinds = {f.name: str(f.type) for f in fields(ServeConfig)}
    values: dict[str, object] = {}
    if config_file is not None:
        data = load_yaml_file(config_file, what="serve config") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{config_file}: expected a mapping of settings, got {type(data).__name__}")
        for key, raw in data.items():
            name = str(key).replace("-", "_")
            if name not in kinds:
                raise ConfigError(f"{config_file}: unknown setting {key!r} (known: {', '.join(sorted(kinds))})")
            values[name] = _convert(name, raw, kinds[name], str(config_file))
    environ = os.environ if environ is None else environ
    for name, kind in kinds.items():
        var = ENV_PREFIX + name.upper()
        if var in environ:
            values[name] = _convert(name, environ[var], kind, var)
    for name, raw in (cli or {}).items():
        if raw is not None:
            if name not in kinds:
                raise ConfigError(f"--{name.replace('_', '-')}: not a serve setting")
            values[name] = raw
    for name in ("model", "gallery", "detector", "keys"):
        if isinstance(values.get(name), Path):
            values[name] = str(values[name])
    try:
        return ServeConfig(**values)
    except TypeError as e:
        raise ConfigError(f"serve config: {e}") from None
