"""TensorBoard pictures of what the pseudo-labels and the pixel selection do (issue 29), beside the training step.

Every ``log_images_every_steps`` steps, a fixed set of ``log_images_count`` unlabelled and val images (the first ones
of each source, centre-cropped to the training crop) goes through a separate small jitted function, never through
the training step, so the step's program and speed are unchanged. Each image becomes one strip of square panels,
``PANEL_GAP`` white pixels apart, written with the run's SummaryWriter as ``images/unlabeled/<i>`` and
``images/val/<i>``; their columns, left to right (those of networks the mode has):

- ``image``: the crop itself;
- ``gen_teacher_labels``, ``pro_teacher_labels``: argmax of each teacher, in the dataset's palette;
- ``gen_teacher_confidence``, ``pro_teacher_confidence``: its max softmax probability, grey (white = 1);
- ``selection``: the Pro-Student's argmax against its teacher's labels (the Gen-Teacher's under cross supervision),
  classified by ``losses.select_pixels`` over the panel batch: consistent / highly mismatched / low mismatched, the
  pixels the default selection (consistent+high) drops, in ``SELECTION_COLORS``;
- ``gen_student_prediction``: the Gen-Student as it is evaluated (running BatchNorm statistics), in the palette;
- ``ground_truth`` (val only), in the palette, ignored pixels black.

Teachers and the Pro-Student run as the step runs them: train mode (BatchNorm on the batch's own statistics, here the
panel batch's; the updated statistics are discarded) on the weak image. Unlike the step, nothing is CutMixed: each
panel shows what the networks make of that one image. 'mean_teacher' has no Pro-Teacher or Pro-Student (no selection
column), 'supervised' has only the Gen-Student.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from stpg_jax import losses
from stpg_jax.config import MODE_NETWORKS
from stpg_jax.data.palettes import colorize
from stpg_jax.models.inputs import MEAN_RGB_UINT8

PANEL_GAP = 2  # white pixels between two panels of a strip
GAP_COLOR = (255, 255, 255)
# consistent, highly mismatched, low mismatched (dropped by the default selection): Okabe-Ito colours, which stay
# apart for the common colour-vision deficiencies.
SELECTION_COLORS = np.array([(0, 158, 115), (240, 228, 66), (213, 94, 0)], np.uint8)
SELECTION_NAMES = ("consistent", "highly mismatched", "low mismatched (dropped)")
TAG_PREFIX = "images"


def panel_columns(mode: str, with_label: bool) -> list[str]:
    """The panel names of one strip, left to right, for a run of ``mode``; ``with_label``: val images."""
    nets = MODE_NETWORKS[mode]
    cols = ["image"]
    cols += [f"{t}_labels" for t in ("gen_teacher", "pro_teacher") if t in nets]
    cols += [f"{t}_confidence" for t in ("gen_teacher", "pro_teacher") if t in nets]
    if "pro_student" in nets:
        cols.append("selection")
    cols.append("gen_student_prediction")
    if with_label:
        cols.append("ground_truth")
    return cols


def centre_crop(image, label, size: int, ignore_index: int = 255):
    """The centre size×size of an (H, W, 3) uint8 image and its optional label, padded where smaller as the weak
    augmentation pads (mean colour, ignore label)."""
    h, w = image.shape[:2]
    out = np.empty((size, size, 3), np.uint8)
    out[...] = MEAN_RGB_UINT8
    out_label = None if label is None else np.full((size, size), ignore_index, np.uint8)
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)  # in the source
    dy, dx = max(0, (size - h) // 2), max(0, (size - w) // 2)  # in the panel
    ch, cw = min(h, size), min(w, size)
    out[dy:dy + ch, dx:dx + cw] = image[y0:y0 + ch, x0:x0 + cw]
    if label is not None:
        out_label[dy:dy + ch, dx:dx + cw] = label[y0:y0 + ch, x0:x0 + cw]
    return out, out_label


def fixed_images(source, count: int, size: int, with_label: bool):
    """The first ``count`` items of ``source`` as (images (N, S, S, 3) uint8, labels (N, S, S) uint8 or None)."""
    images, labels = [], []
    for i in range(min(count, len(source))):
        item = source[i]
        image, label = centre_crop(np.asarray(item["image"]), np.asarray(item["label"]) if with_label else None,
                                   size)
        images.append(image)
        labels.append(label)
    if not images:
        return None, None
    return np.stack(images), (np.stack(labels) if with_label else None)


def make_panel_fn(model, mode: str, num_classes: int, cross_supervision: bool = True):
    """jitted ``panels(networks, images_uint8 (N, S, S, 3), key) -> dict`` of (N, S, S) maps: ``<teacher>_labels``
    int32, ``<teacher>_confidence`` float32, ``selection`` int32 (0 consistent, 1 highly mismatched, 2 low
    mismatched), ``gen_student_prediction`` int32, for the networks of ``mode`` (``networks``: {name: Network})."""
    nets = MODE_NETWORKS[mode]

    def train_mode(net, x, key):
        # As the step runs teachers: batch statistics, dropout on; the mutated statistics are thrown away.
        out, _ = model.apply(net.variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)

    def panels(networks, x, key):  # x: uint8 images, which the networks normalise
        keys = dict(zip(("gen_teacher", "pro_teacher", "pro_student"), jax.random.split(key, 3)))
        out = {}
        for t in ("gen_teacher", "pro_teacher"):
            if t in nets:
                p = train_mode(networks[t], x, keys[t])
                out[f"{t}_labels"] = jnp.argmax(p, axis=-1).astype(jnp.int32)
                out[f"{t}_confidence"] = jnp.max(p, axis=-1)
        if "pro_student" in nets:
            pi = jnp.argmax(train_mode(networks["pro_student"], x, keys["pro_student"]), axis=-1)
            target = out["gen_teacher_labels"] if cross_supervision else out["pro_teacher_labels"]
            sel = losses.select_pixels(target, pi, num_classes)
            out["selection"] = (sel["high"] + 2 * sel["low"]).astype(jnp.int32)
        logits = model.apply(networks["gen_student"].variables, x, train=False)["logits"]
        out["gen_student_prediction"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return out

    return jax.jit(panels)


def render_strip(columns, image, maps: dict, label, palette, ignore_index: int = 255) -> np.ndarray:
    """One image's panels side by side, (S, P·S + (P−1)·PANEL_GAP, 3) uint8. ``maps``: one image's outputs of
    ``make_panel_fn`` (host arrays); ``label``: its ground truth or None."""
    panels = []
    for col in columns:
        if col == "image":
            panels.append(np.asarray(image, np.uint8))
        elif col.endswith("_confidence"):
            grey = np.round(np.clip(maps[col], 0.0, 1.0) * 255).astype(np.uint8)
            panels.append(np.repeat(grey[..., None], 3, axis=-1))
        elif col == "selection":
            panels.append(SELECTION_COLORS[maps[col]])
        elif col == "ground_truth":
            panels.append(colorize(label, palette, ignore_index))
        else:
            panels.append(colorize(maps[col], palette, ignore_index))
    size = panels[0].shape[0]
    gap = np.empty((size, PANEL_GAP, 3), np.uint8)
    gap[...] = GAP_COLOR
    pieces = [panels[0]]
    for p in panels[1:]:
        pieces += [gap, p]
    return np.concatenate(pieces, axis=1)


def legend_markdown(mode: str, palette, class_names) -> str:
    """The key to the strips, for TensorBoard's text tab."""
    lines = [f"Columns of `{TAG_PREFIX}/unlabeled/<i>` (left to right, {PANEL_GAP}-pixel white gaps): "
             + ", ".join(panel_columns(mode, False)) + f"; `{TAG_PREFIX}/val/<i>` adds ground_truth.", ""]
    if "pro_student" in MODE_NETWORKS[mode]:
        lines.append("Selection colours: " + ", ".join(
            f"{name} = RGB{tuple(int(v) for v in c)}" for name, c in zip(SELECTION_NAMES, SELECTION_COLORS)) + ".")
        lines.append("")
    lines.append("Palette: " + ", ".join(f"{n} = RGB{tuple(int(v) for v in c)}" for n, c in zip(class_names, palette))
                 + "; ignored pixels black. Confidence: grey, white = 1.")
    return "\n".join(lines)


