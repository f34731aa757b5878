"""Confusion matrix, mismatch scores and the selection masks (DESIGN.md §2 step 6), CutMix and pseudo-labels
(steps 2 and 4), and nearest label downsampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from stpg_jax import losses

# A 3-class case worked by hand. Pixel pairs (teacher, student): (0,0)×3, (1,1)×2, (2,2), (0,1), (1,2)×2, (2,0).
TEACHER = np.array([[0, 0, 0, 1, 1], [2, 0, 1, 1, 2]], np.int32)
STUDENT = np.array([[0, 0, 0, 1, 1], [2, 1, 2, 2, 0]], np.int32)
# K = [[3,1,0],[0,2,2],[1,0,1]]; K+I = [[4,1,0],[0,3,2],[1,0,2]]: rows sum 5,5,3; columns sum 5,4,4.
# m0 = (1−4/5)+(1−4/5) = 0.4; m1 = (1−3/4)+(1−3/5) = 0.65; m2 = (1−2/4)+(1−2/3) = 5/6.
# (0→1): 0.4 > 0.65? no → low; (1→2): 0.65 > 5/6? no → low (×2); (2→0): 5/6 > 0.4 → high.
HAND_CONFUSION = [[3, 1, 0], [0, 2, 2], [1, 0, 1]]
HAND_SCORES = [0.4, 0.65, 5 / 6]
HAND_CONSISTENT = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
HAND_HIGH = [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
HAND_LOW = [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0]]
HAND_KEEP = {
    "stpg": [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1]],
    "consistent+high": [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1]],
    "consistent": HAND_CONSISTENT,
    "consistent+low": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
    "all": [[1] * 5, [1] * 5],
}


@pytest.mark.parametrize("variant", sorted(HAND_KEEP))
def test_hand_computed_selection(variant):
    out = jax.jit(losses.select_pixels, static_argnums=(2, 3))(TEACHER, STUDENT, 3, variant)
    np.testing.assert_array_equal(out["confusion"], HAND_CONFUSION)
    np.testing.assert_allclose(out["scores"], HAND_SCORES, rtol=1e-6)
    np.testing.assert_array_equal(out["consistent"], HAND_CONSISTENT)
    np.testing.assert_array_equal(out["high"], HAND_HIGH)
    np.testing.assert_array_equal(out["low"], HAND_LOW)
    np.testing.assert_array_equal(out["keep"], HAND_KEEP[variant])
    assert out["keep"].dtype == jnp.float32


def test_unknown_variant_raises():
    with pytest.raises(ValueError):
        losses.select_pixels(TEACHER, STUDENT, 3, variant="high")


def selection_ref(t, s, c, valid):
    t, s, valid = t.reshape(-1), s.reshape(-1), valid.reshape(-1)
    k = np.zeros((c, c))
    for a, b, v in zip(t, s, valid):
        if v:
            k[a, b] += 1
    kk = k + np.eye(c)
    m = np.array([(1 - kk[i, i] / kk[:, i].sum()) + (1 - kk[i, i] / kk[i, :].sum()) for i in range(c)])
    cons = np.array([v and a == b for a, b, v in zip(t, s, valid)])
    high = np.array([v and a != b and m[a] > m[b] for a, b, v in zip(t, s, valid)])
    return k, m, cons, high


@pytest.mark.parametrize("shape,c", [((2, 8, 8), 3), ((2, 16, 16), 21)])
def test_selection_matches_reference(shape, c):
    rng = np.random.default_rng(c)
    t = rng.integers(0, c, shape)
    # Student agrees with the teacher on ~half the pixels, so every case occurs.
    s = np.where(rng.random(shape) < 0.5, t, rng.integers(0, c, shape))
    valid = rng.random(shape) < 0.9
    out = jax.jit(losses.select_pixels, static_argnums=(2, 3))(t, s, c, "stpg", valid)
    k, m, cons, high = selection_ref(t, s, c, valid)
    np.testing.assert_array_equal(out["confusion"], k)
    np.testing.assert_allclose(out["scores"], m, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["consistent"]).reshape(-1), cons)
    np.testing.assert_array_equal(np.asarray(out["high"]).reshape(-1), high)
    np.testing.assert_array_equal(np.asarray(out["keep"]).reshape(-1), cons | high)
    np.testing.assert_allclose(jax.jit(losses.mismatch_scores)(k), m, rtol=1e-6)


def test_confusion_matrix_large_batch_is_exact():
    # The trainer's size: 8·512·512 pixels, 21 classes.
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.randint(key_a, (8, 512, 512), 0, 21)
    b = jax.random.randint(key_b, (8, 512, 512), 0, 21)
    k = jax.jit(losses.confusion_matrix, static_argnums=2)(a, b, 21)
    assert float(k.sum()) == 8 * 512 * 512
    np.testing.assert_array_equal(k.sum(1), np.bincount(np.asarray(a).ravel(), minlength=21))
    np.testing.assert_array_equal(k.sum(0), np.bincount(np.asarray(b).ravel(), minlength=21))


_select = jax.jit(losses.select_pixels, static_argnums=(2, 3))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), agree=st.floats(0.0, 1.0))
def test_masks_partition_and_keep_never_low(seed, agree):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 5, (2, 6, 6))
    s = np.where(rng.random(t.shape) < agree, t, rng.integers(0, 5, t.shape))
    valid = rng.random(t.shape) < 0.8
    out = _select(t, s, 5, "stpg", valid)
    cons, high, low, keep = (np.asarray(out[n]) for n in ("consistent", "high", "low", "keep"))
    np.testing.assert_array_equal(cons + high + low, valid.astype(np.float32))  # a partition of valid pixels
    assert not np.any((keep > 0) & (low > 0))
    np.testing.assert_array_equal(keep, np.maximum(cons, high))
    # Pixel order does not matter: permuting pixels permutes the masks and keeps the scores.
    perm = rng.permutation(t.size)
    pt, ps, pv = (x.reshape(-1)[perm].reshape(t.shape) for x in (t, s, valid))
    out_p = _select(pt, ps, 5, "stpg", pv)
    np.testing.assert_allclose(out_p["scores"], out["scores"], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out_p["keep"]).reshape(-1), keep.reshape(-1)[perm])


def test_cutmix_box_mask_properties():
    fn = jax.jit(losses.cutmix_box_mask, static_argnums=(1, 2, 3, 4))
    m = np.asarray(fn(jax.random.PRNGKey(0), 64, 32, 48))
    assert m.shape == (64, 32, 48) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    frac = m.mean(axis=(1, 2))
    # Three boxes of p/3 each, p in [0.25, 0.5]: at most 0.5 (+ rounding); overlaps can only remove area.
    assert frac.max() <= 0.5 + 0.05 and frac.min() > 0.0
    np.testing.assert_array_equal(m, fn(jax.random.PRNGKey(0), 64, 32, 48))  # deterministic per key
    assert not np.array_equal(m, fn(jax.random.PRNGKey(1), 64, 32, 48))
    one = np.asarray(fn(jax.random.PRNGKey(2), 64, 32, 48, 1))
    for img in one:  # a single box: one solid rectangle covering U(0.25, 0.5) of the image, within bounds
        rows, cols = np.nonzero(img.any(1))[0], np.nonzero(img.any(0))[0]
        assert img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        assert img.sum() == len(rows) * len(cols)
        assert 0.25 - 0.06 <= img.mean() <= 0.5 + 0.06


def test_mix_and_pseudo_labels_match_reference():
    rng = np.random.default_rng(0)
    l0, l1 = (rng.standard_normal((2, 5, 6, 4)).astype(np.float32) for _ in range(2))
    mask = (rng.random((2, 5, 6)) < 0.5).astype(np.float32)
    z = np.where(mask[..., None] > 0, l1, l0).astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    labels, conf = jax.jit(losses.pseudo_labels)(l0, l1, mask)
    assert labels.dtype == jnp.int32 and conf.dtype == jnp.float32
    np.testing.assert_array_equal(labels, p.argmax(-1))
    np.testing.assert_allclose(conf, p.max(-1), rtol=1e-5)
    np.testing.assert_allclose(losses.mix(l0, l1, mask), z, rtol=1e-6)
    img0, img1 = l0[..., 0], l1[..., 0]
    np.testing.assert_allclose(losses.mix(img0, img1, mask), np.where(mask > 0, img1, img0))
    lb, cb = losses.pseudo_labels(jnp.asarray(l0, jnp.bfloat16), jnp.asarray(l1, jnp.bfloat16), mask)
    assert cb.dtype == jnp.float32
    np.testing.assert_allclose(cb, p.max(-1), rtol=2e-2)


@pytest.mark.parametrize("size,factor", [((8, 12), 4), ((10, 7), 2)])
def test_nearest_downsample_uses_torch_index_rule(size, factor):
    labels = np.arange(2 * size[0] * size[1]).reshape((2,) + size)
    h, w = size[0] // factor, size[1] // factor
    ref = np.empty((2, h, w), labels.dtype)
    for i in range(h):
        for j in range(w):
            ref[:, i, j] = labels[:, int(np.floor(i * size[0] / h)), int(np.floor(j * size[1] / w))]
    np.testing.assert_array_equal(jax.jit(losses.nearest_downsample, static_argnums=1)(labels, factor), ref)
