"""Evaluation protocols are data: one small YAML file each, shipped inside the package (source: the
checkout's `eval_protocols/`, found through facebce.resources) and in any directory or file the
user adds, so a new benchmark needs no code (style.md: protocols are data).

Three kinds exist:
- `pairs_bin`: an insightface verification `.bin` (LFW, CFP-FP, AgeDB-30, ...);
- `pairs_list`: a text/CSV file of `path1 path2 label` lines with images relative to a root;
- `ijb`: the IJB-B/C meta files and loose crops of insightface's IJB_release layout;
- `open_set_folder`: a labelled folder of aligned crops `ROOT/<identity>/*.jpg`, split into a
  gallery and probes with identities that are never enrolled (open-set 1:N identification);
- `classification_folder`: a labelled val set `ROOT/<identity>/*.jpg` of a training run's own classes
  (sorted identity folders = class ids 0..N-1), scored against the run's class centres (uniform
  classification: SW / Uni / class-wise accuracy, t*, |bias - t*|).
Every key is checked against its kind's schema when the file is read, so a typo is a ConfigError
naming the file and the key instead of a silently ignored setting.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from facebce.errors import ConfigError, DataFormatError
from facebce.fileio import load_yaml_file
from facebce.resources import shipped_dir

PATH_ENV = "FACEBCE_PROTOCOLS"  # extra protocol dirs/files, os.pathsep-separated
KINDS = ("pairs_bin", "pairs_list", "ijb", "open_set_folder", "classification_folder")
METRICS = ("ten_fold", "tar_at_far", "identification")  # best/global threshold are always reported
FOLD_SCHEMES = ("contiguous",)  # insightface KFold(shuffle=False); file order defines the folds
DEFAULT_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

_REQUIRED, _OPTIONAL = True, False


def _str(v):
    return isinstance(v, str) and v != ""


def _count(v):
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0)


def _bool(v):
    return isinstance(v, bool)


def _metrics(v):
    return isinstance(v, list) and all(m in METRICS for m in v)


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _fraction(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


# key -> (required, check, default, what the check wants)
_COMMON = {
    "name": (_REQUIRED, _str, None, "a non-empty string"),
    "kind": (_REQUIRED, lambda v: v in KINDS, None, f"one of {', '.join(KINDS)}"),
    "description": (_OPTIONAL, _str, "", "a string"),
    "metrics": (_OPTIONAL, _metrics, ["ten_fold", "tar_at_far"], f"a list drawn from {', '.join(METRICS)}"),
}
_PAIRS = {
    "file": (_REQUIRED, _str, None, "a file name"),
    "pairs": (_OPTIONAL, _count, None, "a positive integer or null (expected pair count)"),
    "folds": (_OPTIONAL, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, 10,
              "an integer >= 1"),
    "fold_scheme": (_OPTIONAL, lambda v: v in FOLD_SCHEMES, "contiguous", f"one of {', '.join(FOLD_SCHEMES)}"),
    "image_size": (_OPTIONAL, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 16, 112,
                   "an integer >= 16"),
}
_SCHEMAS = {
    "pairs_bin": {**_COMMON, **_PAIRS},
    "pairs_list": {**_COMMON, **_PAIRS,
                   "root": (_OPTIONAL, _str, ".", "a folder relative to the pairs file"),
                   "delimiter": (_OPTIONAL, lambda v: v in ("auto", "whitespace", "comma"), "auto",
                                 "auto, whitespace or comma"),
                   "header": (_OPTIONAL, _bool, False, "true or false")},
    "ijb": {**_COMMON,
            "folder": (_REQUIRED, _str, None, "the data-set folder name (IJBB, IJBC)"),
            "meta_dir": (_OPTIONAL, _str, "meta", "a folder name"),
            "image_dir": (_OPTIONAL, _str, "loose_crop", "a folder name"),
            "meta_prefix": (_REQUIRED, _str, None, "the meta file prefix (ijbb, ijbc)"),
            "files": (_OPTIONAL, lambda v: isinstance(v, dict), {}, "a mapping"),
            "far_targets": (_OPTIONAL, lambda v: isinstance(v, list) and len(v) > 0, list(DEFAULT_FAR_TARGETS),
                            "a non-empty list of numbers in (0, 1]"),
            "template": (_OPTIONAL, lambda v: isinstance(v, dict), {}, "a mapping"),
            "expected": (_OPTIONAL, lambda v: isinstance(v, dict), {}, "a mapping"),
            },
    "open_set_folder": {**_COMMON,
                        "metrics": (_OPTIONAL, lambda v: v == ["identification"], ["identification"],
                                    "[identification]"),
                        "image_size": _PAIRS["image_size"],
                        "enrol_per_identity": (_OPTIONAL, _positive_int, 1,
                                               "an integer >= 1 (images per known identity in the gallery)"),
                        "unknown_fraction": (_OPTIONAL, _fraction, 0.3, "a number in [0, 1)"),
                        "seed": (_OPTIONAL, lambda v: _positive_int(v) or v == 0, 0, "an integer >= 0"),
                        "fpir_targets": (_OPTIONAL, lambda v: isinstance(v, list) and len(v) > 0,
                                         [1e-3, 1e-2, 1e-1], "a non-empty list of numbers in (0, 1]"),
                        "ranks": (_OPTIONAL, lambda v: isinstance(v, list) and len(v) > 0
                                  and all(map(_positive_int, v)), [1, 5], "a non-empty list of integers >= 1"),
                        },
    "classification_folder": {**_COMMON,
                              "metrics": (_OPTIONAL, lambda v: v == ["uniform"], ["uniform"], "[uniform]"),
                              "image_size": _PAIRS["image_size"],
                              "max_per_class": (_OPTIONAL, lambda v: v is None or _positive_int(v), None,
                                                "an integer >= 1 or null (all images)"),
                              },
}
_IJB_FILES = {  # key -> default name from the prefix
    "tid_mid": "{prefix}_face_tid_mid.txt",
    "five_points": "{prefix}_name_5pts_score.txt",
    "pairs": "{prefix}_template_pair_label.txt",
    "galleries": None,  # list of CSV names; none -> no 1:N
    "probes": None,
}
_IJB_TEMPLATE = {
    "flip": (lambda v: v in ("sum", "concat", "none"), "sum", "sum, concat or none"),
    "image_l2norm": (_bool, False, "true or false"),
    "face_score_weight": (_bool, True, "true or false"),
}
_IJB_EXPECTED = ("rows", "templates", "pairs", "genuine")


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: its kind and settings (every schema key, defaults filled in)."""

    name: str
    kind: str
    source: Path  # the YAML file it came from
    settings: Mapping

    def __getitem__(self, key: str):
        return self.settings[key]

    @property
    def description(self) -> str:
        return self.settings["description"]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.settings["metrics"])


