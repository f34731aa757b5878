"""CamVid 1/8: supervised training, mean teacher and STPG with the same schedule, crop, batch and seed; repeats with
other training seeds combined into means, paired differences and a figure.

    python benchmarks/camvid_experiment.py --steps 300 --workdir_root runs/camvid [--parallel]
    python benchmarks/camvid_experiment.py --smoke --workdir_root /tmp/camvid_smoke      # tiny network, CPU, minutes
    python benchmarks/camvid_experiment.py --combine ROOT0/camvid_results.json ROOT1/camvid_results.json --out DIR

Each method is one ``python launch.py --config=configs/camvid.py:1_8,mode=M,... --workdir=ROOT/M`` (the commands go
to ``commands.txt``), its output to ``ROOT/M/train.log``, its result the last ``eval_<step>.json`` it writes. A short
run keeps STPG's epoch-based schedule in proportion (``schedule.steps_per_epoch = steps // epochs``) and evaluates
once, at the end. The dataset is prepared once before the runs. ``--parallel`` starts them together on the one
device, each preallocating its share of its memory, so that their start-up and compilation overlap (their wall times
are then not solo times). Results in ``--out``: ``camvid_results.{md,json,png}``; ``--combine`` writes
``camvid_results_combined.{md,png}`` after checking that the repeats differ only in ``seed=``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from common import (TINY_NETWORK, last_eval, load_config, names_of, report_header, run_cli, signal_group, split_digest,
                    start)

from stpg_jax import plots
from stpg_jax.data.palettes import rare_classes

METHODS = ("supervised", "mean_teacher", "stpg")
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
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=0, help="training steps of every run (default 300; smoke 4)")
    p.add_argument("--workdir_root", help="each method trains in WORKDIR_ROOT/<method> (required to run)")
    p.add_argument("--config", default="configs/camvid.py:1_8", help="config file and split (no mode= here)")
    p.add_argument("--overrides", default="", help="extra comma-separated key=value overrides for every run")
    p.add_argument("--out", default="", help="folder for the results (default the workdir root)")
    p.add_argument("--smoke", action="store_true", help="tiny network and crop, few steps: a CPU check")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=False,
                   help="start every run at once on the one device (default: one after another)")
    p.add_argument("--mem_fraction", type=float, default=0.0,
                   help=f"--parallel: {MEM_FRACTION_ENV} of each run (default {TOTAL_MEM_FRACTION} / number of "
                        f"runs; ${MEM_FRACTION_ENV} set in the environment wins)")
    p.add_argument("--dry_run", action="store_true", help="print the commands and stop")
    p.add_argument("--combine", nargs="+", metavar="RESULTS_JSON",
                   help="instead of training: summarise repeats (camvid_results.json of each) into --out")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write the per-class comparison PNG (needs matplotlib: pip install 'stpg_jax[plots]')")
    args = p.parse_args(argv)
    if args.combine:
        if not args.out:
            p.error("--combine needs --out (the folder for camvid_results_combined.md)")
        return args
    if not args.workdir_root:
        p.error("--workdir_root is required (each method trains in WORKDIR_ROOT/<method>)")
    args.method_list = names_of(p, "--methods", args.methods, METHODS)
    if "mode=" in args.config or "mode=" in args.overrides.replace("model.", ""):
        p.error("the mode is set per method by --methods; leave mode= out of --config and --overrides")
    args.steps = args.steps or (4 if args.smoke else 300)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.mem_fraction = args.mem_fraction or TOTAL_MEM_FRACTION / len(args.method_list)
    if not 0 < args.mem_fraction * len(args.method_list) <= 1:
        p.error(f"--mem_fraction: {len(args.method_list)} runs of {args.mem_fraction} exceed the device")
    args.workdir_root = os.path.abspath(args.workdir_root)  # the runs start in the repository root
    args.data_dir = os.path.join(args.workdir_root, "prepared")  # prepared once, read by every run
    args.out = args.out or args.workdir_root
    return args


def build_commands(args) -> list[tuple[str, list[str], str]]:
    """[(method, argv from the repository root, workdir)]."""
    epochs = load_config(args.config).schedule.epochs  # STPG's schedule in proportion: epochs of steps // epochs
    common = [f"schedule.total_steps={args.steps}", f"schedule.steps_per_epoch={max(1, args.steps // epochs)}",
              "eval.every_steps=0", f"data.data_dir={args.data_dir}"]
    common += [SMOKE_OVERRIDES] if args.smoke else []
    common += [args.overrides] if args.overrides else []
    return [(m, ["python", "launch.py", f"--config={args.config},mode={m}," + ",".join(common),
                 f"--workdir={os.path.join(args.workdir_root, m)}"], os.path.join(args.workdir_root, m))
            for m in args.method_list]


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


def run_methods(jobs: list[tuple[str, list[str], str, dict]], parallel: bool) -> tuple[dict, str | None]:
    """Runs ``jobs`` = [(method, argv, workdir, env)], all at once or one after another; returns ({method: its
    command, exit status, wall time and result} of the runs started, the signal that stopped them or None). A failed
    run leaves the others going; SIGINT or SIGTERM stops them all (SIGTERM, then SIGKILL after STOP_GRACE_S)."""
    procs, t0, wall, stopped_by = {}, {}, {}, None

    def poll():
        for method, proc in procs.items():
            if method not in wall and proc.poll() is not None:
                wall[method] = time.time() - t0[method]
                signal_group(proc, signal.SIGKILL)  # loader workers that outlived their run
                print(f"=== {method}: exit status {proc.returncode} after {wall[method]:.0f}s", flush=True)
        return len(wall) == len(procs)

    try:
        for method, argv, workdir, env in jobs:
            print(f"=== {method}: {shlex.join(argv)}\n    (output in {workdir}/train.log)", flush=True)
            t0[method] = time.time()
            procs[method] = start([sys.executable] + argv[1:], os.path.join(workdir, "train.log"), env)
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
    runs = {}
    for method, argv, workdir, _ in jobs:
        if method in procs:
            runs[method] = {"command": shlex.join(argv), "returncode": procs[method].returncode,
                            "wall_s": wall.get(method), "result": result_of(workdir),
                            "log": os.path.join(workdir, "train.log")}
    return runs, stopped_by


def result_of(workdir: str) -> dict | None:
    """IoU % by class and mIoU % of the run's last evaluation; None if it wrote none."""
    try:
        record = last_eval(workdir)
    except FileNotFoundError:
        return None
    return {"step": record["step"], "miou": 100 * record["miou"],
            "iou": {c: None if v is None else 100 * v for c, v in record["iou"].items()}}


