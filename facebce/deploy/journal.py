"""The gallery's write-ahead journal: checksummed, numbered records appended and fsynced one at a time.

File layout: a 32-byte header (`FBCJ`, format version u32, the sequence number of its first record
u64, the 16-byte generation of the checkpoint it continues), then frames. A frame is
`length u32 | crc32 u32 | seq u64 | payload`, the CRC covering seq and payload; the payload is
`json_length u32 | JSON (ASCII: every string escaped, so any name survives exactly) | raw bytes`
(e.g. float32 vectors). A frame is written with one `write` and fsynced before
`append` returns, so a record whose append returned is on disk, and a crash leaves at most one torn
frame, at the end.

Reading stops at the first frame that is not whole. Whether that is a torn tail (a crash mid-append:
the caller truncates it, holding the writers' lock) or a record still being written by another
process (a reader without the lock just stops there) is the caller's call; a damaged frame followed by
more frames, or a frame out of sequence, is a DataFormatError naming the file and the record.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from facebce.errors import DataFormatError
from facebce.fileio import atomic_write_bytes

__all__ = ["Journal", "Record", "Tail", "create_journal", "read_journal"]

MAGIC = b"FBCJ"
VERSION = 1
_HEADER = struct.Struct("<4sIQ16s")
_FRAME = struct.Struct("<IIQ")  # payload length, crc32(seq + payload), seq
_JSON_LEN = struct.Struct("<I")
MAX_RECORD_BYTES = 1 << 31  # a frame claiming more is damage, not data


@dataclass(frozen=True)
class Record:
    seq: int
    meta: dict
    blob: bytes
    offset: int  # where the frame starts
    end: int  # where the next frame starts


@dataclass(frozen=True)
class Tail:
    """The end of what could be read: records, the offset after the last whole one, and what stopped it."""

    base_seq: int
    generation: bytes
    records: list[Record]
    end: int
    size: int  # bytes in the file when read
    torn: str | None  # why the bytes after `end` are not a record (None: the file ends at `end`)


def create_journal(path: str | os.PathLike, base_seq: int, generation: bytes) -> None:
    """Write an empty journal whose first record will be `base_seq`, continuing the checkpoint of
    `generation` (atomically, replacing any journal there)."""
    atomic_write_bytes(path, _HEADER.pack(MAGIC, VERSION, int(base_seq), generation))


def encode(seq: int, meta: dict, blob: bytes = b"") -> bytes:
    text = json.dumps(meta, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    payload = _JSON_LEN.pack(len(text)) + text + blob
    seq_bytes = struct.pack("<Q", seq)
    return _FRAME.pack(len(payload), zlib.crc32(seq_bytes + payload), seq) + payload


def read_journal(path: str | os.PathLike, f=None, *, offset: int | None = None, next_seq: int | None = None) -> Tail:
    """Read the header and the whole records from `offset` (default: right after the header), from the
    open binary file `f` when given (so the caller can check which file it is), else from `path`.
    `next_seq`: the sequence number the first record read must carry (numbering is contiguous)."""
    path = Path(path)
    try:
        if f is None:
            with open(path, "rb") as own:
                return read_journal(path, own, offset=offset, next_seq=next_seq)
        f.seek(0)
        base_seq, generation = _check_header(path, f.read(_HEADER.size))
        offset = _HEADER.size if offset is None else offset
        f.seek(offset)
        data = f.read()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read the gallery journal ({e.strerror or e})") from None
    records: list[Record] = []
    pos, size = 0, offset + len(data)
    expect = base_seq if next_seq is None else next_seq
    while pos < len(data):
        where = f"{path}: record {expect} (byte {offset + pos})"
        if len(data) - pos < _FRAME.size:
            return Tail(base_seq, generation, records, offset + pos, size, f"{where}: header cut short")
        length, crc, seq = _FRAME.unpack_from(data, pos)
        if length > MAX_RECORD_BYTES or length < _JSON_LEN.size:
            if _nothing_after(data, pos):
                return Tail(base_seq, generation, records, offset + pos, size, f"{where}: torn header")
            raise DataFormatError(f"{where}: bad record length {length}")
        start, stop = pos + _FRAME.size, pos + _FRAME.size + length
        if stop > len(data):
            return Tail(base_seq, generation, records, offset + pos, size,
                        f"{where}: cut short ({len(data) - start} of {length} bytes)")
        payload = data[start:stop]
        if zlib.crc32(struct.pack("<Q", seq) + payload) != crc:
            if stop == len(data):  # the last frame, whole length but damaged: a torn write
                return Tail(base_seq, generation, records, offset + pos, size,
                            f"{where}: checksum mismatch in the last record")
            raise DataFormatError(f"{where}: checksum mismatch (the journal is damaged before its end)")
        if seq != expect:
            raise DataFormatError(f"{where}: carries sequence number {seq}, expected {expect}")
        (json_len,) = _JSON_LEN.unpack_from(payload)
        try:
            meta = json.loads(payload[_JSON_LEN.size:_JSON_LEN.size + json_len].decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataFormatError(f"{where}: record is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("op"), str):
            raise DataFormatError(f"{where}: record has no 'op'")
        records.append(Record(seq, meta, bytes(payload[_JSON_LEN.size + json_len:]), offset + pos, offset + stop))
        pos, expect = stop, expect + 1
    return Tail(base_seq, generation, records, offset + pos, size, None)


def _nothing_after(data: bytes, pos: int) -> bool:
    """A frame header that makes no sense is a torn tail only if nothing but zeros could follow it."""
    return not any(data[pos + _FRAME.size:])


def _check_header(path: Path, head: bytes) -> tuple[int, bytes]:
    if len(head) < _HEADER.size:
        raise DataFormatError(f"{path}: not a facebce gallery journal (header is {len(head)} bytes)")
    magic, version, base, generation = _HEADER.unpack(head)
    if magic != MAGIC:
        raise DataFormatError(f"{path}: not a facebce gallery journal (magic {magic!r})")
    if version != VERSION:
        raise DataFormatError(f"{path}: gallery journal version {version}; this facebce reads {VERSION}")
    return base, generation


class Journal:
    """An open journal for appending (the caller holds the writers' lock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, seq: int, meta: dict, blob: bytes = b"") -> int:
        """Append one record and fsync it; returns the file size after it."""
        frame = encode(seq, meta, blob)
        view, written = memoryview(frame), 0
        while written < len(frame):
            written += os.write(self._fd, view[written:])
        os.fsync(self._fd)
        return os.fstat(self._fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
