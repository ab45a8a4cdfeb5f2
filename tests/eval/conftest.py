"""Fixtures shared by the evaluation tests."""
from __future__ import annotations

import pytest

from tests.eval.ijb_synthetic import write_synthetic_ijb


@pytest.fixture(scope="session")
def synthetic_ijb(tmp_path_factory):
    """A ~300-image synthetic IJB-C folder (40 subjects) in the exact insightface layout; read-only."""
    return write_synthetic_ijb(tmp_path_factory.mktemp("ijb"), subjects=40, seed=0)
