"""Methods compared over training seeds on one config: supervised, mean teacher and STPG on the config's split, and
supervised training with every label (the ceiling).

    python benchmarks/experiment.py --write_readme                 # the README's demo table: 3 seeds x 4 methods
    python benchmarks/experiment.py --from_json --write_readme     # README.md's section from the recorded JSON
    python benchmarks/experiment.py --config=configs/camvid.py:1_8 --methods supervised,mean_teacher,stpg \
        --steps 300 --seeds 0,1,2 --out runs/camvid [--parallel]  # CamVid 1/8
    python benchmarks/experiment.py --config=configs/camvid.py:1_8 --smoke --out /tmp/camvid_smoke  # a CPU check

Each run is one ``python launch.py --config=CONFIG:SPLIT,mode=M,seed=S,... --workdir=ROOT/M_seedS`` in a new work
directory (the ceiling: split ``full``, mode ``supervised``); the run of the config's own mode and seed with nothing
added is ``--config=CONFIG`` itself: for configs/demo.py, the README's demo command. A run's result is its last
``eval_<step>.json``. ``--steps`` shortens every run, keeping an epoch-based schedule in proportion, and evaluates
once at the end. A dataset to prepare is prepared once, before the runs. ``--parallel`` starts each seed's runs
together on the one device, so that their start-up and compilation overlap (their wall times are then not solo
times), each preallocating its share of the device's memory ($XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.9 / runs).
``--out`` gets ``<config>_table.{json,md,png}`` (default benchmarks/results, for runs of the config's own schedule
only); ``--write_readme`` puts the demo's text
between the README's markers, and tests/test_experiment.py checks that the README says what the JSON holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

from common import (REPO, TINY_NETWORK, git_commit, ints_of, last_eval, load_config, names_of, run_cli, signal_group,
                    split_digest, start, utc_now, write_json)

from stpg_jax import plots
from stpg_jax.data.palettes import rare_classes

DEMO = "configs/demo.py"
METHODS = {"supervised": "supervised", "mean_teacher": "mean teacher", "stpg": "STPG",
           "ceiling": "supervised, all labels"}  # method → column heading
PAIRS = (("stpg", "supervised"), ("stpg", "mean_teacher"), ("mean_teacher", "supervised"))
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
WIDTH = 118  # README.md's line length
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain")
MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
TOTAL_MEM_FRACTION = 0.9  # of the accelerator, split between concurrent runs; the rest for CUDA contexts
STOP_GRACE_S = 5.0  # after SIGTERM, before SIGKILL (gpu_camvid.sh's `timeout -k 10` allows 10 s in all)
SMOKE_OVERRIDES = (  # the tiny network, crop 64, batch 2+2 and 4 val images: the whole pipeline in minutes
    f"{TINY_NETWORK},model.pretrained=,data.crop_size=64,data.batch_labeled=2,data.batch_unlabeled=2,data.workers=0,"
    "stpg.bank_capacity=32,stpg.anchor_steps=100,eval.window=64,eval.windows_per_batch=8,eval.max_images=4,"
    "log_every_steps=2"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEMO, help="config file and split, as launch.py takes it (no mode= or seed=)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    p.add_argument("--steps", type=int, default=0, help="training steps of every run (default: the config's own)")
    p.add_argument("--smoke", action="store_true", help="tiny network and crop, 4 steps: a CPU check in minutes")
    p.add_argument("--overrides", default="", help="extra comma-separated key=value overrides of every run")
    p.add_argument("--out", default="", help="folder for the results (default benchmarks/results)")
    p.add_argument("--workdir_root", default="", help="each run trains in WORKDIR_ROOT/<method>_seed<S> "
                                                      "(default runs/<config>_table)")
    p.add_argument("--overwrite", action="store_true", help="delete run work directories that already exist")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=False,
                   help="start each seed's runs at once on the one device (default: one after another)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write the per-class comparison PNG (needs matplotlib: pip install 'stpg_jax[plots]')")
    p.add_argument("--from_json", action="store_true", help="train nothing: use the results recorded in --out")
    p.add_argument("--write_readme", action="store_true", help="write README.md's demo section from the results")
    args = p.parse_args(argv)
    args.seed_list = ints_of(p, "--seeds", args.seeds)
    args.method_list = names_of(p, "--methods", args.methods, METHODS)
    if "mode=" in args.config or "mode=" in args.overrides.replace("model.", ""):
        p.error("the mode is set per method by --methods; leave mode= out of --config and --overrides")
    if any(o.strip().startswith("seed=") for o in f"{args.config.partition(':')[2]},{args.overrides}".split(",")):
        p.error("the training seed is set per run by --seeds; leave seed= out of --config and --overrides")
    if args.steps < 0:
        p.error("--steps must be >= 1 (or 0: the config's schedule)")
    args.steps = args.steps or (4 if args.smoke else 0)
    if (args.steps or args.overrides) and not args.out and not args.from_json:
        p.error(f"--steps, --smoke and --overrides need --out: such runs must not replace the recorded results in "
                f"{RESULTS}")
    args.stem = Path(args.config.partition(":")[0]).stem
    args.name = f"{args.stem}_table"
    args.out = args.out or str(RESULTS)
    args.workdir_root = repo_path(args.workdir_root) if args.workdir_root else f"runs/{args.name}"
    return args


def repo_path(path: str) -> str:
    """``path`` (relative to the current directory) as the runs see it from the repository root: relative to the
    root when it lies inside it, else absolute."""
    full = Path(path).resolve()
    return str(full.relative_to(REPO)) if full.is_relative_to(REPO) else str(full)


# The runs


def run_spec(config: str, method: str, seed: int, extra: str = "") -> str:
    """The --config of one run: ``config``'s split (the ceiling's: full), its overrides, the method's mode, the seed
    and ``extra``. The config's own mode and seed with nothing added is ``config`` itself."""
    c = load_config(config)
    if method == c.mode and seed == c.seed and not extra:
        return config
    path, _, arg = config.partition(":")
    items = arg.split(",") if arg else []
    own = ",".join(items[1:] if items and "=" not in items[0] else items)  # the overrides after the split name
    mode = "supervised" if method == "ceiling" else method
    return ",".join(x for x in (f"{path}:{'full' if method == 'ceiling' else c.split}", own, f"mode={mode}",
                                f"seed={seed}", extra) if x)


