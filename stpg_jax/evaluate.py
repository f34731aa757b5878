"""Evaluation protocol of DESIGN.md §5: sliding window, summed window logits, single scale, no flip; mIoU.

The window side is the training crop (VOC 512, Cityscapes 800); windows step by 2/3 of the side. An image smaller
than the window is padded with the mean colour (0 after normalisation) and the padding is cropped away afterwards.
Windows are run in fixed-size batches so that one compiled function serves every image size.

As a command, it evaluates a trained network on a dataset's val split:

    python -m stpg_jax.evaluate --checkpoint=WORKDIR [--network=gen_teacher] [--step=N] [--config=FILE:ARG]
    python -m stpg_jax.evaluate --checkpoint=EXPORT_DIR --config=configs/camvid.py:1_8,data.root=/data/camvid

``--config`` supplies the data and evaluation sections (the network always comes from the checkpoint); a work
directory's own config is used without it. ``--out`` writes the result as JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from stpg_jax.data.augment import MEAN_RGB_UINT8, normalize


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Top (or left) offsets covering [0, size) with windows of ``window`` stepped by ``stride``; last one flush."""
    if size <= window:
        return [0]
    count = int(math.ceil((size - window) / stride)) + 1
    return [min(i * stride, size - window) for i in range(count)]


def make_window_predictor(model, window: int, windows_per_batch: int = 4, stride_rate: float = 2 / 3,
                          sharding=None) -> Callable:
    """Returns ``predictor(variables, image_uint8 (H, W, 3)) -> summed logits (H, W, C) float32 numpy``.

    ``sharding``: optional NamedSharding splitting the window batch over devices (its size must divide
    ``windows_per_batch``), those of every process in a multi-process run: each process then cuts the same windows
    and hands its devices their part; the logits come back whole to every process.
    """
    stride = max(1, int(math.ceil(window * stride_rate)))

    def apply(variables, windows):
        return model.apply(variables, normalize(windows), train=False)["logits"]

    if sharding is None:
        forward = jax.jit(apply)
    else:
        forward = jax.jit(apply, out_shardings=NamedSharding(sharding.mesh, PartitionSpec()))

    def predictor(variables, image):
        image = np.asarray(image, np.uint8)
        h, w = image.shape[:2]
        ph, pw = max(h, window), max(w, window)
        padded = np.empty((ph, pw, 3), np.uint8)
        padded[...] = MEAN_RGB_UINT8
        padded[:h, :w] = image
        boxes = [(y, x) for y in window_origins(ph, window, stride) for x in window_origins(pw, window, stride)]
        total = None
        for start in range(0, len(boxes), windows_per_batch):
            chunk = boxes[start:start + windows_per_batch]
            batch = np.zeros((windows_per_batch, window, window, 3), np.uint8)
            for i, (y, x) in enumerate(chunk):
                batch[i] = padded[y:y + window, x:x + window]
            if sharding is not None:
                batch = jax.make_array_from_callback(batch.shape, sharding, lambda index, b=batch: b[index])
            logits = np.asarray(forward(variables, batch))
            if total is None:
                total = np.zeros((ph, pw, logits.shape[-1]), np.float32)
            for i, (y, x) in enumerate(chunk):
                total[y:y + window, x:x + window] += logits[i]
        return total[:h, :w]

    return predictor


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; ignored pixels left out."""
    label = np.asarray(label).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    valid = label != ignore_index
    if np.any(label[valid] >= num_classes) or np.any(label[valid] < 0):
        raise ValueError(f"ground-truth label outside [0, {num_classes}) and not {ignore_index}")
    return np.bincount(label[valid] * num_classes + pred[valid], minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU; NaN for a class absent from both ground truth and prediction."""
    confusion = confusion.astype(np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def evaluate(predictor, variables, source, num_classes: int, ignore_index: int = 255, max_images: int = 0,
             indices: Sequence[int] | None = None, progress: bool = True) -> dict:
    """Runs ``predictor`` over ``source[i]`` ({'image', 'label'}) and returns mIoU, per-class IoU, pixel accuracy."""
    indices = list(indices if indices is not None else range(len(source)))
    if max_images:
        indices = indices[:max_images]
    confusion = np.zeros((num_classes, num_classes), np.int64)
    start = time.time()
    for n, i in enumerate(indices):
        item = source[i]
        pred = predictor(variables, item["image"]).argmax(-1)
        confusion += confusion_matrix(pred, item["label"], num_classes, ignore_index)
        if progress and (n + 1) % 50 == 0:
            print(f"  evaluated {n + 1}/{len(indices)} images ({time.time() - start:.0f}s)", flush=True)
    return summarize(confusion)


def summarize(confusion: np.ndarray) -> dict:
    iou = iou_from_confusion(confusion)
    total = confusion.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else 0.0,
        "iou": iou,
        "pixel_accuracy": float(np.trace(confusion) / total) if total else 0.0,
        "confusion": confusion,
    }


