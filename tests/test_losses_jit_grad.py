"""Every public loss function under jit (and grad where it has one) on degenerate inputs: empty classes, an empty
bank, all-ignored labels. No NaN may appear; bfloat16 inputs give float32 results."""

import jax
import jax.numpy as jnp
import numpy as np

from stpg_jax import losses

B, H, W, C, D, K = 2, 8, 8, 5, 16, 6
IGN = 255


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))) for x in jax.tree_util.tree_leaves(tree))


def _inputs(all_ignored):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((B, H, W, C)), jnp.float32)
    labels = rng.integers(0, 2, (B, H, W)).astype(np.int32)  # classes 2.. are empty
    if all_ignored:
        labels[:] = IGN
    return logits, jnp.asarray(labels)


def _supervised(logits, labels):
    weights = jnp.full(labels.shape, 0.5)
    return (losses.cross_entropy(logits, labels)
            + losses.ohem_cross_entropy(logits, labels, min_kept=10, class_weights=jnp.linspace(0.5, 1.5, C))
            + losses.weighted_cross_entropy(logits, labels, weights))


def _contrastive(feats, labels, bank):
    anchors = losses.init_prototypes(jax.random.PRNGKey(1), C, D)
    return losses.dual_contrastive_loss(feats, labels.reshape(-1), anchors, bank.features, bank.count,
                                        num_classes=C)


def test_gradients_finite_on_degenerate_inputs():
    feats = jnp.asarray(np.random.default_rng(1).standard_normal((B * H * W, D)), jnp.float32)
    feats = feats.at[0].set(0.0)  # a zero feature must not give a NaN gradient through the normalisation
    empty_bank = losses.init_memory_bank(C, K, D)
    sup = jax.jit(jax.value_and_grad(_supervised))
    con = jax.jit(jax.value_and_grad(_contrastive))
    for all_ignored in (False, True):
        logits, labels = _inputs(all_ignored)
        val, g = sup(logits, labels)
        assert _finite((val, g))
        assert (float(val) == 0.0) == all_ignored
        val, g = con(feats, labels, empty_bank)
        assert _finite((val, g))
        assert (float(val) == 0.0) == all_ignored


def test_state_updates_jit_and_stay_finite_with_empty_classes():
    rng = np.random.default_rng(2)
    feats = jnp.asarray(rng.standard_normal((B * H * W, D)), jnp.float32)
    _, labels = _inputs(False)
    labels = labels.reshape(-1)
    probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((B * H * W, C)) * 5), -1)

    @jax.jit
    def step(protos, bank, assignment, anchors, use_proximity):
        valid = losses.bank_candidates(probs, labels, threshold=0.5)
        assigned = losses.assigned_anchors(anchors, assignment)
        protos = losses.update_prototypes(protos, feats, labels, valid, 0.99)
        bank = losses.update_memory_bank(bank, feats, labels, valid, assigned, 4, use_proximity)
        sel = losses.select_pixels(labels.reshape(B, H, W), jnp.zeros((B, H, W), jnp.int32), C)
        return protos, bank, sel

    anchors = losses.make_anchors(C, D, steps=100)
    protos0 = losses.init_prototypes(jax.random.PRNGKey(0), C, D)
    protos, bank, sel = step(protos0, losses.init_memory_bank(C, K, D), np.arange(C, dtype=np.int32), anchors,
                             jnp.asarray(True))
    assert _finite((protos, bank, sel))
    np.testing.assert_array_equal(protos[2:], protos0[2:])  # empty classes untouched
    assert np.all(np.asarray(bank.count[2:]) == 0) and np.all(np.asarray(bank.count[:2]) > 0)
    sigma = losses.hungarian_assignment(protos, anchors)
    assert sigma.shape == (C,)


def test_vmap_over_a_leading_axis():
    logits, labels = _inputs(False)
    per_image = jax.jit(jax.vmap(losses.cross_entropy))(logits, labels)
    assert per_image.shape == (B,)
    np.testing.assert_allclose(per_image.mean(), losses.cross_entropy(logits, labels), rtol=1e-5)
    sel = jax.jit(jax.vmap(lambda t, s: losses.select_pixels(t, s, C)))(labels, jnp.zeros_like(labels))
    assert sel["keep"].shape == (B, H, W) and sel["scores"].shape == (B, C)


def test_bfloat16_contrastive_and_prototypes():
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((64, D)).astype(np.float32)
    labels = rng.integers(0, C, 64).astype(np.int32)
    anchors = losses.make_anchors(C, D, steps=100)
    update = jax.jit(losses.update_memory_bank, static_argnums=5)
    bank = update(losses.init_memory_bank(C, K, D), feats, labels, np.ones(64), anchors, 4, False)
    f = jax.jit(losses.dual_contrastive_loss, static_argnames="num_classes")
    hi = f(feats, labels, anchors, bank.features, bank.count, num_classes=C)
    lo = f(jnp.asarray(feats, jnp.bfloat16), labels, anchors, bank.features.astype(jnp.bfloat16), bank.count,
           num_classes=C)
    assert lo.dtype == jnp.float32
    np.testing.assert_allclose(lo, hi, rtol=1e-2)
    p = losses.init_prototypes(jax.random.PRNGKey(0), C, D)
    protos = jax.jit(losses.update_prototypes)
    up = protos(p, jnp.asarray(feats, jnp.bfloat16), labels, np.ones(64), 0.9)
    assert up.dtype == jnp.float32
    np.testing.assert_allclose(up, protos(p, feats, labels, np.ones(64), 0.9), atol=1e-2)


def test_loss_gradients_hold_no_scatter():
    """The label's log-probability is selected, not gathered: on a GPU a gather's gradient is a scatter-add (atomics,
    summation order varying run to run), while a select's is elementwise."""
    import re

    logits, labels = _inputs(False)
    feats = jnp.asarray(np.random.default_rng(1).standard_normal((B * H * W, D)), jnp.float32)
    bank = losses.init_memory_bank(C, K, D)
    for fn, args in ((_supervised, (logits, labels)), (_contrastive, (feats, labels, bank))):
        text = jax.jit(jax.grad(fn)).lower(*args).compile().as_text()
        assert not re.search(r"\sscatter\(", text), fn.__name__
