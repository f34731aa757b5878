"""CutMix box masks, mixing, and pseudo-labels from mixed teacher logits. DESIGN.md §2 steps 2 and 4."""

import jax
import jax.numpy as jnp


def cutmix_box_mask(key, batch, height, width, num_boxes=3, area_range=(0.25, 0.5)):
    """Random CutMix box masks, (B, H, W) float32 in {0, 1}; 1 marks pixels taken from the second image.

    Per image, `num_boxes` boxes: a proportion p ~ U(area_range) of the image, aspect drawn as in CutMix-Seg
    (y_prop = p^u with u ~ U(0, 1), x_prop = p / y_prop), both scaled by sqrt(1/num_boxes) so each box covers p/num_boxes
    of the image; sizes rounded to pixels and positions drawn so boxes lie within bounds. Like the box generator of the
    CutMix / CPS code bases, each box toggles the pixels under it, so an overlap of two boxes returns to 0.
    batch, height, width, num_boxes are static ints.
    """
    k_prop, k_aspect, k_pos = jax.random.split(key, 3)
    lo, hi = area_range
    props = jax.random.uniform(k_prop, (batch, num_boxes), minval=lo, maxval=hi)
    y_props = jnp.exp(jax.random.uniform(k_aspect, (batch, num_boxes)) * jnp.log(props))
    x_props = props / y_props
    fac = jnp.sqrt(1.0 / num_boxes)
    shape = jnp.array([height, width], jnp.float32)
    sizes = jnp.round(jnp.stack([y_props * fac, x_props * fac], axis=-1) * shape)  # (B, n, 2)
    pos = jnp.round((shape - sizes) * jax.random.uniform(k_pos, sizes.shape))
    start, stop = pos.astype(jnp.int32), (pos + sizes).astype(jnp.int32)
    ys, xs = jnp.arange(height), jnp.arange(width)
    in_rows = ((ys >= start[..., 0:1]) & (ys < stop[..., 0:1])).astype(jnp.float32)  # (B, n, H)
    in_cols = ((xs >= start[..., 1:2]) & (xs < stop[..., 1:2])).astype(jnp.float32)  # (B, n, W)
    # How many boxes cover each pixel; odd counts are inside the (toggled) mask.
    cover = jnp.einsum("bnh,bnw->bhw", in_rows, in_cols, precision=jax.lax.Precision.HIGHEST)
    return jnp.mod(jnp.round(cover), 2.0)


def mix(a, b, mask):
    """a·(1 − M) + b·M. a, b: (B, H, W) or (B, H, W, ch); mask M: (B, H, W), broadcast over a trailing channel
    axis when a has one more dimension. Result dtype: the promotion of a and b."""
    m = jnp.asarray(mask)
    if a.ndim == m.ndim + 1:
        m = m[..., None]
    dtype = jnp.result_type(a, b)
    m = m.astype(dtype)
    return a.astype(dtype) * (1 - m) + b.astype(dtype) * m


def pseudo_labels(logits0, logits1, mask):
    """Pseudo-labels of a CutMixed view from the teacher's logits on the two weak views.

    logits0, logits1: (B, H, W, C) full-resolution; mask: (B, H, W). Mixes the LOGITS (float32), then softmax:
    returns (labels int32 (B, H, W) = argmax p, confidence float32 (B, H, W) = max p). Targets carry no gradient.
    """
    z = mix(jnp.asarray(logits0).astype(jnp.float32), jnp.asarray(logits1).astype(jnp.float32), mask)
    p = jax.nn.softmax(jax.lax.stop_gradient(z), axis=-1)
    return jnp.argmax(p, axis=-1).astype(jnp.int32), jnp.max(p, axis=-1)
