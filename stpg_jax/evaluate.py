"""Evaluation protocol of DESIGN.md §5: sliding window, summed window logits, single scale, no flip; mIoU.
(``eval.flip`` adds each window's mirror image, an option outside the paper's protocol.)

The window side is the training crop (VOC 512, Cityscapes 800); windows step by 2/3 of the side. An image smaller
than the window is padded with the mean colour (0 after normalisation) and the padding is cropped away afterwards.
Windows are run in fixed-size batches so that one compiled function serves every image size.

As a command, it evaluates a trained network on a dataset's val split:

    python -m stpg_jax.evaluate --checkpoint=WORKDIR [--network=all|NAME[,NAME]] [--step=N] [--config=FILE:ARG]
    python -m stpg_jax.evaluate --checkpoint=EXPORT_DIR --config=configs/camvid.py:1_8,data.root=/data/camvid

``--config`` supplies the data and evaluation sections (the network always comes from the checkpoint); a work
directory's own config is used without it. ``--out`` writes the result as JSON.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from stpg_jax.data.augment import MEAN_RGB_UINT8, normalize


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Top (or left) offsets covering [0, size) with windows of ``window`` stepped by ``stride``; last one flush."""
    if size <= window:
        return [0]
    count = int(math.ceil((size - window) / stride)) + 1
    return [min(i * stride, size - window) for i in range(count)]


class _Image:
    """One image on its way through the window batches."""

    def __init__(self, image, window: int, stride: int):
        image = np.asarray(image, np.uint8)
        self.h, self.w = image.shape[:2]
        ph, pw = max(self.h, window), max(self.w, window)
        self.padded = np.empty((ph, pw, 3), np.uint8)
        self.padded[...] = MEAN_RGB_UINT8
        self.padded[:self.h, :self.w] = image
        self.boxes = [(y, x) for y in window_origins(ph, window, stride) for x in window_origins(pw, window, stride)]
        self.waiting = len(self.boxes)  # windows whose outputs have not been taken yet
        self.total = None  # summed window logits: on the device (labels) or the host (__call__)
        self.labels = None  # class ids (H, W), on the device until read


def _add_windows(total, logits, origins, take):
    """``total`` (PH, PW, C) plus, in slot order, each window ``logits[i]`` (w, w, C) whose ``take[i]`` is set, at
    ``origins[i]`` = (y, x): the host's ``total[y:y + w, x:x + w] += logits[i]``, with the same float additions."""
    w, classes = logits.shape[1], logits.shape[-1]

    def add(i, total):
        at = (origins[i, 0], origins[i, 1], 0)
        window = jax.lax.dynamic_slice(total, at, (w, w, classes))
        return jax.lax.dynamic_update_slice(total, window + jnp.where(take[i], logits[i], 0.0), at)

    return jax.lax.fori_loop(0, logits.shape[0], add, total)


def _class_ids(logits):
    ids = jnp.argmax(logits, axis=-1)
    return ids.astype(jnp.uint8) if logits.shape[-1] <= 256 else ids