class ImageLogger:
    """Writes the panels every ``config.log_images_every_steps`` steps (nothing when 0). Build it once per run;
    call ``logger(step, state, writer)`` after each step, in every process (the panel function is a collective
    program on the state's devices); only a process with a writer writes."""

    def __init__(self, config, bundle, model, replicated=None):
        self.every = int(config.log_images_every_steps)
        if not self.every or config.log_images_count <= 0:
            self.every = 0
            return
        self.mode, self.info, self.replicated = config.mode, bundle.info, replicated
        size, count = config.data.crop_size, config.log_images_count
        sets = {"unlabeled": fixed_images(bundle.unlabeled, count, size, with_label=False),
                "val": fixed_images(bundle.val, count, size, with_label=True)}
        self.sets = {k: v for k, v in sets.items() if v[0] is not None}  # a source may be empty
        self.panels = make_panel_fn(model, config.mode, bundle.info.num_classes, config.stpg.cross_supervision)
        self.key = jax.random.PRNGKey(config.seed + 29)
        self._legend_written = False

    def __call__(self, step: int, state, writer) -> None:
        if not self.every or step % self.every:
            return
        networks = {name: getattr(state, name) for name in MODE_NETWORKS[self.mode]}
        key = jax.random.fold_in(self.key, step)
        for split, (images, labels) in self.sets.items():
            placed = images if self.replicated is None else jax.device_put(images, self.replicated)
            maps = jax.device_get(self.panels(networks, placed, key))
            if writer is None:
                continue
            columns = panel_columns(self.mode, labels is not None)
            for i in range(images.shape[0]):
                strip = render_strip(columns, images[i], {k: v[i] for k, v in maps.items()},
                                     None if labels is None else labels[i], self.info.palette, self.info.ignore_index)
                writer.add_image(f"{TAG_PREFIX}/{split}/{i}", strip, step, dataformats="HWC")
        if writer is not None and not self._legend_written:
            writer.add_text(f"{TAG_PREFIX}/legend", legend_markdown(self.mode, self.info.palette,
                                                                    self.info.class_names), step)
            self._legend_written = True
        if writer is not None:
            writer.flush()


def name_classes(scalars: dict, class_names, keys=("mismatch_scores",)) -> dict:
    """``scalars`` with per-class entries ``<key>/<index>`` (as the train loop flattens (C,) metrics) renamed
    ``<key>/<class name>``, so TensorBoard shows class names."""
    out = {}
    for k, v in scalars.items():
        head, _, tail = k.rpartition("/")
        if head in keys and tail.isdigit() and int(tail) < len(class_names):
            k = f"{head}/{class_names[int(tail)]}"
        out[k] = v
    return out


def class_layout(class_names) -> dict:
    """TensorBoard's Custom Scalars layout (SummaryWriter.add_custom_scalars): a chart per class with its eval IoU
    and its mismatch score ("per class"), and one chart of every class's IoU and one of every mismatch score."""
    per_class = {name: ["Multiline", [f"^eval/iou/{re.escape(name)}$", f"^train/mismatch_scores/{re.escape(name)}$"]]
                 for name in class_names}
    return {"per class": per_class,
            "all classes": {"eval IoU": ["Multiline", ["^eval/iou/"]],
                            "mismatch score (train)": ["Multiline", ["^train/mismatch_scores/"]]}}
