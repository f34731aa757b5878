"""BatchNorm over the last axis with a hand-written backward pass: the variables and arithmetic of ``nn.BatchNorm``.

In training mode ``nn.BatchNorm``'s gradient comes from automatic differentiation of its forward pass (the
statistics in float32, the normalisation, the scale and bias), which XLA compiles into several reductions and
elementwise passes over each activation. The gradient of batch normalisation has a closed form,

    dx = scale · rstd · (g − mean(g) − x̂ · mean(g · x̂)),   dscale = Σ g · x̂,   dbias = Σ g,

with x̂ = (x − mean) · rstd and g the incoming gradient: one reduction over (x, g) and one elementwise pass. This
module computes that, with the same variables (``params/scale``, ``params/bias``, ``batch_stats/mean``,
``batch_stats/var``, all float32), the same statistics (float32, variance as E[x²] − E[x]² clipped at 0, the
biased variance in the running average), the same running-average update (skipped while initialising) and the same
output dtype. Checkpoints and converted weights load into either. With ``relu=True`` the ReLU that follows is part of
the same passes: its mask is recomputed from x in the backward pass instead of being read from memory.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _stats(x):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = xf.mean(axes)
    var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
    return mean, var


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
    mul = jax.lax.rsqrt(var + epsilon) * scale
    return ((x - mean) * mul + bias).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x, scale, bias, epsilon: float, dtype, relu: bool):
    """(y, mean, var) of training-mode BatchNorm over all axes but the last, then ReLU if ``relu``.

    ``mean`` and ``var`` (float32) are for the running averages and are not differentiated.
    """
    return _forward(x, scale, bias, epsilon, dtype, relu)[0]


def _forward(x, scale, bias, epsilon, dtype, relu):
    mean, var = _stats(x)
    y = _normalize(x, mean, var, scale, bias, epsilon, dtype)
    if relu:
        y = jnp.maximum(y, 0)
    return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale, bias)


def _backward(epsilon, dtype, relu, residuals, cotangents):
    x, mean, rstd, scale, bias = residuals
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    centered = x.astype(jnp.float32) - mean
    x_hat = centered * rstd
    g = cotangents[0].astype(jnp.float32)  # the batch statistics feed only the running averages: no gradient
    if relu:  # the ReLU's mask, recomputed as the forward pass computed it rather than read from memory
        g = jnp.where(centered * (rstd * scale) + bias > 0, g, 0.0)
    sum_g = g.sum(axes)
    sum_gx = (g * x_hat).sum(axes)
    dx = (scale * rstd) * (g - sum_g / count - x_hat * (sum_gx / count))
    return dx.astype(x.dtype), sum_gx.astype(scale.dtype), sum_g.astype(scale.dtype)


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """``nn.BatchNorm(axis=-1)`` with float32 parameters and statistics, and the closed-form backward pass."""

    use_running_average: bool
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    relu: bool = False  # ReLU after the normalisation, inside the same forward and backward passes

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        dtype = jnp.result_type(x, scale) if self.dtype is None else self.dtype
        if self.use_running_average:
            y = _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)
            return jnp.maximum(y, 0) if self.relu else y
        y, mean, var = batch_norm_train(x, scale, bias, float(self.epsilon), jnp.dtype(dtype), self.relu)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
