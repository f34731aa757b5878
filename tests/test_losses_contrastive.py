"""Anchors, prototypes, Hungarian matching, bank candidates and the dual contrastive loss (DESIGN.md §3)."""

import itertools

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from stpg_jax import losses

IGN = 255


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("c", [19, 21])
def test_anchors_are_a_near_regular_simplex(c):
    a = np.asarray(losses.make_anchors(c, 256, seed=0))
    assert a.shape == (c, 256) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    off = (a @ a.T)[~np.eye(c, dtype=bool)]
    assert np.abs(off + 1 / (c - 1)).max() < 0.02
    assert abs(off.mean() + 1 / (c - 1)) < 1e-3
    np.testing.assert_array_equal(a, losses.make_anchors(c, 256, seed=0))  # deterministic from the seed
    assert not np.array_equal(a, losses.make_anchors(c, 256, seed=1))


def test_uniformity_objective_matches_reference():
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    u = _unit(x)
    ref = np.mean([np.log(sum(np.exp(u[i] @ u[j] / 0.07) for j in range(5) if j != i)) for i in range(5)])
    np.testing.assert_allclose(jax.jit(losses.uniformity_objective)(x), ref, rtol=1e-5)


def prototypes_ref(p, f, labels, valid, beta):
    p = np.asarray(p, np.float64).copy()
    for c in range(p.shape[0]):
        idx = [i for i in range(len(labels)) if valid[i] and labels[i] == c]
        if idx:
            mu = _unit(np.mean(_unit(f[idx]), axis=0))
            p[c] = _unit(beta * p[c] + (1 - beta) * mu)
    return p


@pytest.mark.parametrize("c,beta", [(4, 0.9), (21, 0.99)])
def test_update_prototypes_matches_reference(c, beta):
    rng = np.random.default_rng(c)
    p = np.asarray(losses.init_prototypes(jax.random.PRNGKey(c), c, 8))
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, rtol=1e-6)
    f = (3 * rng.standard_normal((50, 8))).astype(np.float32)
    labels = rng.integers(0, c, 50)
    labels[:5] = IGN
    labels[labels == 1] = 2  # class 1 has no pixel: unchanged
    labels[10] = 1  # ... now a single pixel, which still moves it
    labels[labels == 3] = 0  # class 3 empty
    valid = rng.random(50) < 0.8
    valid[10] = True
    got = jax.jit(losses.update_prototypes)(p, f, labels, valid, beta)
    np.testing.assert_allclose(got, prototypes_ref(p, f, labels, valid, beta), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[3], p[3])
    assert not np.allclose(got[1], p[1])


def test_hungarian_assignment_is_the_best_permutation():
    rng = np.random.default_rng(0)
    p, a = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    sigma = losses.hungarian_assignment(p, a)
    assert sigma.dtype == np.int32 and sorted(sigma) == list(range(6))
    cos = _unit(p) @ _unit(a).T
    best = max(itertools.permutations(range(6)), key=lambda s: sum(cos[i, s[i]] for i in range(6)))
    np.testing.assert_array_equal(sigma, best)
    # Prototypes equal to permuted anchors are matched back to them.
    perm = rng.permutation(6)
    np.testing.assert_array_equal(losses.hungarian_assignment(a[perm], a), perm)


def test_assigned_anchors_does_not_recompile():
    traces = []

    def lookup(anchors, assignment):
        traces.append(1)  # runs once per trace, i.e. per compilation
        return losses.assigned_anchors(anchors, assignment)

    fn = jax.jit(lookup)
    anchors = np.arange(12, dtype=np.float32).reshape(4, 3)
    for sigma in (np.array([0, 1, 2, 3], np.int32), np.array([2, 0, 3, 1], np.int32)):
        np.testing.assert_array_equal(fn(anchors, sigma), anchors[sigma])
    assert len(traces) == 1


def test_bank_candidates():
    probs = np.array([[0.96, 0.04], [0.9, 0.1], [0.02, 0.98], [0.01, 0.99], [0.97, 0.03]], np.float32)
    labels = np.array([0, 0, 1, 0, IGN])
    np.testing.assert_array_equal(losses.bank_candidates(probs, labels), [True, False, True, False, False])


def contrastive_ref(f, labels, anchors, bank, count, c_total, t=0.5):
    """The loss by explicit loops over pixels and (pixel, bank row) pairs."""
    fn = _unit(f)
    total = 0.0
    for c in range(c_total):
        idx = [i for i in range(len(labels)) if labels[i] == c]
        if len(idx) <= 1:
            continue
        terms = []
        for i in idx:
            z = fn[i] @ np.asarray(anchors, np.float64).T / t
            terms.append(-(z[c] - np.log(np.sum(np.exp(z)))))
        total += np.mean(terms)
        if count[c] > 1:
            rows = _unit(bank[c, : count[c]])
            total += np.mean([1 - fn[i] @ r for i in idx for r in rows])
    return total / c_total


def _contrastive_data(seed, n, c, k, d):
    rng = np.random.default_rng(seed)
    f = (2 * rng.standard_normal((n, d))).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    labels[rng.random(n) < 0.2] = IGN
    labels[labels == 1] = IGN  # class 1 absent
    labels[labels == 2] = 0
    labels[3] = 2  # class 2 has one pixel: skipped
    anchors = np.asarray(losses.make_anchors(c, d, steps=200))
    bank = (3 * rng.standard_normal((c, k, d))).astype(np.float32)
    count = rng.integers(0, k + 1, c).astype(np.int32)
    count[0] = 1  # one bank row: no similarity term
    bank[np.arange(k)[None, :] >= count[:, None]] = 0.0
    return f, labels, anchors, bank, count


@pytest.mark.parametrize("n,c,k,d", [(40, 5, 6, 8), (64, 21, 16, 32)])
def test_dual_contrastive_loss_matches_reference(n, c, k, d):
    f, labels, anchors, bank, count = _contrastive_data(n, n, c, k, d)
    fn = jax.jit(losses.dual_contrastive_loss, static_argnames="num_classes")
    got = fn(f, labels, anchors, bank, count, num_classes=c)
    np.testing.assert_allclose(got, contrastive_ref(f, labels, anchors, bank, count, c), rtol=1e-5)
    # Rows past count are not read, whatever they hold.
    junk = np.where(np.arange(k)[None, :, None] >= count[:, None, None], 1e3, bank).astype(np.float32)
    np.testing.assert_allclose(fn(f, labels, anchors, junk, count, num_classes=c), got, rtol=1e-6)


def test_dual_contrastive_loss_zero_without_a_class_of_two_pixels():
    f, _, anchors, bank, count = _contrastive_data(0, 40, 5, 6, 8)
    labels = np.full(40, IGN, np.int32)
    labels[[0, 5]] = [1, 3]
    grad_fn = jax.jit(jax.value_and_grad(losses.dual_contrastive_loss), static_argnames="num_classes")
    val, g = grad_fn(f, labels, anchors, bank, count, num_classes=5)
    assert float(val) == 0.0 and np.all(np.asarray(g) == 0.0)


_loss_jit = jax.jit(losses.dual_contrastive_loss, static_argnames="num_classes")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_dual_contrastive_loss_invariant_to_pixel_order(seed):
    f, labels, anchors, bank, count = _contrastive_data(seed, 40, 5, 6, 8)
    perm = np.random.default_rng(seed).permutation(40)
    a = _loss_jit(f, labels, anchors, bank, count, num_classes=5)
    b = _loss_jit(f[perm], labels[perm], anchors, bank, count, num_classes=5)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert float(a) > 0.0