def _methods_with_result(repeats: list[dict]) -> list[str]:
    """The methods, in METHODS order, that have a result in every repeat ({method: run} each)."""
    return [m for m in METHODS if all((runs.get(m) or {}).get("result") for runs in repeats)]


def iou_table(repeats: list[dict], concurrent: bool = False) -> str | None:
    """Rows = classes, mIoU and wall time; columns = methods. With several repeats each cell is their mean, then
    each repeat's value. None if no method has a result in every repeat."""
    methods = _methods_with_result(repeats)
    if not methods:
        return None

    def row(label, value_of, digits=2, bold=False):
        cells = []
        for m in methods:
            values = [value_of(runs[m]) for runs in repeats]
            if any(v is None or math.isnan(v) for v in values):
                cells.append("n/a")
                continue
            cell = f"{statistics.mean(values):.{digits}f}"
            cell += f" ({' / '.join(f'{v:.{digits}f}' for v in values)})" if len(values) > 1 else ""
            cells.append(f"**{cell}**" if bold else cell)
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = ["| class | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    lines += [row(name, lambda r, name=name: r["result"]["iou"].get(name))
              for name in repeats[0][methods[0]]["result"]["iou"]]
    lines.append(row("**mIoU**", lambda r: r["result"]["miou"], bold=True))
    label = "wall time (train + eval, concurrent), s" if concurrent else "wall time (train + eval), s"
    lines.append(row(label, lambda r: r["wall_s"], digits=0))
    return "\n".join(lines)