def extra_overrides(args) -> str:
    """What every run adds to the config: a shortened schedule, the prepared data's folder, the smoke network."""
    c = load_config(args.config)
    extra = []
    if args.steps:  # an epoch-based schedule in proportion: its epochs of steps // epochs steps
        extra += [f"schedule.total_steps={args.steps}",
                  f"schedule.steps_per_epoch={max(1, args.steps // c.schedule.epochs)}", "eval.every_steps=0"]
    if c.data.dataset != "synthetic":
        extra.append(f"data.data_dir={os.path.join(args.workdir_root, 'prepared')}")
    return ",".join(extra + ([SMOKE_OVERRIDES] if args.smoke else []) + ([args.overrides] if args.overrides else []))


def build_jobs(args) -> list[tuple[str, int, list[str], str]]:
    """[(method, seed, argv from the repository root, workdir)], seed by seed."""
    extra = extra_overrides(args)
    jobs = []
    for seed in args.seed_list:
        for m in args.method_list:
            workdir = os.path.join(args.workdir_root, f"{m}_seed{seed}")
            jobs.append((m, seed, ["python", "launch.py", f"--config={run_spec(args.config, m, seed, extra)}",
                                   f"--workdir={workdir}"], workdir))
    return jobs


def prepare_command(spec: str) -> list[str] | None:
    """The one preparation of the dataset that the runs of config ``spec`` read (None for generated data), done
    before they start so that concurrent runs never write the same ``data.data_dir``."""
    data = load_config(spec).data
    if data.dataset == "synthetic":
        return None
    cmd = [sys.executable, "-m", "stpg_jax.data.prepare", "--dataset", data.dataset, "--manual_dir", data.root]
    cmd += ["--data_dir", data.data_dir] if data.data_dir else []
    cmd += ["--sbd_root", data.sbd_root] if data.get("sbd_root") else []
    cmd += ["--class_names", ",".join(data.class_names)] if data.get("class_names") else []
    return cmd


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while runs were going."""


def _interrupt(signum, _frame):
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not break off the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def run_methods(jobs: list[tuple[str, int, list[str], str, dict | None]], parallel: bool) -> tuple[list, str | None]:
    """Runs ``jobs`` = [(method, seed, argv, workdir, env)], all at once or one after another (output in each
    workdir's train.log); returns ([the record of each run started], the signal that stopped them or
    None). A failed run leaves the others going; SIGINT or SIGTERM stops them all (SIGTERM, then SIGKILL after
    STOP_GRACE_S)."""
    procs, t0, wall, stopped_by = {}, {}, {}, None

    def poll():
        for key, proc in procs.items():
            if key not in wall and proc.poll() is not None:
                wall[key] = time.time() - t0[key]
                signal_group(proc, signal.SIGKILL)  # loader workers that outlived their run
                print(f"=== {key[0]}, seed {key[1]}: exit status {proc.returncode} after {wall[key]:.0f} s", flush=True)
        return len(wall) == len(procs)

    try:
        for method, seed, argv, workdir, env in jobs:
            print(f"=== {method}, seed {seed}: {shlex.join(argv)}\n    (output in {workdir}/train.log)", flush=True)
            t0[method, seed] = time.time()
            procs[method, seed] = start([sys.executable] + argv[1:], os.path.join(REPO, workdir, "train.log"), env)
            while not parallel and not poll():
                time.sleep(0.5)
        while not poll():
            time.sleep(0.5)
    except (Interrupted, KeyboardInterrupt) as e:
        stopped_by = str(e) if isinstance(e, Interrupted) else "SIGINT"
        print(f"\n=== {stopped_by}: stopping the runs", flush=True)
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
            for proc in procs.values():
                if proc.poll() is None:
                    signal_group(proc, sig)
            deadline = time.time() + grace
            while not poll() and time.time() < deadline:
                time.sleep(0.1)
    runs = [{**record(m, s, shlex.join(argv), os.path.join(REPO, workdir), wall.get((m, s)), procs[m, s].returncode),
             "workdir": workdir}
            for m, s, argv, workdir, _ in jobs if (m, s) in procs]
    return runs, stopped_by


def check_runs(runs: list[dict]) -> None:
    """Every run of one data split trained on the same labelled images, every seed of a method as many steps."""
    by_split, steps = {}, {}
    for r in finished(runs):
        by_split.setdefault(r["method"] == "ceiling", set()).add(r["split_labeled_sha256_16"])
        steps.setdefault(r["method"], set()).add(r.get("step"))
    for ceiling, digests in by_split.items():
        if len(digests) > 1:
            raise RuntimeError(f"runs of the {'full' if ceiling else 'same'} split trained on different labelled "
                               f"images ({sorted(digests)})")
    for method, counts in steps.items():
        if len(counts) > 1:
            raise RuntimeError(f"the {method} runs were evaluated after different steps ({sorted(counts)})")


def data_sizes(runs: list[dict]) -> dict:
    """Labelled and unlabelled training images (the runs' split files) and val images (their evaluations)."""
    sizes = {}
    for r in finished(runs):
        for key, name in (("ceiling_labeled", "labeled"),) if r["method"] == "ceiling" else (
                ("labeled", "labeled"), ("unlabeled", "unlabeled")):
            split = Path(REPO, r["workdir"], f"split_{name}.txt")
            if key not in sizes and split.exists():
                sizes[key] = len(split.read_text().split())
        if "val" not in sizes and r.get("val_images"):
            sizes["val"] = r["val_images"]
    return sizes


def measure(args, jobs, prepare) -> dict:
    existing = [w for *_, w in jobs if (REPO / w).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"work directories already exist (a run there would resume, not start fresh): "
                              f"{', '.join(existing)}; remove them or pass --overwrite")
    for w in existing:
        shutil.rmtree(REPO / w)
    t0, commit = time.time(), git_commit(full=True)  # before the runs: the code they run
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    c = load_config(args.config)
    report = {
        "what": f"{args.config} Gen-Student IoU on the val set, by method and training seed", "date": utc_now(),
        "commit": commit.removesuffix("-dirty"), "dirty": commit.endswith("-dirty"), "versions": versions,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()}, "config": args.config, "split": c.split,
        "steps": args.steps or None, "smoke": args.smoke, "overrides": args.overrides, "parallel": args.parallel,
        "seeds": args.seed_list, "methods": args.method_list,
        "default_command": f"python launch.py --config={args.config} --workdir=runs/{args.stem}",
        "data": {}, "prepare_s": None, "stopped_by": None, "runs": []}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if prepare:
        print(f"=== preparing the dataset once for every run: {shlex.join(prepare)}", flush=True)
        proc = start(prepare, os.path.join(REPO, args.workdir_root, "prepare.log"), env)
        try:
            if proc.wait() != 0:
                raise RuntimeError(f"data preparation failed; see {args.workdir_root}/prepare.log")
        except (Interrupted, KeyboardInterrupt):
            signal_group(proc, signal.SIGTERM)
            raise
        report["prepare_s"] = round(time.time() - t0, 1)
    if args.parallel and MEM_FRACTION_ENV not in os.environ:  # one set in the environment wins
        env[MEM_FRACTION_ENV] = f"{TOTAL_MEM_FRACTION / len(args.method_list):.3f}"
    groups = ([[j for j in jobs if j[1] == seed] for seed in args.seed_list] if args.parallel
              else [[j] for j in jobs])
    for group in groups:
        runs, report["stopped_by"] = run_methods([(*j, env) for j in group], args.parallel)
        report["runs"] += runs
        report["data"], report["total_wall_s"] = data_sizes(report["runs"]), round(time.time() - t0, 1)
        save(report, args.out, args.name)
        check_runs(report["runs"])
        if report["stopped_by"]:
            break
    return report


