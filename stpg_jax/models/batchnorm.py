"""BatchNorm over the last axis: the variables and arithmetic of ``nn.BatchNorm``, with per-input-group statistics
and a hand-written backward pass.

**Groups.** The released training step runs each network once per input (a student on the labelled batch, then on
the CutMix batch; a teacher on each weak view), so every input is normalised with its own batch statistics and the
running averages move once per input, in that order (DESIGN.md §8.1). ``BatchNormSpec.groups`` gives the same
semantics in one pass over the joined batch: a static tuple holding each sample's group index. The statistics are
reduced per sample over the spatial axes, then summed per group (under a data-parallel mesh the per-sample sums are
tiny (B, C) arrays, so a group spans the global batch); each sample is normalised with its group's statistics and
the running averages are updated group after group, exactly as the separate passes would. The convolutions around
it see the joined batch once.

**Backward.** In training mode ``nn.BatchNorm``'s gradient comes from automatic differentiation of its forward pass,
which XLA compiles into several reductions and elementwise passes over each activation. The gradient of batch
normalisation has a closed form (per group g),

    dx = scale · rstd_g · (d − mean_g(d) − x̂ · mean_g(d · x̂)),   dscale = Σ d · x̂,   dbias = Σ d,

with x̂ = (x − mean_g) · rstd_g and d the incoming gradient (through the activation): one reduction over (x, d) and
one elementwise pass. ``backward='closed_form'`` computes that; 'autodiff' differentiates the forward pass.

Either way: the same variables (``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``, all
float32), statistics in float32 with the variance as E[x²] − E[x]² clipped at 0, the running-average update skipped
while initialising, and the input's dtype out. ``unbiased_running_var`` stores the running variance as PyTorch does
(×n/(n−1), n the values per channel of the group; DESIGN.md §8.5); normalisation always uses the biased variance.
The activation that follows (ReLU, or LeakyReLU with ``negative_slope``) is part of the same passes: its mask is
recomputed from x in the backward pass instead of being read from memory.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache, partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BACKWARDS = ("autodiff", "closed_form")
# The mutable collection in which a grouped BatchNorm also leaves its running averages as they were before the last
# group's update (for a pass whose last input only counts from some step on: the bank's labelled teacher pass).
BEFORE_LAST_GROUP = "batch_stats_before_last_group"


@dataclasses.dataclass(frozen=True)
class BatchNormSpec:
    """How every BatchNorm of a network computes (static, hashable: part of the module's definition).

    backward: 'autodiff' or 'closed_form'. groups: each sample's group index (0..G-1, every group present), or None
    for one group. unbiased_running_var: store the running variance ×n/(n−1), as PyTorch.
    """

    backward: str = "autodiff"
    groups: Optional[tuple] = None
    unbiased_running_var: bool = False

    def __post_init__(self):
        if self.backward not in BACKWARDS:
            raise ValueError(f"model.bn_backward must be one of {BACKWARDS}, got {self.backward!r}")
        if self.groups is not None:
            ids = np.asarray(self.groups)
            if ids.ndim != 1 or ids.size == 0 or set(ids.tolist()) != set(range(int(ids.max()) + 1)):
                raise ValueError(f"BatchNormSpec.groups must number the groups 0..G-1, each present; got {self.groups}")

    @property
    def legacy(self) -> bool:
        """One group with the biased running variance: nn.BatchNorm's exact arithmetic."""
        return self.groups is None and not self.unbiased_running_var


def _activate(y, slope):
    if slope is None:
        return y
    return jnp.maximum(y, 0) if slope == 0.0 else jnp.where(y > 0, y, slope * y)


@lru_cache(maxsize=64)
def _group_index(groups: tuple):
    """(each sample's group, each group's samples), NumPy: static, computed once per layout (every BatchNorm of a
    network shares its layout)."""
    ids = np.asarray(groups)
    return ids, [np.flatnonzero(ids == g) for g in range(int(ids.max()) + 1)]


def _reduce(v, groups):
    """Σ of ``v`` (B, ..., C) per group: (G, C) (or (1, C) for one group), in float32."""
    if groups is None:
        return v.sum(tuple(range(v.ndim - 1)))[None]
    per_sample = v.sum(tuple(range(1, v.ndim - 1)))  # (B, C)
    _, members = _group_index(groups)
    # A group of consecutive samples is a slice; others (a batch joined device by device) are gathered, (B, C) small.
    return jnp.stack([per_sample[idx[0]:idx[-1] + 1].sum(0) if idx[-1] - idx[0] + 1 == len(idx) else
                      per_sample[idx].sum(0) for idx in members])


def _counts(x, groups):
    """Values per channel in each group, (G,) NumPy."""
    per_sample = int(np.prod(x.shape[1:-1]))
    if groups is None:
        return np.asarray([x.shape[0] * per_sample])
    _, members = _group_index(groups)
    return np.asarray([len(idx) * per_sample for idx in members])


def _expand(stat, groups, ndim):
    """Per-group (G, C) statistics as a broadcastable (B, 1.., C) array (or (C,) for one group).

    Group 0's row broadcast, then each other group's row selected where the layout has that group: the values of
    indexing ``stat`` by each sample's group, without the gather that XLA compiles the indexing to (on a GPU a
    kernel per BatchNorm and use, and a scatter in the backward pass), and elementwise, so a batch sharded over
    devices keeps its statistics where its samples are."""
    if groups is None:
        return stat[0]
    ids, _ = _group_index(groups)
    ids = ids.reshape((len(ids),) + (1,) * (ndim - 1))
    out = jnp.broadcast_to(stat[0], ids.shape[:-1] + stat.shape[-1:])
    for g in range(1, stat.shape[0]):
        out = jnp.where(ids == g, stat[g], out)
    return out


def _stats(x, groups):
    xf = x.astype(jnp.float32)
    if groups is None:  # one reduction over every axis but the last, as nn.BatchNorm
        axes = tuple(range(x.ndim - 1))
        mean = xf.mean(axes)
        var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
        return mean[None], var[None]
    n = jnp.asarray(_counts(x, groups), jnp.float32)[:, None]
    mean = _reduce(xf, groups) / n
    var = jnp.maximum(0.0, _reduce(xf * xf, groups) / n - mean * mean)
    return mean, var


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
    mul = jax.lax.rsqrt(var + epsilon) * scale
    return ((x - mean) * mul + bias).astype(dtype)


def _train_forward(x, scale, bias, epsilon, dtype, slope, groups):
    mean, var = _stats(x, groups)
    m, v = _expand(mean, groups, x.ndim), _expand(var, groups, x.ndim)
    y = _activate(_normalize(x, m, v, scale, bias, epsilon, dtype), slope)
    return (y, mean, var), (x, m, jax.lax.rsqrt(v + epsilon), scale, bias)


def batch_norm_autodiff(x, scale, bias, epsilon: float, dtype, slope, groups):
    """(y, mean (G, C), var (G, C)) of training-mode BatchNorm then the activation; differentiated by JAX."""
    y, mean, var = _train_forward(x, scale, bias, epsilon, dtype, slope, groups)[0]
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_closed_form(x, scale, bias, epsilon: float, dtype, slope, groups):
    """As ``batch_norm_autodiff``, with the closed-form backward pass. ``mean`` and ``var`` feed the running
    averages only and are not differentiated."""
    return _train_forward(x, scale, bias, epsilon, dtype, slope, groups)[0]


def _backward(epsilon, dtype, slope, groups, residuals, cotangents):
    x, mean, rstd, scale, bias = residuals
    count = jnp.asarray(_counts(x, groups), jnp.float32)[:, None]
    centered = x.astype(jnp.float32) - mean
    x_hat = centered * rstd
    g = cotangents[0].astype(jnp.float32)  # the batch statistics feed only the running averages: no gradient
    if slope is not None:  # the activation's mask, recomputed as the forward pass computed it
        g = jnp.where(centered * (rstd * scale) + bias > 0, g, slope * g if slope else 0.0)
    sum_g, sum_gx = _reduce(g, groups), _reduce(g * x_hat, groups)
    mean_g = _expand(sum_g / count, groups, x.ndim)
    mean_gx = _expand(sum_gx / count, groups, x.ndim)
    dx = (scale * rstd) * (g - mean_g - x_hat * mean_gx)
    return dx.astype(x.dtype), sum_gx.sum(0).astype(scale.dtype), sum_g.sum(0).astype(scale.dtype)


batch_norm_closed_form.defvjp(
    lambda x, scale, bias, epsilon, dtype, slope, groups: _train_forward(x, scale, bias, epsilon, dtype, slope,
                                                                          groups),
    _backward,
)


def batch_norm_train(x, scale, bias, epsilon: float, dtype, relu: bool):
    """(y, mean, var) of one-group training-mode BatchNorm then ReLU if ``relu``, closed-form backward."""
    y, mean, var = batch_norm_closed_form(x, scale, bias, epsilon, dtype, 0.0 if relu else None, None)
    return y, mean[0], var[0]


class BatchNorm(nn.Module):
    """``nn.BatchNorm(axis=-1)`` with float32 parameters and statistics, per-group statistics (``spec.groups``) and
    either backward pass, followed by ReLU (``negative_slope`` 0), LeakyReLU (> 0) or nothing (None)."""

    use_running_average: bool
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    relu: bool = False  # shorthand for negative_slope=0.0
    negative_slope: Optional[float] = None
    spec: BatchNormSpec = BatchNormSpec(backward="closed_form")

    @nn.compact
    def __call__(self, x):
        slope = self.negative_slope if self.negative_slope is not None else (0.0 if self.relu else None)
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        dtype = jnp.result_type(x, scale) if self.dtype is None else self.dtype
        if self.use_running_average:
            return _activate(_normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype), slope)
        groups = self.spec.groups
        if groups is not None and len(groups) != x.shape[0]:
            raise ValueError(f"BatchNorm groups name {len(groups)} samples, the batch has {x.shape[0]}")
        fn = batch_norm_closed_form if self.spec.backward == "closed_form" else batch_norm_autodiff
        y, mean, var = fn(x, scale, bias, float(self.epsilon), jnp.dtype(dtype), slope, groups)
        if not self.is_initializing():
            counts = _counts(x, groups)
            m, v = ra_mean.value, ra_var.value
            for g in range(mean.shape[0]):  # one update per input, in order, as the separate passes
                if g == mean.shape[0] - 1 and self.is_mutable_collection(BEFORE_LAST_GROUP):
                    self.put_variable(BEFORE_LAST_GROUP, "mean", m)
                    self.put_variable(BEFORE_LAST_GROUP, "var", v)
                n = counts[g]
                unbias = n / max(n - 1, 1) if self.spec.unbiased_running_var else 1.0
                m = self.momentum * m + (1 - self.momentum) * mean[g]
                v = self.momentum * v + (1 - self.momentum) * (var[g] * unbias)
            ra_mean.value, ra_var.value = m, v
        return y
