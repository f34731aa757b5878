"""Input-pipeline throughput: how fast the training loader (``stpg_jax.data.make_train_loader``: decode, random
scale, crop, flip; for STPG the labelled batch and both unlabelled streams) delivers batches, per ``data.workers``.

    python benchmarks/loader_throughput.py --config=configs/camvid.py:1_8 --workers 0,2,4 --batches 40

The mean time per batch is the shortest step the loader can keep fed; set it against step_time.py's step.
"""

from __future__ import annotations

import os
import statistics
import time

from common import arg_parser, finish, ints_of, load_config, report_header, run_cli

from stpg_jax.data import DataError, build_data, make_train_loader
from stpg_jax.host import tune_malloc


def parse_args(argv=None):
    p = arg_parser(__doc__, "configs/camvid.py:1_8")
    p.add_argument("--workers", default="0,2,4", help="comma-separated data.workers values to time")
    p.add_argument("--batches", type=int, default=40, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    args = p.parse_args(argv)
    args.worker_list = ints_of(p, "--workers", args.workers)
    if args.batches < 1 or args.warmup < 1:
        p.error("--batches and --warmup must be >= 1")
    return args


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
    report = {**report_header("loader_throughput.py", argv), "config": args.config, "results": rows}
    return finish(report, markdown_table(rows), args.out)


if __name__ == "__main__":
    run_cli(main, DataError)
