"""Evaluation protocol of DESIGN.md §5: sliding window, summed window logits, single scale, no flip; mIoU.

The window side is the training crop (VOC 512, Cityscapes 800); windows step by 2/3 of the side. An image smaller
than the window is padded with the mean colour (0 after normalisation) and the padding is cropped away afterwards.
Windows are run in fixed-size batches so that one compiled function serves every image size.
"""

from __future__ import annotations

import math
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