def paired_differences(repeats: list[dict]) -> str | None:
    """The mIoU differences between methods trained with the same seed: per pair each repeat's, their mean, sample
    sd, two-sided 95 % Student-t interval of the mean and how often the first is ahead. None below 2 x 2."""
    from scipy import stats

    methods, n = _methods_with_result(repeats), len(repeats)
    if n < 2 or len(methods) < 2:
        return None
    t = float(stats.t.ppf(0.975, n - 1))
    lines = ["| mIoU difference | per repeat | mean | sd | 95 % interval of the mean | repeats ahead |",
             "|---|---|---:|---:|---|---:|"]
    for i, base in enumerate(methods):
        for other in methods[i + 1:]:
            d = [runs[other]["result"]["miou"] - runs[base]["result"]["miou"] for runs in repeats]
            mean, half = statistics.mean(d), t * statistics.stdev(d) / math.sqrt(n)
            lines.append(f"| {other} − {base} | {' / '.join(f'{x:+.2f}' for x in d)} | {mean:+.2f} | "
                         f"{statistics.stdev(d):.2f} | {mean - half:+.2f} to {mean + half:+.2f} | "
                         f"{sum(x > 0 for x in d)} of {n} |")
    return "\n".join(lines)


def write_figure(repeats: list[dict], path: str, title: str, config: str) -> None:
    """Per class a bar per method at its mean over the repeats, whiskers from the lowest to the highest, a dot per
    repeat; the dataset's rare classes marked."""
    methods = _methods_with_result(repeats)
    if not methods:
        return
    names = list(repeats[0][methods[0]]["result"]["iou"]) + ["mIoU"]
    per_method = {m: [{**runs[m]["result"]["iou"], "mIoU": runs[m]["result"]["miou"]} for runs in repeats]
                  for m in methods}
    print(f"figure: {path}", flush=True)
    plots.method_comparison_png(per_method, names, path, rare=rare_classes(load_config(config).data.dataset),
                                title=title)


def collect_split(args, runs: dict) -> dict:
    """Copies the first run's split files next to the results; says whether every run used the same one."""
    digests = {m: split_digest(Path(args.workdir_root, m)) for m in runs
               if Path(args.workdir_root, m, "split_labeled.txt").exists()}
    if not digests:
        return {"identical": None, "sha256_16": {}}
    first = Path(args.workdir_root, next(iter(digests)))
    for name in ("split_labeled.txt", "split_unlabeled.txt", "split.json"):
        if (first / name).exists():
            shutil.copyfile(first / name, os.path.join(args.out, name))
    return {"identical": len(set(digests.values())) == 1, "sha256_16": digests,
            "num_labeled": len((first / "split_labeled.txt").read_text().split())}


def _seed_of(overrides: str) -> str:
    seeds = [o[len("seed="):] for o in overrides.split(",") if o.startswith("seed=")]
    return seeds[-1] if seeds else "0 (config default)"


def combine_results(reports: list[dict], names: list[str]) -> str:
    """Markdown of repeats that differ only in the training seed; ValueError naming the file and the field where
    two are not comparable."""
    def fields(r):
        return {"config": r["config"], "steps": r["steps"], "methods": sorted(r["runs"]),
                "overrides without seed=": ",".join(o for o in r["overrides"].split(",") if not o.startswith("seed=")),
                "labelled split": sorted(set(r["split"]["sha256_16"].values())),
                "concurrent runs": r.get("parallel", False)}

    ref = fields(reports[0])
    for name, report in zip(names[1:], reports[1:]):
        for key, value in fields(report).items():
            if value != ref[key]:
                raise ValueError(f"{name}: {key} is {value!r}, but {names[0]} has {ref[key]!r}; repeats must differ "
                                 "only in seed=")
    seeds = [_seed_of(r["overrides"]) for r in reports]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"two repeats have the same training seed ({', '.join(seeds)}): nothing to average")
    table = iou_table([r["runs"] for r in reports], concurrent=bool(reports[0].get("parallel")))
    if table is None:
        raise ValueError("no method has a result in every repeat")
    text = (f"CamVid {reports[0]['config']}, {reports[0]['steps']} steps per method, {len(reports)} repeats with "
            f"training seeds {', '.join(seeds)} (same labelled split); commits "
            f"{', '.join(r['commit'] for r in reports)}. Each cell: mean over the repeats (each repeat's value, in "
            "seed order).\n\n" + table + "\n")
    paired = paired_differences([r["runs"] for r in reports])
    if paired:
        text += ("\nPaired by seed (each difference between two methods trained with the same seed; the interval "
                 "is mean ± t(0.975, n−1) · sd / √n):\n\n" + paired + "\n")
    return text


