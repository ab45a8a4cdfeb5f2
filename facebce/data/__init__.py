"""Data layer: RecordIO (.rec/.idx/property), image folders, verification .bin, synthetic identities.

Imports nothing else of facebce but facebce.errors, .fileio and .lazy. The names below load their
module on first use: alignment, RecordIO and .bin files need no torch, the datasets do."""
from __future__ import annotations

from facebce.lazy import lazy_attributes

_LAZY = {
    **dict.fromkeys(("ImageFolderDataset", "scan_image_folder"), "facebce.data.image_folder"),
    **dict.fromkeys(("RecDataset", "read_property"), "facebce.data.rec_dataset"),
    **dict.fromkeys(("PACK_FILES", "PackSummary", "pack_image_folder"), "facebce.data.pack"),
    **dict.fromkeys(("IndexedRecordReader", "IRHeader", "RecordIOWriter", "pack_image_record",
                     "unpack_image_record"), "facebce.data.recordio"),
    **dict.fromkeys(("SyntheticFaceDataset", "SyntheticFaces", "make_pairs", "write_image_folder"),
                    "facebce.data.synthetic"),
    **dict.fromkeys(("VerificationSet", "load_bin", "save_bin"), "facebce.data.verification_bin"),
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
