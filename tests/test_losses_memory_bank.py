"""Memory bank: selection rule, newest-first FIFO semantics, capacity (DESIGN.md §3 "Memory bank")."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from stpg_jax import losses

C, K, D, N = 3, 5, 4, 12
_update = jax.jit(losses.update_memory_bank, static_argnums=5)


class ListBank:
    """Reference: per class a Python list, newest first, cut to capacity from the end."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.rows = [[] for _ in range(C)]

    def update(self, feats, labels, valid, anchors, n_add, proximity):
        for c in range(C):
            cand = [i for i in range(len(labels)) if valid[i] and labels[i] == c]
            if len(cand) > n_add:
                if proximity:
                    f = feats[cand] / np.linalg.norm(feats[cand], axis=1, keepdims=True)
                    a = anchors[c] / np.linalg.norm(anchors[c])
                    cand = [cand[j] for j in np.argsort(-(f @ a), kind="stable")[:n_add]]
                else:
                    cand = cand[:n_add]
            self.rows[c] = ([feats[i] for i in cand] + self.rows[c])[: self.capacity]


def _step_data(rng):
    feats = rng.standard_normal((N, D)).astype(np.float32)
    labels = rng.integers(0, C + 1, N).astype(np.int32)
    labels[labels == C] = 255
    valid = rng.random(N) < 0.8
    anchors = rng.standard_normal((C, D)).astype(np.float32)
    return feats, labels, valid, anchors


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_add=st.sampled_from([2, 7]),
       proximity=st.lists(st.booleans(), min_size=1, max_size=6))
def test_bank_matches_newest_first_list(seed, n_add, proximity):
    rng = np.random.default_rng(seed)
    bank = losses.init_memory_bank(C, K, D)
    ref = ListBank(K)
    for prox in proximity:
        feats, labels, valid, anchors = _step_data(rng)
        bank = _update(bank, feats, labels, valid, anchors, n_add, jnp.asarray(prox))
        ref.update(feats, labels, valid, anchors, n_add, prox)
        for c in range(C):
            got = losses.memory_bank_contents(bank, c)
            assert int(bank.count[c]) == len(ref.rows[c]) <= K
            np.testing.assert_array_equal(got, np.asarray(ref.rows[c]).reshape(-1, D))
            # Filled slots are 0..count−1, which is what the contrastive loss relies on.
            filled = np.any(np.asarray(bank.features[c]) != 0, axis=1)
            assert not filled[int(bank.count[c]):].any()


def test_proximity_order_and_no_recompile():
    traces = []

    def counted(bank, feats, labels, valid, anchors, use_proximity):
        traces.append(1)  # runs once per trace, i.e. per compilation
        return losses.update_memory_bank(bank, feats, labels, valid, anchors, 2, use_proximity)

    fn = jax.jit(counted)
    feats = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.2, 1], [-1, 0]], np.float32)
    labels = np.zeros(5, np.int32)
    valid = np.ones(5, bool)
    anchors = np.array([[0.0, 1.0]], np.float32)
    bank = losses.init_memory_bank(1, 4, 2)
    raster = fn(bank, feats, labels, valid, anchors, jnp.asarray(False))
    prox = fn(bank, feats, labels, valid, anchors, jnp.asarray(True))
    assert len(traces) == 1
    # Raster: the first two pixels, pixel 0 newest. Proximity: the two closest to (0, 1), closest newest.
    np.testing.assert_array_equal(losses.memory_bank_contents(raster, 0), feats[[0, 1]])
    np.testing.assert_array_equal(losses.memory_bank_contents(prox, 0), feats[[2, 3]])
    # ≤ n_add candidates: raster order even with proximity on.
    few = fn(bank, feats, labels, np.array([0, 0, 0, 1, 1], bool), anchors, jnp.asarray(True))
    np.testing.assert_array_equal(losses.memory_bank_contents(few, 0), feats[[3, 4]])


def test_bank_stores_raw_features_in_its_dtype():
    bank = losses.init_memory_bank(2, 3, 2, dtype=jnp.bfloat16)
    feats = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    bank = _update(bank, feats, np.array([1, 1]), np.ones(2), np.eye(2, dtype=np.float32), 4, False)
    assert bank.features.dtype == jnp.bfloat16 and bank.count.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(losses.memory_bank_contents(bank, 1), np.float32), feats)
    assert int(bank.count[0]) == 0 and int(bank.count[1]) == 2 and int(bank.position[1]) == 2