def load_protocol_file(path: str | os.PathLike) -> Protocol:
    """Read and validate one protocol YAML; any problem is a ConfigError naming the file and key."""
    path = Path(path)
    try:
        raw = load_yaml_file(path, what="protocol file")  # one line: missing, not UTF-8, YAML syntax
    except DataFormatError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a protocol file must be a mapping of keys, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{path}: key 'kind' is {kind!r}, expected one of {', '.join(KINDS)}")
    settings = _validated(raw, _SCHEMAS[kind], path)
    if kind == "ijb":
        settings = _validated_ijb(settings, path)
    elif kind == "open_set_folder":
        settings = {**settings, "fpir_targets": _rates(settings, "fpir_targets", path),
                    "ranks": sorted(set(settings["ranks"]))}
    return Protocol(settings["name"], kind, path, MappingProxyType(settings))


def _validated(raw: dict, schema: dict, path: Path) -> dict:
    unknown = [k for k in raw if k not in schema]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} for kind {raw['kind']!r} "
                          f"(valid keys: {', '.join(schema)})")
    out = {}
    for key, (required, check, default, wants) in schema.items():
        if key not in raw:
            if required:
                raise ConfigError(f"{path}: missing required key {key!r} ({wants})")
            out[key] = default
        elif not check(raw[key]):
            raise ConfigError(f"{path}: key {key!r} is {raw[key]!r}, expected {wants}")
        else:
            out[key] = raw[key]
    return out


