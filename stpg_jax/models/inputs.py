"""What the networks take: RGB pixel values (uint8 as the loaders give them), normalised on the device.

The ImageNet mean and std are the backbone weights' (torchvision's); the mean colour in uint8 is what the host pads
images with, which normalises to (almost exactly) 0. A ``valid`` map marks each image's own pixels where the padding
must be exactly 0, as the released code's zero padding of normalised images (DESIGN.md §8.7).
"""

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_RGB_UINT8 = (124, 116, 104)  # the mean in uint8 (rounded)


def normalize(images, valid=None):
    """(B, H, W, 3) RGB values in [0, 255] → float32 ImageNet-normalised; where ``valid`` (B, H, W) is False, 0."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return x if valid is None else jnp.where(valid[..., None], x, 0.0)


def box_mask(boxes, height: int, width: int):
    """(B, 4) int boxes (top, left, height, width) → (B, height, width) bool, True inside each image's box."""
    boxes = jnp.asarray(boxes, jnp.int32)
    rows, cols = jnp.arange(height), jnp.arange(width)
    top, left, h, w = (boxes[:, i, None] for i in range(4))
    inside_r = (rows[None] >= top) & (rows[None] < top + h)
    inside_c = (cols[None] >= left) & (cols[None] < left + w)
    return inside_r[:, :, None] & inside_c[:, None, :]