# The statistics: per method and class the mean and sample standard deviation over the seeds, the rare
# classes' mean IoU, and seed-paired mIoU differences with a 95 % Student-t interval


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


# The results


def markdown(report: dict) -> str:
    """The results' text (the README section of the demo, without the markers)."""
    runs, d, v = report["runs"], report["data"], report["versions"]
    seeds = sorted({r["seed"] for r in runs})
    commit = f"`{report['commit'][:7]}`" + (" (with uncommitted changes)" if report["dirty"] else "")
    steps = (f"{report['steps']} steps per run (shortened{', smoke' if report.get('smoke') else ''})"
             if report["steps"] else "the config's own schedule")
    sizes = (f"{d.get('labeled', 'n/a')} labelled + {d.get('unlabeled', 'n/a')} unlabelled images, "
             f"{d.get('val', 'n/a')} val")
    sizes += f"; the ceiling: all {d['ceiling_labeled']} labelled" if d.get("ceiling_labeled") else ""
    alone = ("each seed's runs together on one device, so each wall time includes waiting for the others"
             if report.get("parallel") else "each run alone in a fresh work directory")
    intro = (f"`{report['config']}` ({report['split']}: {sizes}), {steps}"
             + (f", overrides `{report['overrides']}`" if report.get("overrides") else "")
             + f", measured {report['date']} at commit {commit} (JAX {v.get('jax')}, flax {v.get('flax')}, "
             f"{report['host']['cpus']} CPUs) by `python benchmarks/experiment.py`: {len(seeds)} training "
             f"seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}; the same images and labelled "
             f"split), {alone}. Gen-Student IoU %, mean ± sample standard deviation over the seeds:")
    rare = rare_classes(load_config(report["config"]).data.dataset)
    label = "wall time per run (whole command" + (", concurrent)" if report.get("parallel") else ")")
    lines = [textwrap.fill(intro, WIDTH, break_on_hyphens=False), "", markdown_table(runs, METHODS, rare, label)]
    texts = [paired_text(runs, a, b, METHODS, rare) for a, b in PAIRS]
    if report.get("stopped_by"):
        texts.append(f"Stopped by {report['stopped_by']}: a run without a result did not finish.")
    default = default_run(report)
    if default:
        per_class = ", ".join(f"{c} {100 * x:.2f}" for c, x in default["iou"].items() if x is not None)
        texts.append(f"The command `{report['default_command']}` is the {METHODS[default['method']]} run with seed "
                     f"{default['seed']}: it prints mIoU **{100 * default['miou']:.2f}** ({per_class}).")
    for text in filter(None, texts):
        lines += ["", textwrap.fill(text, WIDTH, break_on_hyphens=False)]
    return "\n".join(lines)


