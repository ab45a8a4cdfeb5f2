"""Where the shipped protocols and recipes live: inside the package, found with importlib.resources.

The files' source of truth is the checkout's top-level `eval_protocols/` and `recipes/` folders
(what users read and copy); `facebce/_shipped/protocols` and `facebce/_shipped/recipes` are
symbolic links to them, so an editable install reads them in place and a wheel or sdist build
copies them into the package as package data. Code never looks for them relative to the source
tree. Leaf module: imports only `facebce.errors`.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from facebce.errors import ConfigError

KINDS = ("protocols", "recipes")


def shipped_dir(kind: str) -> Path:
    """The folder of shipped `kind` files ("protocols" or "recipes") as a filesystem path."""
    if kind not in KINDS:
        raise ValueError(f"shipped_dir: kind {kind!r}, expected one of {KINDS}")
    folder = resources.files("facebce").joinpath("_shipped", kind)
    if not isinstance(folder, Path):  # e.g. a zip import: protocols are read as files, so refuse clearly
        raise ConfigError(f"facebce's shipped {kind} are not on the filesystem ({folder}); install facebce "
                          "as files (pip install), not as a zip")
    if not folder.is_dir():
        raise ConfigError(f"facebce's shipped {kind} folder is missing ({folder}): a broken install? "
                          "Reinstall facebce")
    return folder


def shipped_names(kind: str) -> list[str]:
    """Names (file stems) of the shipped `kind` YAML files, sorted."""
    return sorted(p.stem for p in shipped_dir(kind).glob("*.yaml"))


def shipped_file(kind: str, name: str) -> Path | None:
    """The shipped file `name` (with or without `.yaml`) of `kind`, or None when there is none.

    Only bare names are looked up: a name with a folder part is never a shipped file.
    """
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        return None
    path = shipped_dir(kind) / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return path if path.is_file() else None


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A recipe given on the command line: an existing file path, else a shipped recipe's name.

    `demo_synthetic`, `demo_synthetic.yaml` and `recipes/demo_synthetic.yaml` (from a checkout)
    all work; anything else is a one-line ConfigError naming what was given.
    """
    given = Path(name_or_path)
    if given.is_file():
        return given
    if given.exists():
        raise ConfigError(f"recipe: {given} is not a file")
    shipped = shipped_file("recipes", str(name_or_path))
    if shipped is not None:
        return shipped
    raise ConfigError(f"recipe: {name_or_path}: no such file, nor a shipped recipe "
                      f"(shipped: {', '.join(shipped_names('recipes'))})")


def resolve_base(base: str, recipe: Path) -> Path:
    """A recipe's `base:` value: relative to the recipe's folder first, else the shipped recipe of that name."""
    local = recipe.parent / base
    if local.is_file():
        return local
    shipped = shipped_file("recipes", base)
    if shipped is not None:
        return shipped
    raise ConfigError(f"base: {base!r} in {recipe}: not found beside the recipe ({local}) "
                      "nor among the shipped recipes")
