"""Per-class memory bank of labelled features as fixed-shape state. DESIGN.md §3 "Memory bank".

Each class's bank is a list with the newest rows first, cut to `capacity` from the end. It is stored as a ring
buffer: a step's selected rows r_1..r_m are written in reverse order, so slot (position − 1) always holds the
newest row and, when an old step is partly evicted, its last rows go first — exactly the list semantics.
Filled slots are always 0..count−1 (writing starts at slot 0), so `count` alone says which rows are valid.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stpg_jax.losses.utils import l2_normalize


class MemoryBank(NamedTuple):
    """features (C, K, D) raw rows; count (C,) int32 filled rows (<= K); position (C,) int32 next write slot."""

    features: jax.Array
    count: jax.Array
    position: jax.Array


def init_memory_bank(num_classes, capacity, dim, dtype=jnp.float32):
    """An empty bank: zeros (C, K, D) of `dtype`, count and position 0."""
    return MemoryBank(
        features=jnp.zeros((num_classes, capacity, dim), dtype),
        count=jnp.zeros((num_classes,), jnp.int32),
        position=jnp.zeros((num_classes,), jnp.int32),
    )


def select_rows(features, labels, valid, assigned_anchors, n_add, use_proximity):
    """Which candidate rows each class adds this step, in push order (first = newest).

    features: (N, D); labels: (N,) int; valid: (N,) mask; assigned_anchors: (C, D); n_add: static int;
    use_proximity: bool scalar (may be traced). Returns (indices (C, n_add) int32 into N, num_selected (C,) int32):
    a class with <= n_add candidates takes all of them in raster order; otherwise the first n_add in raster order,
    or with use_proximity the n_add with the highest cosine to its assigned anchor, in descending-cosine order.
    Both rankings are computed and one chosen per class, so flipping use_proximity does not recompile.
    """
    num_classes = assigned_anchors.shape[0]
    n = labels.shape[0]
    k = min(int(n_add), n)
    cand = (labels[None, :] == jnp.arange(num_classes)[:, None]) & (jnp.asarray(valid)[None, :] > 0)  # (C, N)
    num_cand = jnp.sum(cand, axis=1, dtype=jnp.int32)
    # Raster order: larger score for earlier pixels; non-candidates below every candidate.
    raster_score = jnp.where(cand, n - jnp.arange(n, dtype=jnp.int32)[None, :], -1)
    _, raster_idx = jax.lax.top_k(raster_score, k)
    cos = jnp.matmul(l2_normalize(assigned_anchors), l2_normalize(features).T,
                     precision=jax.lax.Precision.HIGHEST)  # (C, N)
    _, prox_idx = jax.lax.top_k(jnp.where(cand, cos, -jnp.inf), k)
    by_proximity = jnp.logical_and(use_proximity, num_cand > k)
    idx = jnp.where(by_proximity[:, None], prox_idx, raster_idx).astype(jnp.int32)
    if k < n_add:  # fewer pixels than n_add: pad (never selected, num_selected <= k)
        idx = jnp.pad(idx, ((0, 0), (0, n_add - k)))
    return idx, jnp.minimum(num_cand, k)


def push_rows(bank, rows, num_new):
    """Push rows (C, M, D) — the first num_new (C,) of each class, first = newest — into the bank.

    Written as a gather over slots (no scatter, so no undefined order when M > capacity): slot s at offset
    d = (s − position) mod K takes row num_new' − 1 − d if d < num_new', with num_new' = min(num_new, K).
    """
    capacity = bank.features.shape[1]
    m = jnp.minimum(num_new, capacity).astype(jnp.int32)
    slots = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    d = jnp.mod(slots - bank.position[:, None], capacity)  # (C, K)
    written = d < m[:, None]
    src = jnp.clip(m[:, None] - 1 - d, 0, rows.shape[1] - 1)
    new = jnp.take_along_axis(rows.astype(bank.features.dtype), src[:, :, None], axis=1)
    features = jnp.where(written[:, :, None], new, bank.features)
    return MemoryBank(
        features=features,
        count=jnp.minimum(bank.count + m, capacity).astype(jnp.int32),
        position=jnp.mod(bank.position + m, capacity).astype(jnp.int32),
    )


def update_memory_bank(bank, features, labels, valid, assigned_anchors, n_add, use_proximity):
    """Add up to n_add candidate rows per class to the bank (see `select_rows` for which), newest first.

    bank: MemoryBank (C, K, D); features: (N, D) raw teacher projections (stored unnormalised); labels: (N,) int;
    valid: (N,) candidate mask (see contrastive.bank_candidates); assigned_anchors: (C, D); n_add: static int;
    use_proximity: bool scalar, traced is fine. Returns the new MemoryBank; count saturates at K.
    """
    idx, num_new = select_rows(features, labels, valid, assigned_anchors, n_add, use_proximity)
    rows = jnp.take(jnp.asarray(features), idx, axis=0)  # (C, n_add, D)
    return push_rows(bank, rows, num_new)


def memory_bank_contents(bank, c):
    """Host helper: class c's rows, newest first, as a numpy array (count_c, D)."""
    feats = np.asarray(bank.features[c])
    n, p = int(bank.count[c]), int(bank.position[c])
    k = feats.shape[0]
    return feats[[(p - 1 - j) % k for j in range(n)]]
