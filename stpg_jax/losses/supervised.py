"""Supervised cross-entropy losses: plain CE with an ignore index, Cityscapes OHEM CE, and the all-pixel weighted CE
used for the unsupervised (pseudo-label) terms. DESIGN.md §2 steps 3 and 7."""

import jax
import jax.numpy as jnp

# Class weights the CPS / U2PL code bases use for OHEM CE on Cityscapes' 19 train classes.
CITYSCAPES_CLASS_WEIGHTS = (
    0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
    0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507,
)


def _nll(logits, labels, ignore_index):
    """Per-pixel −log softmax(logits)[label] in float32 and the validity mask; both shaped like labels."""
    logits = jnp.asarray(logits).astype(jnp.float32)
    num_classes = logits.shape[-1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    logp = jax.nn.log_softmax(logits, axis=-1)
    # The label's entry by a select over classes rather than a gather: its gradient is elementwise, not a scatter.
    nll = -jnp.sum(jnp.where(labels[..., None] == jnp.arange(num_classes), logp, 0.0), axis=-1)
    return jnp.where(valid, nll, 0.0), valid


def cross_entropy(logits, labels, ignore_index=255):
    """Mean CE over non-ignored pixels.

    logits: (..., C) any float dtype; labels: (...) int. Returns a float32 scalar; 0.0 when no pixel is valid.
    Labels outside [0, C) are treated like ignore_index.
    """
    nll, valid = _nll(logits, labels, ignore_index)
    count = jnp.sum(valid, dtype=jnp.float32)
    return jnp.sum(nll) / jnp.maximum(count, 1.0)


def ohem_cross_entropy(logits, labels, *, threshold=0.7, min_kept=50000, class_weights=None, ignore_index=255):
    """Online hard-example-mined CE (the CPS / U2PL probability OHEM used on Cityscapes).

    logits: (B, H, W, C); labels: (B, H, W) int; min_kept is per image, so the whole batch keeps at least
    k = min_kept·B pixels, ranked jointly over the batch; class_weights: (C,) or None.
    Kept pixels: valid ones whose true-class probability p <= t, where t = threshold, raised to the k-th smallest p
    when fewer than k pixels fall under the threshold. If the batch has fewer than k valid pixels, all valid pixels
    are kept. Loss = Σ_kept w[y]·CE / Σ_kept w[y] (the weighted mean of torch's CrossEntropyLoss); 0.0 if none kept.
    Returns a float32 scalar. The selection itself carries no gradient.
    """
    nll, valid = _nll(logits, labels, ignore_index)
    num_pixels = nll.size
    k = min(int(min_kept) * logits.shape[0], num_pixels)
    # True-class probability; invalid pixels get 1 so they sort last and never set the threshold.
    prob = jax.lax.stop_gradient(jnp.where(valid, jnp.exp(-nll), 1.0)).reshape(-1)
    num_valid = jnp.sum(valid)
    if k > 0:
        kth = jnp.sort(prob)[k - 1]
        thresh = jnp.maximum(jnp.float32(threshold), kth)
        kept = (prob <= thresh) | (num_valid < k)
    else:
        kept = prob <= jnp.float32(threshold)
    kept = kept.reshape(valid.shape) & valid
    if class_weights is None:
        w = kept.astype(jnp.float32)
    else:
        cw = jnp.asarray(class_weights, jnp.float32)
        safe = jnp.where(valid, labels, 0).astype(jnp.int32)
        w = jnp.where(kept, cw[safe], 0.0)
    denom = jnp.sum(w)
    return jnp.sum(w * nll) / jnp.where(denom > 0, denom, 1.0)


def weighted_cross_entropy(logits, targets, weights, ignore_index=255):
    """Σ_pixels w·CE / (number of ALL pixels), DESIGN.md §2 step 7.

    logits: (..., C); targets: (...) int; weights: (...) float (e.g. confidence·keep). The denominator is
    targets.size, not Σw nor the valid count: an ignored target contributes 0 but still counts. Float32 scalar.
    """
    nll, _ = _nll(logits, targets, ignore_index)
    w = jnp.asarray(weights).astype(jnp.float32)
    return jnp.sum(w * nll) / nll.size
