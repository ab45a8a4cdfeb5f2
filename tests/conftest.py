"""Shared fixtures. Real data lives in ../shared/data beside the repo; tests that need it skip with a reason."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEBCE_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
SHARED_SPEC = SHARED / "spec"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found: {path} (put the team's shared/ folder beside the repo "
                    f"or set FACEBCE_SHARED)")
    return path


@pytest.fixture
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture
def shared_spec() -> Path:
    return _need(SHARED_SPEC)


@pytest.fixture(scope="module")
def one_torch_thread():
    """On a shared, busy CPU, torch's spinning OpenMP threads run ~20x slower than one thread
    (opt in per module with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Files that take minutes of CPU, started first: `make test` runs a file per pytest-xdist worker
# at a time, in collection order, so a long file taken last would run alone at the end.
_LONG_FIRST = ("tests/eval/test_real_lfw.py", "tests/deploy/test_gallery.py", "tests/serve/test_serve.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return _LONG_FIRST.index(path) if path in _LONG_FIRST else len(_LONG_FIRST)
    items.sort(key=rank)  # stable: every other test keeps its order