def default_run(report: dict) -> dict | None:
    """The finished run of the config itself (its own mode, seed and schedule), if the report has it."""
    own = f"--config={report['config']}"
    return next((r for r in finished(report["runs"]) if own in shlex.split(r["command"])), None)


def write_readme(text: str, readme: Path = README) -> None:
    """Replaces what lies between the markers in ``readme`` with ``text``."""
    content = readme.read_text()
    if content.count(START) != 1 or content.count(END) != 1 or content.index(START) > content.index(END):
        raise ValueError(f"{readme} needs exactly one {START} followed by one {END}")
    head, rest = content.split(START)
    readme.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END)[1]}")


def readme_section(readme: Path = README) -> str | None:
    """The text between the markers, or None when the README has none."""
    content = readme.read_text()
    if START not in content or END not in content:
        return None
    return content.split(START, 1)[1].split(END, 1)[0].strip("\n")


def save(report: dict, out: str, name: str) -> None:
    write_json(os.path.join(out, f"{name}.json"), report)
    Path(out, f"{name}.md").write_text(markdown(report) + "\n")


def load(out: str, name: str) -> dict:
    path = os.path.join(out, f"{name}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}: run benchmarks/experiment.py without --from_json first")
    return json.loads(Path(path).read_text())


def readme_problem(report: dict) -> str | None:
    """Why these results cannot be the README's demo table, or None."""
    summary = summarize(report["runs"], METHODS)
    short = [m for m in METHODS if m not in summary or summary[m]["miou"]["n"] < 3]
    if report["config"] == DEMO and not (report["steps"] or report.get("overrides") or short):
        return None
    return (f"--write_readme: the README's table needs {DEMO} with its own schedule and at least 3 seeds of every "
            f"method ({', '.join(METHODS)}); these results are of {report['config']}, steps={report['steps']}"
            + (f", overrides {report['overrides']!r}" if report.get("overrides") else "")
            + (f", fewer than 3 seeds of {', '.join(short)}" if short else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        plots.require_matplotlib("the comparison PNG (--no-plot leaves it out)")  # before any training
    if args.from_json:
        report = load(args.out, args.name)
        Path(args.out, f"{args.name}.md").write_text(markdown(report) + "\n")
    else:
        jobs = build_jobs(args)
        print("commands (run from the repository root):\n" + "".join(f"  {shlex.join(j[2])}\n" for j in jobs))
        prepare = prepare_command(jobs[0][2][2].removeprefix("--config="))  # every run reads the same data
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            report = measure(args, jobs, prepare)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print("\n" + markdown(report), flush=True)
    if args.plot:
        path = write_figure(report["runs"], METHODS, os.path.join(args.out, f"{args.name}.png"),
                            f"{report['config']}: IoU % per class, by method over the seeds",
                            rare_classes(load_config(report["config"]).data.dataset))
        print(f"figure: {path}" if path else "no figure: no run finished", flush=True)
    failed = [f"{m} seed {s}" for m in report["methods"] for s in report["seeds"]
              if not any(r["method"] == m and r["seed"] == s for r in finished(report["runs"]))]
    if failed:
        print(f"error: failed or not run: {', '.join(failed)} (see their train.log)", file=sys.stderr)
        return 128 + signal.Signals[report["stopped_by"]] if report.get("stopped_by") else 1
    if args.write_readme:
        problem = readme_problem(report)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        write_readme(markdown(report))
        print(f"\nwritten to {README} between {START} and {END}")
    return 0


if __name__ == "__main__":
    run_cli(main, FileExistsError, RuntimeError, ValueError, plots.PlotsUnavailable)