def _validated_ijb(settings: dict, path: Path) -> dict:
    """Fill the IJB sub-mappings (files, template, expected) and check their keys and values."""
    files = dict(settings["files"])
    for key in files:
        if key not in _IJB_FILES:
            raise ConfigError(f"{path}: unknown key 'files.{key}' (valid keys: {', '.join(_IJB_FILES)})")
    for key, default in _IJB_FILES.items():
        if key not in files:
            files[key] = default.format(prefix=settings["meta_prefix"]) if default else None
    if files["galleries"] is not None and not (isinstance(files["galleries"], list)
                                               and all(_str(g) for g in files["galleries"])):
        raise ConfigError(f"{path}: key 'files.galleries' is {files['galleries']!r}, expected a list of file names")
    if (files["galleries"] is None) != (files["probes"] is None):
        raise ConfigError(f"{path}: keys 'files.galleries' and 'files.probes' go together (1:N needs both)")
    template = dict(settings["template"])
    for key in template:
        if key not in _IJB_TEMPLATE:
            raise ConfigError(f"{path}: unknown key 'template.{key}' (valid keys: {', '.join(_IJB_TEMPLATE)})")
    for key, (check, default, wants) in _IJB_TEMPLATE.items():
        template.setdefault(key, default)
        if not check(template[key]):
            raise ConfigError(f"{path}: key 'template.{key}' is {template[key]!r}, expected {wants}")
    for key, value in settings["expected"].items():
        if key not in _IJB_EXPECTED:
            raise ConfigError(f"{path}: unknown key 'expected.{key}' (valid keys: {', '.join(_IJB_EXPECTED)})")
        if not _count(value):
            raise ConfigError(f"{path}: key 'expected.{key}' is {value!r}, expected a positive integer")
    return {**settings, "files": files, "template": template, "far_targets": _rates(settings, "far_targets", path)}


def _rates(settings: dict, key: str, path: Path) -> list[float]:
    """A list of target rates in (0, 1] as floats."""
    try:  # PyYAML reads 1e-6 (no dot) as a string; accept it as the number it means
        targets = [float(t) for t in settings[key]]
    except (TypeError, ValueError):
        targets = []
    if not targets or not all(0 < t <= 1 for t in targets):
        raise ConfigError(f"{path}: key {key!r} is {settings[key]!r}, expected numbers in (0, 1]")
    return targets


def _protocol_files(where: Path) -> list[Path]:
    if where.is_dir():
        return sorted(p for p in where.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if where.is_file():
        return [where]
    raise ConfigError(f"{where}: no such protocol file or folder")


def _search_path(extra: Iterable[str | os.PathLike]) -> list[Path]:
    """Shipped protocols first, then FACEBCE_PROTOCOLS, then `extra`: a later source overrides a name."""
    env = [Path(p) for p in os.environ.get(PATH_ENV, "").split(os.pathsep) if p]
    return [shipped_dir("protocols"), *env, *(Path(p) for p in extra)]


def load_registry(extra: Iterable[str | os.PathLike] = ()) -> dict[str, Protocol]:
    """Every protocol by name. A later source replaces an earlier one of the same name (a user's
    `lfw.yaml` overrides the shipped one); two files of one source defining a name is an error."""
    registry: dict[str, Protocol] = {}
    for where in _search_path(extra):
        seen: dict[str, Path] = {}
        for path in _protocol_files(where):
            protocol = load_protocol_file(path)
            if protocol.name in seen:
                raise ConfigError(f"{path}: protocol name {protocol.name!r} is also defined in {seen[protocol.name]}")
            seen[protocol.name] = path
            registry[protocol.name] = protocol
    return registry


def list_protocols(extra: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Names of all protocols (shipped, FACEBCE_PROTOCOLS, then `extra` dirs or YAML files), sorted."""
    return sorted(load_registry(extra))


def get_protocol(name: str, extra: Iterable[str | os.PathLike] = ()) -> Protocol:
    """The protocol called `name`; `name` may also be the path of a protocol YAML file."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return load_protocol_file(name)
    registry = load_registry(extra)
    if name not in registry:
        raise ConfigError(f"unknown protocol {name!r}; known: {', '.join(sorted(registry))} "
                          f"(add a YAML file to a folder given with --protocols or {PATH_ENV})")
    return registry[name]


def describe_protocols(extra: Iterable[str | os.PathLike] = ()) -> str:
    """One line per protocol (name, kind, default data file, description, source): `facebce eval --list`."""
    rows = []
    for name, p in sorted(load_registry(extra).items()):
        data = (p["folder"] if p.kind == "ijb" else "ROOT/<id>/*.jpg"
                if p.kind in ("open_set_folder", "classification_folder") else p["file"])
        rows.append(f"{name:15} {p.kind:15} {data:16} {p.description}  [{p.source}]")
    return "\n".join(rows)
