"""Same weights, same numbers: our backbones against a verbatim copy of insightface's."""
import pytest
import torch

from facebce.models import build_backbone, load_insightface_weights
from tests.models import insightface_reference as insightface

THEIRS = {
    "r18": lambda: insightface.iresnet18(False, num_features=512),
    "r50": lambda: insightface.iresnet50(False, num_features=512),
    "mbf": lambda: insightface.get_mbf(False, 512),
}


def _faces(n):
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", list(THEIRS))
def test_same_outputs_as_insightface(name, randomise):
    theirs = randomise(THEIRS[name](), seed=1).eval()
    ours = build_backbone(name).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = _faces(2)
    with torch.inference_mode():
        expected = theirs(x)
        got = ours(x)
    assert expected.abs().max() > 0.1  # a meaningful scale for the tolerance below
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ddp_prefix", ["", "module."])
def test_insightface_pth_loads(tmp_path, randomise, ddp_prefix):
    theirs = randomise(THEIRS["mbf"](), seed=2).eval()
    path = tmp_path / "backbone.pth"  # what arcface_torch's train.py saves
    torch.save({ddp_prefix + k: v for k, v in theirs.state_dict().items()}, path)
    ours = load_insightface_weights(build_backbone("mbf"), path).eval()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = _faces(1)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_insightface_iresnet_init_is_reproduced():
    torch.manual_seed(3)
    theirs = insightface.iresnet18(False, num_features=128)
    torch.manual_seed(3)
    ours = build_backbone("r18", embedding_size=128)
    for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k
    assert [n for n, p in theirs.named_parameters() if not p.requires_grad] == ["features.weight"]
