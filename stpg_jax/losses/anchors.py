"""Class anchors: C nearly equidistant unit vectors from a uniformity objective. DESIGN.md §3 "Anchors"."""

import functools

import jax
import jax.numpy as jnp

from stpg_jax.losses.utils import l2_normalize


def uniformity_objective(params, temperature=0.07):
    """mean_i log Σ_{j≠i} exp(a_i·a_j / T) over the row-normalised params (C, D). Float32 scalar.

    The self term j = i is a constant exp(1/T) that only swamps float32 resolution at T = 0.07; leaving it out keeps
    the same minimiser (the regular simplex, for D >= C − 1).
    """
    a = l2_normalize(params)
    sim = jnp.matmul(a, a.T, precision=jax.lax.Precision.HIGHEST) / temperature
    sim = jnp.where(jnp.eye(a.shape[0], dtype=bool), -jnp.inf, sim)
    return jnp.mean(jax.nn.logsumexp(sim, axis=1))


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _optimise(num_classes, dim, key, steps, learning_rate, temperature):
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = jax.random.normal(key, (num_classes, dim), jnp.float32)
    value_and_grad = jax.value_and_grad(uniformity_objective)

    def step(carry, t):
        params, mu, nu, best, best_params = carry
        loss, g = value_and_grad(params, temperature)
        better = loss < best
        best = jnp.where(better, loss, best)
        best_params = jnp.where(better, params, best_params)
        # Not optax.adam: it sums (1−b1)·g + b1·mu, which XLA fuses into another multiply-add: anchors move ≤1e-4.
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        t = t.astype(jnp.float32) + 1.0
        update = (mu / (1 - b1**t)) / (jnp.sqrt(nu / (1 - b2**t)) + eps)
        return (params - learning_rate * update, mu, nu, best, best_params), None

    zeros = jnp.zeros_like(params)
    init = (params, zeros, zeros, jnp.float32(jnp.inf), params)
    (params, _, _, best, best_params), _ = jax.lax.scan(step, init, jnp.arange(steps))
    final = uniformity_objective(params, temperature)
    best_params = jnp.where(final < best, params, best_params)
    return l2_normalize(best_params)


def make_anchors(num_classes, dim, seed=0, steps=10000, learning_rate=1e-3, temperature=0.07):
    """(C, D) float32 unit anchors, deterministic from `seed`: random-normal init, then `steps` Adam steps on
    `uniformity_objective`, keeping the parameters with the lowest objective seen. Runs once before training."""
    key = jax.random.PRNGKey(seed)
    return _optimise(int(num_classes), int(dim), key, int(steps), jnp.float32(learning_rate),
                     jnp.float32(temperature))
