"""Methods compared over training seeds: the records, statistics, table and figure of benchmarks/experiment.py.

A run is one ``python launch.py`` in its own work directory; its record holds the method, the seed, the command, the
wall time, the exit status and the last evaluation (``eval_<step>.json``: IoU as fractions). From a list of records:
per method and class the mean and sample standard deviation over the seeds, the mean IoU of the rare classes, the
seed-paired mIoU differences with a 95 % Student-t interval, a markdown table and a figure.
"""

from __future__ import annotations

import math
import os
import statistics

from common import last_eval, split_digest


def seeds_of(p, text: str) -> list[int]:
    """The distinct integer seeds of ``--seeds`` (comma-separated), else the parser's error."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds: integers separated by commas, got {text!r}")
    if not seeds or len(set(seeds)) < len(seeds):
        p.error(f"--seeds: one or more distinct seeds, got {text!r}")
    return seeds


def record(method: str, seed: int, command: str, workdir: str, wall_s, returncode) -> dict:
    """A run's record; its evaluation fields are None when it wrote none."""
    r = {"method": method, "seed": seed, "command": command, "workdir": workdir,
         "wall_s": None if wall_s is None else round(wall_s, 1), "returncode": returncode,
         "step": None, "miou": None, "pixel_accuracy": None, "iou": None, "val_images": None,
         "split_labeled_sha256_16": None}
    try:
        result = last_eval(workdir)
    except FileNotFoundError:
        return r
    r.update(step=result["step"], miou=result["miou"], pixel_accuracy=result.get("pixel_accuracy"),
             iou=result["iou"], val_images=result.get("images"),
             split_labeled_sha256_16=split_digest(workdir) if os.path.isfile(os.path.join(workdir, "split_labeled.txt"))
             else None)
    return r


def finished(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["miou"] is not None]


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _spread_of_known(values: list[float]) -> dict | None:
    """The spread of the values that are not NaN; None if none is."""
    known = [v for v in values if not math.isnan(v)]
    return spread(known) if known else None


def rare_mean(run: dict, rare) -> float:
    """Mean IoU of the rare classes the val set holds (a class absent from it has no IoU)."""
    values = [run["iou"][c] for c in rare if run["iou"].get(c) is not None]
    return statistics.fmean(values) if values else math.nan


def summarize(runs: list[dict], methods, rare=()) -> dict:
    """{method: {'seeds', 'iou': {class: spread or None}, 'miou', 'rare', 'wall_s'}} of the methods (in the order
    of ``methods``) with finished runs; a class without an IoU in some seed has None."""
    out = {}
    for method in methods:
        mine = sorted((r for r in finished(runs) if r["method"] == method), key=lambda r: r["seed"])
        if not mine:
            continue
        out[method] = {
            "seeds": [r["seed"] for r in mine],
            "iou": {c: spread([r["iou"][c] for r in mine]) if all(r["iou"][c] is not None for r in mine) else None
                    for c in mine[0]["iou"]},
            "miou": spread([r["miou"] for r in mine]),
            "rare": _spread_of_known([rare_mean(r, rare) for r in mine]) if rare else None,
            "wall_s": _spread_of_known([r["wall_s"] for r in mine if r["wall_s"] is not None]),
        }
    return out


def paired(runs: list[dict], a: str, b: str, key=lambda r: r["miou"]) -> list[float]:
    """key(run of a) − key(run of b) for each seed both finished, in seed order."""
    by = {(r["method"], r["seed"]): r for r in finished(runs)}
    seeds = sorted(s for m, s in by if m == a and (b, s) in by)
    return [key(by[a, s]) - key(by[b, s]) for s in seeds]


def paired_text(runs: list[dict], a: str, b: str, headings: dict, rare=()) -> str | None:
    """One sentence: a − b in mIoU points, paired by seed (each seed, the mean, the 95 % interval of the mean from
    two seeds on, how often a is ahead), and in the rare classes' mean IoU. None without a common seed."""
    d = paired(runs, a, b)
    if not d:
        return None
    mean = statistics.fmean(d)
    text = (f"{headings[a]} − {headings[b]}, paired by seed: mIoU {100 * mean:+.2f} points (per seed "
            f"{', '.join(f'{100 * x:+.2f}' for x in d)}")
    if len(d) > 1:
        from scipy import stats

        half = float(stats.t.ppf(0.975, len(d) - 1)) * statistics.stdev(d) / math.sqrt(len(d))
        text += f"; 95 % interval of the mean {100 * (mean - half):+.2f} to {100 * (mean + half):+.2f}"
    text += f"; {headings[a]} ahead in {sum(x > 0 for x in d)} of {len(d)})"
    d_rare = [x for x in paired(runs, a, b, lambda r: rare_mean(r, rare)) if not math.isnan(x)] if rare else []
    if d_rare:
        text += f", rare classes {100 * statistics.fmean(d_rare):+.2f} points"
    return text + "."


def pct(s: dict | None) -> str:
    if s is None:
        return "n/a"
    return f"{100 * s['mean']:.2f} ± {100 * s['sd']:.2f}" if s["n"] > 1 else f"{100 * s['mean']:.2f}"


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def markdown_table(runs: list[dict], headings: dict, rare=(), wall_label="wall time per run (whole command)") -> str:
    """Rows: each class, mIoU, the rare classes' mean and the mean wall time; a column per method of ``headings``
    ({method: column heading}) with finished runs. Cells: IoU %, mean ± sample sd over the seeds."""
    summary = summarize(runs, headings, rare)
    if not summary:
        return "(no run finished)"
    methods = list(summary)
    lines = ["| class | " + " | ".join(headings[m] for m in methods) + " |", "| --- |" + " ---: |" * len(methods)]
    for c in summary[methods[0]]["iou"]:
        lines.append(f"| {c} | " + " | ".join(pct(summary[m]["iou"].get(c)) for m in methods) + " |")
    lines.append("| **mIoU** | " + " | ".join(pct(summary[m]["miou"]) for m in methods) + " |")
    if rare:
        lines.append(f"| rare classes ({', '.join(rare)}) | " + " | ".join(pct(summary[m]["rare"]) for m in methods)
                     + " |")
    lines.append(f"| {wall_label} | " + " | ".join(
        duration(summary[m]["wall_s"]["mean"]) if summary[m]["wall_s"] else "n/a" for m in methods) + " |")
    return "\n".join(lines)


def write_figure(runs: list[dict], headings: dict, path: str, title: str, rare=()) -> str:
    """Per class a bar per method at its mean over the seeds, min-max whiskers, a dot per seed, the rare classes
    marked (stpg_jax.plots); '' when no run finished. Needs matplotlib."""
    from stpg_jax import plots

    done = finished(runs)
    if not done:
        return ""
    classes = list(done[0]["iou"]) + ["mIoU"]
    per_method = {headings[m]: [{**{c: None if v is None else 100 * v for c, v in r["iou"].items()},
                                 "mIoU": 100 * r["miou"]}
                                for r in sorted((r for r in done if r["method"] == m), key=lambda r: r["seed"])]
                  for m in headings if any(r["method"] == m for r in done)}
    return plots.method_comparison_png(per_method, classes, str(path), rare=rare, title=title)