class WindowPredictor:
    """The evaluation protocol for one network. ``predictor(variables, image_uint8 (H, W, 3))`` returns the summed
    window logits (H, W, C) float32; ``predictor.labels(variables, images)`` yields class-id maps (H, W) for a
    stream of images, the windows of consecutive images filling the same batches (an image no larger than the
    window is one window: a batch of several windows then holds several images, not one image and padding), the
    next batch running on the device while the host reads the last one's outputs, and the logits summed and their
    argmax taken on the device, so that only class ids come back to the host.

    ``sharding``: optional NamedSharding splitting the window batch over devices (its size must divide
    ``windows_per_batch``), those of every process in a multi-process run: each process then cuts the same windows
    and hands its devices their part; the outputs come back whole to every process.
    """

    def __init__(self, model, window: int, windows_per_batch: int = 4, stride_rate: float = 2 / 3, sharding=None,
                 flip: bool = False):
        self.window, self.windows_per_batch, self.sharding = window, windows_per_batch, sharding
        self.stride = max(1, int(math.ceil(window * stride_rate)))

        def apply(variables, windows):
            x = normalize(windows)
            if flip:  # each window and its mirror image in one pass; the mirror's logits mirrored back and added
                both = model.apply(variables, jnp.concatenate([x, x[:, :, ::-1]]), train=False)["logits"]
                logits = both[:x.shape[0]] + both[x.shape[0]:, :, ::-1]
            else:
                logits = model.apply(variables, x, train=False)["logits"]
            return logits, _class_ids(logits)  # the ids are read when an image is one window

        def zeros(shape):
            return jnp.zeros(shape, jnp.float32)

        if sharding is None:
            self._replicated = None
            self._forward, self._ids = jax.jit(apply), jax.jit(_class_ids)
            self._zeros = jax.jit(zeros, static_argnums=0)
            self._add = jax.jit(_add_windows, donate_argnums=0)
        else:
            self._replicated = NamedSharding(sharding.mesh, PartitionSpec())
            self._forward = jax.jit(apply, out_shardings=self._replicated)
            self._ids = jax.jit(_class_ids, out_shardings=self._replicated)
            self._zeros = jax.jit(zeros, static_argnums=0, out_shardings=self._replicated)
            self._add = jax.jit(_add_windows, donate_argnums=0, out_shardings=self._replicated)

    def _put(self, array: np.ndarray, sharding):
        """A host array as the jitted functions take it: as it is, or as a global array of ``sharding``."""
        if sharding is None:
            return array
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def _dispatch(self, variables, slots):
        """Starts the network on the windows ``slots`` [(image, (y, x))], padded to a full batch with zeros."""
        w = self.window
        batch = np.zeros((self.windows_per_batch, w, w, 3), np.uint8)
        for i, (im, (y, x)) in enumerate(slots):
            batch[i] = im.padded[y:y + w, x:x + w]
        return slots, self._forward(variables, self._put(batch, self.sharding))

    def _collect(self, slots, outputs) -> None:
        """Hands a dispatched batch's outputs to its images: a one-window image takes its window's class ids, a
        larger one adds its windows' logits to its sum on the device (its class ids follow from its last window)."""
        logits, ids = outputs
        several = {}
        for i, (im, (y, x)) in enumerate(slots):
            if len(im.boxes) == 1:
                im.labels = (ids, i)
            else:
                several.setdefault(id(im), (im, []))[1].append((i, y, x))
        for im, windows in several.values():
            origins = np.zeros((self.windows_per_batch, 2), np.int32)
            take = np.zeros((self.windows_per_batch,), bool)
            for i, y, x in windows:
                origins[i], take[i] = (y, x), True
            if im.total is None:
                im.total = self._zeros(im.padded.shape[:2] + (logits.shape[-1],))
            im.total = self._add(im.total, logits, self._put(origins, self._replicated),
                                 self._put(take, self._replicated))
            if im.waiting == len(windows):
                im.labels, im.total = self._ids(im.total), None
        for im, _ in slots:
            im.waiting -= 1
            if im.waiting == 0:
                im.padded = None

    def labels(self, variables, images: Iterable) -> Iterator[np.ndarray]:
        """Class-id maps (H, W) of ``images`` (uint8 (H, W, 3) each), in order."""
        queue, pending, in_flight = [], collections.deque(), None
        for image in images:
            im = _Image(image, self.window, self.stride)
            pending.append(im)
            queue += [(im, box) for box in im.boxes]
            while len(queue) >= self.windows_per_batch:
                slots, queue = queue[:self.windows_per_batch], queue[self.windows_per_batch:]
                started = self._dispatch(variables, slots)
                if in_flight is not None:
                    self._collect(*in_flight)
                    yield from _finished(pending)
                in_flight = started
        started = self._dispatch(variables, queue) if queue else None
        for batch in (in_flight, started):
            if batch is not None:
                self._collect(*batch)
        yield from _finished(pending)

    def __call__(self, variables, image) -> np.ndarray:
        im = _Image(image, self.window, self.stride)
        logits = None
        for start in range(0, len(im.boxes), self.windows_per_batch):
            slots = [(im, box) for box in im.boxes[start:start + self.windows_per_batch]]
            _, outputs = self._dispatch(variables, slots)
            logits = np.asarray(outputs[0])
            if im.total is None:
                im.total = np.zeros(im.padded.shape[:2] + logits.shape[-1:], np.float32)
            for i, (_, (y, x)) in enumerate(slots):
                im.total[y:y + self.window, x:x + self.window] += logits[i]
        return im.total[:im.h, :im.w]


def _finished(pending: "collections.deque[_Image]") -> Iterator[np.ndarray]:
    """The class ids of the leading images whose windows are all taken, read to the host."""
    while pending and pending[0].waiting == 0:
        im = pending.popleft()
        if isinstance(im.labels, tuple):  # (a batch's ids, the slot of this one-window image)
            ids, slot = im.labels
            yield np.asarray(ids)[slot, :im.h, :im.w]
        else:
            yield np.asarray(im.labels)[:im.h, :im.w]


def make_window_predictor(model, window: int, windows_per_batch: int = 4, stride_rate: float = 2 / 3,
                          sharding=None, flip: bool = False) -> WindowPredictor:
    """A `WindowPredictor`: ``predictor(variables, image)`` → summed logits, ``predictor.labels`` → class ids."""
    return WindowPredictor(model, window, windows_per_batch, stride_rate, sharding, flip)


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
    from absl import flags, logging

    from stpg_jax import checkpoint, cli, export, plots
    from stpg_jax.config import MODE_NETWORKS
    from stpg_jax.data import build_data
    from stpg_jax.predict import load_predictor

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
        def network_record(name):
            return {**result_record(results[name], bundle.info.class_names),
                    "confusion": results[name]["confusion"].tolist(), "seconds": seconds[name]}

        record = {"checkpoint": os.path.abspath(path), "step": step, "dataset": bundle.info.name, "images": count,
                  "window": predictor.window, "stride_rate": predictor.stride_rate, "flip": predictor.flip}
        if len(networks) == 1:
            record.update(network=networks[0], **network_record(networks[0]))
        else:
            record["networks"] = {name: network_record(name) for name in networks}
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "x") as f:  # "x": a file that appeared meanwhile is not overwritten either
            json.dump(record, f, indent=2)
        print(f"written to {FLAGS.out}")
    if FLAGS.plot:
        print(f"chart: {plots.eval_iou_png(results, bundle.info.class_names, FLAGS.plot, step)}")


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
