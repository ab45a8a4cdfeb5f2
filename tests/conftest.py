"""Shared fixtures. Real data lives in ../shared/data beside the repo; tests that need it skip with a reason."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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
