"""Evaluation of DESIGN.md §5: a network's class ids by the protocol of ``stpg_jax.inference`` (sliding window,
summed window logits, single scale, no flip; ``eval.flip`` adds each window's mirror image, an option outside the
paper's protocol), counted against the labels into a confusion matrix; IoU per class and mIoU.

As a command, it evaluates a trained network on a dataset's val split:

    python -m stpg_jax.evaluate --checkpoint=WORKDIR [--network=all|NAME[,NAME]] [--step=N] [--config=FILE:ARG]
    python -m stpg_jax.evaluate --checkpoint=EXPORT_DIR --config=configs/camvid.py:1_8,data.root=/data/camvid

``--config`` supplies the data and evaluation sections (the network always comes from the checkpoint); a work
directory's own config is used without it. ``--out`` writes the result as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Sequence

import jax
import numpy as np


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
    """Runs ``predictor`` over ``source[i]`` ({'image', 'label'}) and returns mIoU, per-class IoU, pixel accuracy.
    ``predictor``: a `WindowPredictor` (its ``labels`` stream), or any ``(variables, image) -> logits``."""
    indices = list(indices if indices is not None else range(len(source)))
    if max_images:
        indices = indices[:max_images]
    truths = collections.deque()

    def images():
        for i in indices:
            item = source[i]
            truths.append(item["label"])
            yield item["image"]

    if hasattr(predictor, "labels"):
        predictions = predictor.labels(variables, images())
    else:
        predictions = (predictor(variables, image).argmax(-1) for image in images())
    confusion = np.zeros((num_classes, num_classes), np.int64)
    start = time.time()
    for n, pred in enumerate(predictions):
        confusion += confusion_matrix(pred, truths.popleft(), num_classes, ignore_index)
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


def format_iou_columns(results: dict, class_names: Sequence[str]) -> str:
    """IoU % by class (rows) and network (columns), then mIoU and pixel accuracy."""
    width = max(12, *(len(n) + 1 for n in results))
    lines = [f"{'class':<16}" + "".join(f"{n:>{width}}" for n in results)]
    for c, name in enumerate(class_names):
        cells = ("n/a" if np.isnan(r["iou"][c]) else f"{100 * r['iou'][c]:.2f}" for r in results.values())
        lines.append(f"{name:<16}" + "".join(f"{cell:>{width}}" for cell in cells))
    lines.append(f"{'mIoU':<16}" + "".join(f"{100 * r['miou']:>{width}.2f}" for r in results.values()))
    accuracy = (100 * r["pixel_accuracy"] for r in results.values())
    lines.append(f"{'pixel accuracy':<16}" + "".join(f"{a:>{width}.2f}" for a in accuracy))
    return "\n".join(lines)


def main(argv) -> None:
    # The command's own imports: the evaluation above, which the training loop imports, needs none of them (the
    # data package loads tensorflow_datasets).
    from absl import flags, logging

    from stpg_jax import checkpoint, cli, export, plots
    from stpg_jax.config import MODE_NETWORKS
    from stpg_jax.data import build_data
    from stpg_jax.inference import load_predictor

    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.ERROR)  # Orbax's notes on reading a checkpoint are not for this console
    if FLAGS.out:
        cli.check_new_file(FLAGS.out, "--out")  # before the evaluation, which may take long
    path, override = FLAGS.checkpoint, (FLAGS.config if FLAGS["config"].present else None)
    step = None if FLAGS.step == -1 else FLAGS.step
    networks = list(FLAGS.network)
    if FLAGS.plot:
        try:
            plots.require_matplotlib("--plot")  # before the evaluation, not after it
        except plots.PlotsUnavailable as e:
            raise cli.InputError(str(e)) from None
    if not networks:
        raise cli.InputError("no network given, --network, expected one or more of the run's networks, or 'all'")
    if export.is_export(path):
        if override is None:
            raise cli.InputError(f"{path} is an export, --config is missing, expected --config for the val data "
                                 "(data.dataset, data.root)")
        data_config = override.data
        networks = ["gen_student"] if networks == ["all"] else networks
    else:
        run_config = checkpoint.load_config(path)
        data_config = (override or run_config).data
        networks = list(MODE_NETWORKS[run_config.mode]) if networks == ["all"] else networks
    predictor = load_predictor(path, override, FLAGS.windows_per_batch, network=networks[0], step=step)
    if FLAGS.flip is not None:
        predictor.flip = FLAGS.flip
    bundle = build_data(data_config)
    if bundle.info.num_classes != predictor.num_classes:
        raise cli.InputError(f"the network predicts {predictor.num_classes} classes, data.dataset = "
                             f"{bundle.info.name!r}, expected a dataset of as many classes (it has "
                             f"{bundle.info.num_classes})")
    others = {name: checkpoint.load_network(path, name, predictor.step)[1] for name in networks[1:]}
    step = predictor.step
    count = min(len(bundle.val), FLAGS.max_images) if FLAGS.max_images else len(bundle.val)
    print(f"{', '.join(networks)} of {path}" + (f" at step {step}" if step is not None else "")
          + f": {count} {bundle.info.name} val images, window {predictor.window}, stride rate "
          f"{predictor.stride_rate:.3f}{', flipped too' if predictor.flip else ''}, {predictor.windows_per_batch} "
          f"windows per batch on "
          f"{jax.local_device_count()} device(s); the first batch compiles the network", flush=True)
    # One compiled network serves them all: they share the model and differ only in their variables.
    run, variables = predictor.window_predictor()
    results, seconds = {}, {}
    for name in networks:
        if name != networks[0]:
            variables = predictor.place(others.pop(name))
        start = time.time()
        results[name] = evaluate(run, variables, bundle.val, bundle.info.num_classes, bundle.info.ignore_index,
                                 FLAGS.max_images)
        seconds[name] = time.time() - start
        print(f"  {name}: mIoU {100 * results[name]['miou']:.2f} ({count} images in {seconds[name]:.1f} s)",
              flush=True)
    if len(networks) == 1:
        print(format_iou_table(results[networks[0]], bundle.info.class_names))
        print(f"pixel accuracy {100 * results[networks[0]]['pixel_accuracy']:.2f} %")
    else:
        print(format_iou_columns(results, bundle.info.class_names))
    if FLAGS.out:
        record = {"checkpoint": os.path.abspath(path), "step": step, "dataset": bundle.info.name, "images": count,
                  "window": predictor.window, "stride_rate": predictor.stride_rate, "flip": predictor.flip}
        _write_record(FLAGS.out, record, results, seconds, bundle.info.class_names)
    if FLAGS.plot:
        print(f"chart: {plots.eval_iou_png(results, bundle.info.class_names, FLAGS.plot, step)}")


def _write_record(path: str, record: dict, results: dict, seconds: dict, class_names) -> None:
    """The command's --out JSON: ``record`` and each network's result (one network: at the top level)."""
    def network_record(name):
        return {**result_record(results[name], class_names), "confusion": results[name]["confusion"].tolist(),
                "seconds": seconds[name]}

    if len(results) == 1:
        name = next(iter(results))
        record.update(network=name, **network_record(name))
    else:
        record["networks"] = {name: network_record(name) for name in results}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "x") as f:  # "x": a file that appeared meanwhile is not overwritten either
        json.dump(record, f, indent=2)
    print(f"written to {path}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    from stpg_jax.checkpoint import NETWORKS

    flags.DEFINE_string("checkpoint", None, "training work directory or export directory", required=True)
    flags.DEFINE_list("network", ["gen_student"], f"network(s) of a work directory's checkpoint, comma-separated, "
                      f"from {', '.join(NETWORKS)}; 'all': every network the run has")
    flags.DEFINE_integer("step", -1, "checkpoint step of a work directory (-1: the latest)", lower_bound=-1)
    flags.DEFINE_integer("max_images", 0, "evaluate the first N val images only (0: all)", lower_bound=0)
    flags.DEFINE_integer("windows_per_batch", 0, "windows per batch (0: from the config/export)", lower_bound=0)
    flags.DEFINE_boolean("flip", None, "--flip / --noflip: add each window's mirror image or not (default: as the "
                         "run's eval.flip or the export's)")
    flags.DEFINE_string("out", "", "write the result (IoUs, confusion matrix, protocol) to this JSON file")
    flags.DEFINE_string("plot", "", "write a per-class IoU bar chart (rare classes marked) to this PNG file; needs "
                        "matplotlib (pip install 'stpg_jax[plots]')")
    config_flags.DEFINE_config_file("config", None, "config whose data and eval sections to use", lock_config=True)


if __name__ == "__main__":
    from stpg_jax import cli

    _define_flags()
    cli.run_absl(main)
