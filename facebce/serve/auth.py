"""API keys for `facebce serve`: a JSON keys file holding only salted hashes, and scopes.

A key is `fbk_` + 32 random bytes (URL-safe base64), printed once by `add_key`. The file keeps, per
key, its name, scope, a random 16-byte salt and HMAC-SHA256(salt, key): high-entropy keys need no
slow password hash, and a stolen file gives no key. Checking a presented key computes its digest
under every stored salt and compares each with `hmac.compare_digest`, without stopping at a match,
so the time taken says nothing about which key (or how much of one) matched.

Scopes, each including the ones before it: read (embed, verify, identify), enrol (+ add and delete
faces), admin (+ the threshold: per request and the gallery's; the key list).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from facebce.errors import ConfigError
from facebce.fileio import atomic_write_text

__all__ = ["KEYS_FORMAT", "SCOPES", "ApiKey", "KeyStore", "add_key", "scope_allows"]

KEYS_FORMAT = "facebce-serve-keys"
SCOPES = ("read", "enrol", "admin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def scope_allows(granted: str, needed: str) -> bool:
    return SCOPES.index(granted) >= SCOPES.index(needed)


def _digest(salt: bytes, key: str) -> str:
    return hmac.new(salt, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    scope: str
    salt: str  # hex
    hash: str  # hex HMAC-SHA256(salt, key)
    created: str = ""


class KeyStore:
    """The keys of one file; `check(key)` -> the ApiKey it is, or None. Re-reads the file when it
    changes on disk, so keys added with `facebce serve keys add` work without a restart."""

    def __init__(self, path: str | os.PathLike, keys: list[ApiKey], stamp=None):
        self.path, self._keys, self._stamp = Path(path), keys, stamp
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> list[ApiKey]:
        return list(self._keys)

    @classmethod
    def load(cls, path: str | os.PathLike, *, missing_ok: bool = False) -> KeyStore:
        path = Path(path)
        try:
            st = path.stat()
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            if missing_ok:
                return cls(path, [])
            raise ConfigError(f"{path}: no such keys file (create one with 'facebce serve keys add NAME "
                              f"--scope admin --keys {path}')") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the keys file ({e})") from None
        return cls(path, _parse(text, path), (st.st_mtime_ns, st.st_size, st.st_ino))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return
        with self._lock:
            self._checked_at = now
            try:
                st = self.path.stat()
            except OSError:
                return  # keep the keys we have; a vanished file does not open the server
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                try:
                    self._keys = _parse(self.path.read_bytes().decode("utf-8"), self.path)
                    self._stamp = stamp
                except (OSError, UnicodeDecodeError, ConfigError):
                    pass  # a half-edited file: keep the last good keys

    def check(self, presented: str | None) -> ApiKey | None:
        if not presented:
            return None
        self._maybe_reload()
        found = None
        for k in self._keys:  # every key, no early exit
            if hmac.compare_digest(_digest(bytes.fromhex(k.salt), presented), k.hash):
                found = k
        return found


def _parse(text: str, path: Path) -> list[ApiKey]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: keys file is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != KEYS_FORMAT or not isinstance(data.get("keys"), list):
        raise ConfigError(f"{path}: not a facebce keys file (format != {KEYS_FORMAT!r})")
    keys = []
    for i, r in enumerate(data["keys"]):
        try:
            k = ApiKey(str(r["name"]), str(r["scope"]), str(r["salt"]), str(r["hash"]), str(r.get("created", "")))
            bytes.fromhex(k.salt)
            if k.scope not in SCOPES or len(k.hash) != 64:
                raise ValueError(k.scope)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: keys[{i}] is malformed (needs name, scope in {SCOPES}, hex salt and "
                              f"a 64-hex-digit hash)") from None
        keys.append(k)
    return keys


def add_key(path: str | os.PathLike, name: str, scope: str) -> str:
    """Add a key to the keys file (created if missing, written atomically); returns the key itself,
    which is not stored anywhere and cannot be recovered."""
    if scope not in SCOPES:
        raise ConfigError(f"--scope {scope!r}: expected one of {', '.join(SCOPES)}")
    if not _NAME.match(name or ""):
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
    store = KeyStore.load(path, missing_ok=True)
    if any(k.name == name for k in store.keys):
        raise ConfigError(f"{path}: a key named {name!r} exists already; pick another name")
    key = "fbk_" + secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    records = [k.__dict__ for k in store.keys] + [ApiKey(name, scope, salt.hex(), _digest(salt, key), created).__dict__]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"format": KEYS_FORMAT, "version": 1, "keys": records}, indent=1) + "\n")
    return key
