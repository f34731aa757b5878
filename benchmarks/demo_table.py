"""The README's demo table: supervised, mean teacher and STPG on configs/demo.py's split, and the all-labels ceiling.

    python benchmarks/demo_table.py [--write_readme]          # 3 seeds x 4 methods, one run after another
    python benchmarks/demo_table.py --from_json --write_readme  # README.md's section from the recorded JSON
    python benchmarks/demo_table.py --print_default             # what the README's demo command prints

Each run is one ``python launch.py`` in a fresh work directory ``WORKDIR_ROOT/<method>_seed<S>`` (compile included in
its wall time); STPG with seed 0 is the README's demo command itself. The seed changes initialisation, data order
and augmentation, not the scenes or the labelled split (checked). A run's result is its last ``eval_<step>.json``.
``--out`` (default ``benchmarks/results``) gets ``demo_table.json`` and ``demo_table.md``; ``--write_readme`` puts the
text between the README's markers, and tests/test_demo_table.py checks that the README says what the JSON holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

from common import REPO, git_commit, last_eval, load_config, names_of, run_cli, split_digest, start, utc_now, write_json

CONFIG = "configs/demo.py"
SPLIT = "1_8"
DEFAULT_COMMAND = f"python launch.py --config={CONFIG} --workdir=runs/demo"
# method name → (split, mode, column heading)
METHODS = {
    "supervised": (SPLIT, "supervised", "supervised"),
    "mean_teacher": (SPLIT, "mean_teacher", "mean teacher"),
    "stpg": (SPLIT, "stpg", "STPG"),
    "ceiling": ("full", "supervised", "supervised, all labels"),
}
RARE = ("pole", "sign_symbol", "fence", "pedestrian", "bicyclist")
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"
JSON_NAME, MD_NAME = "demo_table.json", "demo_table.md"
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
WIDTH = 118  # README.md's line length
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=0,
                   help="schedule.total_steps of every run (a quick smoke; default: the config's own schedule)")
    p.add_argument("--out", default="", help=f"folder for {JSON_NAME} and {MD_NAME} (default benchmarks/results)")
    p.add_argument("--workdir_root", default="runs/demo_table", help="each run trains in WORKDIR_ROOT/<method>_seed<S>")
    p.add_argument("--overwrite", action="store_true", help="delete run work directories that already exist")
    p.add_argument("--write_readme", action="store_true", help="write README.md's demo section from the results")
    p.add_argument("--from_json", action="store_true", help=f"train nothing: use --out's {JSON_NAME}")
    p.add_argument("--print_default", action="store_true",
                   help="print the default command's recorded IoU table (as it prints it) and stop")
    args = p.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: integers separated by commas, got {args.seeds!r}")
    if not args.seed_list or len(set(args.seed_list)) < len(args.seed_list):
        p.error(f"--seeds: one or more distinct seeds, got {args.seeds!r}")
    args.method_list = names_of(p, "--methods", args.methods, METHODS)
    if args.steps < 0:
        p.error("--steps must be >= 1 (or 0: the config's schedule)")
    if args.steps and not args.out and not (args.from_json or args.print_default):
        p.error(f"--steps needs --out: a shortened run must not replace the recorded {RESULTS / JSON_NAME}")
    args.out = args.out or str(RESULTS)
    return args


def run_spec(method: str, seed: int, steps: int = 0) -> str:
    """The --config argument of one run; STPG with seed 0 and the config's schedule is the README's demo command."""
    split, mode, _ = METHODS[method]
    if method == "stpg" and seed == 0 and not steps:
        return CONFIG
    return f"{CONFIG}:{split},mode={mode},seed={seed}" + (f",schedule.total_steps={steps}" if steps else "")


def run_command(method: str, seed: int, workdir: str, steps: int = 0) -> list[str]:
    return ["python", "launch.py", f"--config={run_spec(method, seed, steps)}", f"--workdir={workdir}"]


def run_one(method: str, seed: int, workdir: str, steps: int) -> dict:
    """Trains one run in ``workdir`` (a new folder; output in its train.log) and returns its record."""
    argv = run_command(method, seed, workdir, steps)
    print(f"=== {method}, seed {seed}: {shlex.join(argv)}", flush=True)
    t0 = time.monotonic()
    proc = start([sys.executable] + argv[1:], str(REPO / workdir / "train.log"),  # workdir as seen from REPO
                 {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:  # the run got the same Ctrl-C: it checkpoints and stops
        proc.wait()
        raise
    record = {"method": method, "seed": seed, "command": shlex.join(argv), "workdir": workdir,
              "wall_s": round(time.monotonic() - t0, 1), "returncode": returncode}
    if returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed (exit status {returncode}); see {workdir}/train.log")
    result = last_eval(str(REPO / workdir))
    record.update(step=result["step"], miou=result["miou"], pixel_accuracy=result["pixel_accuracy"],
                  iou=result["iou"], split_labeled_sha256_16=split_digest(str(REPO / workdir)))
    print(f"=== {method}, seed {seed}: mIoU {100 * result['miou']:.2f} after {record['wall_s']:.0f} s", flush=True)
    return record


def repo_path(path: str) -> str:
    """``path`` (relative to the current directory) as the runs see it from the repository root: relative to the
    root when it lies inside it, else absolute."""
    full = Path(path).resolve()
    return str(full.relative_to(REPO)) if full.is_relative_to(REPO) else str(full)


def measure(args) -> dict:
    root = repo_path(args.workdir_root)
    jobs = [(m, s, os.path.join(root, f"{m}_seed{s}")) for s in args.seed_list for m in args.method_list]
    existing = [w for _, _, w in jobs if (REPO / w).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"work directories already exist (a run there would resume, not start fresh): "
                              f"{', '.join(existing)}; remove them or pass --overwrite")
    for w in existing:
        shutil.rmtree(REPO / w)
    commit = git_commit(full=True)  # before the runs: the code they run
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    report = {
        "what": "configs/demo.py Gen-Student IoU on the generated val set, by method and training seed",
        "date": utc_now(), "commit": commit.removesuffix("-dirty"),
        "dirty": commit.endswith("-dirty"), "versions": versions,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": CONFIG, "split": SPLIT, "steps": args.steps or None, "seeds": args.seed_list,
        "methods": args.method_list, "default_command": DEFAULT_COMMAND, "data": data_sizes(), "runs": [],
    }
    for method, seed, workdir in jobs:
        report["runs"].append(run_one(method, seed, workdir, args.steps))
        check_splits(report["runs"])
        save(report, args.out)
    return report


def data_sizes() -> dict:
    """Image counts of the demo's split and of the ceiling's, from the config."""
    split, full = (load_config(f"{CONFIG}:{s}").data.synthetic for s in (SPLIT, "full"))
    return {"labeled": split.num_labeled, "unlabeled": split.num_unlabeled, "val": split.num_val,
            "ceiling_labeled": full.num_labeled}


def check_splits(runs: list[dict]):
    """Every run of one data split trained on the same labelled images, every seed of a method as many steps."""
    by_split, steps = {}, {}
    for r in runs:
        by_split.setdefault(METHODS[r["method"]][0], set()).add(r["split_labeled_sha256_16"])
        steps.setdefault(r["method"], set()).add(r.get("step"))
    for split, digests in by_split.items():
        if len(digests) > 1:
            raise RuntimeError(f"runs of split {split} trained on different labelled images ({sorted(digests)})")
    for method, counts in steps.items():
        if len(counts) > 1:
            raise RuntimeError(f"the {method} runs were evaluated after different steps ({sorted(counts)})")


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def rare_mean(run: dict) -> float:
    """Mean IoU of the rare classes the val set holds (a class absent from it has no IoU)."""
    return statistics.fmean(run["iou"][c] for c in RARE if run["iou"][c] is not None)


def summarize(report: dict) -> dict:
    """{method: {'iou': {class: spread}, 'miou': spread, 'rare': spread, 'wall_s': spread, 'seeds': [...]}} of the
    methods that have runs, in METHODS order."""
    out = {}
    for method in METHODS:
        runs = sorted((r for r in report["runs"] if r["method"] == method), key=lambda r: r["seed"])
        if not runs:
            continue
        classes = list(runs[0]["iou"])
        out[method] = {
            "seeds": [r["seed"] for r in runs],
            "iou": {c: spread([r["iou"][c] for r in runs]) if all(r["iou"][c] is not None for r in runs) else None
                    for c in classes},
            "miou": spread([r["miou"] for r in runs]),
            "rare": spread([rare_mean(r) for r in runs]),
            "wall_s": spread([r["wall_s"] for r in runs]),
        }
    return out


def paired(report: dict, a: str, b: str, key) -> list[float]:
    """key(run of a) − key(run of b) for each seed both have, in seed order."""
    runs = {(r["method"], r["seed"]): r for r in report["runs"]}
    seeds = sorted(s for m, s in runs if m == a and (b, s) in runs)
    return [key(runs[a, s]) - key(runs[b, s]) for s in seeds]


def pct(s: dict) -> str:
    return f"{100 * s['mean']:.2f} ± {100 * s['sd']:.2f}" if s["n"] > 1 else f"{100 * s['mean']:.2f}"


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def markdown(report: dict) -> str:
    """The README section (without the markers) from a report."""
    summary = summarize(report)
    methods = list(summary)
    seeds = sorted({r["seed"] for r in report["runs"]})
    v, d = report["versions"], report["data"]
    commit = f"`{report['commit'][:7]}`" + (" (with uncommitted changes)" if report["dirty"] else "")
    steps = f"{report['steps']} steps per run (shortened)" if report["steps"] else "the config's own schedule"
    intro = (
        f"`{report['config']}` ({report['split']}: {d['labeled']} labelled + {d['unlabeled']} unlabelled generated "
        f"scenes, {d['val']} val; the ceiling: all {d['ceiling_labeled']} labelled), {steps}, measured "
        f"{report['date']} at commit {commit} (JAX {v.get('jax')}, flax {v.get('flax')}, "
        f"{report['host']['cpus']} CPUs) by `python benchmarks/demo_table.py`: "
        f"{len(seeds)} training seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}; the same scenes "
        "and labelled split), each run alone in a fresh work directory. Gen-Student IoU %, mean ± sample standard "
        "deviation over the seeds:")
    lines = [
        textwrap.fill(intro, WIDTH, break_on_hyphens=False),
        "",
        "| class | " + " | ".join(METHODS[m][2] for m in methods) + " |",
        "| --- |" + " ---: |" * len(methods),
    ]
    for c in next(iter(summary.values()))["iou"]:
        cells = [pct(summary[m]["iou"][c]) if summary[m]["iou"][c] else "n/a" for m in methods]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **mIoU** | " + " | ".join(pct(summary[m]["miou"]) for m in methods) + " |")
    lines.append(f"| rare classes ({', '.join(RARE)}) | " + " | ".join(pct(summary[m]["rare"]) for m in methods)
                 + " |")
    lines.append("| wall time per run (whole command) | " + " | ".join(
        duration(summary[m]["wall_s"]["mean"]) for m in methods) + " |")
    comparisons = []
    for other in ("supervised", "mean_teacher"):
        if "stpg" in summary and other in summary:
            d = paired(report, "stpg", other, lambda r: r["miou"])
            d_rare = paired(report, "stpg", other, rare_mean)
            ahead = sum(x > 0 for x in d)
            comparisons.append(
                f"STPG − {METHODS[other][2]}, paired by seed: mIoU {100 * statistics.fmean(d):+.2f} points "
                f"(per seed {', '.join(f'{100 * x:+.2f}' for x in d)}; STPG ahead in {ahead} of {len(d)}), "
                f"rare classes {100 * statistics.fmean(d_rare):+.2f} points.")
    if comparisons:
        lines += [""] + [textwrap.fill(c, WIDTH, break_on_hyphens=False) for c in comparisons]
    default = default_run(report)
    if default:
        per_class = ", ".join(f"{c} {100 * v:.2f}" for c, v in default["iou"].items() if v is not None)
        text = (f"The demo command `{report['default_command']}` is the STPG run with seed 0: it prints mIoU "
                f"**{100 * default['miou']:.2f}** ({per_class}); `python benchmarks/demo_table.py --print_default` "
                "prints its whole table as the command does.")
        lines += ["", textwrap.fill(text, WIDTH, break_on_hyphens=False)]
    return "\n".join(lines)


def default_run(report: dict) -> dict | None:
    """The run of the README's demo command (STPG, seed 0, the config's schedule), if the report has it."""
    for r in report["runs"]:
        if r["method"] == "stpg" and r["seed"] == 0 and not report["steps"]:
            return r
    return None


def default_table(report: dict) -> str:
    """The default command's IoU table as it prints it (stpg_jax.evaluate.format_iou_table)."""
    import numpy as np

    from stpg_jax.evaluate import format_iou_table

    run = default_run(report)
    if run is None:
        raise LookupError("the results have no run of the demo command (STPG, seed 0, the config's schedule)")
    names = list(run["iou"])
    iou = [np.nan if run["iou"][n] is None else run["iou"][n] for n in names]
    return format_iou_table({"iou": iou, "miou": run["miou"]}, names)