def format_iou_table(result: dict, class_names: Sequence[str]) -> str:
    lines = [f"{'class':<16} {'IoU %':>7}"]
    for name, value in zip(class_names, result["iou"]):
        lines.append(f"{name:<16} {'   n/a' if np.isnan(value) else f'{100 * value:7.2f}'}")
    lines.append(f"{'mIoU':<16} {100 * result['miou']:7.2f}")
    return "\n".join(lines)


def result_record(result: dict, class_names: Sequence[str]) -> dict:
    """The JSON-ready part of ``summarize``'s result: mIoU, pixel accuracy, IoU by class name (None where n/a)."""
    return {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"],
            "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, result["iou"])}}


def main(argv) -> None:
    from absl import flags, logging

    from stpg_jax import checkpoint, export
    from stpg_jax.data import DataError, build_data
    from stpg_jax.predict import load_predictor

    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.ERROR)  # Orbax's notes on reading a checkpoint are not for this console
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    path, override = FLAGS.checkpoint, (FLAGS.config if FLAGS["config"].present else None)
    step = None if FLAGS.step < 0 else FLAGS.step
    try:
        if export.is_export(path):
            if override is None:
                raise ValueError(f"{path} is an export: give --config for the val data (data.dataset, data.root)")
            data_config = override.data
        else:
            data_config = (override or checkpoint.load_config(path)).data
        predictor = load_predictor(path, override, FLAGS.windows_per_batch, network=FLAGS.network, step=step)
        bundle = build_data(data_config)
        if bundle.info.num_classes != predictor.num_classes:
            raise ValueError(f"the network predicts {predictor.num_classes} classes; data.dataset "
                             f"{bundle.info.name!r} has {bundle.info.num_classes}")
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    step = predictor.step
    count = min(len(bundle.val), FLAGS.max_images) if FLAGS.max_images else len(bundle.val)
    print(f"{FLAGS.network} of {path}" + (f" at step {step}" if step is not None else "")
          + f": {count} {bundle.info.name} val images, window {predictor.window}, stride rate "
          f"{predictor.stride_rate:.3f}, {predictor.windows_per_batch} windows per batch on "
          f"{jax.local_device_count()} device(s); the first batch compiles the network", flush=True)
    run, variables = predictor.window_predictor()
    start = time.time()
    result = evaluate(run, variables, bundle.val, bundle.info.num_classes, bundle.info.ignore_index,
                      FLAGS.max_images)
    seconds = time.time() - start
    print(format_iou_table(result, bundle.info.class_names))
    print(f"pixel accuracy {100 * result['pixel_accuracy']:.2f} %; {count} images in {seconds:.1f} s")
    if FLAGS.out:
        record = {"checkpoint": os.path.abspath(path), "network": FLAGS.network, "step": step,
                  "dataset": bundle.info.name, "images": count, "window": predictor.window,
                  "stride_rate": predictor.stride_rate, **result_record(result, bundle.info.class_names),
                  "confusion": result["confusion"].tolist(), "seconds": seconds}
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"written to {FLAGS.out}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    from stpg_jax.checkpoint import NETWORKS

    flags.DEFINE_string("checkpoint", None, "training work directory or export directory", required=True)
    flags.DEFINE_enum("network", "gen_student", NETWORKS, "network of a work directory's checkpoint")
    flags.DEFINE_integer("step", -1, "checkpoint step of a work directory (-1: the latest)")
    flags.DEFINE_integer("max_images", 0, "evaluate the first N val images only (0: all)")
    flags.DEFINE_integer("windows_per_batch", 0, "windows per batch (0: from the config/export)")
    flags.DEFINE_string("out", "", "write the result (IoUs, confusion matrix, protocol) to this JSON file")
    config_flags.DEFINE_config_file("config", None, "config whose data and eval sections to use", lock_config=True)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
