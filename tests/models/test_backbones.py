"""The backbone registry: insightface state_dict layout for every name, shapes, dropout, precision, errors."""
import pytest
import torch
import torch.nn.functional as F

from facebce.errors import ModelError
from facebce.models import (IResNet, MobileFaceNet, build_backbone, list_backbones, load_insightface_weights,
                            register_backbone)


def _faces(n, seed=0):
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def test_registry_names_and_aliases():
    assert list_backbones() == ["r18", "r34", "r50", "r100", "r200", "mbf"]
    assert type(build_backbone("iresnet18")) is IResNet
    assert type(build_backbone("mobilefacenet")) is MobileFaceNet


@pytest.mark.parametrize("name", list_backbones())
def test_state_dict_matches_insightface_manifest(name, manifest):
    count, expected = manifest(name)
    model = build_backbone(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(expected)
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.embedding_size == 512 and model.input_size == (112, 112)


def test_iresnet_features_scale_is_frozen_at_one():
    model = build_backbone("r18")
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "features.weight")


def test_zero_init_residual_zeroes_block_bn2():
    model = build_backbone("r18", zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in model.layer1)
    assert torch.count_nonzero(build_backbone("r18").layer1[0].bn2.weight) == 64


@pytest.mark.parametrize("name", ["r18", "mbf"])
@pytest.mark.parametrize("embedding_size", [512, 128])
def test_output_shape_and_eval_determinism(name, embedding_size, randomise):
    model = randomise(build_backbone(name, embedding_size=embedding_size)).eval()
    assert model.embedding_size == embedding_size
    x = _faces(2)
    with torch.inference_mode():
        a, b = model(x), model(x)
    assert a.shape == (2, embedding_size) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # the two faces do not collapse to one embedding


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_channels_last_and_bf16_autocast(name, randomise):
    model = randomise(build_backbone(name)).eval()
    x = _faces(2, seed=1)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
        after = model(x)
        model.to(memory_format=torch.channels_last)
        cl = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, atol=1e-4, rtol=0)
    assert mixed.dtype == torch.float32  # head runs in fp32 under autocast, as insightface's fp16 path
    assert F.cosine_similarity(mixed, ref).min() > 0.99
    assert not torch.equal(mixed, ref)  # autocast really ran the trunk in bf16
    assert torch.equal(after, ref)  # autocast off again: fp32 result unchanged


def test_dropout_acts_on_flattened_features_before_fc(manifest):
    model = build_backbone("r18", dropout=0.2).eval()
    assert set(model.state_dict()) == set(manifest("r18")[1])
    seen = {}
    model.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn2", o.flatten(1).clone()))
    model.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("fc_in", i[0].clone()))
    x = _faces(1)
    with torch.no_grad():
        eval_out = model(x)
        torch.testing.assert_close(seen["fc_in"], seen["bn2"], atol=0, rtol=0)
        model.dropout.train()  # only dropout in train mode, so that BN batch statistics play no part
        train_out = model(x)
    kept = seen["fc_in"] != 0
    assert 0.18 < 1 - kept.float().mean().item() < 0.22
    torch.testing.assert_close(seen["fc_in"][kept], seen["bn2"][kept] / 0.8)
    assert not torch.allclose(train_out, eval_out)


def test_no_dropout_means_train_mode_dropout_is_identity():
    model = build_backbone("r18").eval()
    x = _faces(1)
    with torch.no_grad():
        a = model(x)
        model.dropout.train()
        assert torch.equal(model(x), a)


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="r5"), ["'r5'", "r18", "r200", "mbf"]),
    (dict(name="r18", embedding_size=0), ["embedding_size=0"]),
    (dict(name="r18", dropout=1.0), ["dropout=1.0"]),
    (dict(name="r18", widht=2), ["widht"]),
    (dict(name="mbf", dropout=0.2), ["mbf", "dropout"]),
])
def test_bad_build_arguments(kwargs, words):
    with pytest.raises(ModelError) as e:
        build_backbone(**kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_register_rejects_a_taken_name():
    with pytest.raises(ModelError, match="'r50' is already registered"):
        register_backbone("r50")(lambda embedding_size=512, dropout=0.0: None)
    with pytest.raises(ModelError, match="'iresnet50' is already registered"):
        register_backbone("my_net", "iresnet50")(lambda embedding_size=512, dropout=0.0: None)
    assert "my_net" not in list_backbones()


def test_bad_weight_files(tmp_path):
    model = build_backbone("mbf")
    with pytest.raises(ModelError, match="no such checkpoint file"):
        load_insightface_weights(model, tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"garbage\.pth: (not a weights-only checkpoint|checkpoint is truncated)"):
        load_insightface_weights(model, garbage)
    whole = tmp_path / "whole_model.pth"
    torch.save(model, whole)  # a pickled module, which weights_only=True refuses to execute
    with pytest.raises(ModelError, match="whole_model.pth: not a weights-only checkpoint: it contains "
                                         "facebce.models.mobilefacenet.MobileFaceNet"):
        load_insightface_weights(model, whole)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, nested)
    with pytest.raises(ModelError, match="expected a state_dict .* got 'state_dict', 'epoch'"):
        load_insightface_weights(model, nested)


def test_mismatched_checkpoints_name_the_keys():
    r18 = build_backbone("r18")
    with pytest.raises(ModelError) as e:
        load_insightface_weights(r18, build_backbone("r18", embedding_size=128).state_dict())
    msg = str(e.value)
    assert "shape mismatches (6)" in msg and "fc.weight (128, 25088) vs model (512, 25088)" in msg
    assert "missing" not in msg and "unexpected" not in msg

    with pytest.raises(ModelError) as e:
        load_insightface_weights(r18, build_backbone("r34").state_dict())
    msg = str(e.value)
    assert "unexpected keys (144)" in msg and "layer1.2.bn1.weight" in msg and "more)" in msg

    state = r18.state_dict()
    del state["prelu.weight"]
    with pytest.raises(ModelError, match=r"missing keys \(1\): prelu.weight"):
        load_insightface_weights(build_backbone("r18"), state)
