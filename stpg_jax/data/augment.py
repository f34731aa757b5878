"""Weak augmentation (DESIGN.md §2 step 1) on the host, normalisation on the device.

The host works in uint8: random horizontal flip, random scale from a fixed set, random crop padded with the
ImageNet mean colour (images) and the ignore value (labels). The network normalises them on the device
(``stpg_jax.models.inputs``).

Two variants (``data.augmentation``):
- 'release' (DESIGN.md §8.7, the released code's order): scaled size s·(H, W) rounded down, bilinear resize
  without antialiasing (OpenCV's INTER_LINEAR: half-pixel centres, clamped borders), labels nearest; a crop at a
  random position where the scaled image is larger (the release's ``randint(0, size − crop + 1)``, both ends
  included), then padding centred around it (top = pad//2). Each view comes with its image's box inside the crop,
  ``(top, left, height, width)``, and the network sets everything outside it to exactly 0 after normalisation.
- 'legacy': rounded size, PIL's antialiased bilinear, the image top-left in mean-colour padding, then the crop;
  its box is the whole crop (the mean colour normalises to almost 0).
"""

import numpy as np
from PIL import Image

from stpg_jax.models.inputs import MEAN_RGB_UINT8

AUGMENTATIONS = ("release", "legacy")


def _linear_taps(in_size: int, out_size: int):
    """Source indices and weights of OpenCV-style bilinear resizing along one axis (half-pixel centres)."""
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_linear(image, height, width):
    """uint8 (H, W, 3) → (height, width, 3) by bilinear interpolation without antialiasing (as OpenCV's
    INTER_LINEAR; its fixed-point arithmetic can differ by one grey level)."""
    lo_y, hi_y, fy = _linear_taps(image.shape[0], height)
    lo_x, hi_x, fx = _linear_taps(image.shape[1], width)
    x = image.astype(np.float32)
    rows = x[lo_y] * (1 - fy)[:, None, None] + x[hi_y] * fy[:, None, None]
    out = rows[:, lo_x] * (1 - fx)[None, :, None] + rows[:, hi_x] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_nearest(label, height, width):
    """OpenCV's INTER_NEAREST: source index floor(i · in / out)."""
    ys = np.minimum((np.arange(height) * label.shape[0]) // height, label.shape[0] - 1)
    xs = np.minimum((np.arange(width) * label.shape[1]) // width, label.shape[1] - 1)
    return label[ys][:, xs]


def resize(image, label, height, width):
    """Bilinear for the image, nearest for the label (labels must keep their class ids)."""
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
    return image, label


def weak_augment(rng, image, label, crop_size, scales, ignore_index=255, variant="release"):
    """One image (H, W, 3) uint8 and optional label (H, W) uint8 → (image, label or None, box): a crop_size² view
    and the (top, left, height, width) int32 box of the image's own pixels in it (see the module docstring).

    rng: np.random.Generator; the draws are, in order: flip, scale, crop offset — a fixed count per call,
    so the result depends only on the generator's seed.
    """
    flip = rng.random() < 0.5
    scale = float(scales[rng.integers(len(scales))])
    u_y, u_x = rng.random(), rng.random()
    if flip:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    if variant == "release":
        return _release_view(image, label, crop_size, scale, u_y, u_x, ignore_index)
    if variant != "legacy":
        raise ValueError(f"data.augmentation must be one of {AUGMENTATIONS}, got {variant!r}")
    full = np.asarray([0, 0, crop_size, crop_size], np.int32)
    out_image, out_label = _legacy_view(image, label, crop_size, scale, u_y, u_x, ignore_index)
    return out_image, out_label, full


def _release_view(image, label, crop_size, scale, u_y, u_x, ignore_index):
    h, w = image.shape[:2]
    nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    if (nh, nw) != (h, w):
        image = resize_linear(np.ascontiguousarray(image), nh, nw)
        label = None if label is None else resize_nearest(np.ascontiguousarray(label), nh, nw)
    # The release draws randint(0, size - crop + 1), both ends included, where the image is larger than the crop.
    y0 = int(u_y * (nh - crop_size + 2)) if nh > crop_size else 0
    x0 = int(u_x * (nw - crop_size + 2)) if nw > crop_size else 0
    image = image[y0:y0 + crop_size, x0:x0 + crop_size]
    ch, cw = image.shape[:2]
    top, left = (crop_size - ch) // 2, (crop_size - cw) // 2
    out_image = np.empty((crop_size, crop_size, 3), np.uint8)
    out_image[...] = MEAN_RGB_UINT8  # outside the box: 0 after normalisation (set on the device)
    out_image[top:top + ch, left:left + cw] = image
    box = np.asarray([top, left, ch, cw], np.int32)
    if label is None:
        return out_image, None, box
    out_label = np.full((crop_size, crop_size), ignore_index, np.uint8)
    out_label[top:top + ch, left:left + cw] = label[y0:y0 + crop_size, x0:x0 + crop_size]
    return out_image, out_label, box


def _legacy_view(image, label, crop_size, scale, u_y, u_x, ignore_index):
    h, w = image.shape[:2]
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    if (nh, nw) != (h, w):
        image, label = resize(
            np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label), nh, nw
        )
    ph, pw = max(crop_size, nh), max(crop_size, nw)
    out_image = np.empty((ph, pw, 3), np.uint8)
    out_image[...] = MEAN_RGB_UINT8
    out_image[:nh, :nw] = image
    y0 = int(u_y * (ph - crop_size + 1))
    x0 = int(u_x * (pw - crop_size + 1))
    out_image = out_image[y0 : y0 + crop_size, x0 : x0 + crop_size]
    if label is None:
        return out_image, None
    out_label = np.full((ph, pw), ignore_index, np.uint8)
    out_label[:nh, :nw] = label
    return out_image, out_label[y0 : y0 + crop_size, x0 : x0 + crop_size]
