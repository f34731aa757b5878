"""Dual contrastive loss with anchors and the memory bank, and the bank-candidate rule. DESIGN.md §3."""

import jax
import jax.numpy as jnp

from stpg_jax.losses.prototypes import class_onehot
from stpg_jax.losses.utils import l2_normalize


def bank_candidates(teacher_probs, labels, threshold=0.95, ignore_index=255):
    """Pixels allowed into the memory bank / prototype update: teacher argmax == label and max prob > threshold.

    teacher_probs: (..., C) softmax probabilities at the label's resolution; labels: (...) int (nearest-downsampled
    ground truth). Returns a bool mask (...). Ignored labels are never candidates.
    """
    p = jnp.asarray(teacher_probs).astype(jnp.float32)
    return (jnp.argmax(p, axis=-1) == labels) & (jnp.max(p, axis=-1) > threshold) & (labels != ignore_index)


def dual_contrastive_loss(features, labels, assigned_anchors, bank_features, bank_count, *, num_classes,
                          ignore_index=255, temperature=0.5):
    """Anchor term + bank-similarity term, summed over classes with > 1 pixel, divided by C. Float32 scalar.

    features: (N, D) projection-head outputs (unnormalised, any float dtype); labels: (N,) int with ignore_index;
    assigned_anchors: (C, D) unit rows A_σ(c) (used as given); bank_features: (C, K, D) raw; bank_count: (C,) int
    (rows 0..count−1 are valid). For each class c with more than one pixel:
      anchor term     = mean over its pixels of −log softmax_k(f̂·A_σ(k) / temperature)[c];
      similarity term = mean over all (pixel, bank row) pairs of 1 − cos(f, row), only if count_c > 1.
    The mean of cos over pairs equals f̂-sum · (mean of normalised rows) / n_c exactly, so memory is
    O(N·C + C·K·D), never (N, C, K). Returns 0.0 when no class has more than one pixel.
    """
    f = l2_normalize(features)  # (N, D)
    labels = jnp.asarray(labels)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    anchors = jnp.asarray(assigned_anchors).astype(jnp.float32)

    logits = jnp.matmul(f, anchors.T, precision=jax.lax.Precision.HIGHEST) / temperature  # (N, C)
    logp = jax.nn.log_softmax(logits, axis=-1)

    onehot = class_onehot(labels, valid, num_classes)  # (N, C)
    counts = jnp.sum(onehot, axis=0)
    nll_sums = -jnp.sum(onehot * logp, axis=0)  # Σ over class c's pixels of −log p[c]; a product, so no scatter
    f_sums = jnp.matmul(onehot.T, f, precision=jax.lax.Precision.HIGHEST)  # (C, D)
    present = counts > 1
    n_c = jnp.maximum(counts, 1.0)
    anchor_term = nll_sums / n_c

    capacity = bank_features.shape[1]
    rows = l2_normalize(bank_features)  # (C, K, D)
    row_valid = (jnp.arange(capacity)[None, :] < bank_count[:, None]).astype(jnp.float32)
    bank_mean = jnp.einsum("ck,ckd->cd", row_valid, rows, precision=jax.lax.Precision.HIGHEST)
    bank_mean = bank_mean / jnp.maximum(bank_count, 1).astype(jnp.float32)[:, None]
    mean_cos = jnp.sum(f_sums * bank_mean, axis=1) / n_c
    sim_term = jnp.where(bank_count > 1, 1.0 - mean_cos, 0.0)

    per_class = jnp.where(present, anchor_term + sim_term, 0.0)
    return jnp.sum(per_class) / num_classes
