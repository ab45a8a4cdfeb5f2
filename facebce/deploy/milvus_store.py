"""The Milvus gallery store: the same gallery calls over a Milvus collection, through pymilvus.

A gallery is a collection named by a URI:
- `milvus://HOST:PORT/COLLECTION` (also `milvus+https://...`): a Milvus server or cluster;
- `milvus+lite://PATH.db/COLLECTION`: the local milvus-lite server pymilvus starts for a file (the
  same gRPC API; what the tests use).

Rows: `id` (INT64 primary key, the stable external id), `vector` (unit float32, FLAT index, inner
product = cosine), `identity`, `source`, `count` and `mean_norm` (mean templates). The gallery's
settings live in the collection's properties (`facebce.format`, `facebce.mode`,
`facebce.threshold`, `facebce.next_id`). Ids are reserved by advancing `facebce.next_id` before the
rows are inserted, so a crash can skip ids but never reuse one. Milvus acknowledges a write once
its own log holds it, so a call that returned is durable; searches run at Strong consistency and
see every committed write. Milvus has no cross-client lock: run one writer per collection (the
service), any number of readers. Needs the `[milvus]` extra: pymilvus (+ milvus-lite for files).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from facebce.deploy.gallery import (GALLERY_FORMAT, MODES, Match, SearchResult, _id_array, _names, _positive_int,
                                    _sources, _threshold, escape_name)
from facebce.errors import DataFormatError, FacebceError
from facebce.fileio import unit_rows

__all__ = ["MilvusStore", "parse_uri"]

_NAME_BYTES = 65_535
_COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")
_PAGE = 10_000
_P = "facebce."


@dataclass(frozen=True)
class MilvusUri:
    client_uri: str  # what MilvusClient takes: a .db file or http(s)://host:port
    collection: str
    lite: bool


def parse_uri(spec: str) -> MilvusUri:
    """`milvus://HOST:PORT/COLL`, `milvus+https://HOST:PORT/COLL` or `milvus+lite://PATH.db/COLL`."""
    scheme, sep, rest = spec.partition("://")
    head, slash, collection = rest.rpartition("/")
    if not sep or not slash or not head or not _COLLECTION.match(collection):
        raise FacebceError(f"{spec}: expected milvus://HOST:PORT/COLLECTION or milvus+lite://PATH.db/COLLECTION "
                           f"(collection: letters, digits, _)")
    if scheme == "milvus+lite":
        if not head.endswith(".db"):
            raise FacebceError(f"{spec}: a milvus-lite file must end in .db")
        return MilvusUri(head, collection, True)
    if scheme in ("milvus", "milvus+http", "milvus+https"):
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d+", head):
            raise FacebceError(f"{spec}: expected HOST:PORT before the collection")
        return MilvusUri(("https://" if scheme == "milvus+https" else "http://") + head, collection, False)
    raise FacebceError(f"{spec}: unknown scheme {scheme!r}; use milvus:// or milvus+lite://")


def _client(uri: MilvusUri, spec: str, timeout: float):
    import logging
    # pymilvus logs each failed RPC with a traceback (and iterator notes): facebce says what failed in one line
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise FacebceError(f"{spec}: Milvus galleries need pymilvus (pip install 'facebce[milvus]')") from None
    if uri.lite:
        try:
            import milvus_lite  # noqa: F401
        except ImportError:
            raise FacebceError(f"{spec}: milvus+lite:// needs milvus-lite (pip install 'facebce[milvus]')") from None
    try:
        return MilvusClient(uri=uri.client_uri, timeout=timeout)
    except Exception as e:  # pymilvus raises MilvusException, grpc errors, ...
        raise FacebceError(f"{spec}: cannot reach Milvus ({_short(e)})") from None


def _short(e: Exception) -> str:
    text = " ".join(str(getattr(e, "message", "") or e).split())
    return text[:200] or type(e).__name__


def _milvus_name(name: str, what: str) -> str:
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise DataFormatError(f"{what} {escape_name(name)}: not valid Unicode (an undecodable file name?); "
                              f"Milvus stores UTF-8 text only") from None
    if size > _NAME_BYTES:
        raise DataFormatError(f"{what} {escape_name(name[:40])}...: {size} bytes, Milvus keeps at most {_NAME_BYTES}")
    return name


def _literal(name: str) -> str | None:
    """A Milvus expression string literal for `name`, or None when it has a character the expression
    language cannot escape (it knows \\ \" \n \r \t, not \\u)."""
    if not all(ch.isprintable() or ch in "\n\r\t" for ch in name):
        return None
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace(
        "\r", "\\r").replace("\t", "\\t") + '"'


class MilvusStore:
    """A gallery in a Milvus collection (module docstring); the calls of `open_gallery`'s result."""

    backend = "milvus"

    def __init__(self, spec: str, *, dim: int | None = None, create: bool = False, threshold: float | None = None,
                 timeout: float = 10.0, index_type: str = "flat", mode: str = "all", **options):
        self.spec = spec
        self.uri = parse_uri(spec)
        self._timeout = float(timeout)
        self.collection = self.uri.collection
        if create:
            if dim is None:
                raise FacebceError(f"{spec}: creating a gallery needs dim= (the embedding size)")
            if index_type != "flat":
                raise FacebceError(f"{spec}: index {index_type!r}: a Milvus gallery uses Milvus's own index "
                                   f"(FLAT here); choose ANN indexes in Milvus")
            if mode not in MODES:
                raise FacebceError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
            dim = _positive_int(dim, "dim")
            threshold = None if threshold is None else _threshold(threshold, "threshold")
        self._c = _client(self.uri, spec, self._timeout)
        try:
            if create:
                self._create(dim, mode, threshold)
            self._read_settings()
        except BaseException:
            self._c.close()
            raise
        if dim is not None and self.dim != dim:
            self._c.close()
            raise DataFormatError(f"{spec}: collection vectors are {self.dim}-d, the model gives {dim}-d")
        if not create and threshold is not None and self._threshold != _threshold(threshold, "threshold"):
            raise FacebceError(f"threshold={threshold}: the gallery's is {self._threshold}; use set_threshold")

    # ---- setup ------------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FacebceError:
            raise
        except Exception as e:
            raise FacebceError(f"{self.spec}: Milvus {what} failed ({_short(e)})") from None

    def _create(self, dim: int, mode: str, threshold: float | None) -> None:
        from pymilvus import DataType, MilvusClient
        if self._call("has_collection", self._c.has_collection, self.collection):
            raise FacebceError(f"{self.spec}: a gallery already exists here; use 'gallery add' or another collection")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description="facebce gallery")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("identity", DataType.VARCHAR, max_length=_NAME_BYTES)
        schema.add_field("source", DataType.VARCHAR, max_length=_NAME_BYTES, nullable=True)
        schema.add_field("count", DataType.INT64)
        schema.add_field("mean_norm", DataType.DOUBLE)
        index = self._c.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="IP")
        self._call("create_collection", self._c.create_collection, self.collection, schema=schema,
                   index_params=index, consistency_level="Strong")
        self._set({"format": GALLERY_FORMAT, "mode": mode, "threshold": "" if threshold is None else repr(threshold),
                   "next_id": "0"})

    def _set(self, props: dict) -> None:
        self._call("alter_collection_properties", self._c.alter_collection_properties, self.collection,
                   properties={_P + k: str(v) for k, v in props.items()})

    def _read_settings(self) -> None:
        if not self._call("has_collection", self._c.has_collection, self.collection):
            raise FacebceError(f"{self.spec}: no gallery here (create one with 'facebce gallery build')")
        desc = self._call("describe_collection", self._c.describe_collection, self.collection)
        props = {k[len(_P):]: v for k, v in (desc.get("properties") or {}).items() if k.startswith(_P)}
        if props.get("format") != GALLERY_FORMAT:
            raise DataFormatError(f"{self.spec}: collection {self.collection!r} is not a facebce gallery "
                                  f"(no {_P}format property)")
        fields = {f["name"]: f for f in desc.get("fields", [])}
        try:
            self.dim = int(fields["vector"]["params"]["dim"])
            self.mode = props["mode"]
            self._threshold = None if props.get("threshold", "") == "" else float(props["threshold"])
            self._next_id = int(props["next_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"{self.spec}: malformed facebce properties ({type(e).__name__}: {e})") from None
        if self.mode not in MODES:
            raise DataFormatError(f"{self.spec}: {_P}mode={self.mode!r}")

    # ---- reading ----------------------------------------------------------------------------------
    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_c", None) is not None:
            self._c.close()
            self._c = None

    def refresh(self) -> bool:
        """Re-read the settings (threshold); rows need nothing: searches run at Strong consistency."""
        before = (self._threshold, self._next_id)
        self._read_settings()
        return (self._threshold, self._next_id) != before

    @property
    def threshold(self) -> float | None:
        self._read_settings()
        return self._threshold

    def __len__(self) -> int:
        rows = self._call("query", self._c.query, self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def _rows(self, fields: list[str], names: list[str] | None = None) -> list[dict]:
        """Every row (or the rows whose identity is in `names`), with `fields` and the id."""
        literals = None if names is None else [_literal(n) for n in names]
        if literals is not None and all(lit is not None for lit in literals):
            filter = f"identity in [{', '.join(literals)}]"
        else:  # a name Milvus's expression language cannot spell: filter here
            filter = "id >= 0"
            if names is not None and "identity" not in fields:
                fields = [*fields, "identity"]
        it = self._call("query_iterator", self._c.query_iterator, self.collection, batch_size=_PAGE,
                        filter=filter, output_fields=fields)
        out = []
        try:
            while True:
                page = self._call("query_iterator", it.next)
                if not page:
                    break
                out.extend(page)
        finally:
            it.close()
        if names is not None:
            wanted = set(names)
            out = [r for r in out if r["identity"] in wanted]
        return out

    @property
    def identities(self) -> list[str]:
        return sorted({r["identity"] for r in self._rows(["identity"])})

    @property
    def ids(self) -> np.ndarray:
        return np.array(sorted(r["id"] for r in self._rows(["id"])), dtype=np.int64)

    def _record(self, r: dict) -> dict:
        record = {"id": int(r["id"]), "identity": r["identity"], "source": r.get("source")}
        if self.mode == "mean":
            record.update(count=int(r["count"]), mean_norm=float(r["mean_norm"]))
        return record

    def entry(self, id: int) -> dict:
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
            raise FacebceError(f"id={id!r}: not in the gallery")
        rows = self._call("query", self._c.query, self.collection, ids=[int(id)],
                          output_fields=["identity", "source", "count", "mean_norm"])
        if not rows:
            raise FacebceError(f"id={id!r}: not in the gallery")
        return self._record(rows[0])

    def entries(self) -> list[dict]:
        rows = self._rows(["identity", "source", "count", "mean_norm"])
        return [self._record(r) for r in sorted(rows, key=lambda r: r["id"])]

    def vectors(self, ids) -> np.ndarray:
        ids = _id_array(ids)
        if not ids.size:
            return np.empty((0, self.dim), np.float32)
        got = {}
        for s in range(0, ids.size, _PAGE):
            rows = self._call("query", self._c.query, self.collection, ids=ids[s:s + _PAGE].tolist(),
                              output_fields=["vector"])
            got.update((int(r["id"]), r["vector"]) for r in rows)
        missing = [int(i) for i in ids if int(i) not in got]
        if missing:
            raise FacebceError(f"ids: not in the gallery: {missing[:5]}")
        return np.asarray([got[int(i)] for i in ids], dtype=np.float32)

    def info(self) -> dict:
        self._read_settings()
        return {"format": GALLERY_FORMAT, "backend": self.backend, "uri": self.spec, "collection": self.collection,
                "dim": self.dim, "metric": "inner_product", "index_type": "flat", "mode": self.mode,
                "threshold": self._threshold, "entries": len(self), "identities": len(self.identities),
                "next_id": self._next_id, "exact_vectors": True}

    def search(self, queries, k: int = 5, threshold: float | None = None, *, nprobe: int | None = None):
        """Top-k and the open-set decision (best cosine > threshold), as the FAISS gallery decides."""
        t = self.threshold if threshold is None else _threshold(threshold, "threshold")
        if t is None:
            raise FacebceError("threshold: the gallery has none; pass threshold= or set one "
                               "(facebce gallery set-threshold)")
        q = unit_rows(queries, "queries", dim=self.dim)
        k = _positive_int(k, "k")
        if not len(self):
            raise FacebceError("search: the gallery is empty; add embeddings first")
        hits = self._call("search", self._c.search, self.collection, data=q.tolist(), limit=k,
                          output_fields=["identity", "source"], search_params={"metric_type": "IP"})
        results = []
        for row in hits:
            matches = [Match(int(h["id"]), h["entity"]["identity"], float(h["distance"]), h["entity"].get("source"))
                       for h in row]
            best = matches[0] if matches else None
            known = best is not None and best.score > t
            results.append(SearchResult(matches, best.identity if known else None,
                                        best.score if best else float("-inf"), t))
        return results

    # ---- mutations --------------------------------------------------------------------------------
    def _reserve(self, n: int) -> int:
        self._read_settings()
        first = self._next_id
        self._set({"next_id": first + n})
        self._next_id = first + n
        return first

    def _insert(self, rows: list[dict], upsert: bool = False) -> None:
        fn = self._c.upsert if upsert else self._c.insert
        for s in range(0, len(rows), _PAGE):
            self._call("upsert" if upsert else "insert", fn, self.collection, rows[s:s + _PAGE])

    def add(self, embeddings, identities, sources=None) -> np.ndarray:
        """Enrol rows (any positive norm; stored normalised); returns their ids. Durable when it returns."""
        x = unit_rows(embeddings, "embeddings", dim=self.dim)
        if not len(x):
            raise DataFormatError("embeddings: no rows to add")
        names = [_milvus_name(n, "identity") for n in _names(identities, len(x))]
        srcs = [None if s is None else _milvus_name(s, "source") for s in _sources(sources, len(x))]
        if self.mode == "mean":
            return self._add_means(x, names)
        first = self._reserve(len(x))
        ids = np.arange(first, first + len(x), dtype=np.int64)
        self._insert([{"id": int(i), "vector": v.tolist(), "identity": n, "source": s, "count": 1, "mean_norm": 1.0}
                      for i, v, n, s in zip(ids, x, names, srcs)])
        return ids

    def _add_means(self, x: np.ndarray, names: list[str]) -> np.ndarray:
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            rows.setdefault(name, []).append(row)
        old = {r["identity"]: r for r in self._rows(["identity", "vector", "count", "mean_norm"],
                                                    names=list(rows))}
        fresh = [n for n in rows if n not in old]
        first = self._reserve(len(fresh)) if fresh else 0
        new_id = dict(zip(fresh, range(first, first + len(fresh))))
        out, ids = [], []
        for name, r in rows.items():
            total, count = x[r].sum(axis=0, dtype=np.float64), len(r)
            if name in old:
                prev = old[name]
                total += np.asarray(prev["vector"], np.float64) * float(prev["mean_norm"]) * int(prev["count"])
                count += int(prev["count"])
            norm = float(np.linalg.norm(total))
            if norm == 0:
                raise FacebceError(f"identities: the embeddings of {escape_name(name)} sum to zero; no mean template")
            i = int(old[name]["id"]) if name in old else new_id[name]
            ids.append(i)
            out.append({"id": i, "vector": (total / norm).astype(np.float32).tolist(), "identity": name,
                        "source": None, "count": count, "mean_norm": norm / count})
        self._insert(out, upsert=True)
        return np.array(ids, dtype=np.int64)

    def remove(self, ids=None, identity=None) -> int:
        """Delete entries by id or every entry of one or more identities; returns how many."""
        if (ids is None) == (identity is None):
            raise FacebceError("remove: pass exactly one of ids= or identity=")
        if identity is not None:
            wanted = [identity] if isinstance(identity, str) else list(identity)
            rows = self._rows(["identity"], names=wanted)
            unknown = sorted(set(wanted) - {r["identity"] for r in rows})
            if unknown:
                raise FacebceError(f"identity: not in the gallery: {', '.join(map(escape_name, unknown[:5]))}")
            drop = sorted(int(r["id"]) for r in rows)
        else:
            drop = sorted(set(_id_array(ids).tolist()))
            found = {int(r["id"]) for r in self._call("query", self._c.query, self.collection, ids=drop,
                                                      output_fields=["id"])} if drop else set()
            missing = [i for i in drop if i not in found]
            if missing:
                raise FacebceError(f"ids: not in the gallery: {missing[:5]}")
        for s in range(0, len(drop), _PAGE):
            self._call("delete", self._c.delete, self.collection, ids=drop[s:s + _PAGE])
        return len(drop)

    def rename(self, old: str, new: str) -> int:
        new = _milvus_name(_names([new], 1)[0], "identity")
        rows = self._rows(["identity", "source", "vector", "count", "mean_norm"], names=[old])
        if not rows:
            raise FacebceError(f"identity: not in the gallery: {escape_name(old)}")
        self._insert([{**r, "identity": new} for r in rows], upsert=True)
        return len(rows)

    def set_threshold(self, threshold: float | None) -> None:
        t = None if threshold is None else _threshold(threshold, "threshold")
        self._set({"threshold": "" if t is None else repr(t)})
        self._threshold = t

    def import_entries(self, records: list[dict], vectors) -> int:
        """Insert entries as they are (ids, identities, sources, template counts): what migrate copies."""
        x = unit_rows(vectors, "vectors", dim=self.dim, rows=len(records))
        rows = [{"id": int(r["id"]), "vector": v.tolist(), "identity": _milvus_name(r["identity"], "identity"),
                 "source": None if r.get("source") is None else _milvus_name(r["source"], "source"),
                 "count": int(r.get("count", 1)), "mean_norm": float(r.get("mean_norm", 1.0))}
                for r, v in zip(records, x)]
        if rows:
            ids = [r["id"] for r in rows]
            clash = self._call("query", self._c.query, self.collection, ids=ids, output_fields=["id"])
            if clash or len(set(ids)) != len(ids):
                raise FacebceError("entries: ids clash with each other or with the gallery's")
            self._read_settings()
            self._set({"next_id": max(self._next_id, max(ids) + 1)})
            self._insert(rows)
        return len(rows)
