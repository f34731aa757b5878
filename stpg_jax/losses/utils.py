"""Small array helpers shared by the loss modules: safe normalisation and nearest-neighbour label resizing."""

import jax.numpy as jnp

_EPS = 1e-12  # same floor as torch.nn.functional.normalize


def l2_normalize(x, axis=-1):
    """x / max(||x||, 1e-12) along `axis`, computed in float32.

    The norm is taken as sqrt(max(Σx², eps²)) so the gradient at x = 0 is finite (jnp.linalg.norm's is NaN there).
    """
    x = jnp.asarray(x).astype(jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jnp.reciprocal(jnp.sqrt(jnp.maximum(sq, _EPS * _EPS)))


def nearest_resize(labels, size):
    """Nearest-neighbour resize of label maps over their last two axes, PyTorch's `mode='nearest'` index rule.

    labels: (..., H, W) any dtype; size: (h, w) static ints. Returns (..., h, w) with out[i, j] =
    labels[floor(i·H/h), floor(j·W/w)] (integer arithmetic, so exact when H/h is an integer).
    """
    height, width = labels.shape[-2:]
    h, w = size
    rows = (jnp.arange(h) * height) // h
    cols = (jnp.arange(w) * width) // w
    return labels[..., rows[:, None], cols[None, :]]


def nearest_downsample(labels, factor):
    """Labels (..., H, W) → (..., H//factor, W//factor) by nearest-neighbour (every factor-th pixel when divisible)."""
    height, width = labels.shape[-2:]
    return nearest_resize(labels, (height // factor, width // factor))
