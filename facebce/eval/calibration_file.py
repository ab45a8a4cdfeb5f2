"""The calibration artifact: `calib.json` (written, loaded and verified), the threshold resolver other
modules call (`resolve_threshold_spec`), and the drift report (Markdown and the FAR-vs-threshold plot).

facebce.eval.calibrate computes a `Calibration`; this module is all that reads one back. Checks:
format and version, a sha256 checksum of the canonical JSON of the content (any edit is refused), and,
when the caller knows its model's digest, that the calibration was made with that model.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facebce import __version__
from facebce.errors import ConfigError, DataFormatError, ModelError

FORMAT = "facebce-calibration"
FORMAT_VERSION = 1


@dataclass
class Calibration:
    """What `calib.json` holds (see `to_json`); `sets` has one row per given set."""

    model: dict
    target_far: float
    calibrated_on: list[str]
    threshold: float
    n_impostor: int
    false_accepts_allowed: int
    far: float
    tar: float
    bootstrap: dict | None
    sets: list[dict]
    facebce_version: str = __version__
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"))
    path: Path | None = None
    digest: str | None = None  # sha256 of the file, once written or loaded

    def to_json(self) -> dict:
        body = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "facebce_version": self.facebce_version,
            "created": self.created, "model": self.model, "target_far": self.target_far,
            "accept": "cosine > threshold", "calibrated_on": self.calibrated_on, "threshold": self.threshold,
            "n_impostor": self.n_impostor, "false_accepts_allowed": self.false_accepts_allowed,
            "far": self.far, "tar": self.tar, "bootstrap": self.bootstrap, "sets": self.sets,
        }
        return {**body, "checksum": content_checksum(body)}

    @property
    def threshold_ci(self) -> tuple[float, float] | None:
        return tuple(self.bootstrap["threshold_ci"]) if self.bootstrap else None

    def set(self, name: str) -> dict:
        for row in self.sets:
            if row["name"] == name:
                return row
        raise KeyError(name)


def content_checksum(body: Mapping) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of everything but the checksum."""
    text = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _clean(x):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ----------------------------------------------------------------------------- the artifact

