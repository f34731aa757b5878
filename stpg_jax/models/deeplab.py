"""DeepLabV3+ with a projection head (DESIGN.md §4), flax.linen, NHWC."""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stpg_jax.models.batchnorm import BatchNormSpec
from stpg_jax.models.inputs import normalize
from stpg_jax.models.resnet import KAIMING_FAN_IN, KAIMING_FAN_OUT, STAGE_BLOCKS, ResNet, batch_norm, conv, maybe_remat

# The released code's ASPP uses LeakyReLU (PyTorch's default slope) for its three activations (DESIGN.md §8.2).
ASPP_SLOPES = {"leaky_relu": 0.01, "relu": 0.0}
HEAD_INITS = ("kaiming_fan_in", "legacy")


def _axis_weights(in_size: int, out_size: int):
    """Source indices and weights of align_corners=True linear interpolation along one axis.

    Sizes are static, so this is NumPy at trace time: the source position i·(in−1)/(out−1) is split into integer and
    fraction exactly, instead of a float32 product whose error grows with the size (≈3e-5 at 257 → 2048).
    """
    i = np.arange(out_size, dtype=np.int64)
    if out_size == 1 or in_size == 1:
        lo, frac = np.zeros_like(i), np.zeros(out_size)
    else:
        lo, rem = np.divmod(i * (in_size - 1), out_size - 1)
        frac = rem / (out_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, frac


@functools.lru_cache(maxsize=None)
def _transpose_taps(in_size: int, out_size: int):
    """The transpose of ``_axis_weights``' interpolation as fixed taps: input index h receives
    Σ_k weight[h, k] · grad[index[h, k]], the shorter lists padded with weight 0 (NumPy, static)."""
    lo, hi, frac = _axis_weights(in_size, out_size)
    dense = np.zeros((in_size, out_size))  # the interpolation's (input, output) weights
    np.add.at(dense, (lo, np.arange(out_size)), 1.0 - frac)
    np.add.at(dense, (hi, np.arange(out_size)), frac)
    nonzero = dense != 0
    # Per input row, its nonzero outputs first (in order), then zero-weight ones as padding.
    index = np.argsort(~nonzero, axis=1, kind="stable")[:, :max(1, nonzero.sum(1).max())].astype(np.int32)
    return index, np.take_along_axis(dense, index, axis=1)


def _take(x, index, axis: int):
    return x[(slice(None),) * axis + (index,)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _resize_axis(x, axis: int, in_size: int, out_size: int):
    """align_corners=True linear interpolation of ``x`` along ``axis`` from ``in_size`` to ``out_size``."""
    lo, hi, t = _axis_weights(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    t = jnp.asarray(t, x.dtype).reshape(shape)
    return _take(x, lo, axis) * (1 - t) + _take(x, hi, axis) * t


def _resize_axis_forward(x, axis, in_size, out_size):
    return _resize_axis(x, axis, in_size, out_size), None


def _resize_axis_backward(axis, in_size, out_size, _, g):
    # The gradient gathers each input position's few contributions instead of scatter-adding every output's two:
    # no atomics (the same sums in a fixed order on a GPU, run to run), accumulated in float32.
    index, weight = _transpose_taps(in_size, out_size)
    shape = [1] * g.ndim
    shape[axis] = in_size
    gf = g.astype(jnp.float32)
    dx = sum(_take(gf, index[:, k], axis) * jnp.asarray(weight[:, k], jnp.float32).reshape(shape)
             for k in range(index.shape[1]))
    return (dx.astype(g.dtype),)


_resize_axis.defvjp(_resize_axis_forward, _resize_axis_backward)


def resize_bilinear_align_corners(x, size: Sequence[int]):
    """Bilinear resize of (B, H, W, C) to ``size`` = (H', W') with align_corners=True semantics.

    Separable gathers and lerps (exact, no interpolation matrix), so memory stays O(output); the backward pass
    gathers too (see ``_resize_axis_backward``).
    """
    out_h, out_w = size
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return x
    return _resize_axis(_resize_axis(x, 1, in_h, out_h), 2, in_w, out_w)


class ConvBNReLU(nn.Module):
    """Conv → BN → ReLU (LeakyReLU with ``negative_slope`` > 0)."""

    features: int
    kernel: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32
    bn: BatchNormSpec = BatchNormSpec()
    negative_slope: float = 0.0
    kernel_init: Any = KAIMING_FAN_IN

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv(self.features, self.kernel, 1, self.dilation, dtype=self.dtype, name="conv",
                 kernel_init=self.kernel_init)(x)
        return batch_norm(train, self.dtype, "bn", self.bn, negative_slope=self.negative_slope)(x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1, three dilated 3×3, image pooling; then a 1×1 projection.

    The release's layout (the four branches concatenated → one BN → activation → 1×1; pooling → BN → activation → 1×1;
    their sum → BN → activation) is this one: BN is per channel, and a 1×1 conv of a concatenation is the sum of 1×1
    convs of its parts, so ``project`` holds the release's two reduction convs stacked."""

    features: int = 256
    rates: Sequence[int] = (6, 12, 18)
    dtype: Any = jnp.float32
    remat: bool = False
    bn: BatchNormSpec = BatchNormSpec()
    negative_slope: float = 0.0
    kernel_init: Any = KAIMING_FAN_IN

    @nn.compact
    def __call__(self, x, train: bool):
        conv_bn_relu = maybe_remat(ConvBNReLU, self.remat)
        kw = dict(dtype=self.dtype, bn=self.bn, negative_slope=self.negative_slope, kernel_init=self.kernel_init)
        branches = [conv_bn_relu(self.features, 1, **kw, name="branch0")(x, train)]
        for i, rate in enumerate(self.rates):
            branches.append(conv_bn_relu(self.features, 3, rate, **kw, name=f"branch{i + 1}")(x, train))
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = conv_bn_relu(self.features, 1, **kw, name="image_pool")(pooled, train)
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        return conv_bn_relu(self.features, 1, **kw, name="project")(jnp.concatenate(branches, -1), train)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ returning ``{'logits': (B,H,W,C) float32, 'features': (B,H/4,W/4,proj_dim) float32}``.

    Input: (B, H, W, 3) RGB pixel values in [0, 255] (uint8 as the loaders give them), ImageNet-normalised here;
    ``valid`` (B, H, W) bool, optional: False on padding, which is then exactly 0 after normalisation (``inputs``).

    ``features`` come from the projection head (3×3 conv (with a bias if ``proj_conv_bias``) → BN → ReLU →
    Dropout(``proj_dropout``, 0.1; whole channels if ``proj_dropout_kind`` is 'channel', as PyTorch's Dropout2d) → 1×1
    conv) on the 256-channel decoder output; with ``proj_dim=0`` the head is left out and ``features`` is the decoder
    output. ``aspp_activation``: 'leaky_relu' (the release) or 'relu'. ``head_init``: 'kaiming_fan_in' (the release,
    for every layer after the backbone) or 'legacy'.

    BatchNorm: ``bn_groups`` (static, one group index per sample) normalises each input group of a joined batch with
    its own statistics, as separate passes would (``batchnorm``); None is one group. ``bn_running_var`` 'unbiased'
    stores running variances as PyTorch does, 'biased' as flax.
    Parameters are float32; ``dtype`` sets the compute dtype (bfloat16 for mixed precision). ``remat`` recomputes
    the activations inside the stem, every bottleneck, ASPP branch and decoder conv in the backward pass instead of
    keeping them (for the R50 train step, less than half of XLA's temporary memory for ~21 % more FLOPs); the
    variables are the same. The projection head is left out: recomputing it saved nothing. ``bn_backward``
    'closed_form' computes every BatchNorm's (and following ReLU's) backward pass in closed form instead of by
    automatic differentiation (``batchnorm.BatchNorm``): same variables, same forward values.
    """

    num_classes: int
    depth: int = 50
    stage_blocks: Optional[Sequence[int]] = None
    width: int = 64
    stem: str = "deep"
    stride_in_1x1: bool = False
    output_stride: int = 16
    aspp_channels: int = 256
    decoder_channels: int = 256
    low_level_channels: int = 48
    proj_dim: int = 256
    proj_dropout: float = 0.1
    proj_dropout_kind: str = "channel"
    proj_conv_bias: bool = True
    aspp_activation: str = "leaky_relu"
    head_init: str = "kaiming_fan_in"
    dtype: Any = jnp.float32
    remat: bool = False
    bn_backward: str = "autodiff"
    bn_groups: Optional[tuple] = None
    bn_running_var: str = "unbiased"

    @nn.compact
    def __call__(self, images, train: bool = False, valid=None):
        in_h, in_w = images.shape[1], images.shape[2]
        blocks = tuple(self.stage_blocks) if self.stage_blocks else STAGE_BLOCKS[self.depth]
        if self.aspp_activation not in ASPP_SLOPES:
            raise ValueError(f"model.aspp_activation must be one of {sorted(ASPP_SLOPES)}, got {self.aspp_activation!r}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"model.head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        bn = BatchNormSpec(self.bn_backward, self.bn_groups, self.bn_running_var == "unbiased")
        legacy_init = self.head_init == "legacy"
        head_init = KAIMING_FAN_OUT if legacy_init else KAIMING_FAN_IN
        out_init = nn.linear.default_kernel_init if legacy_init else KAIMING_FAN_IN  # the two 1×1 output convs
        x = normalize(images, valid).astype(self.dtype)
        low, high = ResNet(
            blocks, self.width, self.stem, self.stride_in_1x1, self.output_stride, self.dtype, self.remat, bn,
            name="backbone",
        )(x, train)

        conv_bn_relu = maybe_remat(ConvBNReLU, self.remat)
        rates = (6, 12, 18) if self.output_stride == 16 else (12, 24, 36)
        kw = dict(dtype=self.dtype, bn=bn, kernel_init=head_init)
        y = ASPP(self.aspp_channels, rates, self.dtype, self.remat, bn, ASPP_SLOPES[self.aspp_activation], head_init,
                 name="aspp")(high, train)
        low = conv_bn_relu(self.low_level_channels, 1, **kw, name="low_level")(low, train)
        y = resize_bilinear_align_corners(y, low.shape[1:3])
        y = jnp.concatenate([y, low], axis=-1)
        y = conv_bn_relu(self.decoder_channels, 3, **kw, name="decoder1")(y, train)
        y = conv_bn_relu(self.decoder_channels, 3, **kw, name="decoder2")(y, train)

        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, kernel_init=out_init,
                         name="classifier")(y)
        logits = resize_bilinear_align_corners(logits.astype(jnp.float32), (in_h, in_w))

        if self.proj_dim:
            if self.proj_dropout_kind not in ("channel", "element"):
                raise ValueError(f"model.proj_dropout_kind must be 'channel' or 'element', got {self.proj_dropout_kind!r}")
            f = conv(self.decoder_channels, 3, dtype=self.dtype, name="proj_conv1", use_bias=self.proj_conv_bias,
                     kernel_init=head_init)(y)
            f = batch_norm(train, self.dtype, "proj_bn", bn, relu=True)(f)
            channels = (1, 2) if self.proj_dropout_kind == "channel" else ()  # Dropout2d: one draw per channel
            f = nn.Dropout(self.proj_dropout, broadcast_dims=channels, deterministic=not train)(f)
            f = nn.Conv(self.proj_dim, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, kernel_init=out_init,
                        name="proj_conv2")(f)
        else:
            f = y
        return {"logits": logits, "features": f.astype(jnp.float32)}
