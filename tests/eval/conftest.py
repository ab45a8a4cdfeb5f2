"""Fixtures shared by the evaluation tests."""
from __future__ import annotations

import pytest

from facebce.data.synthetic import SyntheticFaces, write_image_folder
from tests.eval.ijb_synthetic import write_synthetic_ijb


@pytest.fixture(scope="session")
def synthetic_ijb(tmp_path_factory):
    """A ~300-image synthetic IJB-C folder (40 subjects) in the exact insightface layout; read-only."""
    return write_synthetic_ijb(tmp_path_factory.mktemp("ijb"), subjects=40, seed=0)


@pytest.fixture(scope="session")
def labelled_folder(tmp_path_factory):
    """A labelled folder of aligned crops, ROOT/id_NNNN/NNNN.jpg: 12 identities x 5 images; read-only.
    Low nuisance, so a fixed random projection already tells most identities apart."""
    faces = SyntheticFaces(12, 5, seed=3, difficulty=0.1)
    return write_image_folder(faces, tmp_path_factory.mktemp("folder") / "faces")
