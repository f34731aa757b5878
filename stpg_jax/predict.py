"""Segments images with a trained Gen-Student and writes coloured masks.

    python -m stpg_jax.predict --checkpoint=EXPORT_DIR_OR_WORKDIR --images=DIR_OR_GLOB --out=DIR [--config=...]
        [--network=gen_teacher] [--step=N] [--flip]

``--checkpoint`` is a directory written by `stpg_jax.export.export_model` or a training work directory (its latest
Gen-Student, or ``--network`` / ``--step``). Each image goes through the evaluation protocol (sliding window of the
config's side, stride 2/3, summed window logits, single scale, no flip unless ``eval.flip`` / ``--flip``; windows
batched on the device). ``--config`` overrides the protocol (``eval.window``, ``eval.stride_rate``, ``eval.flip``,
``eval.windows_per_batch``) and the palette (``data.dataset``).

For each ``<name>.<ext>`` it writes ``<name>.png`` (palette PNG whose pixel values are class ids) and
``<name>_overlay.jpg`` (the image blended with the class colours).
"""

from __future__ import annotations

import collections
import glob
import os
import sys
from typing import List, Sequence

import jax
import numpy as np
from PIL import Image, ImageOps

from stpg_jax.errors import InputError
from stpg_jax.inference import Predictor, load_predictor  # noqa: F401  (load_predictor: part of this API)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
OVERLAY_ALPHA = 0.5


def list_images(pattern: str) -> List[str]:
    """Image files of a directory (sorted, not recursive), of a glob pattern, or a single file."""
    if os.path.isdir(pattern):
        paths = [os.path.join(pattern, n) for n in os.listdir(pattern)]
    elif os.path.isfile(pattern):
        paths = [pattern]
    else:
        paths = glob.glob(pattern, recursive=True)
    paths = sorted(p for p in paths if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"no images found for {pattern!r}, --images, expected an image file, a folder or a "
                                f"glob pattern of {', '.join(IMAGE_EXTENSIONS)} files")
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise InputError(f"several input images share the names {clashes}, --images={pattern}, expected one image "
                         "per name: their outputs would overwrite each other")
    return paths


def palette_image(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = palette[:256]
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(table.reshape(-1).tolist())
    return image


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    colours = palette[np.minimum(mask, len(palette) - 1)].astype(np.float32)
    return (image.astype(np.float32) * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA).round().astype(np.uint8)


class UnreadableImagesError(OSError):
    """Some input images could not be read; the others' outputs were written (``written``)."""

    def __init__(self, unreadable: List[tuple], written: List[str]):
        self.unreadable, self.written = unreadable, written
        listed = "; ".join(f"{path} ({reason})" for path, reason in unreadable)
        super().__init__(f"{len(unreadable)} of the images could not be read and have no outputs: {listed}")


def predict(predictor: Predictor, image_paths: Sequence[str], out_dir: str, progress: bool = True) -> List[str]:
    """Writes a mask and an overlay per image into ``out_dir``; returns the written paths. An image that cannot be
    read is passed over (a line on stderr names it) and the others go on; then `UnreadableImagesError` lists them."""
    from tqdm import tqdm

    # Here, not above: the data package loads tensorflow_datasets, which predicting needs for nothing else.
    from stpg_jax.data.palettes import palette_for

    if predictor.num_classes > 256:
        raise ValueError(f"{predictor.num_classes} classes do not fit an 8-bit palette PNG")
    palette = np.asarray(palette_for(predictor.dataset_name, predictor.num_classes), np.uint8)
    if len(palette) < predictor.num_classes:
        raise ValueError(f"the {predictor.dataset_name!r} palette has {len(palette)} colours for "
                         f"{predictor.num_classes} classes")
    run, variables = predictor.window_predictor()

    os.makedirs(out_dir, exist_ok=True)
    read = collections.deque()  # (path, image) of the images handed to the predictor, not yet written

    unreadable = []

    def images():
        for path in image_paths:
            try:
                with Image.open(path) as f:
                    image = np.asarray(ImageOps.exif_transpose(f).convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # not an image, truncated, too large
                unreadable.append((path, str(e) or type(e).__name__))
                print(f"cannot read {path}: {unreadable[-1][1]}; passed over", file=sys.stderr, flush=True)
                continue
            read.append((path, image))
            yield image

    written = []
    masks = run.labels(variables, images())
    for mask in tqdm(masks, total=len(image_paths), desc="predict", unit="image", disable=not progress):
        path, image = read.popleft()
        mask = mask.astype(np.uint8)
        name = os.path.splitext(os.path.basename(path))[0]
        mask_path = os.path.join(out_dir, f"{name}.png")
        overlay_path = os.path.join(out_dir, f"{name}_overlay.jpg")
        palette_image(mask, palette).save(mask_path)
        Image.fromarray(overlay(image, mask, palette)).save(overlay_path, quality=90)
        written += [mask_path, overlay_path]
    if unreadable:
        raise UnreadableImagesError(unreadable, written)
    return written


def main(argv) -> int:
    from absl import flags, logging

    from stpg_jax import cli

    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.ERROR)  # Orbax's notes on reading a checkpoint are not for this console
    cli.check_output_dir(FLAGS.out, "--out")
    paths = list_images(FLAGS.images)  # before the network is read: a wrong folder fails at once
    config = FLAGS.config if FLAGS["config"].present else None
    predictor = load_predictor(FLAGS.checkpoint, config, FLAGS.windows_per_batch, network=FLAGS.network,
                               step=None if FLAGS.step == -1 else FLAGS.step)
    if FLAGS.flip is not None:
        predictor.flip = FLAGS.flip
    print(f"{len(paths)} images, window {predictor.window}, stride rate {predictor.stride_rate:.3f}"
          f"{', flipped too' if predictor.flip else ''}, "
          f"{predictor.windows_per_batch} windows per batch on {jax.local_device_count()} device(s); the first "
          f"batch compiles the network")
    try:
        predict(predictor, paths, FLAGS.out)
    except UnreadableImagesError as e:
        print(f"masks and overlays of {len(e.written) // 2} images written to {FLAGS.out}")
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_PARTIAL
    print(f"masks and overlays written to {FLAGS.out}")
    return cli.EXIT_OK


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("checkpoint", None, "export directory or training work directory", required=True)
    flags.DEFINE_string("images", None, "image directory, glob pattern or file", required=True)
    flags.DEFINE_string("out", None, "output directory", required=True)
    flags.DEFINE_integer("windows_per_batch", 0, "windows per device batch (0: from the config/export)",
                         lower_bound=0)
    flags.DEFINE_string("network", "gen_student", "network of a work directory's checkpoint: gen_student, "
                        "pro_student, gen_teacher or pro_teacher")
    flags.DEFINE_integer("step", -1, "checkpoint step of a work directory (-1: the latest)", lower_bound=-1)
    flags.DEFINE_boolean("flip", None, "--flip / --noflip: add each window's mirror image or not (default: as the "
                         "run's eval.flip or the export's)")
    config_flags.DEFINE_config_file("config", None, "training config; overrides the evaluation protocol",
                                    lock_config=True)


if __name__ == "__main__":
    from stpg_jax import cli

    _define_flags()
    cli.run_absl(main)
