"""Weak augmentation (DESIGN.md §2 step 1) on the host, normalisation on the device.

The host works in uint8: random horizontal flip, random scale from a fixed set, random crop padded with the
ImageNet mean colour (images) and the ignore value (labels). The device subtracts the mean and divides by the std,
which turns the mean-colour padding into 0, the design's "pad 0 after normalisation".
"""

import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean in uint8 (rounded); padding with it normalises to (almost exactly) zero.
MEAN_RGB_UINT8 = (124, 116, 104)


def normalize(images):
    """uint8 (..., 3) RGB in [0, 255] → float32 ImageNet-normalised, in jax.numpy (runs on the device)."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def resize(image, label, height, width):
    """Bilinear for the image, nearest for the label (labels must keep their class ids)."""
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
    return image, label


def weak_augment(rng, image, label, crop_size, scales, ignore_index=255):
    """One image (H, W, 3) uint8 and optional label (H, W) uint8 → a crop_size² view.

    rng: np.random.Generator; the draws are, in order: flip, scale, crop offset — a fixed count per call,
    so the result depends only on the generator's seed.
    """
    flip = rng.random() < 0.5
    scale = float(scales[rng.integers(len(scales))])
    u_y, u_x = rng.random(), rng.random()
    if flip:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
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
