"""Supervised CE, OHEM CE and all-pixel weighted CE against float64 NumPy references (DESIGN.md §2 steps 3, 7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from stpg_jax import losses

IGN = 255


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def ce_ref(logits, labels):
    x = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    y = np.asarray(labels).reshape(-1)
    total, n = 0.0, 0
    for i in range(len(y)):
        if y[i] != IGN:
            total -= np.log(_softmax(x[i])[y[i]])
            n += 1
    return total / n if n else 0.0


def wce_ref(logits, targets, weights):
    x = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    y = np.asarray(targets).reshape(-1)
    w = np.asarray(weights, np.float64).reshape(-1)
    total = sum(-w[i] * np.log(_softmax(x[i])[y[i]]) for i in range(len(y)) if y[i] != IGN)
    return total / len(y)


def ohem_ref(logits, labels, threshold, min_kept, weights):
    """The CPS probability-OHEM rule, written from its description."""
    batch, c = logits.shape[0], logits.shape[-1]
    p = _softmax(np.asarray(logits, np.float64).reshape(-1, c))
    y = np.asarray(labels).reshape(-1)
    valid = y != IGN
    yy = np.where(valid, y, 0)
    true_p = np.where(valid, p[np.arange(len(y)), yy], 1.0)
    k = min_kept * batch
    kept = valid.copy()
    if 0 < k <= valid.sum():
        t = threshold
        kth = np.sort(true_p)[min(len(y), k) - 1]
        if kth > t:
            t = kth
        kept &= true_p <= t
    w = np.ones(c) if weights is None else np.asarray(weights, np.float64)
    wk = w[yy] * kept
    if wk.sum() == 0:
        return 0.0
    return float(np.sum(wk * -np.log(p[np.arange(len(y)), yy])) / wk.sum())


def _data(seed, shape, c, ignore_frac=0.2, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal(shape + (c,))).astype(np.float32)
    labels = rng.integers(0, c, shape).astype(np.int32)
    labels[rng.random(shape) < ignore_frac] = IGN
    return logits, labels


@pytest.mark.parametrize("shape,c", [((2, 6, 5), 4), ((3, 4, 4), 19)])
def test_cross_entropy_matches_reference(shape, c):
    logits, labels = _data(0, shape, c)
    got = jax.jit(losses.cross_entropy)(logits, labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ce_ref(logits, labels), rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient():
    logits, _ = _data(1, (2, 6, 5), 4)
    labels = np.full((2, 6, 5), IGN, np.int32)
    val, g = jax.jit(jax.value_and_grad(losses.cross_entropy))(logits, labels)
    assert float(val) == 0.0
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("shape,c", [((2, 6, 5), 4), ((3, 4, 4), 19)])
def test_weighted_cross_entropy_divides_by_all_pixels(shape, c):
    logits, targets = _data(2, shape, c)
    weights = np.random.default_rng(3).random(shape).astype(np.float32)
    got = jax.jit(losses.weighted_cross_entropy)(logits, targets, weights)
    np.testing.assert_allclose(got, wce_ref(logits, targets, weights), rtol=1e-5)
    # Not the weighted mean: halving the kept set does not renormalise.
    masked = weights * (np.arange(weights.size).reshape(shape) % 2)
    np.testing.assert_allclose(losses.weighted_cross_entropy(logits, targets, masked),
                               wce_ref(logits, targets, masked), rtol=1e-5)


@pytest.mark.parametrize(
    "threshold,min_kept,weighted",
    [(0.7, 5, False),    # threshold decides
     (0.05, 10, True),   # too few under the threshold: raised to the k-th smallest probability
     (0.7, 40, True)],   # fewer valid pixels than min_kept·B: every valid pixel kept
)
def test_ohem_matches_reference(threshold, min_kept, weighted):
    logits, labels = _data(4, (2, 6, 5), 19, ignore_frac=0.1)
    cw = losses.CITYSCAPES_CLASS_WEIGHTS if weighted else None
    fn = jax.jit(lambda x, y: losses.ohem_cross_entropy(x, y, threshold=threshold, min_kept=min_kept,
                                                        class_weights=cw))
    np.testing.assert_allclose(fn(logits, labels), ohem_ref(logits, labels, threshold, min_kept, cw), rtol=1e-5)


def test_ohem_keeps_at_least_min_kept_and_differs_from_plain_ce():
    logits, labels = _data(5, (2, 6, 5), 4, ignore_frac=0.0)
    plain = losses.cross_entropy(logits, labels)
    hard = losses.ohem_cross_entropy(logits, labels, threshold=0.0, min_kept=3)
    # Only the hardest 6 pixels are kept, so the mean NLL is larger than over all pixels.
    assert float(hard) > float(plain)
    np.testing.assert_allclose(hard, ohem_ref(logits, labels, 0.0, 3, None), rtol=1e-5)


def test_ohem_all_ignored_is_zero():
    logits, _ = _data(6, (2, 6, 5), 19)
    labels = np.full((2, 6, 5), IGN, np.int32)
    val, g = jax.jit(jax.value_and_grad(lambda x: losses.ohem_cross_entropy(x, labels, min_kept=5)))(logits)
    assert float(val) == 0.0 and np.all(np.isfinite(np.asarray(g)))


def test_cityscapes_weights():
    w = np.asarray(losses.CITYSCAPES_CLASS_WEIGHTS)
    assert w.shape == (19,)
    np.testing.assert_allclose([w[0], w[12], w[17], w[18]], [0.8373, 1.1116, 1.1529, 1.0507])


_ce_jit = jax.jit(losses.cross_entropy)
_wce_jit = jax.jit(losses.weighted_cross_entropy)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_ce_losses_invariant_to_pixel_order(seed):
    logits, labels = _data(seed, (2, 6, 5), 4)
    weights = np.random.default_rng(seed).random((2, 6, 5)).astype(np.float32)
    perm = np.random.default_rng(seed + 1).permutation(60)
    flat = lambda a: a.reshape((60,) + a.shape[3:])  # noqa: E731
    p = lambda a: flat(a)[perm].reshape(a.shape)  # noqa: E731
    np.testing.assert_allclose(_ce_jit(p(logits), p(labels)), _ce_jit(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(_wce_jit(p(logits), p(labels), p(weights)), _wce_jit(logits, labels, weights),
                               rtol=1e-5)


def test_bfloat16_inputs_give_float32_results():
    logits, labels = _data(7, (2, 6, 5), 19)
    weights = np.random.default_rng(7).random((2, 6, 5)).astype(np.float32)
    lb = jnp.asarray(logits, jnp.bfloat16)
    up = lb.astype(jnp.float32)
    for fn in (lambda x: losses.cross_entropy(x, labels),
               lambda x: losses.weighted_cross_entropy(x, labels, weights),
               lambda x: losses.ohem_cross_entropy(x, labels, min_kept=5,
                                                   class_weights=losses.CITYSCAPES_CLASS_WEIGHTS)):
        low = fn(lb)
        assert low.dtype == jnp.float32
        np.testing.assert_allclose(low, fn(up), rtol=1e-6)  # accumulation happens in float32
        np.testing.assert_allclose(low, fn(logits), rtol=2e-2)  # close to the float32-input loss
