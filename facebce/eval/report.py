"""An EvalReport as files: JSON (every number, machine-readable), Markdown tables, PNG plots.

The Markdown puts each set's own best threshold beside the accuracy at the one global threshold,
because the gap between the two is what a deployment with one threshold pays; open-set sets put
the thresholds of their DIR@FPIR targets beside DIR and FPIR at that same global threshold. Plots use
matplotlib's Agg canvas directly (no pyplot, no global backend switch). `write_report` renders every
file in memory, then writes each atomically (facebce.fileio), so a reader never sees a half-written
file and a failing plot changes nothing.
"""
from __future__ import annotations

import dataclasses
import json
import io
import math
import os
from pathlib import Path
from typing import IO

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from facebce.errors import FacebceError
from facebce.eval.results import EvalReport
from facebce.eval.roc import Roc
from facebce.eval.tenfold import ACCURACY_THRESHOLDS, VAL_FAR_TARGET
from facebce.fileio import atomic_write_bytes

_ARRAYS_LEFT_OUT = ("scores", "issame", "labels", "probes", "curve")  # per-pair/probe data: scores.npz, not JSON


# ----------------------------------------------------------------------------- JSON

def report_to_dict(report: EvalReport) -> dict:
    """Every number of the report as plain JSON types; NaN and infinities become null."""
    out = _plain(report)
    for s in out["sets"]:
        if s["ten_fold"] is not None:
            s["ten_fold"]["roc_thresholds"] = _plain(ACCURACY_THRESHOLDS)  # squared-distance grid of tpr/fpr
            s["ten_fold"]["val_far_target"] = VAL_FAR_TARGET
    return out


def _plain(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name not in _ARRAYS_LEFT_OUT}
    if isinstance(x, dict) or hasattr(x, "items"):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()] if x.ndim else _plain(x.item())
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def to_json(report: EvalReport) -> str:
    return json.dumps(report_to_dict(report), indent=1, allow_nan=False)


# ----------------------------------------------------------------------------- Markdown

def _pct(x, digits: int = 2) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{100 * x:.{digits}f}"


def _num(x, fmt: str = ".4f") -> str:
    return "—" if x is None or not np.isfinite(x) else format(x, fmt)


def to_markdown(report: EvalReport) -> str:
    """Header (model, threshold source, TAR mode, flip), then one table per section."""
    t = report.threshold
    fitted = f", fitted on {' + '.join(t.fitted_on)} (accuracy {_pct(t.fitted_accuracy)} %)" if t.fitted_on else ""
    lines = [
        "# facebce evaluation", "",
        f"- model: {report.model}",
        *([f"- inference: {report.inference}"] if report.inference else []),
        f"- global threshold: **{t.value:.4f}** from `{t.source}`{fitted}; accept a pair iff cosine > threshold",
        f"- TAR@FAR mode: {report.tar_mode}; flip: {'flip-sum' if report.flip else 'off'}",
        f"- facebce {report.facebce_version}, {report.created}", "",
    ]
    if report.sets:
        lines += _pairs_table(report)
    for ijb in report.ijb:
        lines += _ijb_tables(ijb, report)
    for o in report.open_set:
        lines += _open_set_tables(o, report)
    if report.uniform is not None:
        lines += _uniform_table(report)
    return "\n".join(lines) + "\n"


