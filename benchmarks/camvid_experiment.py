"""CamVid 1/8: supervised-only vs mean teacher vs STPG with one schedule, crop, batch and seed (issue 7).

    python benchmarks/camvid_experiment.py --methods supervised,mean_teacher,stpg --steps 300 --parallel \
        --workdir_root runs/camvid_exp
    python benchmarks/camvid_experiment.py --smoke --workdir_root /tmp/camvid_smoke    # tiny network, CPU, minutes

Each method is one ordinary training run, ``python launch.py --config=configs/camvid.py:1_8,mode=M,...
--workdir=ROOT/M``; the commands are printed and written to ``commands.txt``. Every run gets the same overrides:
``schedule.total_steps=N``, and ``schedule.steps_per_epoch=N // epochs`` so that STPG's epoch-based schedule (bank
from epoch 6, contrastive from 11, proximity from 16, matching frozen at 20 of 40) keeps its place in a short run
(``--no_proportional_schedule`` keeps the data's own epoch length instead), and ``eval.every_steps=0`` (one
evaluation, at the end, on the whole val split). The split is seeded (``data.split_seed``); each run writes it to its
workdir and it is copied next to the results, with a check that all methods trained on the same labelled frames.

The dataset is prepared once into ``data.data_dir`` (``python -m stpg_jax.data.prepare``, log in
``ROOT/prepare.log``) before any run starts, so the runs only read it. By default the runs go one after another;
``--parallel`` starts them all at once on the one device, so their start-up and XLA compilation overlap. Each run then
preallocates ``XLA_PYTHON_CLIENT_MEM_FRACTION`` = its share of the accelerator's memory (``--mem_fraction``: one
value for every run, or ``method=value`` pairs with the rest of 0.9 split between the others; default 0.9 / number of
runs; the variable set in the environment wins), and its output goes to ``ROOT/M/train.log`` and, each line after
``[M] ``, to stdout. Concurrent runs share the device, so their wall times are not solo times; the results say so.
SIGINT or SIGTERM stops every run (SIGTERM, then SIGKILL after a few seconds) and still writes the results.

Results: ``camvid_results.md`` (rows = classes, columns = methods, IoU %, plus mIoU and wall time),
``camvid_results.json`` and ``camvid_results.png`` (per class, a bar per method; rare classes, under 2 % of CamVid's
labelled pixels, marked; ``--no-plot`` leaves it out, and without matplotlib the script stops before training unless
given) in ``--out`` (default: the workdir root), read from the IoU table each run prints at its end.

Repeats with other training seeds (``--overrides seed=1`` and another ``--workdir_root``) are summarised by

    python benchmarks/camvid_experiment.py --combine ROOT0/camvid_results.json ROOT1/camvid_results.json --out DIR

which writes ``camvid_results_combined.md`` (each cell: the mean over the repeats, then every repeat's value; then
the mIoU difference of each pair of methods within each seed, with its mean, sd and 95 % t-interval) after checking
that the repeats ran the same config, steps, methods and labelled split, alike one after another or concurrently, and
differ only in ``seed=``, and ``camvid_results_combined.png``: per class, a bar per method at its mean over the
repeats, whiskers from the lowest to the highest repeat and a dot per repeat. The same figure from a combined table
kept in a Markdown file (the first table after the first line that contains TEXT; ``--config`` names the dataset,
whose rare classes are marked):

    python benchmarks/camvid_experiment.py --plot_markdown BENCHMARKS.md --section "TEXT" --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import git_commit, load_config, run_cli  # noqa: E402  (the sibling script)

from stpg_jax import plots  # noqa: E402
from stpg_jax.config import ConfigError  # noqa: E402
from stpg_jax.data.palettes import rare_classes  # noqa: E402

METHODS = ("supervised", "mean_teacher", "stpg")
SPLIT_FILES = ("split_labeled.txt", "split_unlabeled.txt", "split.json")
MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
TOTAL_MEM_FRACTION = 0.9  # of the accelerator, split between concurrent runs; the rest for CUDA contexts
STOP_GRACE_S = 5.0  # after SIGTERM, before SIGKILL (gpu_camvid.sh's `timeout -k 10` allows 10 s in all)
# After a run's process ends, how long its output may still drain before what is left of its process group (loader
# workers orphaned by a run the OOM killer ended, which keep the output pipe open) is killed.
DRAIN_S = 10.0

# A tiny randomly initialised network, crop 64, batch 2+2 and 4 val images: the whole pipeline in minutes on a CPU.
SMOKE_OVERRIDES = (
    "model.stage_blocks=(1,1,1,1),model.width=8,model.aspp_channels=16,model.decoder_channels=16,"
    "model.low_level_channels=8,model.proj_dim=16,model.output_stride=8,model.pretrained=,data.crop_size=64,"
    "data.batch_labeled=2,data.batch_unlabeled=2,data.workers=0,stpg.bank_capacity=32,stpg.anchor_steps=100,"
    "eval.window=64,eval.windows_per_batch=8,eval.max_images=4,log_every_steps=2"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=0, help="training steps of every run (default 300; smoke 4)")
    p.add_argument("--workdir_root", help="each method trains in WORKDIR_ROOT/<method> (required to run)")
    p.add_argument("--config", default="configs/camvid.py:1_8", help="config file and split (no mode= here)")
    p.add_argument("--overrides", default="", help="extra comma-separated key=value overrides for every run")
    p.add_argument("--data_dir", default="", help="where the prepared dataset goes (default WORKDIR_ROOT/prepared)")
    p.add_argument("--out", default="", help="folder for the tables, JSON, commands and split (default the root)")
    p.add_argument("--smoke", action="store_true", help="tiny network and crop, few steps: a CPU check")
    p.add_argument("--no_proportional_schedule", action="store_true",
                   help="keep the data's epoch length instead of total_steps // epochs")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=False,
                   help="start every run at once on the one device (default: one after another)")
    p.add_argument("--mem_fraction", default="",
                   help=f"--parallel: {MEM_FRACTION_ENV} of each run, one value or method=value pairs (the rest "
                        f"of {TOTAL_MEM_FRACTION} split between unnamed methods); default "
                        f"{TOTAL_MEM_FRACTION} / number of runs; ${MEM_FRACTION_ENV} set in the environment wins")
    p.add_argument("--dry_run", action="store_true", help="print the commands and stop")
    p.add_argument("--combine", nargs="+", metavar="RESULTS_JSON",
                   help="instead of training: summarise repeats (camvid_results.json of each) into --out")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write the per-class comparison PNG (needs matplotlib: pip install 'stpg_jax[plots]')")
    p.add_argument("--plot_markdown", metavar="FILE", help="instead of training: draw camvid_results_combined.png "
                   "into --out from a combined table in FILE (the first after the line holding --section)")
    p.add_argument("--section", default="", help="--plot_markdown: text of a line before the table")
    args = p.parse_args(argv)
    if args.plot_markdown:
        if not args.out:
            p.error("--plot_markdown needs --out (the folder for camvid_results_combined.png)")
        return args
    if args.combine:
        if not args.out:
            p.error("--combine needs --out (the folder for camvid_results_combined.md)")
        return args
    if not args.workdir_root:
        p.error("--workdir_root is required (each method trains in WORKDIR_ROOT/<method>)")
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
    try:
        args.mem_fractions = memory_fractions(args.mem_fraction, args.method_list)
    except ValueError as e:
        p.error(f"--mem_fraction: {e}")
    return args


def memory_fractions(spec: str, methods: list[str]) -> dict[str, float]:
    """{method: share of the accelerator's memory} from '' (equal shares), '0.3' or 'stpg=0.45,supervised=0.2'."""
    named = {}
    if spec and "=" not in spec:
        named = dict.fromkeys(methods, float(spec))
    elif spec:
        for item in spec.split(","):
            method, _, value = item.partition("=")
            if method.strip() not in METHODS:
                raise ValueError(f"unknown method {method.strip()!r} in {spec!r}")
            named[method.strip()] = float(value)
    named = {m: f for m, f in named.items() if m in methods}
    rest = [m for m in methods if m not in named]
    if rest:
        share = (TOTAL_MEM_FRACTION - sum(named.values())) / len(rest)
        named.update(dict.fromkeys(rest, share))
    fractions = {m: named[m] for m in methods}
    if any(not 0 < f <= 1 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
        raise ValueError(f"each share must lie in (0, 1] and all together at most 1, got {fractions}")
    return fractions


def child_env(mem_fraction: float | None = None, base: dict | None = None) -> dict:
    """The environment of one run: unbuffered output and, for concurrent runs, its share of the device memory.

    JAX preallocates 75 % of the accelerator's memory per process, so a second concurrent run would find too little;
    a fraction already in ``base`` (the user's environment) is kept.
    """
    env = {**(os.environ if base is None else base), "PYTHONUNBUFFERED": "1"}
    if mem_fraction is not None:
        env.setdefault(MEM_FRACTION_ENV, f"{mem_fraction:.3f}")
    return env


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


def prepare_command(spec: str) -> list[str] | None:
    """The one-time preparation of the dataset the run with config ``spec`` reads (None for generated data).

    The same call as a run's own first preparation (stpg_jax.data.prepare, the config's data fields), done once
    before the runs start so that concurrent runs never write the same ``data.data_dir``.
    """
    data = load_config(spec).data
    if data.dataset == "synthetic":
        return None
    cmd = [sys.executable, "-m", "stpg_jax.data.prepare", "--dataset", data.dataset, "--manual_dir", data.root]
    if data.data_dir:
        cmd += ["--data_dir", data.data_dir]
    if data.get("sbd_root"):
        cmd += ["--sbd_root", data.sbd_root]
    if data.get("class_names"):
        cmd += ["--class_names", ",".join(data.class_names)]
    return cmd


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


def _text_after(pattern: str, log: str) -> str | None:
    """The first group of the last match of ``pattern`` in ``log``, or None."""
    found = re.findall(pattern, log)
    return found[-1] if found else None


def _number_after(pattern: str, log: str) -> float | None:
    text = _text_after(pattern, log)
    return None if text is None else float(text)


_STDOUT = threading.Lock()


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while runs were going."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not break off the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


class Run:
    """One child process, run from the repository root in its own process group (so that stopping it also stops
    its data-loader workers); a thread copies its output, line by line, to ``log_path``, to stdout after ``prefix``
    and to ``lines``; another waits for the process, records its exit status and wall time, and ends the process
    group if the output is still open ``DRAIN_S`` after the process ended."""

    def __init__(self, name: str, cmd: list[str], log_path: str, env: dict | None = None, prefix: str = ""):
        self.name, self.cmd, self.log_path, self.prefix = name, cmd, log_path, prefix
        self.lines: list[str] = []
        self.returncode: int | None = None
        self.wall_s: float | None = None
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True)
        # Waiting on an Event, not on Thread.join: a signal that interrupts join() can leave the thread marked as
        # stopped while it still runs.
        self._done = threading.Event()
        self._copied = threading.Event()
        threading.Thread(target=self._copy_output, name=f"output of {name}", daemon=True).start()
        threading.Thread(target=self._wait_for_exit, name=f"exit of {name}", daemon=True).start()

    def _copy_output(self):
        try:
            with open(self.log_path, "w") as log_file:
                for line in self.proc.stdout:
                    log_file.write(line)
                    log_file.flush()
                    self.lines.append(line)
                    with _STDOUT:
                        sys.stdout.write(self.prefix + line)
                        sys.stdout.flush()
        finally:
            self._copied.set()

    def _wait_for_exit(self):
        try:
            returncode = self.proc.wait()
            self.wall_s = time.time() - self.t0
            if not self._copied.wait(DRAIN_S):
                self.signal(signal.SIGKILL)  # orphaned workers hold the pipe: end them so the copy finishes
                self._copied.wait(DRAIN_S)
            self.returncode = returncode
            if self.prefix:
                with _STDOUT:
                    print(f"{self.prefix}(exit status {self.returncode} after {self.wall_s:.0f}s)", flush=True)
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None if still running after ``timeout`` s (None: no limit)."""
        self._done.wait(timeout)
        return self.returncode

    def signal(self, sig: int):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_runs(runs: list[Run], grace_s: float = STOP_GRACE_S):
    """SIGTERM to every run (a training run checkpoints and exits), SIGKILL to those still there after grace_s."""
    live = [r for r in runs if r.returncode is None]
    for r in live:
        r.signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for r in live:
        r.wait(max(0.0, deadline - time.time()))
    for r in live:
        if r.returncode is None:
            r.signal(signal.SIGKILL)
    for r in live:
        r.wait(5.0)


def run_methods(jobs: list[tuple[str, list[str], str, dict]], parallel: bool) -> tuple[dict, str | None]:
    """Runs ``jobs`` = [(method, argv from the repository root, workdir, env)], all at once or one after another.

    Returns ({method: run_info} of the runs started, the name of the signal that stopped them or None). A run that
    fails leaves the others going; SIGINT/SIGTERM (with ``_raise_interrupted`` installed) or Ctrl-C stops them all.
    """
    runs: dict[str, Run] = {}
    stopped_by = None
    try:
        for method, argv, workdir, env in jobs:
            print(f"\n=== {method}: {shlex.join(argv)}", flush=True)
            runs[method] = Run(method, [sys.executable] + argv[1:], os.path.join(workdir, "train.log"), env,
                               prefix=f"[{method}] " if parallel else "")
            if not parallel:
                runs[method].wait()
        for run in runs.values():
            run.wait()
    except (Interrupted, KeyboardInterrupt) as e:
        stopped_by = str(e) if isinstance(e, Interrupted) else "SIGINT"
        print(f"\n=== {stopped_by}: stopping {', '.join(m for m, r in runs.items() if r.returncode is None)}",
              flush=True)
        stop_runs(list(runs.values()))
    return {method: run_info(method, argv, runs[method]) for method, argv, _, _ in jobs if method in runs}, stopped_by


def run_info(method: str, argv: list[str], run: Run) -> dict:
    log = "".join(run.lines)
    result = parse_iou_table(log)
    rc = run.returncode
    wall = run.wall_s if run.wall_s is not None else time.time() - run.t0
    info = {
        "command": shlex.join(argv),
        "returncode": rc,
        "wall_s": wall,
        "first_step_s": _number_after(r"first step done in ([\d.]+)s", log),
        "eval_s": _number_after(r"evaluation took ([\d.]+)s", log),
        "last_images_per_s": _number_after(r"\| ([\d.]+) img/s", log),
        "devices": _text_after(r"(\d+ device\(s\) \([^)]*\))", log),
        "matching": _text_after(r"matching: ([^\n]*)", log),  # STPG's host matching: runs, changes, steps run twice
        "result": result,
        "log": run.log_path,
    }
    status = "ok" if rc == 0 and result else f"FAILED (exit status {rc}{', no IoU table' if not result else ''})"
    print(f"=== {method}: {status}, {wall:.0f}s", flush=True)
    return info


def markdown_table(runs: dict, concurrent: bool = False) -> str:
    """One experiment's table: rows = classes, mIoU and wall time; columns = the methods with an IoU table."""
    return iou_table([runs], concurrent) or "(no run produced an IoU table)"


def iou_table(repeats: list[dict], concurrent: bool = False) -> str | None:
    """The table of one or more repeats ({method: run_info} each) of the same experiment, or None if no method has
    an IoU table in every repeat. With several repeats each cell is their mean, then each repeat's value."""
    methods = _methods_with_result(repeats, repeats[0])
    if not methods:
        return None

    def cell(values, digits=2):
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            return "n/a"
        mean = f"{statistics.mean(values):.{digits}f}"
        return mean if len(values) == 1 else f"{mean} ({' / '.join(f'{v:.{digits}f}' for v in values)})"

    def row(label, value_of, digits=2, bold=False):
        cells = (cell([value_of(runs[m]) for runs in repeats], digits) for m in methods)
        return f"| {label} | " + " | ".join(f"**{c}**" if bold else c for c in cells) + " |"

    lines = ["| class | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for name in repeats[0][methods[0]]["result"]["iou"]:
        lines.append(row(name, lambda r: r["result"]["iou"].get(name)))
    lines.append(row("**mIoU**", lambda r: r["result"]["miou"], bold=True))
    label = "wall time (train + eval, concurrent), s" if concurrent else "wall time (train + eval), s"
    lines.append(row(label, lambda r: r["wall_s"], digits=0))
    return "\n".join(lines)


def _methods_with_result(repeats: list[dict], order) -> list[str]:
    """The methods of ``order`` that have an IoU table in every repeat ({method: run_info} each)."""
    return [m for m in order if all((runs.get(m) or {}).get("result") for runs in repeats)]


def paired_differences(repeats: list[dict]) -> str | None:
    """Markdown of the mIoU differences between methods within each repeat (same seed, so same split, data order
    and initialisation of the shared parts): per pair the per-repeat differences, their mean, sample standard
    deviation, a two-sided 95 % Student-t interval of the mean and how many repeats the first method is ahead in.
    None with fewer than two repeats or two methods."""
    from scipy import stats

    methods = _methods_with_result(repeats, METHODS)
    n = len(repeats)
    if n < 2 or len(methods) < 2:
        return None
    t = float(stats.t.ppf(0.975, n - 1))
    lines = ["| mIoU difference | per repeat | mean | sd | 95 % interval of the mean | repeats ahead |",
             "|---|---|---:|---:|---|---:|"]
    for i, base in enumerate(methods):
        for other in methods[i + 1:]:
            d = [runs[other]["result"]["miou"] - runs[base]["result"]["miou"] for runs in repeats]
            mean, sd = statistics.mean(d), statistics.stdev(d)
            half = t * sd / math.sqrt(n)
            lines.append(f"| {other} − {base} | {' / '.join(f'{x:+.2f}' for x in d)} | {mean:+.2f} | {sd:.2f} | "
                         f"{mean - half:+.2f} to {mean + half:+.2f} | {sum(x > 0 for x in d)} of {n} |")
    return "\n".join(lines)


def per_seed_iou(repeats: list[dict]) -> tuple[dict, list[str]]:
    """({method: [{class: IoU %, ..., 'mIoU': %} per repeat]}, class names + 'mIoU') of the methods with an IoU
    table in every repeat ({method: run_info} each)."""
    methods = _methods_with_result(repeats, repeats[0])
    names = list(repeats[0][methods[0]]["result"]["iou"]) + ["mIoU"] if methods else []
    return {m: [{**runs[m]["result"]["iou"], "mIoU": runs[m]["result"]["miou"]} for runs in repeats]
            for m in methods}, names


def dataset_of(spec: str) -> str:
    """The dataset of config ``spec`` ('' if it cannot be read): it says which classes are rare."""
    try:
        return load_config(spec).data.dataset
    except (ConfigError, FileNotFoundError, OSError):
        return ""


def write_figure(per_method, names, path: str, title: str, dataset: str) -> str:
    print(f"figure: {path}", flush=True)
    # Each method in the same colour in every figure: this script's methods first, in their order.
    per_method = {m: per_method[m] for m in sorted(per_method, key=lambda m: (m not in METHODS, METHODS.index(m)
                                                                                if m in METHODS else 0))}
    return plots.method_comparison_png(per_method, names, path, rare=rare_classes(dataset), title=title)


_CELL = re.compile(r"^\**\s*(-?[\d.]+|n/a)\s*(?:\(([^)]*)\))?\s*\**$")


def parse_combined_table(text: str, section: str = "") -> tuple[dict, list[str]]:
    """``per_seed_iou``'s result from a combined table as ``combine_results`` writes it (cells 'mean (a / b / …)'),
    the first one after the first line that contains ``section``; the wall-time row is left out."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if section in line), None)
    if start is None:
        raise ValueError(f"no line contains {section!r}")
    head = next((i for i in range(start, len(lines)) if lines[i].startswith("| class |")), None)
    if head is None:
        raise ValueError(f"no table with a '| class |' header after the line holding {section!r}")
    methods = [c.strip() for c in lines[head].strip().strip("|").split("|")[1:]]
    per_method, names = {m: [] for m in methods}, []
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("*").strip()
        if name.startswith("wall time"):
            continue
        names.append(name)
        for method, cell in zip(methods, cells[1:]):
            m = _CELL.match(cell)
            if not m:
                raise ValueError(f"cell {cell!r} of {name!r}: not 'mean (a / b / …)'")
            values = [v.strip() for v in m[2].split("/")] if m[2] else [m[1]]
            for k, v in enumerate(values):
                if len(per_method[method]) <= k:
                    per_method[method].append({})
                per_method[method][k][name] = None if v == "n/a" else float(v)
    return per_method, names


def plot_markdown_main(args) -> int:
    try:
        per_method, names = parse_combined_table(Path(args.plot_markdown).read_text(), args.section)
    except ValueError as e:
        print(f"error: --plot_markdown {args.plot_markdown}: {e}", file=sys.stderr)
        return 2
    seeds = max(len(v) for v in per_method.values())
    os.makedirs(args.out, exist_ok=True)
    title = f"{args.config}, {seeds} seed(s): IoU % per class (from {os.path.basename(args.plot_markdown)})"
    write_figure(per_method, names, os.path.join(args.out, "camvid_results_combined.png"), title,
                 dataset_of(args.config))
    return 0


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


def config_spec(argv: list[str]) -> str:
    return next(a for a in argv if a.startswith("--config="))[len("--config="):]


def _without_seed(overrides: str) -> str:
    return ",".join(o for o in overrides.split(",") if o and not o.startswith("seed="))


def _seed_of(overrides: str) -> str:
    seeds = [o[len("seed="):] for o in overrides.split(",") if o.startswith("seed=")]
    return seeds[-1] if seeds else "0 (config default)"


def _comparable_fields(report: dict) -> dict:
    """What repeats of one experiment must share."""
    return {"config": report["config"], "steps": report["steps"],
            "overrides without seed=": _without_seed(report["overrides"]), "methods": sorted(report["runs"]),
            "labelled split": sorted(set(report["split"]["sha256_16"].values())),
            "concurrent runs": report.get("parallel", False)}


def combine_results(reports: list[dict], names: list[str]) -> str:
    """Markdown of repeats that differ only in the training seed: per cell the mean, then each repeat's value.

    Raises ValueError naming the file and the field when two repeats are not comparable.
    """
    first = reports[0]
    ref = _comparable_fields(first)
    for name, report in zip(names[1:], reports[1:]):
        for key, value in _comparable_fields(report).items():
            if value != ref[key]:
                raise ValueError(f"{name}: {key} is {value!r}, but {names[0]} has {ref[key]!r}; repeats must differ "
                                 "only in seed=")
    seeds = [_seed_of(r["overrides"]) for r in reports]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"two repeats have the same training seed ({', '.join(seeds)}): nothing to average")
    table = iou_table([r["runs"] for r in reports], concurrent=bool(first.get("parallel")))
    if table is None:
        raise ValueError("no method has an IoU table in every repeat")
    text = (f"CamVid {first['config']}, {first['steps']} steps per method, {len(reports)} repeats with training "
            f"seeds {', '.join(seeds)} (same labelled split); commits {', '.join(r['commit'] for r in reports)}. "
            "Each cell: mean over the repeats (each repeat's value, in seed order).\n\n" + table + "\n")
    paired = paired_differences([r["runs"] for r in reports])
    if paired:
        text += ("\nPaired by seed (each difference between two methods trained with the same seed; the interval "
                 "is mean ± t(0.975, n−1) · sd / √n):\n\n" + paired + "\n")
    return text


def combine_main(args) -> int:
    reports = []
    for path in args.combine:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: --combine {path}: not a readable camvid_results.json ({e})", file=sys.stderr)
            return 2
    try:
        text = combine_results(reports, args.combine)
    except ValueError as e:
        print(f"error: --combine: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: --combine: a results file lacks the field {e}: give camvid_results.json files",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "camvid_results_combined.md"), "w") as f:
        f.write(text)
    print(text, end="")
    if args.plot:
        per_method, names = per_seed_iou([r["runs"] for r in reports])
        title = (f"CamVid {reports[0]['config']}, {reports[0]['steps']} steps, {len(reports)} seed(s): "
                 "IoU % per class")
        write_figure(per_method, names, os.path.join(args.out, "camvid_results_combined.png"), title,
                     dataset_of(reports[0]["config"]))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_markdown or (args.plot and not args.dry_run):
        plots.require_matplotlib("the comparison PNG (--no-plot leaves it out)")  # before any training
    if args.plot_markdown:
        return plot_markdown_main(args)
    if args.combine:
        return combine_main(args)
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
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_experiment(args, commands)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_experiment(args, commands) -> int:
    t0 = time.time()
    commit = git_commit()  # now, before the runs: the code they run (a commit made meanwhile does not count)
    prepare_s = None
    prepare = prepare_command(config_spec(commands[0][1]))
    if prepare:
        print(f"\n=== preparing the dataset once for every run: {shlex.join(prepare)}", flush=True)
        run = Run("prepare", prepare, os.path.join(args.workdir_root, "prepare.log"), child_env(), "[prepare] ")
        try:
            rc = run.wait()
        except (Interrupted, KeyboardInterrupt) as e:
            stop_runs([run])
            return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
        if rc != 0:
            print(f"data preparation failed (exit status {rc}); see {run.log_path}", file=sys.stderr)
            return 1
        prepare_s = run.wall_s

    jobs = [(method, argv_, os.path.join(args.workdir_root, method),
             child_env(args.mem_fractions[method] if args.parallel else None)) for method, argv_ in commands]
    mem_fractions = {m: float(env[MEM_FRACTION_ENV]) for m, _, _, env in jobs if MEM_FRACTION_ENV in env}
    runs, stopped_by = run_methods(jobs, args.parallel)
    total_s = time.time() - t0
    split = collect_split(args, runs)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = markdown_table(runs, concurrent=args.parallel)
    header = (f"CamVid {args.config}, {args.steps} steps per method{' (smoke)' if args.smoke else ''}, {date}; "
              f"labelled frames: {split.get('num_labeled', 'n/a')}, same split for every method: "
              f"{split['identical']}\n\nCommit {commit}; devices (as the runs reported them): "
              f"{', '.join(sorted({r['devices'] for r in runs.values() if r.get('devices')})) or 'n/a'}; "
              f"host CPUs: {os.cpu_count()}.")
    if args.parallel:
        shares = ", ".join(f"{m} {f:.3f}" for m, f in mem_fractions.items())
        header += (f"\n\nThe {len(jobs)} runs shared one device concurrently (started together; "
                   f"{MEM_FRACTION_ENV}: {shares}), so each run's wall time includes waiting for the others and "
                   f"is not its solo time.")
    else:
        header += "\n\nThe runs went one after another on one device."
    header += f" Total wall time {total_s:.0f} s"
    header += f", of which {prepare_s:.0f} s preparing the data once before the runs." if prepare_s is not None else "."
    if stopped_by:
        header += f" Stopped by {stopped_by}: a run without a column did not finish."
    for method, r in runs.items():
        if r.get("matching"):
            header += f"\n\n{method}'s host matching: {r['matching']}."
    text = header + "\n\n" + table + "\n\nCommands:\n" + "".join(f"    {r['command']}\n" for r in runs.values())
    print("\n" + text, flush=True)
    with open(os.path.join(args.out, "camvid_results.md"), "w") as f:
        f.write(text)
    report = {"date": date, "config": args.config, "steps": args.steps, "smoke": args.smoke,
              "overrides": args.overrides, "parallel": args.parallel, "mem_fractions": mem_fractions,
              "total_wall_s": total_s, "prepare_s": prepare_s, "stopped_by": stopped_by, "split": split,
              "runs": runs, "commit": commit,
              "host_cpus": os.cpu_count()}
    with open(os.path.join(args.out, "camvid_results.json"), "w") as f:
        json.dump(report, f, indent=1)
    per_method, names = per_seed_iou([runs])
    if args.plot and per_method:
        write_figure(per_method, names, os.path.join(args.out, "camvid_results.png"),
                     f"CamVid {args.config}, {args.steps} steps{' (smoke)' if args.smoke else ''}: IoU % per class",
                     dataset_of(args.config))
    failed = [m for m, _ in commands if m not in runs or runs[m]["returncode"] != 0 or not runs[m]["result"]]
    if failed:
        print(f"failed: {', '.join(failed)} (see their train.log)", file=sys.stderr)
        return 128 + signal.Signals[stopped_by] if stopped_by else 1
    return 0


if __name__ == "__main__":
    run_cli(main, plots.PlotsUnavailable)
