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
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import compare
from common import REPO, git_commit, load_config, names_of, run_cli, start, utc_now, write_json

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
HEADINGS = {m: heading for m, (_, _, heading) in METHODS.items()}
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
    args.seed_list = compare.seeds_of(p, args.seeds)
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
    record = compare.record(method, seed, shlex.join(argv), str(REPO / workdir), time.monotonic() - t0, returncode)
    record["workdir"] = workdir
    if returncode != 0 or record["miou"] is None:
        raise RuntimeError(f"{method} seed {seed} failed (exit status {returncode}); see {workdir}/train.log")
    print(f"=== {method}, seed {seed}: mIoU {100 * record['miou']:.2f} after {record['wall_s']:.0f} s", flush=True)
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


def markdown(report: dict) -> str:
    """The README section (without the markers) from a report."""
    runs = report["runs"]
    seeds = sorted({r["seed"] for r in runs})
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
    lines = [textwrap.fill(intro, WIDTH, break_on_hyphens=False), "", compare.markdown_table(runs, HEADINGS, RARE)]
    comparisons = [compare.paired_text(runs, "stpg", other, HEADINGS, RARE) for other in ("supervised", "mean_teacher")]
    comparisons = [c for c in comparisons if c]
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
    """The methods compared per class (compare.write_figure), or '' without matplotlib or runs."""
    from stpg_jax import plots

    try:
        plots.require_matplotlib("the demo table's figure")
    except plots.PlotsUnavailable as e:
        print(f"note: {e}; no figure written", file=sys.stderr)
        return ""
    return compare.write_figure(report["runs"], HEADINGS, str(path), rare=RARE,
                                title=f"{report['config']}: IoU % per class, by method over the seeds")


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
        summary = compare.summarize(report["runs"], METHODS)
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
