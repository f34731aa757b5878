"""stpg_jax.models.batchnorm: nn.BatchNorm's variables and forward values, and the closed-form backward pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stpg_jax.models.batchnorm import BatchNorm

SHAPE = (4, 6, 5, 8)


def _pair(dtype, relu, train=True):
    """(nn.BatchNorm [+ ReLU], closed-form BatchNorm) with the model's settings, and shared variables."""
    flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                           param_dtype=jnp.float32)
    reference = nn.Sequential([flax_bn, nn.relu]) if relu else flax_bn
    ours = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, relu=relu)
    x = (jax.random.normal(jax.random.PRNGKey(0), SHAPE) * 3 + 1).astype(dtype)
    variables = {"params": {"scale": jnp.linspace(0.5, 2.0, 8), "bias": jnp.linspace(-1.0, 1.0, 8)},
                 "batch_stats": {"mean": jnp.linspace(-0.2, 0.3, 8), "var": jnp.linspace(0.8, 1.5, 8)}}
    if relu:  # nn.Sequential names its layer layers_0
        return reference, ours, x, {k: {"layers_0": v} for k, v in variables.items()}, variables
    return reference, ours, x, variables, variables


def _loss(module, variables, params, x, weights, train=True):
    out = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                       mutable=["batch_stats"] if train else False)
    y, updates = out if train else (out, None)
    return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * weights), (y, updates)


@functools.lru_cache(maxsize=None)
def _results(dtype, relu):
    reference, ours, x, ref_vars, our_vars = _pair(dtype, relu)
    weights = jax.random.normal(jax.random.PRNGKey(3), SHAPE)
    grad = jax.value_and_grad(_loss, argnums=(2, 3), has_aux=True)
    ref = grad(reference, ref_vars, ref_vars["params"], x, weights)
    new = grad(ours, our_vars, our_vars["params"], x, weights)
    return ref, new, relu


def _unwrap(tree, relu):
    return tree["layers_0"] if relu else tree


@pytest.mark.parametrize("relu", [False, True])
def test_same_variables_as_nn_batchnorm(relu):
    reference, ours, x, _, _ = _pair(jnp.float32, relu)
    a = reference.init(jax.random.PRNGKey(1), x)
    b = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(_unwrap(a["batch_stats"], relu)) == jax.tree_util.tree_structure(
        b["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, _unwrap(a["params"], relu), b["params"])
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(b))
    # No running-average update while initialising, as nn.BatchNorm.
    np.testing.assert_array_equal(b["batch_stats"]["mean"], np.zeros(8))
    np.testing.assert_array_equal(b["batch_stats"]["var"], np.ones(8))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_training_forward_and_running_averages_are_identical(dtype, relu):
    ((_, (y_ref, upd_ref)), _), ((_, (y_new, upd_new)), _), _ = _results(dtype, relu)
    assert y_new.dtype == y_ref.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y_new, np.float32), np.asarray(y_ref, np.float32))
    jax.tree_util.tree_map(np.testing.assert_array_equal, upd_new["batch_stats"],
                           _unwrap(upd_ref["batch_stats"], relu))
    if relu:
        assert float(jnp.mean(y_new == 0)) > 0.1  # the ReLU cuts: its mask matters in the backward pass


@pytest.mark.parametrize("relu", [False, True])
def test_float32_gradients_match_automatic_differentiation(relu):
    (_, (g_params_ref, g_x_ref)), (_, (g_params_new, g_x_new)), _ = _results(jnp.float32, relu)
    np.testing.assert_allclose(g_x_new, g_x_ref, rtol=1e-5, atol=1e-6)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(close, g_params_new, _unwrap(g_params_ref, relu))
    assert float(jnp.abs(g_x_ref).max()) > 1e-2  # not trivially zero


def test_bfloat16_gradient_is_as_close_to_float32_arithmetic():
    """In bfloat16 both differ from float32 arithmetic by rounding; the closed form rounds once, at the end."""
    exact_module, _, x, variables, _ = _pair(jnp.float32, True)
    weights = jax.random.normal(jax.random.PRNGKey(3), SHAPE)
    x16 = x.astype(jnp.bfloat16)
    exact = jax.grad(lambda v: _loss(exact_module, variables, variables["params"], v, weights)[0])(
        x16.astype(jnp.float32))
    reference, ours, _, ref_vars, our_vars = _pair(jnp.bfloat16, True)
    errors = {}
    for name, module, v in (("autodiff", reference, ref_vars), ("closed form", ours, our_vars)):
        g = jax.grad(lambda a: _loss(module, v, v["params"], a, weights)[0])(x16)
        errors[name] = float(jnp.mean(jnp.abs(g.astype(jnp.float32) - exact)))
    scale = float(jnp.mean(jnp.abs(exact)))
    assert errors["closed form"] < 0.02 * scale and errors["closed form"] <= 1.1 * errors["autodiff"], (errors, scale)


@pytest.mark.parametrize("relu", [False, True])
def test_eval_mode_uses_the_running_averages(relu):
    reference, ours, x, ref_vars, our_vars = _pair(jnp.float32, relu, train=False)
    np.testing.assert_array_equal(ours.apply(our_vars, x), reference.apply(ref_vars, x))


@pytest.mark.parametrize("groups", [(0, 0, 1, 1), (0, 1, 0, 1)])
def test_group_statistics_reach_their_samples_without_a_gather(groups, monkeypatch):
    # Each sample's group statistics are selected from its group's row by a constant mask: the values of indexing
    # by each sample's group (the reference below), forward and closed-form backward (bit for bit with XLA's
    # default CPU optimisation; within the last bit under this suite's optimisation level 0). XLA compiles the
    # indexing to gathers, the selection to none: for consecutive groups the compiled pass has no gather at all.
    from stpg_jax.models import batchnorm as bn

    x = jax.random.normal(jax.random.PRNGKey(0), SHAPE) * 3 + 1
    scale, bias = jnp.linspace(0.5, 2.0, 8), jnp.linspace(-1.0, 1.0, 8)
    ids = np.asarray(groups)

    def reference_expand(stat, groups, ndim):
        return stat[ids].reshape((len(ids),) + (1,) * (ndim - 2) + stat.shape[-1:])

    def loss(x, scale, bias):
        y = bn.batch_norm_closed_form(x, scale, bias, 1e-5, jnp.float32, 0.0, groups)[0]
        return jnp.sum(jnp.tanh(y) * jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    ours = value_and_grad(x, scale, bias)
    text = value_and_grad.lower(x, scale, bias).compile().as_text()
    monkeypatch.setattr(bn, "_expand", reference_expand)
    reference = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    if groups == (0, 0, 1, 1):
        assert " gather(" not in text
    else:  # the check sees gathers at all: the per-group sums of the interleaved layout are gathered
        assert " gather(" in text
