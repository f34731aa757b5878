"""CamVid 1/8: supervised-only vs mean teacher vs STPG with one schedule, crop, batch and seed (issue 7).

    python benchmarks/camvid_experiment.py --methods supervised,mean_teacher,stpg --steps 300 \
        --workdir_root runs/camvid_exp
    python benchmarks/camvid_experiment.py --smoke --workdir_root /tmp/camvid_smoke    # tiny network, CPU, minutes

Each method is one ordinary training run, ``python launch.py --config=configs/camvid.py:1_8,mode=M,...
--workdir=ROOT/M``, started one after another; the commands are printed and written to ``commands.txt``. Every run
gets the same overrides: ``schedule.total_steps=N``, and ``schedule.steps_per_epoch=N // epochs`` so that STPG's
epoch-based schedule (bank from epoch 6, contrastive from 11, proximity from 16, matching frozen at 20 of 40) keeps
its place in a short run (``--no_proportional_schedule`` keeps the data's own epoch length instead), and
``eval.every_steps=0`` (one evaluation, at the end, on the whole val split). The split is seeded
(``data.split_seed``); each run writes it to its workdir and it is copied next to the results, with a check that
all methods trained on the same labelled frames.

Results: ``camvid_results.md`` (rows = classes, columns = methods, IoU %, plus mIoU and wall time) and
``camvid_results.json`` in ``--out`` (default: the workdir root), read from the IoU table each run prints at its end.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import git_commit  # noqa: E402  (the sibling script)

METHODS = ("supervised", "mean_teacher", "stpg")
SPLIT_FILES = ("split_labeled.txt", "split_unlabeled.txt", "split.json")

# A tiny randomly initialised network, crop 64, batch 2+2 and 4 val images: the whole pipeline in minutes on a CPU.
SMOKE_OVERRIDES = (
    "model.stage_blocks=(1,1,1,1),model.width=8,model.aspp_channels=16,model.decoder_channels=16,"
    "model.low_level_channels=8,model.proj_dim=16,model.output_stride=8,model.pretrained=,data.crop_size=64,"
    "data.batch_labeled=2,data.batch_unlabeled=2,data.workers=0,stpg.bank_capacity=32,stpg.anchor_steps=100,"
    "eval.window=64,eval.windows_per_batch=8,eval.max_images=4,log_every_steps=2"
)


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    file = Path(path) if Path(path).is_file() else REPO / path
    module_spec = importlib.util.spec_from_file_location(f"_camvid_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=0, help="training steps of every run (default 300; smoke 4)")
    p.add_argument("--workdir_root", required=True, help="each method trains in WORKDIR_ROOT/<method>")
    p.add_argument("--config", default="configs/camvid.py:1_8", help="config file and split (no mode= here)")
    p.add_argument("--overrides", default="", help="extra comma-separated key=value overrides for every run")
    p.add_argument("--data_dir", default="", help="where the prepared dataset goes (default WORKDIR_ROOT/prepared)")
    p.add_argument("--out", default="", help="folder for the tables, JSON, commands and split (default the root)")
    p.add_argument("--smoke", action="store_true", help="tiny network and crop, few steps: a CPU check")
    p.add_argument("--no_proportional_schedule", action="store_true",
                   help="keep the data's epoch length instead of total_steps // epochs")
    p.add_argument("--dry_run", action="store_true", help="print the commands and stop")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.method_list:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if "mode=" in args.config or "mode=" in args.overrides.replace("model.", ""):
        p.error("the mode is set per method by --methods; leave mode= out of --config and --overrides")
    if not args.steps:
        args.steps = 4 if args.smoke else 300
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.out = args.out or args.workdir_root
    return args


def build_commands(args) -> list[tuple[str, list[str]]]:
    """[(method, argv)] with argv relative to the repository root (launch.py is run from there)."""
    common = [f"schedule.total_steps={args.steps}"]
    if not args.no_proportional_schedule:
        epochs = load_config(args.config).schedule.epochs
        common.append(f"schedule.steps_per_epoch={max(1, args.steps // epochs)}")
    common.append("eval.every_steps=0")
    if args.data_dir:
        common.append(f"data.data_dir={args.data_dir}")
    if args.smoke:
        common.append(SMOKE_OVERRIDES)
    if args.overrides:
        common.append(args.overrides)
    commands = []
    for method in args.method_list:
        spec = f"{args.config},mode={method}," + ",".join(common)
        workdir = os.path.join(args.workdir_root, method)
        commands.append((method, ["python", "launch.py", f"--config={spec}", f"--workdir={workdir}"]))
    return commands


_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<value>-?\d+(?:\.\d+)?|n/a)\s*$")


def parse_iou_table(log: str) -> dict | None:
    """The last IoU table a run printed (evaluate.format_iou_table): {'miou': %, 'iou': {class: % or None}}."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^class\s+IoU %\s*$", line)]
    if not starts:
        return None
    iou = {}
    for line in lines[starts[-1] + 1:]:
        m = _ROW.match(line)
        if not m:
            break
        value = None if m["value"] == "n/a" else float(m["value"])
        if m["name"] == "mIoU":
            return {"miou": value, "iou": iou}
        iou[m["name"]] = value
    return None


