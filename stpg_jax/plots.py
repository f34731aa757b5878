"""Per-class bar charts as PNG files (matplotlib, the optional ``plots`` extra: ``pip install 'stpg_jax[plots]'``).

- ``eval_iou_png``: the per-class IoU of one evaluation (the train loop writes ``eval_<step>.png`` with it);
- ``method_comparison_png``: methods compared per class, mean and spread over training seeds (the experiment scripts).

Rare classes are marked (label " *", red, shaded column). For an evaluation they are the classes with less than
``RARE_SHARE`` of the evaluated ground-truth pixels (from its confusion matrix); the comparison takes them from the
caller (e.g. ``stpg_jax.data.palettes.rare_classes``). matplotlib is imported only when a chart is drawn, so training
needs it only for these files; without it, ``PlotsUnavailable`` says so in one line.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Mapping, Sequence

import numpy as np

RARE_SHARE = 0.02  # a class with less than this share of the labelled pixels counts as rare
RARE_COLOR = "#b00000"
RARE_SHADE = "#f6e3e3"
INSTALL_HINT = "pip install 'stpg_jax[plots]' (or pip install matplotlib)"


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed; the message is one line and says how to install it."""


def require_matplotlib(what: str = "a PNG chart"):
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable(f"{what} needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return matplotlib


def rare_from_confusion(confusion, threshold: float = RARE_SHARE) -> np.ndarray:
    """(C,) bool: classes present in the ground truth (rows of ``confusion``) with a pixel share below ``threshold``."""
    counts = np.asarray(confusion, np.float64).sum(axis=1)
    share = counts / max(counts.sum(), 1.0)
    return (share > 0) & (share < threshold)


def _as_matrix(per_seed, class_names) -> np.ndarray:
    """(seeds, C) float with NaN for n/a, from a list of {class: value or None} mappings or of sequences."""
    rows = []
    for values in per_seed:
        if isinstance(values, Mapping):
            values = [values.get(n) for n in class_names]
        if len(values) != len(class_names):
            raise ValueError(f"{len(values)} values for {len(class_names)} classes")
        rows.append([math.nan if v is None else float(v) for v in values])
    return np.asarray(rows, np.float64).reshape(len(rows), len(class_names))


def _bar_chart(series: dict, class_names, rare, title: str, ylabel: str, note: str, labels_on_bars: bool):
    """A matplotlib Figure (no pyplot: no global state, no display): grouped bars, one group per class, one bar per
    series = its mean over rows (seeds), whiskers min–max and a dot per row when there are several."""
    require_matplotlib()
    from matplotlib.figure import Figure

    n_classes, n_series = len(class_names), len(series)
    fig = Figure(figsize=(max(6.0, 0.3 * n_classes * max(2, n_series) + 2.0), 4.6), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    rare = set(rare or ())
    for c, name in enumerate(class_names):
        if name in rare:
            ax.axvspan(c - 0.5, c + 0.5, color=RARE_SHADE, zorder=0, lw=0)
    width = 0.8 / n_series
    top = 100.0  # IoU % on a fixed scale, so that charts of successive evaluations compare at a glance
    for k, (label, matrix) in enumerate(series.items()):
        x = np.arange(n_classes) + (k - (n_series - 1) / 2) * width
        seen = ~np.all(np.isnan(matrix), axis=0)
        with warnings.catch_warnings():  # an all-n/a class: NaN, drawn as "n/a"
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, lo, hi = (f(matrix, axis=0) for f in (np.nanmean, np.nanmin, np.nanmax))
        ax.bar(x, np.nan_to_num(mean), width * 0.92, label=label, color=f"C{k}", zorder=2)
        top = max(top, float(np.nanmax(matrix)) if seen.any() else 0.0)
        if matrix.shape[0] > 1:
            ax.errorbar(x[seen], mean[seen], yerr=[mean[seen] - lo[seen], hi[seen] - mean[seen]], fmt="none",
                        ecolor="black", elinewidth=0.8, capsize=2, zorder=3)
            for row in matrix:
                ok = ~np.isnan(row)
                ax.scatter(x[ok], row[ok], s=6, color="black", zorder=4, linewidths=0)
        for xi, m, s in zip(x, mean, seen):
            if not s:
                ax.text(xi, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="grey")
            elif labels_on_bars:
                ax.annotate(f"{m:.1f}", (xi, m), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7, zorder=5)
    ax.set_xticks(np.arange(n_classes))
    ax.set_xticklabels([f"{n} *" if n in rare else n for n in class_names], rotation=40, ha="right")
    for tick, name in zip(ax.get_xticklabels(), class_names):
        if name in rare:
            tick.set_color(RARE_COLOR)
            tick.set_fontweight("bold")
    ax.set_xlim(-0.6, n_classes - 0.4)
    ax.set_ylim(0, 10 * math.ceil(top / 10))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3, zorder=1)
    if n_series > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the axes, never on a bar
    if note:
        ax.set_xlabel(note, fontsize=7, color="dimgrey")
    return fig


def eval_iou_png(results, class_names: Sequence[str], path: str, step: int | None = None,
                 rare: Sequence[str] | None = None, threshold: float = RARE_SHARE) -> str:
    """Writes the per-class IoU % of an evaluation to ``path`` (PNG) and returns it.

    ``results``: one ``stpg_jax.evaluate.summarize`` result or {network: result} (one bar per network). ``rare``:
    class names to mark; default: those under ``threshold`` of the first result's ground-truth pixels."""
    if "iou" in results:
        results = {"gen_student": results}
    first = next(iter(results.values()))
    if rare is None:
        rare = [n for n, r in zip(class_names, rare_from_confusion(first["confusion"], threshold)) if r]
    series = {f"{name} (mIoU {100 * r['miou']:.2f})": 100 * np.asarray(r["iou"], np.float64)[None]
              for name, r in results.items()}
    when = f" at step {step}" if step is not None else ""
    if len(results) == 1:
        name, r = next(iter(results.items()))
        title = f"{name}{when}: per-class IoU, mIoU {100 * r['miou']:.2f} %"
    else:
        title = f"per-class IoU{when}"
    pixels = int(np.asarray(first["confusion"]).sum())
    note = f"* rare: under {100 * threshold:g} % of the {pixels} evaluated ground-truth pixels (shaded)"
    fig = _bar_chart(series, list(class_names), rare, title, "IoU %", note, labels_on_bars=len(results) == 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


_notified = set()


def save_eval_png(results, class_names, path: str, step: int | None = None, log=print) -> str | None:
    """``eval_iou_png``, or, without matplotlib, a one-line notice (once per process) and None: training does not
    need matplotlib."""
    try:
        return eval_iou_png(results, class_names, path, step)
    except PlotsUnavailable as e:
        if "eval" not in _notified:
            _notified.add("eval")
            log(f"note: {e}; the eval_<step>.png charts are skipped")
        return None


def method_comparison_png(per_method_per_seed_iou: Mapping[str, Sequence], class_names: Sequence[str], path: str,
                          rare: Sequence[str] = (), title: str = "", ylabel: str = "IoU %") -> str:
    """Writes methods compared per class to ``path`` (PNG) and returns it: per class one bar per method, its mean
    over seeds, with min–max whiskers and a dot per seed when there are several.

    ``per_method_per_seed_iou``: {method: [one entry per seed: {class: value or None} or a sequence aligned with
    ``class_names``]}, values as they are to be shown (e.g. IoU %); add an "mIoU" entry to ``class_names`` and the
    mappings to show it too. ``rare``: class names to mark."""
    series = {}
    for method, per_seed in per_method_per_seed_iou.items():
        matrix = _as_matrix(per_seed, class_names)
        if matrix.shape[0] == 0:
            raise ValueError(f"method {method!r}: no seeds")
        series[method] = matrix
    seeds = sorted({m.shape[0] for m in series.values()})
    counts = "/".join(str(s) for s in seeds)
    note = (f"bars: mean over {counts} seed(s)" + ("; whiskers: min–max; dots: each seed" if seeds[-1] > 1 else "")
            + ("; * rare class (shaded)" if rare else ""))
    fig = _bar_chart(series, list(class_names), rare, title, ylabel, note, labels_on_bars=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path
