"""Pixel selection of the professional module: confusion matrix, per-class mismatch scores and the keep masks.
DESIGN.md §2 step 6 and the paper's Table 5 ablation variants."""

import jax.numpy as jnp

VARIANTS = ("stpg", "consistent", "consistent+low", "consistent+high", "all")


def confusion_counts(labels_a, labels_b, num_classes, valid=None):
    """K[i, j] = #pixels with labels_a == i and labels_b == j, as a (C, C) int32 matrix (no +1 here).

    labels_a, labels_b: same shape (...) int; valid: optional (...) bool/float mask. Pixels with a label outside
    [0, C) in either map are skipped. Counts are accumulated in int32 by a fixed-length bincount (memory O(pixels)),
    so they are exact at any realistic batch size.
    """
    a = jnp.asarray(labels_a).astype(jnp.int32).reshape(-1)
    b = jnp.asarray(labels_b).astype(jnp.int32).reshape(-1)
    ok = (a >= 0) & (a < num_classes) & (b >= 0) & (b < num_classes)
    if valid is not None:
        ok = ok & (jnp.asarray(valid).reshape(-1) > 0)
    idx = jnp.where(ok, a * num_classes + b, 0)
    counts = jnp.bincount(idx, weights=ok.astype(jnp.int32), length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def confusion_matrix(labels_a, labels_b, num_classes, valid=None):
    """``confusion_counts`` as float32 (exact up to 2**24 pixels per entry)."""
    return confusion_counts(labels_a, labels_b, num_classes, valid).astype(jnp.float32)


def mismatch_scores(confusion):
    """Per-class mismatch m_c = (1 − precision_c) + (1 − recall_c), (C,) float32.

    confusion: (C, C) raw counts (int, or float holding integers), rows = teacher label, columns = student
    prediction. The +1 on every diagonal entry (DESIGN.md §2 step 6) is added HERE, which also keeps every
    denominator >= 1: precision_c = K[c,c] / Σ_i K[i,c], recall_c = K[c,c] / Σ_j K[c,j] with K = confusion + I.
    Each term is computed as (Σ − K[c,c]) / Σ from exact integer counts (DESIGN.md §8.8): ``1 − K[c,c]/Σ`` in
    float32 rounds two large classes' scores to the same number at a real batch's millions of pixels, and the
    strict ``>`` of the selection then drops pixels.
    """
    k = jnp.asarray(confusion)
    if not jnp.issubdtype(k.dtype, jnp.integer):
        k = jnp.round(k)
    k = k.astype(jnp.int32) + jnp.eye(k.shape[0], dtype=jnp.int32)
    diag = jnp.diagonal(k)
    col, row = jnp.sum(k, axis=0), jnp.sum(k, axis=1)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return f32(col - diag) / f32(col) + f32(row - diag) / f32(row)


def select_pixels(teacher_labels, student_pred, num_classes, variant="stpg", valid=None):
    """Consistent / highly-mismatched / low-mismatched masks and the keep mask of one mini-batch.

    teacher_labels (ŷ_g), student_pred (π): same shape (...) int in [0, C); valid: optional (...) mask of pixels
    that take part (all by default); invalid pixels are 0 in every mask and skipped by the confusion matrix.
    consistent: π == ŷ; high: π != ŷ and m[ŷ] > m[π]; low: the other mismatched pixels — the three partition the
    valid pixels. keep by `variant` (static): "stpg" == "consistent+high" (the method), "consistent",
    "consistent+low", "all" (every valid pixel). Returns dict of float32 {0,1} maps shaped like the inputs
    (keep, consistent, high, low), scores (C,) and confusion (C, C) (raw counts, without the +1).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    t = jnp.asarray(teacher_labels).astype(jnp.int32)
    s = jnp.asarray(student_pred).astype(jnp.int32)
    ok = jnp.ones(t.shape, bool) if valid is None else jnp.asarray(valid) > 0
    counts = confusion_counts(t, s, num_classes, ok)
    scores = mismatch_scores(counts)
    conf = counts.astype(jnp.float32)
    consistent = (t == s) & ok
    mismatched = (t != s) & ok
    high = mismatched & (scores[jnp.clip(t, 0, num_classes - 1)] > scores[jnp.clip(s, 0, num_classes - 1)])
    low = mismatched & ~high
    keep = {
        "stpg": consistent | high,
        "consistent+high": consistent | high,
        "consistent": consistent,
        "consistent+low": consistent | low,
        "all": ok,
    }[variant]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return dict(keep=f32(keep), consistent=f32(consistent), high=f32(high), low=f32(low), scores=scores,
                confusion=conf)