def _number_after(pattern: str, log: str):
    found = re.findall(pattern, log)
    return float(found[-1]) if found else None


def run_method(method: str, argv: list[str], workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "train.log")
    cmd = [sys.executable] + argv[1:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"\n=== {method}: {shlex.join(argv)}", flush=True)
    t0 = time.time()
    chunks = []
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log_file.write(line)
            chunks.append(line)
        rc = proc.wait()
    wall = time.time() - t0
    log = "".join(chunks)
    result = parse_iou_table(log)
    info = {
        "command": shlex.join(argv),
        "returncode": rc,
        "wall_s": wall,
        "first_step_s": _number_after(r"first step done in ([\d.]+)s", log),
        "eval_s": _number_after(r"evaluation took ([\d.]+)s", log),
        "last_images_per_s": _number_after(r"\| ([\d.]+) img/s", log),
        "result": result,
        "log": log_path,
    }
    status = "ok" if rc == 0 and result else f"FAILED (exit status {rc}{', no IoU table' if not result else ''})"
    print(f"=== {method}: {status}, {wall:.0f}s", flush=True)
    return info


def markdown_table(runs: dict) -> str:
    methods = [m for m in runs if runs[m].get("result")]
    if not methods:
        return "(no run produced an IoU table)"
    classes = list(runs[methods[0]]["result"]["iou"])
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    lines = ["| class | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(fmt(runs[m]["result"]["iou"].get(name)) for m in methods) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{fmt(runs[m]['result']['miou'])}**" for m in methods) + " |")
    lines.append("| wall time (train + eval), s | " + " | ".join(f"{runs[m]['wall_s']:.0f}" for m in methods) + " |")
    return "\n".join(lines)


def collect_split(args, runs: dict) -> dict:
    """Copies the split files of the first run next to the results; checks every run used the same one."""
    digests = {}
    for method in runs:
        path = os.path.join(args.workdir_root, method, "split_labeled.txt")
        if os.path.exists(path):
            digests[method] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    if not digests:
        return {"identical": None, "sha256_16": {}}
    first = next(iter(digests))
    for name in SPLIT_FILES:
        src = os.path.join(args.workdir_root, first, name)
        if os.path.exists(src) and os.path.abspath(args.out) != os.path.abspath(os.path.dirname(src)):
            shutil.copyfile(src, os.path.join(args.out, name))
    labeled = Path(args.workdir_root, first, "split_labeled.txt").read_text().split()
    return {"identical": len(set(digests.values())) == 1, "sha256_16": digests, "num_labeled": len(labeled)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.data_dir:
        args.data_dir = os.path.join(args.workdir_root, "prepared")
    commands = build_commands(args)
    print("commands (run from the repository root):")
    for _, argv_ in commands:
        print("  " + shlex.join(argv_))
    if args.dry_run:
        return 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "commands.txt"), "w") as f:
        f.write("".join(shlex.join(a) + "\n" for _, a in commands))

    runs = {}
    for method, argv_ in commands:
        runs[method] = run_method(method, argv_, os.path.join(args.workdir_root, method))
    split = collect_split(args, runs)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = markdown_table(runs)
    header = (f"CamVid {args.config}, {args.steps} steps per method{' (smoke)' if args.smoke else ''}, {date}; "
              f"labelled frames: {split.get('num_labeled', 'n/a')}, same split for every method: "
              f"{split['identical']}")
    text = header + "\n\n" + table + "\n\nCommands:\n" + "".join(f"    {r['command']}\n" for r in runs.values())
    print("\n" + text, flush=True)
    with open(os.path.join(args.out, "camvid_results.md"), "w") as f:
        f.write(text)
    report = {"date": date, "config": args.config, "steps": args.steps, "smoke": args.smoke,
              "overrides": args.overrides, "split": split, "runs": runs,
              "commit": git_commit()}
    with open(os.path.join(args.out, "camvid_results.json"), "w") as f:
        json.dump(report, f, indent=1)
    failed = [m for m, r in runs.items() if r["returncode"] != 0 or not r["result"]]
    if failed:
        print(f"failed: {', '.join(failed)} (see their train.log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