def _pairs_table(report: EvalReport) -> list[str]:
    lines = [
        "## Verification sets", "",
        "10-fold refits its threshold per fold (insightface protocol); *best* is each set's own single "
        "threshold; *global* is the one threshold above, applied to every set.", "",
        "*VAL@FAR (insightface rule)* is the number insightface's verification.py prints (its `interp1d` "
        "reading of the FAR curve); it differs from facebce's VAL@FAR only on sets too small to resolve "
        "FAR 1e-3 (see facebce.eval.tenfold).", "",
        "| set | pairs | 10-fold acc % | VAL@FAR=1e-3 % | VAL@FAR (insightface rule) % | best acc % | best t "
        "| global acc % | TAR@t % | FAR@t % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.sets:
        tf = s.ten_fold
        tenfold = f"{_pct(tf.accuracy)} ± {_pct(tf.std)}" if tf else "—"
        val = f"{_pct(tf.val)} ± {_pct(tf.val_std)} (FAR {_pct(tf.far, 3)} %)" if tf else "—"
        parity = tf.parity if tf else None
        val_if = f"{_pct(parity.val)} ± {_pct(parity.val_std)} (FAR {_pct(parity.far, 3)} %)" if parity else "—"
        lines.append(f"| {s.name} | {s.n_pairs} | {tenfold} | {val} | {val_if} | {_pct(s.best.accuracy)} "
                     f"| {_num(s.best.threshold)} | {_pct(s.at_global.accuracy)} | {_pct(s.at_global.tar)} "
                     f"| {_pct(s.at_global.far, 3)} |")
    with_tar = [s for s in report.sets if s.tar_at_far is not None]
    if with_tar:
        targets = with_tar[0].tar_at_far.far_targets
        lines += ["", f"TAR@FAR % (mode {report.tar_mode}; — where the set has too few impostors to resolve it)", "",
                  "| set | " + " | ".join(f"{f:.0e}" for f in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        lines += [f"| {s.name} | " + " | ".join(_pct(x) for x in s.tar_at_far.tar) + " |" for s in with_tar]
    return lines + [""]


def _ijb_tables(ijb, report: EvalReport) -> list[str]:
    o = ijb.options
    lines = [f"## {ijb.name} (1:1)", "",
             f"{ijb.n_images} images, {ijb.n_templates} templates, {ijb.n_pairs} pairs ({ijb.n_genuine} genuine); "
             f"flip {o['flip']}, image_l2norm {o['image_l2norm']}, face_score_weight {o['face_score_weight']}", "",
             "| TAR@FAR % | " + " | ".join(f"{f:.0e}" for f in ijb.tar_at_far.far_targets) + " |",
             "|---|" + "---|" * len(ijb.tar_at_far.far_targets)]
    for r in (ijb.tar_at_far, ijb.tar_at_far_parity):
        lines.append(f"| {r.mode}{' (eval_ijbc.py)' if r.mode == 'insightface' else ''} | "
                     + " | ".join(_pct(x) for x in r.tar) + " |")
    if ijb.at_threshold is not None:
        a = ijb.at_threshold
        lines += ["", f"At the global threshold {a.threshold:.4f}: TAR {_pct(a.tar)} %, FAR {_pct(a.far, 4)} %"]
    ident = ijb.identification
    if ident is not None:
        targets = ident.fpir_targets
        lines += ["", f"## {ijb.name} (1:N, open set)", "",
                  "| gallery | mated | non-mated | top-1 % | top-5 % | top-10 % | "
                  + " | ".join(f"TPIR@{f:.0e} %" for f in targets) + " | TPIR@t % | FPIR@t % |",
                  "|---|---|---|---|---|---|" + "---|" * (len(targets) + 2)]
        for g, r in ident.galleries.items():
            tp, fp = ident.at_threshold[g] if ident.at_threshold else (None, None)
            lines.append(f"| {g} | {r.n_mated} | {r.n_non_mated} | "
                         + " | ".join(_pct(r.cmc.get(k)) for k in (1, 5, 10)) + " | "
                         + " | ".join(_pct(x) for x in r.tpir) + f" | {_pct(tp)} | {_pct(fp)} |")
        lines.append("| mean (ijb_evals) | | | " + " | ".join(_pct(ident.cmc.get(k)) for k in (1, 5, 10)) + " | "
                     + " | ".join(_pct(x) for x in ident.tpir) + " | | |")
    return lines + [""]


def _open_set_tables(o, report: EvalReport) -> list[str]:
    r, t, g = o.identification, report.threshold, o.at_global
    unknown = f"{len(o.unknown_identities)} never enrolled (unknown_fraction {o.unknown_fraction:g}, seed {o.seed})"
    lines = [f"## {o.name} (1:N, open set)", "",
             f"{o.n_images} images of {o.n_identities} identities: {o.n_enrolled_identities} enrolled "
             f"({o.n_gallery_images} gallery images, first {o.enrol_per_identity} per identity), {unknown}; "
             f"{o.n_mated} mated probes, {o.n_non_mated} non-mated probes.", "",
             "| rank | " + " | ".join(str(k) for k in r.cmc) + " |", "|---|" + "---|" * len(r.cmc),
             "| CMC % | " + " | ".join(_pct(v) for v in r.cmc.values()) + " |", "",
             "DIR = rank-1 detection-and-identification rate (TPIR); FPIR = non-mated probes whose best "
             "gallery score > t. A target's threshold is the non-mated maxima's (int(n·f) − 1)-th largest "
             "(ijb_evals); with n·f < 2 that is the highest one, realised FPIR 0: *unresolved*.", "",
             "| operating point | threshold | DIR % | FPIR % |", "|---|---|---|---|"]
    for f, thr, dir_, fpir in zip(r.fpir_targets, r.thresholds, r.tpir, r.fpir):
        short = " (unresolved)" if int(f * r.n_non_mated) < 2 else ""
        lines.append(f"| FPIR target {f:.0e}{short} | {_num(thr)} | {_pct(dir_)} | {_pct(fpir, 3)} |")
    lines.append(f"| **global** `{t.source}` | {_num(g.threshold)} | {_pct(g.tpir)} | {_pct(g.fpir, 3)} |")
    return lines + [""]


def _uniform_table(report: EvalReport) -> list[str]:
    u = report.uniform
    gap = "—" if u.gap is None else f"{abs(u.gap):.4f}"
    where = (f"{u.name} ({u.path}): {u.n_samples} images of {u.num_classes} training classes, scored against "
             "the run's class centres (bias-free scores)" if u.name else "a given score matrix")
    return ["## Uniform classification", "", f"- {where}", "",
            "| SW acc % | Uni acc % | t* | segment | CW opt % | CW learned % | bias | \\|bias − t*\\| |",
            "|---|---|---|---|---|---|---|---|",
            f"| {_pct(u.sample_wise)} | {_pct(u.uniform.accuracy)} | {_num(u.uniform.threshold)} "
            f"| ({_num(u.uniform.segment[0])}, {_num(u.uniform.segment[1])}) | {_pct(u.class_wise_opt)} "
            f"| {_pct(u.class_wise_learned)} | {_num(u.bias)} | {gap} |", ""]


# ----------------------------------------------------------------------------- plots

def _save(fig: Figure, path) -> None:
    """Draw `fig` as PNG into `path` (a file name or a binary file object)."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, format="png")


def plot_roc(report: EvalReport, path: Path | IO[bytes]) -> None:
    """ROC of every set (pairs and IJB 1:1) on a log FAR axis."""
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    curves = [(s.name, s.scores, s.issame) for s in report.sets] + [(r.name, r.scores, r.labels) for r in report.ijb]
    for name, scores, labels in curves:
        if not 0 < labels.sum() < labels.size:
            continue
        fpr, tpr, _ = Roc.from_labels(scores, labels).curve()
        keep = fpr > 0
        ax.step(fpr[keep], tpr[keep], where="post", label=name)
    ax.set_xscale("log")
    ax.set(xlabel="FAR (false accept rate)", ylabel="TAR (true accept rate)",
           title="ROC — " + report.model.split(",")[0][:60])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_histogram(report: EvalReport, s, path: Path | IO[bytes]) -> None:
    """Genuine vs impostor cosines of one set with the thresholds that matter marked."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    bins = np.linspace(min(s.scores.min(), -0.2), max(s.scores.max(), 1.0), 81)
    ax.hist(s.scores[s.issame], bins=bins, alpha=0.55, density=True, label="genuine", color="tab:green")
    ax.hist(s.scores[~s.issame], bins=bins, alpha=0.55, density=True, label="impostor", color="tab:red")
    marks = [(report.threshold.value, f"global {report.threshold.source} ({report.threshold.value:.3f})", "k", "-"),
             (s.best.threshold, f"own best ({s.best.threshold:.3f})", "tab:blue", "--")]
    t_star = report.uniform.uniform.threshold if report.uniform is not None else float("nan")
    if np.isfinite(t_star):
        marks.append((t_star, f"t* ({t_star:.3f})", "tab:purple", ":"))
    if report.bias is not None:
        marks.append((report.bias, f"learned bias ({report.bias:.3f})", "tab:orange", "-."))
    for x, label, colour, style in marks:
        ax.axvline(x, color=colour, linestyle=style, label=label)
    ax.set(xlabel="cosine score", ylabel="density", title=f"{s.name}: {s.n_pairs} pairs")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_accuracy_bars(report: EvalReport, path: Path | IO[bytes]) -> None:
    """Per set: accuracy at the global threshold next to the set's own best single threshold."""
    fig = Figure(figsize=(max(4.5, 1.3 * len(report.sets) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(report.sets))
    bars = [ax.bar(x - 0.2, [100 * s.at_global.accuracy for s in report.sets], 0.4,
                   label=f"global {report.threshold.source} (t={report.threshold.value:.3f})"),
            ax.bar(x + 0.2, [100 * s.best.accuracy for s in report.sets], 0.4, label="own best threshold")]
    for b in bars:
        ax.bar_label(b, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [s.name for s in report.sets])
    low = min(min(100 * s.at_global.accuracy, 100 * s.best.accuracy) for s in report.sets)
    ax.set_ylim(max(0.0, low - 2), 100)
    ax.set(ylabel="accuracy %", title="One threshold for all vs each set's own")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)
    _save(fig, path)


def plot_dir_fpir(report: EvalReport, o, path: Path | IO[bytes]) -> None:
    """DIR vs FPIR of one open-set set on a log FPIR axis, the targets and the global threshold marked."""
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    c, r, g = o.curve, o.identification, o.at_global
    floor = 0.5 / max(o.n_non_mated, 1)  # FPIR 0 cannot sit on a log axis: drawn at half of 1/n
    order = np.argsort(c.fpir, kind="stable")
    ax.step(np.maximum(c.fpir[order], floor), 100 * c.dir[order], where="post", label="DIR (rank-1)")
    ax.plot(np.maximum(r.fpir, floor), 100 * r.tpir, "o", color="tab:blue", label="FPIR targets")
    ax.plot(max(g.fpir, floor), 100 * g.tpir, "*", color="k", markersize=13,
            label=f"global {report.threshold.source} (t={g.threshold:.3f}): DIR {_pct(g.tpir)} %, "
                  f"FPIR {_pct(g.fpir, 3)} %")
    ax.axvline(1 / max(o.n_non_mated, 1), color="grey", linestyle=":", label=f"1/n non-mated ({o.n_non_mated})")
    ax.set_xscale("log")
    ax.set(xlabel="FPIR (false positive identification rate; 0 drawn at 1/2n)", ylabel="DIR %",
           title=f"{o.name}: {o.n_gallery_images} enrolled, {o.n_mated} mated + {o.n_non_mated} non-mated probes")
    ax.title.set_fontsize(10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_open_set_histogram(report: EvalReport, o, path: Path | IO[bytes]) -> None:
    """Mate scores of mated probes vs best gallery scores of non-mated probes, with the global
    threshold and the FPIR-target thresholds marked."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    p = o.probes
    both = np.r_[p.mate_score, p.non_mated_max]
    bins = np.linspace(min(both.min(), -0.2), max(both.max(), 1.0), 81)
    ax.hist(p.mate_score, bins=bins, alpha=0.55, density=True, label="mated: mate score", color="tab:green")
    ax.hist(p.non_mated_max, bins=bins, alpha=0.55, density=True, label="non-mated: best score", color="tab:red")
    ax.axvline(report.threshold.value, color="k", label=f"global {report.threshold.source} "
                                                         f"({report.threshold.value:.3f})")
    r = o.identification
    for f, thr in zip(r.fpir_targets, r.thresholds):
        if np.isfinite(thr):
            ax.axvline(thr, color="tab:blue", linestyle="--", alpha=0.6, label=f"FPIR {f:.0e} ({thr:.3f})")
    ax.set(xlabel="cosine score", ylabel="density", title=f"{o.name}: open-set probe scores")
    ax.legend(fontsize=8)
    _save(fig, path)


# ----------------------------------------------------------------------------- writing

def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """`out_dir` as a report folder: one FacebceError line when it names an existing non-folder
    (or a path under a file), before anything is computed or written."""
    out = Path(out_dir)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            what = "the report folder" if p == out else f"a folder on the way to {out}"
            raise FacebceError(f"{p}: exists and is not a folder; --out / out_dir must name {what}")
        if p.is_dir():
            break
    return out


def write_report(report: EvalReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md, scores.npz and the PNG plots into `out_dir`; returns name -> path.

    Every file is rendered in memory first (a failing plot leaves `out_dir` as it was), then each is
    written atomically with facebce.fileio (temporary file, fsync, rename, folder fsync).
    """
    files: dict[str, bytes] = {"report.json": to_json(report).encode("utf-8"),
                               "report.md": to_markdown(report).encode("utf-8")}

    def render(name: str, draw, *args) -> None:
        buf = io.BytesIO()
        draw(*args, buf)
        files[name] = buf.getvalue()

    if report.sets or report.open_set:
        render("scores.npz", lambda f: np.savez(f, **_score_arrays(report)))
    if report.sets:
        render("accuracy_bars.png", plot_accuracy_bars, report)
        for s in report.sets:
            render(f"hist_{s.name}.png", plot_histogram, report, s)
    if report.sets or report.ijb:
        render("roc.png", plot_roc, report)
    for o in report.open_set:
        if o.n_non_mated:
            render(f"dir_fpir_{o.name}.png", plot_dir_fpir, report, o)
        if o.n_mated and o.n_non_mated:
            render(f"hist_{o.name}.png", plot_open_set_histogram, report, o)
    out = check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in sorted(files):
        atomic_write_bytes(out / name, files[name])
        written[name] = out / name
    return written


def _score_arrays(report: EvalReport) -> dict[str, np.ndarray]:
    """Per-pair and per-probe arrays for scores.npz, keyed `<set>.<array>`."""
    out = {}
    for s in report.sets:
        out[f"{s.name}.scores"], out[f"{s.name}.issame"] = s.scores, s.issame
    for o in report.open_set:
        out.update({f"{o.name}.mate_score": o.probes.mate_score, f"{o.name}.rank": o.probes.rank,
                    f"{o.name}.non_mated_max": o.probes.non_mated_max, f"{o.name}.curve_threshold": o.curve.thresholds,
                    f"{o.name}.curve_dir": o.curve.dir, f"{o.name}.curve_fpir": o.curve.fpir})
    return out
