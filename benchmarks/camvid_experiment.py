"""CamVid 1/8: supervised training, mean teacher and STPG with the same schedule, crop and batch, over one or more
training seeds: per class the mean and spread over the seeds, seed-paired differences and a figure.

    python benchmarks/camvid_experiment.py --steps 300 --seeds 0,1,2 --workdir_root runs/camvid [--parallel]
    python benchmarks/camvid_experiment.py --smoke --workdir_root /tmp/camvid_smoke      # tiny network, CPU, minutes

Each run is one ``python launch.py --config=configs/camvid.py:1_8,mode=M,seed=S,... --workdir=ROOT/M_seedS`` (the
commands go to ``commands.txt``), its output to its ``train.log``, its result the last ``eval_<step>.json`` it writes
(benchmarks/compare.py). A short run keeps STPG's epoch-based schedule in proportion (``schedule.steps_per_epoch =
steps // epochs``) and evaluates once, at the end. The dataset is prepared once before the runs. ``--parallel``
starts one seed's methods together on the one device, each preallocating its share of its memory, so that their
start-up and compilation overlap (their wall times are then not solo times). Results in ``--out``:
``camvid_results.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import compare
from common import TINY_NETWORK, load_config, names_of, report_header, run_cli, signal_group, start

from stpg_jax import plots
from stpg_jax.data.palettes import rare_classes

METHODS = ("supervised", "mean_teacher", "stpg")
HEADINGS = {m: m for m in METHODS}
PAIRS = (("stpg", "supervised"), ("stpg", "mean_teacher"), ("mean_teacher", "supervised"))
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
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated (default 0)")
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
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write the per-class comparison PNG (needs matplotlib: pip install 'stpg_jax[plots]')")
    args = p.parse_args(argv)
    args.seed_list = compare.seeds_of(p, args.seeds)
    if not args.workdir_root:
        p.error("--workdir_root is required (each method trains in WORKDIR_ROOT/<method>)")
    args.method_list = names_of(p, "--methods", args.methods, METHODS)
    if "mode=" in args.config or "mode=" in args.overrides.replace("model.", ""):
        p.error("the mode is set per method by --methods; leave mode= out of --config and --overrides")
    if any(o.strip().startswith("seed=") for o in f"{args.config.partition(':')[2]},{args.overrides}".split(",")):
        p.error("the training seed is set per run by --seeds; leave seed= out of --config and --overrides")
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


def build_commands(args, seed: int) -> list[tuple[str, list[str], str]]:
    """[(method, argv from the repository root, workdir)] of one training seed."""
    epochs = load_config(args.config).schedule.epochs  # STPG's schedule in proportion: epochs of steps // epochs
    common = [f"seed={seed}", f"schedule.total_steps={args.steps}",
              f"schedule.steps_per_epoch={max(1, args.steps // epochs)}", "eval.every_steps=0",
              f"data.data_dir={args.data_dir}"]
    common += [SMOKE_OVERRIDES] if args.smoke else []
    common += [args.overrides] if args.overrides else []
    workdirs = {m: os.path.join(args.workdir_root, f"{m}_seed{seed}") for m in args.method_list}
    return [(m, ["python", "launch.py", f"--config={args.config},mode={m}," + ",".join(common),
                 f"--workdir={workdirs[m]}"], workdirs[m]) for m in args.method_list]


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


def run_methods(jobs: list[tuple[str, list[str], str, dict]], parallel: bool, seed: int = 0) -> tuple[dict, str | None]:
    """Runs ``jobs`` = [(method, argv, workdir, env)] of training seed ``seed``, all at once or one after another;
    returns ({method: its record (compare.record)} of the runs started, the signal that stopped them or None). A
    failed run leaves the others going; SIGINT or SIGTERM stops them all (SIGTERM, then SIGKILL after STOP_GRACE_S)."""
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
    runs = {method: compare.record(method, seed, shlex.join(argv), workdir, wall.get(method), procs[method].returncode)
            for method, argv, workdir, _ in jobs if method in procs}
    return runs, stopped_by


def collect_split(args, runs: list[dict]) -> dict:
    """Copies the first run's split files next to the results; says whether every run used the same one."""
    digests = {f"{r['method']}_seed{r['seed']}": r["split_labeled_sha256_16"] for r in runs
               if r["split_labeled_sha256_16"]}
    if not digests:
        return {"identical": None, "sha256_16": {}}
    first = Path(next(r["workdir"] for r in runs if r["split_labeled_sha256_16"]))
    for name in ("split_labeled.txt", "split_unlabeled.txt", "split.json"):
        if (first / name).exists():
            shutil.copyfile(first / name, os.path.join(args.out, name))
    labelled = first / "split_labeled.txt"
    return {"identical": len(set(digests.values())) == 1, "sha256_16": digests,
            "num_labeled": len(labelled.read_text().split()) if labelled.exists() else None}


