"""Running a trained network on images: the evaluation protocol's windows and batching (DESIGN.md §5) and the
network with its protocol as one object, for ``stpg_jax.evaluate`` and ``stpg_jax.predict`` alike.

Sliding windows of the protocol's side (VOC 512, Cityscapes 800) step by 2/3 of it; an image smaller than the window
is padded with the mean colour (0 after normalisation) and the padding cropped away afterwards. Windows of
consecutive images fill fixed-size batches, so one compiled function serves every image size; the window logits are
summed and their argmax taken on the device. The networks take uint8 pixels (they normalise them).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
from typing import Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from stpg_jax import export, sharding
from stpg_jax.checkpoint import load_network
from stpg_jax.errors import InputError
from stpg_jax.models.inputs import MEAN_RGB_UINT8
from stpg_jax.recipe import model_from_config


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

        def apply(variables, windows):  # uint8 windows: the network normalises them
            if flip:  # each window and its mirror image in one pass; the mirror's logits mirrored back and added
                both = model.apply(variables, jnp.concatenate([windows, windows[:, :, ::-1]]), train=False)["logits"]
                logits = both[:windows.shape[0]] + both[windows.shape[0]:, :, ::-1]
            else:
                logits = model.apply(variables, windows, train=False)["logits"]
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


@dataclasses.dataclass
class Predictor:
    """A model with its variables and the protocol to run it with."""

    model: object
    variables: dict
    num_classes: int
    dataset_name: str
    window: int
    stride_rate: float = 2 / 3
    windows_per_batch: int = 4
    step: Optional[int] = None  # the checkpoint's step (None for an export)
    flip: bool = False  # also the mirrored windows (eval.flip)

    def _placement(self):
        """The window batches' sharding over the local devices and the variables' (None, None: one device), used
        when the devices divide ``windows_per_batch``."""
        devices = jax.local_devices()
        if len(devices) < 2 or self.windows_per_batch % len(devices):
            return None, None
        mesh = sharding.make_mesh(devices)
        return sharding.batch_sharded(mesh), sharding.replicated(mesh)

    def place(self, variables):
        """``variables`` (these or another network's of the same model) placed for `window_predictor`'s ``run``."""
        _, replicated = self._placement()
        return variables if replicated is None else jax.device_put(variables, replicated)

    def window_predictor(self):
        """(run, variables): a `WindowPredictor` for this network and protocol, its window batches
        split over the local devices when their count divides ``windows_per_batch``; the variables placed for it."""
        batch_sharding, _ = self._placement()
        run = WindowPredictor(self.model, self.window, self.windows_per_batch, self.stride_rate,
                              sharding=batch_sharding, flip=self.flip)
        return run, self.place(self.variables)


def load_predictor(checkpoint: str, config=None, windows_per_batch: Optional[int] = None,
                   network: str = "gen_student", step: Optional[int] = None) -> Predictor:
    """A `Predictor` from an export directory or a training work directory; ``config`` overrides the protocol.
    ``network`` and ``step`` pick a network and a checkpoint of a work directory (default: the latest
    Gen-Student); an export holds its Gen-Student alone."""
    if export.is_export(checkpoint):
        if network != "gen_student" or step is not None:
            raise InputError(f"{checkpoint} is an export, which holds its Gen-Student alone; a network or step "
                             "can be chosen only from a training work directory")
        model, variables, meta = export.load_model(checkpoint)
        p = Predictor(model, variables, meta["num_classes"], meta["dataset_name"], meta["eval_window"],
                      meta["eval_stride_rate"], flip=bool(meta.get("eval_flip", False)))
    elif os.path.isdir(checkpoint):
        train_config, variables, num_classes, step = load_network(checkpoint, network, step, on_damaged=warn_damaged)
        p = Predictor(model_from_config(train_config.model, num_classes), variables, num_classes,
                      train_config.data.dataset, train_config.eval.window, train_config.eval.stride_rate,
                      train_config.eval.windows_per_batch, step, bool(train_config.eval.get("flip", False)))
    else:
        raise FileNotFoundError(f"no such directory {checkpoint!r}, --checkpoint, expected an export directory or a "
                                "training work directory")
    if config is not None:
        p.window, p.stride_rate = int(config.eval.window), float(config.eval.stride_rate)
        p.windows_per_batch = int(config.eval.windows_per_batch)
        p.flip = bool(config.eval.flip)
        p.dataset_name = config.data.dataset
    if windows_per_batch:
        p.windows_per_batch = int(windows_per_batch)
    return p


def warn_damaged(error) -> None:
    """Says on stderr that a damaged checkpoint was passed over (the command goes on with an older one)."""
    print(f"warning: {error}; using the newest intact checkpoint instead", file=sys.stderr, flush=True)


