"""Class prototypes: an EMA of the normalised class means of candidate features. DESIGN.md §3 "Prototypes"."""

import jax
import jax.numpy as jnp

from stpg_jax.losses.utils import l2_normalize


def init_prototypes(key, num_classes, dim):
    """(C, D) float32 unit rows from a normal draw."""
    return l2_normalize(jax.random.normal(key, (num_classes, dim), jnp.float32))


def class_onehot(labels, valid, num_classes):
    """(N, C) float32 one-hot of labels (N,) restricted to valid (N,); out-of-range labels (e.g. 255) are all-zero."""
    onehot = (labels[:, None] == jnp.arange(num_classes)) & (jnp.asarray(valid)[:, None] > 0)
    return onehot.astype(jnp.float32)


def class_sums(features, labels, valid, num_classes):
    """Σ of the given rows per class and the per-class count: ((C, D) float32, (C,) float32).

    features: (N, D) float; labels: (N,) int (out-of-range labels, e.g. 255, count nowhere); valid: (N,) mask.
    A one-hot matmul at full float32 precision (no scatter).
    """
    onehot = class_onehot(labels, valid, num_classes)
    sums = jnp.matmul(onehot.T, features.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return sums, jnp.sum(onehot, axis=0)


def update_prototypes(prototypes, features, labels, valid, momentum):
    """One prototype EMA step. prototypes: (C, D); features: (N, D) raw; labels: (N,) int; valid: (N,) mask of
    candidate pixels; momentum β: float (paper 0.99, released code 0.9). Returns (C, D) float32.

    μ_c = normalise(mean of normalised candidate features of class c); P_c ← normalise(β·P_c + (1 − β)·μ_c) for every
    class with at least one candidate (one is enough); other rows are returned unchanged.
    """
    prototypes = jnp.asarray(prototypes).astype(jnp.float32)
    sums, counts = class_sums(l2_normalize(features), labels, valid, prototypes.shape[0])
    mean = l2_normalize(sums)  # normalising the sum equals normalising the mean
    moved = l2_normalize(momentum * prototypes + (1.0 - momentum) * mean)
    return jnp.where(counts[:, None] > 0, moved, prototypes)
