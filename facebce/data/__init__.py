"""Data layer: RecordIO (.rec/.idx/property), image folders, verification .bin, synthetic identities.

Imports nothing else of facebce but facebce.errors and facebce.fileio."""
from facebce.data.image_folder import ImageFolderDataset, scan_image_folder
from facebce.data.rec_dataset import RecDataset, read_property
from facebce.data.pack import PACK_FILES, PackSummary, pack_image_folder
from facebce.data.recordio import IndexedRecordReader, IRHeader, RecordIOWriter
from facebce.data.recordio import pack_image_record, unpack_image_record
from facebce.data.synthetic import SyntheticFaceDataset, SyntheticFaces, make_pairs, write_image_folder
from facebce.data.verification_bin import VerificationSet, load_bin, save_bin