def combine_main(args) -> int:
    try:
        reports = [json.loads(Path(path).read_text()) for path in args.combine]
        text = combine_results(reports, args.combine)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        print(f"error: --combine: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: --combine: a results file lacks the field {e}: give camvid_results.json files",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "camvid_results_combined.md").write_text(text)
    print(text, end="")
    if args.plot:
        r = reports[0]
        write_figure([r["runs"] for r in reports], os.path.join(args.out, "camvid_results_combined.png"),
                     f"CamVid {r['config']}, {r['steps']} steps, {len(reports)} seed(s): IoU % per class", r["config"])
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot and not args.dry_run:
        plots.require_matplotlib("the comparison PNG (--no-plot leaves it out)")  # before any training
    if args.combine:
        return combine_main(args)
    commands = build_commands(args)
    print("commands (run from the repository root):\n" + "".join(f"  {shlex.join(a)}\n" for _, a, _ in commands))
    prepare = prepare_command(commands[0][1][2][len("--config="):])  # a bad --config fails here
    if args.dry_run:
        return 0
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "commands.txt").write_text("".join(shlex.join(a) + "\n" for _, a, _ in commands))
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_experiment(args, commands, prepare, argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_experiment(args, commands, prepare, argv=None) -> int:
    t0 = time.time()
    header = report_header("camvid_experiment.py", argv)  # now: the code the runs run
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    prepare_s = None
    if prepare:
        print(f"=== preparing the dataset once for every run: {shlex.join(prepare)}", flush=True)
        proc = start(prepare, os.path.join(args.workdir_root, "prepare.log"), env)
        try:
            if proc.wait() != 0:
                print(f"data preparation failed; see {args.workdir_root}/prepare.log", file=sys.stderr)
                return 1
        except (Interrupted, KeyboardInterrupt):
            signal_group(proc, signal.SIGTERM)
            return 130
        prepare_s = time.time() - t0
    fraction = {MEM_FRACTION_ENV: f"{args.mem_fraction:.3f}"} if args.parallel else {}
    jobs = [(m, argv, workdir, {**fraction, **env}) for m, argv, workdir in commands]
    runs, stopped_by = run_methods(jobs, args.parallel)
    split = collect_split(args, runs)
    text = (f"CamVid {args.config}, {args.steps} steps per method{' (smoke)' if args.smoke else ''}, "
            f"{header['date']}, commit {header['commit']}, host {header['host']}; labelled frames: "
            f"{split.get('num_labeled', 'n/a')}, the same for every method: {split['identical']}. ")
    text += (f"The {len(jobs)} runs shared one device concurrently ({MEM_FRACTION_ENV} "
             f"{jobs[0][3][MEM_FRACTION_ENV]} each), so each wall time includes waiting for the others."
             if args.parallel else "The runs went one after another.")
    text += f" Total wall time {time.time() - t0:.0f} s"
    text += f", {prepare_s:.0f} s of it preparing the data." if prepare_s is not None else "."
    text += f" Stopped by {stopped_by}: a run without a column did not finish." if stopped_by else ""
    text += "\n\n" + (iou_table([runs], args.parallel) or "(no run wrote a result)")
    text += "\n\nCommands:\n" + "".join(f"    {r['command']}\n" for r in runs.values())
    print("\n" + text, flush=True)
    Path(args.out, "camvid_results.md").write_text(text)
    report = {**header, "config": args.config, "steps": args.steps, "smoke": args.smoke, "overrides": args.overrides,
              "parallel": args.parallel, "total_wall_s": time.time() - t0, "prepare_s": prepare_s,
              "stopped_by": stopped_by, "split": split, "runs": runs}
    Path(args.out, "camvid_results.json").write_text(json.dumps(report, indent=1))
    if args.plot:
        write_figure([runs], os.path.join(args.out, "camvid_results.png"), f"CamVid {args.config}, {args.steps} "
                     f"steps{' (smoke)' if args.smoke else ''}: IoU % per class", args.config)
    failed = [m for m, *_ in commands if m not in runs or runs[m]["returncode"] != 0 or not runs[m]["result"]]
    if failed:
        print(f"failed: {', '.join(failed)} (see their train.log)", file=sys.stderr)
        return 128 + signal.Signals[stopped_by] if stopped_by else 1
    return 0


if __name__ == "__main__":
    run_cli(main, plots.PlotsUnavailable)