def results_text(runs: list[dict], rare, concurrent: bool) -> str:
    """The per-class table over the seeds and the seed-paired comparisons of the methods."""
    label = "wall time per run (train + eval, concurrent)" if concurrent else "wall time per run (train + eval)"
    lines = [compare.markdown_table(runs, HEADINGS, rare, label)]
    pairs = [compare.paired_text(runs, a, b, HEADINGS, rare) for a, b in PAIRS]
    return "\n\n".join(lines + [p for p in pairs if p])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot and not args.dry_run:
        plots.require_matplotlib("the comparison PNG (--no-plot leaves it out)")  # before any training
    commands = {seed: build_commands(args, seed) for seed in args.seed_list}
    every = [a for seed in args.seed_list for _, a, _ in commands[seed]]
    print("commands (run from the repository root):\n" + "".join(f"  {shlex.join(a)}\n" for a in every))
    prepare = prepare_command(every[0][2][len("--config="):])  # a bad --config fails here
    if args.dry_run:
        return 0
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "commands.txt").write_text("".join(shlex.join(a) + "\n" for a in every))
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
    runs, stopped_by = [], None
    for seed in args.seed_list:
        jobs = [(m, argv, workdir, {**fraction, **env}) for m, argv, workdir in commands[seed]]
        done, stopped_by = run_methods(jobs, args.parallel, seed)
        runs += done.values()
        if stopped_by:
            break
    split = collect_split(args, runs)
    rare = rare_classes(load_config(args.config).data.dataset)
    seeds = ", ".join(map(str, args.seed_list))
    text = (f"CamVid {args.config}, {args.steps} steps per run{' (smoke)' if args.smoke else ''}, training seeds "
            f"{seeds}, {header['date']}, commit {header['commit']}, host {header['host']}; labelled frames: "
            f"{split.get('num_labeled', 'n/a')}, the same for every run: {split['identical']}. ")
    text += (f"Each seed's {len(commands[args.seed_list[0]])} runs shared one device concurrently "
             f"({MEM_FRACTION_ENV} {args.mem_fraction:.3f} each), so each wall time includes waiting for the others."
             if args.parallel else "The runs went one after another.")
    text += f" Total wall time {time.time() - t0:.0f} s"
    text += f", {prepare_s:.0f} s of it preparing the data." if prepare_s is not None else "."
    text += f" Stopped by {stopped_by}: a run without a result did not finish." if stopped_by else ""
    text += " IoU %, mean ± sample standard deviation over the seeds.\n\n" + results_text(runs, rare, args.parallel)
    text += "\n\nCommands:\n" + "".join(f"    {r['command']}\n" for r in runs)
    print("\n" + text, flush=True)
    Path(args.out, "camvid_results.md").write_text(text)
    report = {**header, "config": args.config, "steps": args.steps, "seeds": args.seed_list, "smoke": args.smoke,
              "overrides": args.overrides, "parallel": args.parallel, "total_wall_s": time.time() - t0,
              "prepare_s": prepare_s, "stopped_by": stopped_by, "split": split, "runs": runs}
    Path(args.out, "camvid_results.json").write_text(json.dumps(report, indent=1))
    if args.plot:
        path = compare.write_figure(runs, HEADINGS, os.path.join(args.out, "camvid_results.png"),
                                    f"CamVid {args.config}, {args.steps} steps{' (smoke)' if args.smoke else ''}, "
                                    f"seeds {seeds}: IoU % per class", rare)
        print(f"figure: {path}" if path else "no figure: no run finished", flush=True)
    expected = [(m, seed) for seed in args.seed_list for m in args.method_list]
    ok = {(r["method"], r["seed"]) for r in runs if r["returncode"] == 0 and r["miou"] is not None}
    failed = [f"{m} seed {seed}" for m, seed in expected if (m, seed) not in ok]
    if failed:
        print(f"failed or not run: {', '.join(failed)} (see their train.log)", file=sys.stderr)
        return 128 + signal.Signals[stopped_by] if stopped_by else 1
    return 0


if __name__ == "__main__":
    run_cli(main, plots.PlotsUnavailable)