def write_readme(text: str, readme: Path = README) -> None:
    """Replaces what lies between the markers in ``readme`` with ``text``."""
    content = readme.read_text()
    if content.count(START) != 1 or content.count(END) != 1 or content.index(START) > content.index(END):
        raise ValueError(f"{readme} needs exactly one {START} followed by one {END}")
    head, rest = content.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def readme_section(readme: Path = README) -> str | None:
    """The text between the markers, or None when the README has none."""
    content = readme.read_text()
    if START not in content or END not in content:
        return None
    return content.split(START, 1)[1].split(END, 1)[0].strip("\n")


def save(report: dict, out: str) -> None:
    write_json(os.path.join(out, JSON_NAME), report)
    with open(os.path.join(out, MD_NAME), "w") as f:
        f.write(markdown(report) + "\n")


def load(out: str) -> dict:
    path = os.path.join(out, JSON_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}: run benchmarks/demo_table.py first")
    return json.loads(Path(path).read_text())


def write_figure(report: dict, path: Path) -> str:
    """The methods compared per class (mean, min-max and each seed; stpg_jax.plots), or '' without matplotlib."""
    from stpg_jax import plots

    runs = report["runs"]
    if not runs:
        return ""
    try:
        plots.require_matplotlib("the demo table's figure")
    except plots.PlotsUnavailable as e:
        print(f"note: {e}; no figure written", file=sys.stderr)
        return ""
    classes = list(runs[0]["iou"])
    per_method = {m: [{c: None if r["iou"][c] is None else 100 * r["iou"][c] for c in classes}
                      for r in sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])]
                  for m in METHODS if any(r["method"] == m for r in runs)}
    return plots.method_comparison_png(per_method, classes, str(path), rare=RARE,
                                       title=f"{report['config']}: IoU % per class, {len(per_method)} methods")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_default:
        print(default_table(load(args.out)))
        return 0
    report = load(args.out) if args.from_json else measure(args)
    if not args.from_json:
        save(report, args.out)
    text = markdown(report)
    print("\n" + text)
    figure = write_figure(report, Path(args.out) / "demo_table.png")
    if figure:
        print(f"figure: {figure}")
    if args.write_readme:
        summary = summarize(report)
        short = [m for m in METHODS if m not in summary or summary[m]["miou"]["n"] < 3]
        if report["steps"] or short:
            print(f"error: --write_readme: the README's table needs the config's schedule and at least 3 seeds of "
                  f"every method ({', '.join(METHODS)}); these results have steps={report['steps']}"
                  f"{', fewer than 3 seeds of ' + ', '.join(short) if short else ''}", file=sys.stderr)
            return 2
        write_readme(text)
        print(f"\nwritten to {README} between {START} and {END}")
    return 0


if __name__ == "__main__":
    run_cli(main, FileExistsError, LookupError, RuntimeError, ValueError)
