"""Simulated crashes for the gallery tests."""
from __future__ import annotations

import os


def crash_on_replace(monkeypatch, call: int) -> None:
    """Make the `call`-th os.replace (1-based) raise, as if the process died there."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == call:
            raise KeyboardInterrupt("simulated crash")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
