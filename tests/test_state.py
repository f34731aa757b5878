"""The optimiser of each student: SGD with momentum, L2 on kernels only, poly schedule, optional frozen head; the
teachers' EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stpg_jax.config import base_config
from stpg_jax.recipe import make_optimizer
from stpg_jax.state import Network, ema


def params():
    return {
        "backbone": {"conv1": {"kernel": jnp.ones((3, 3, 3, 4))}, "bn1": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
        "classifier": {"kernel": jnp.ones((1, 1, 4, 5)), "bias": jnp.ones(5)},
        "proj_conv2": {"kernel": jnp.ones((1, 1, 4, 3)), "bias": jnp.ones(3)},
    }


def test_weight_decay_reaches_kernels_only_and_momentum_accumulates():
    c = base_config().optim
    p = params()
    tx, schedule = make_optimizer(c, 100, p)
    state = tx.init(p)
    zero = jax.tree_util.tree_map(jnp.zeros_like, p)
    updates, state = tx.update(zero, state, p)
    new = optax.apply_updates(p, updates)
    # With zero gradients only the L2 term moves a parameter: kernels shrink by lr·wd, nothing else moves.
    np.testing.assert_allclose(new["backbone"]["conv1"]["kernel"], 1 - c.lr * c.weight_decay, rtol=1e-6)
    np.testing.assert_allclose(new["classifier"]["kernel"], 1 - c.lr * c.weight_decay, rtol=1e-6)
    for leaf in (new["backbone"]["bn1"]["scale"], new["backbone"]["bn1"]["bias"], new["classifier"]["bias"]):
        np.testing.assert_array_equal(leaf, 1.0)
    # PyTorch SGD: buf = m·buf + g, p -= lr_t·buf; a constant gradient 1 on a bias gives lr_0 then lr_1·(1 + m).
    ones = jax.tree_util.tree_map(jnp.ones_like, p)
    p0 = p
    u1, state = tx.update(ones, tx.init(p0), p0)
    p1 = optax.apply_updates(p0, u1)
    u2, state = tx.update(ones, state, p1)
    p2 = optax.apply_updates(p1, u2)
    expected = 1 - schedule(0) - schedule(1) * (1 + c.momentum)
    np.testing.assert_allclose(p2["classifier"]["bias"], expected, rtol=1e-6)


def test_poly_schedule():
    c = base_config().optim
    _, schedule = make_optimizer(c, 1000, params())
    for t in (0, 1, 500, 999):
        np.testing.assert_allclose(schedule(t), c.lr * (1 - t / 1000) ** 0.9, rtol=1e-4)


def test_released_code_switch_freezes_the_projection_head():
    c = base_config().optim
    p = params()
    tx, _ = make_optimizer(c, 100, p, train_projection_head=False)
    ones = jax.tree_util.tree_map(jnp.ones_like, p)
    new = optax.apply_updates(p, tx.update(ones, tx.init(p), p)[0])
    np.testing.assert_array_equal(new["proj_conv2"]["kernel"], 1.0)
    np.testing.assert_array_equal(new["proj_conv2"]["bias"], 1.0)
    assert float(new["classifier"]["bias"][0]) < 1.0


def test_ema_is_decay_teacher_plus_one_minus_decay_student_to_the_bit_when_compiled():
    # Compiled as training compiles it (XLA's default optimisation level; the suite's conftest lowers it): XLA then
    # fuses one of the two products into a multiply-add, and which one depends on the order of the sum, so only
    # decay·t + (1 − decay)·s in that order gives the step's numbers.
    def compiled(fn, *args):
        return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 3})(*args)

    rng = np.random.default_rng(0)
    tree = lambda: {"conv": {"kernel": rng.standard_normal((3, 3, 16, 32)).astype(np.float32)},  # noqa: E731
                    "bn": {"scale": (1e3 * rng.standard_normal(64)).astype(np.float32)}}
    teacher, student = Network(tree(), {"bn": {"mean": np.ones(64, np.float32)}}), Network(tree(), {})
    for decay in (0.99, 0.9, 0.0):
        got = compiled(lambda t, s: ema(t, s, decay), teacher, student)
        want = compiled(lambda t, s: jax.tree_util.tree_map(lambda t, s: decay * t + (1.0 - decay) * s, t, s),
                        teacher.params, student.params)
        for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), decay
        # The statistics stay the teacher's own, never averaged.
        np.testing.assert_array_equal(got.batch_stats["bn"]["mean"], teacher.batch_stats["bn"]["mean"])
