"""Input-pipeline throughput: can the training loader feed the step? (No accelerator involved.)

    python benchmarks/loader_throughput.py --config=configs/camvid.py:1_8 --workers 0,2,4 --batches 40
    python benchmarks/loader_throughput.py --config=configs/demo.py --workers 0 --batches 5     # synthetic, seconds

Builds the config's dataset (preparing it into ``data.data_dir`` on first use, as training does) and the very loader
``train_and_evaluate`` uses (``stpg_jax.data.make_train_loader``: decode, random scale, crop, flip; for STPG the
labelled batch and both unlabelled streams), then for each worker count times ``--batches`` batches after
``--warmup`` (which absorbs the start of the worker processes). It reports batches/s, decoded images/s, and the
fastest step time each worker count can feed. Compare that with the step time of ``benchmarks/step_time.py`` on the
same config to choose ``data.workers``: a loader slower than the step leaves the accelerator waiting.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import git_commit, load_config, run_cli, write_json  # noqa: E402  (the sibling script)

from stpg_jax.data import DataError, build_data, make_train_loader  # noqa: E402
from stpg_jax.host import tune_malloc  # noqa: E402


def images_per_batch(batch: dict) -> int:
    """Decoded images in one batch: the labelled images plus every unlabelled stream's."""
    return sum(int(v.shape[0]) for k, v in batch.items()
               if (k == "image" or k.startswith("unlabeled")) and not k.endswith("_box"))


def time_loader(bundle, data_config, seed: int, with_unlabeled: bool, workers: int, batches: int,
                warmup: int) -> dict:
    data_config = dict(data_config)
    data_config["workers"] = workers
    t0 = time.perf_counter()
    loader = make_train_loader(bundle, data_config, seed, with_unlabeled=with_unlabeled)
    try:
        first = next(loader)
        first_s = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            next(loader)
        per_batch = []
        images = images_per_batch(first)
        for _ in range(batches):
            t = time.perf_counter()
            next(loader)
            per_batch.append(time.perf_counter() - t)
    finally:
        loader.close()
    total = sum(per_batch)
    return {
        "workers": workers,
        "first_batch_s": first_s,
        "batches": batches,
        "images_per_batch": images,
        "batches_per_s": batches / total,
        "images_per_s": batches * images / total,
        "mean_batch_ms": 1e3 * total / batches,
        "median_wait_ms": 1e3 * statistics.median(per_batch),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| workers | first batch s | batches/s | images/s | mean ms per batch (= fastest step it feeds) |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['first_batch_s']:.1f} | {r['batches_per_s']:.2f} | "
                     f"{r['images_per_s']:.1f} | {r['mean_batch_ms']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/camvid.py:1_8",
                   help="config file, with the split and overrides after ':' (as launch.py takes it)")
    p.add_argument("--workers", default="0,2,4", help="comma-separated data.workers values to time")
    p.add_argument("--batches", type=int, default=40, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        args.worker_list = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    if not args.worker_list or min(args.worker_list) < 0:
        p.error(f"--workers must list counts >= 0, got {args.workers!r}")
    if args.batches < 1 or args.warmup < 1:
        p.error("--batches and --warmup must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tune_malloc()
    config = load_config(args.config, "")
    c = config
    print(f"building the {c.data.dataset} data (prepares it into data.data_dir on first use)...", flush=True)
    bundle = build_data(c.data)
    with_unlabeled = c.mode != "supervised"
    print(f"config {args.config}: mode={c.mode} crop={c.data.crop_size} batch={c.data.batch_labeled}"
          f"{f'+{c.data.batch_unlabeled}+{c.data.batch_unlabeled}' if with_unlabeled else ''} "
          f"labelled={len(bundle.labeled)} unlabelled={len(bundle.unlabeled)}; {os.cpu_count()} CPUs", flush=True)
    rows = []
    for workers in args.worker_list:
        r = time_loader(bundle, c.data.to_dict(), c.seed, with_unlabeled, workers, args.batches, args.warmup)
        rows.append(r)
        print(f"  workers={workers}: {r['batches_per_s']:.2f} batches/s, {r['images_per_s']:.1f} images/s "
              f"(first batch after {r['first_batch_s']:.1f}s)", flush=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "command": "python benchmarks/loader_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": args.config,
        "results": rows,
    }
    print(f"\n{report['date']} | commit {report['commit']} | host {report['host']}\ncommand: {report['command']}\n")
    print(markdown_table(rows), flush=True)
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    run_cli(main, DataError)