def write_calibration(cal: Calibration, path: str | os.PathLike, *, sets: Sequence | None = None,
                      report: bool = True) -> Path:
    """calib.json (atomic), and with `report` the drift report `<stem>.md` and plot `<stem>.png` beside it."""
    from facebce.fileio import atomic_write_text

    path = Path(path)
    text = json.dumps(cal.to_json(), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    cal.path, cal.digest = path, hashlib.sha256(text.encode()).hexdigest()
    if report:
        atomic_write_text(path.with_suffix(".md"), drift_markdown(cal) + "\n")
        if sets is not None:
            plot_far_curves(cal, sets, path.with_suffix(".png"))
    return path


def load_calibration(path: str | os.PathLike, *, model_digest: str | None = None) -> Calibration:
    """Read and verify calib.json: its format, its checksum (any edit is refused) and, when
    `model_digest` is given, that it was made with that model. Every problem is one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such calibration file (make one with facebce calibrate)")
    raw = path.read_bytes()
    if len(raw) > 64 << 20:
        raise DataFormatError(f"{path}: {len(raw)} bytes is too large for a calibration file")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataFormatError(f"{path}: not a calibration file (not JSON: {str(e).splitlines()[0]})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not a facebce calibration file (format is not {FORMAT!r})")
    if body.get("format_version") != FORMAT_VERSION:
        raise DataFormatError(f"{path}: calibration format_version {body.get('format_version')!r}, this facebce "
                              f"reads {FORMAT_VERSION}")
    try:
        ok = body.get("checksum") == content_checksum(body)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataFormatError(f"{path}: checksum mismatch: the calibration file was edited or damaged; "
                              "recalibrate instead of editing it")
    try:
        t, f = float(body["threshold"]), float(body["target_far"])
        made_with = str(body["model"]["digest"])
        cal = Calibration(model=body["model"], target_far=f, calibrated_on=list(body["calibrated_on"]),
                          threshold=t, n_impostor=int(body["n_impostor"]),
                          false_accepts_allowed=int(body["false_accepts_allowed"]), far=body["far"],
                          tar=body["tar"], bootstrap=body.get("bootstrap"), sets=list(body["sets"]),
                          facebce_version=body.get("facebce_version", "?"), created=body.get("created", "?"))
    except (KeyError, TypeError, ValueError) as e:
        raise DataFormatError(f"{path}: calibration file lacks a valid field ({e})") from None
    if not (-1.0 <= t <= 1.0):
        raise DataFormatError(f"{path}: threshold {t!r} is not a cosine in [-1, 1]")
    if model_digest is not None and made_with != str(model_digest):
        raise ModelError(f"{path}: calibrated with another model (digest {made_with[:12]}, this model "
                         f"{str(model_digest)[:12]}); recalibrate with this model")
    cal.path, cal.digest = path, hashlib.sha256(raw).hexdigest()
    return cal


@dataclass(frozen=True)
class ThresholdSpec:
    """A pair threshold and where it came from; `metadata()` is the ONNX/gallery provenance schema."""

    value: float
    source: str  # "user" (a number given) | "calibrated"
    target_far: float | None = None
    ci: tuple[float, float] | None = None
    calibration_digest: str | None = None  # sha256 of calib.json
    path: str | None = None

    def provenance(self) -> dict | None:
        """None for a user's number; for a calibration {"source": "calibrated", "target_far", "ci",
        "calibration"} as facebce.deploy.export.pair_threshold_metadata takes it."""
        if self.source != "calibrated":
            return None
        if self.ci is None:
            raise ConfigError(f"{self.path}: the calibration has no bootstrap interval (made with --bootstrap 0); "
                              "recalibrate with --bootstrap 1000 to deploy it")
        return {"source": "calibrated", "target_far": float(self.target_far),
                "ci": (float(self.ci[0]), float(self.ci[1])), "calibration": str(self.calibration_digest)}

    def metadata(self) -> dict[str, str]:
        """threshold, threshold_source and, when calibrated, threshold_target_far, threshold_ci ("[lo, hi]"
        JSON) and threshold_calibration (digest of calib.json): strings, as ONNX metadata_props hold them."""
        out = {"threshold": repr(float(self.value)), "threshold_source": self.source}
        if self.source == "calibrated":
            out["threshold_target_far"] = repr(float(self.target_far))
            if self.ci is not None:
                out["threshold_ci"] = json.dumps([float(self.ci[0]), float(self.ci[1])])
            out["threshold_calibration"] = str(self.calibration_digest)
        return out


def resolve_threshold_spec(spec, *, model_digest: str | None = None) -> ThresholdSpec:
    """"calibrated:PATH" -> the verified calibration's threshold (refused for another model when
    `model_digest` is given); "0.43" or "fixed:0.43" (or a float) -> that cosine threshold."""
    if isinstance(spec, ThresholdSpec):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return _fixed(float(spec), repr(spec))
    text = str(spec).strip()
    kind, sep, arg = text.partition(":")
    if sep and kind == "calibrated":
        if not arg:
            raise ConfigError("threshold 'calibrated:': name the calibration file, e.g. calibrated:calib.json")
        cal = load_calibration(arg, model_digest=model_digest)
        return ThresholdSpec(cal.threshold, "calibrated", cal.target_far, cal.threshold_ci, cal.digest, arg)
    if sep and kind == "fixed":
        text = arg
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"threshold {spec!r}: expected a cosine (e.g. 0.43), fixed:<t> or "
                          "calibrated:<calib.json>") from None
    return _fixed(value, spec)


def _fixed(value: float, spec) -> ThresholdSpec:
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise ConfigError(f"threshold {spec!r}: a cosine threshold lies in [-1, 1]")
    return ThresholdSpec(value, "user")


# ----------------------------------------------------------------------------- drift report

def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.3f}"


def drift_markdown(cal: Calibration) -> str:
    """The drift table (OneFace's one-threshold-for-all protocol) and the consistency figures."""
    ci = cal.bootstrap
    lines = ["# facebce calibration", "",
             f"- model: {cal.model.get('path')} (sha256 {str(cal.model.get('digest'))[:12]})",
             f"- calibrated on: {' + '.join(cal.calibrated_on)} ({cal.n_impostor} impostor pairs; "
             f"{cal.false_accepts_allowed} false accepts allowed at target FAR {cal.target_far:g})",
             f"- threshold: **{cal.threshold:.4f}** (accept iff cosine > threshold), TAR there {100 * cal.tar:.2f} %"]
    if ci:
        lines.append(f"- {100 * ci['level']:.0f} % bootstrap interval ({ci['replicates']} replicates, resampling "
                     f"{ci['unit']}, seed {ci['seed']}): threshold [{ci['threshold_ci'][0]:.4f}, "
                     f"{ci['threshold_ci'][1]:.4f}], TAR [{100 * ci['tar_ci'][0]:.2f}, {100 * ci['tar_ci'][1]:.2f}] %")
    lines += ["", "| set | pairs | impostors | FAR at t % | FAR drift (FAR / target) | TAR at t % | own threshold "
              "at target | own TAR % |", "|---|---|---|---|---|---|---|---|"]
    for r in cal.sets:
        mark = " (calibration)" if r.get("calibration_set") else ""
        own = f"{r['own_threshold']:.4f}" if r.get("own_threshold") is not None else (r.get("own_note") or "—")
        drift = "—" if r.get("far_drift") is None else f"**{r['far_drift']:.2f}**"
        lines.append(f"| {r['name']}{mark} | {r['n_pairs']} | {r['n_impostor']} | {_pct(r['far'])} | {drift} | "
                     f"{_pct(r['tar'])} | {own} | {_pct(r.get('own_tar'))} |")
    folders = [r for r in cal.sets if "per_identity_far" in r]
    if folders:
        lines += ["", "Consistency on labelled folders (every pair of images; per-identity FAR over identities with "
                  "enough impostor pairs; OPIS, arXiv 2307.04047, see docs/calibration.md):", "",
                  "| set | identities | per-identity FAR median % | p90 % | max % | max / target | OPIS |",
                  "|---|---|---|---|---|---|---|"]
        for r in folders:
            p, o = r["per_identity_far"], r.get("opis") or {}
            opis_text = "—" if o.get("value") is None else f"{o['value']:.3g} (β={o['beta']:g}, FAR " \
                f"{o['far_range'][0]:g}–{o['far_range'][1]:g})"
            lines.append(f"| {r['name']} | {p['identities']} (of {p['identities'] + p['left_out']}) | "
                         f"{_pct(p.get('median'))} | {_pct(p.get('p90'))} | {_pct(p.get('max'))} | "
                         f"{'—' if p.get('max_over_target') is None else format(p['max_over_target'], '.2f')} | "
                         f"{opis_text} |")
    return "\n".join(lines)


def plot_far_curves(cal: Calibration, sets: Sequence, path: str | os.PathLike) -> Path:
    """FAR-vs-threshold of every set on one log axis, the calibrated threshold (and its interval) and
    the target marked; written atomically as PNG."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facebce.fileio import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for s in sets:
        imp = np.sort(s.impostor)
        ts = np.unique(imp)
        far = (imp.size - np.searchsorted(imp, ts, side="right")) / imp.size  # FAR(t) = #{s > t} / n
        keep = far > 0
        ax.step(ts[keep], far[keep], where="post", label=f"{s.name} ({imp.size} impostors)")
    ax.set_yscale("log")
    ax.axhline(cal.target_far, color="k", ls=":", lw=1, label=f"target FAR {cal.target_far:g}")
    ax.axvline(cal.threshold, color="r", ls="--", lw=1, label=f"calibrated t = {cal.threshold:.4f}")
    if cal.bootstrap:
        lo, hi = cal.bootstrap["threshold_ci"]
        ax.axvspan(lo, hi, color="r", alpha=0.12, label=f"{100 * cal.bootstrap['level']:.0f} % interval")
    ax.set_xlabel("threshold (accept iff cosine > t)")
    ax.set_ylabel("FAR")
    ax.set_title(f"FAR vs threshold; calibrated on {' + '.join(cal.calibrated_on)}")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
