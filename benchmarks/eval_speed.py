"""Evaluation throughput: how fast the sliding-window protocol (the training loop's evaluation, ``python -m
stpg_jax.evaluate`` and ``stpg_jax.predict``) scores val images, with the config's network (random weights).

    python benchmarks/eval_speed.py --config=configs/voc_blender.py:1_4 --size 375x500 --images 64   # random images
    python benchmarks/eval_speed.py --config=configs/camvid.py:1_8 --images 101                      # the val set

The first ``--warmup`` images (compilation) are timed apart; the rest give images/s.
"""

from __future__ import annotations

import argparse
import math
import time

from common import arg_parser, finish, load_config, num_classes_of, report_header, run_cli

from stpg_jax.data import DataError
from stpg_jax.host import tune_malloc


def random_images(count: int, height: int, width: int, num_classes: int, seed: int = 0) -> list[dict]:
    """``count`` random RGB images of one size with random labels: a val source of the shapes to time. Four distinct
    ones, repeated: generating hundreds of large random images would dominate the run."""
    import numpy as np

    rng = np.random.default_rng(seed)
    distinct = [{"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                 "label": rng.integers(0, num_classes, (height, width), dtype=np.uint8)} for _ in range(min(count, 4))]
    return [distinct[i % len(distinct)] for i in range(count)]


def window_counts(sizes, window: int, stride_rate: float) -> list[int]:
    from stpg_jax.inference import window_origins

    stride = max(1, int(math.ceil(window * stride_rate)))
    return [len(window_origins(max(h, window), window, stride)) * len(window_origins(max(w, window), window, stride))
            for h, w in sizes]


def image_size(text: str) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` as (height, width), for argparse."""
    h, _, w = text.lower().partition("x")
    if not (h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH of positive integers, e.g. 375x500, got {text!r}")
    return int(h), int(w)


def parse_args(argv=None):
    p = arg_parser(__doc__, "configs/voc_blender.py:1_4")
    p.add_argument("--overrides", default="", help="extra comma-separated key=value overrides")
    p.add_argument("--size", type=image_size, help="HEIGHTxWIDTH of random images (default: the config's val set)")
    p.add_argument("--images", type=int, default=64, help="images to evaluate, warm-up included")
    p.add_argument("--warmup", type=int, default=4, help="first images timed apart (compilation)")
    args = p.parse_args(argv)
    if args.images <= args.warmup or args.warmup < 1:
        p.error("need --warmup >= 1 and --images > --warmup")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tune_malloc()
    import jax
    import jax.numpy as jnp

    from stpg_jax import evaluate, inference, sharding
    from stpg_jax.recipe import model_from_config

    config = load_config(args.config, args.overrides)
    c = config
    if args.size:
        h, w = args.size
        num_classes = num_classes_of(c)
        source, what = random_images(args.images, h, w, num_classes), f"random {h}x{w} images"
    else:
        from stpg_jax.data import build_data

        print(f"building the {c.data.dataset} data (prepares it into data.data_dir on first use)...", flush=True)
        bundle = build_data(c.data)
        source, num_classes, what = bundle.val, bundle.info.num_classes, f"{c.data.dataset} val images"
    count = min(args.images, len(source))
    if count <= args.warmup:
        raise SystemExit(f"only {count} images: need more than --warmup {args.warmup}")
    sizes = [source[i]["image"].shape[:2] for i in range(count)]
    windows = window_counts(sizes, c.eval.window, c.eval.stride_rate)

    mesh = sharding.make_mesh()
    model = model_from_config(c.model, num_classes)
    window = c.eval.window
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                        out_shardings=sharding.replicated(mesh))(jnp.zeros((1, window, window, 3)))
    per_batch = c.eval.windows_per_batch
    shard = sharding.batch_sharded(mesh) if per_batch % mesh.devices.size == 0 else None
    predictor = inference.WindowPredictor(model, window, per_batch, c.eval.stride_rate, sharding=shard,
                                          flip=c.eval.flip)

    devices = f"{mesh.devices.size} x {jax.devices()[0].device_kind}"
    print(f"{args.config}: {count} {what}, {num_classes} classes, window {window}, {per_batch} windows per batch "
          f"on {devices}; {sum(windows)} windows ({sum(windows) / count:.2f} per image)", flush=True)
    t0 = time.perf_counter()
    evaluate.evaluate(predictor, variables, source, num_classes, indices=range(args.warmup), progress=False)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate.evaluate(predictor, variables, source, num_classes, indices=range(args.warmup, count), progress=False)
    timed_s = time.perf_counter() - t0
    timed = count - args.warmup
    report = {
        **report_header("eval_speed.py", argv), "devices": devices,
        "images": count, "source": what, "window": window, "windows_per_batch": per_batch, "flip": c.eval.flip,
        "windows_per_image": sum(windows) / count,
        "warmup_images": args.warmup, "warmup_s": warmup_s,
        "timed_images": timed, "timed_s": timed_s, "images_per_s": timed / timed_s,
        "ms_per_image": 1e3 * timed_s / timed,
    }
    table = ("| images | windows per image | first images (compile) s | images/s | ms per image |\n"
             "|---:|---:|---:|---:|---:|\n"
             f"| {timed} + {args.warmup} | {report['windows_per_image']:.2f} | {warmup_s:.1f} | "
             f"{report['images_per_s']:.2f} | {report['ms_per_image']:.1f} |")
    return finish(report, table, args.out, f" | {devices}")


if __name__ == "__main__":
    run_cli(main, DataError)
