"""ResNet-50/101 backbones in flax.linen (NHWC), dilated for dense prediction.

Parameter names follow torchvision's where a counterpart exists (``conv1``/``bn1`` for the standard stem,
``layer{1..4}_{i}`` blocks with ``conv{1,2,3}``, ``bn{1,2,3}``, ``downsample_conv``/``downsample_bn``), so that
`stpg_jax.models.pretrained` maps PyTorch checkpoints onto this tree one key at a time.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from stpg_jax.models.batchnorm import BatchNorm, BatchNormSpec

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# Layer-4 multi-grid of the dilated ResNets used by DeepLabV3+ (DESIGN.md §4: dilations 2/4/8 at OS16).
MULTI_GRID = (1, 2, 4)


def batch_norm(train: bool, dtype: Any, name: str, spec="autodiff", relu: bool = False, negative_slope=None):
    """BatchNorm, then ReLU if ``relu`` (or LeakyReLU with ``negative_slope``), with PyTorch's defaults: running stats
    updated with momentum 0.1 (flax momentum 0.9), eps 1e-5. ``spec``: a ``BatchNormSpec`` or its backward name.
    One group with the biased running variance and 'autodiff' is ``nn.BatchNorm`` itself; everything else is
    ``batchnorm.BatchNorm`` (same variables and forward values; per-group statistics, closed-form backward)."""
    spec = BatchNormSpec(backward=spec) if isinstance(spec, str) else spec
    slope = negative_slope if negative_slope is not None else (0.0 if relu else None)
    if spec.backward == "closed_form" or not spec.legacy:
        return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                         negative_slope=slope, spec=spec, name=name)
    bn = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name
    )
    if slope is None:
        return bn
    return (lambda x: nn.relu(bn(x))) if slope == 0.0 else (lambda x: nn.leaky_relu(bn(x), slope))


# The backbone's convs (ImageNet weights replace them) and, by default, the new layers: kaiming normal with PyTorch's
# gain for ReLU and fan_in, as the released code initialises ASPP, decoder, classifier and projection head
# (DESIGN.md §8.6). 'legacy' is this project's earlier choice (fan_out; flax's default for the two 1×1 output convs).
KAIMING_FAN_IN = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, dtype: Any = jnp.float32, name=None,
         use_bias=False, kernel_init=KAIMING_FAN_OUT):
    pad = dilation * (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        name=name,
    )


def maybe_remat(target, remat: bool):
    """``target`` with its internal activations recomputed in the backward pass (``nn.remat``) when ``remat``.

    ``target`` is a module class called as ``(x, train)`` or a function called as ``(module, x, train)``; ``train``
    must be passed positionally: it selects Python branches, so it is static argument 2 (flax counts ``self`` or
    the module as 0). Variable names and shapes do not change.
    """
    return nn.remat(target, static_argnums=(2,)) if remat else target


@jax.custom_vjp
def max_pool_3x3_s2(x):
    """The stem's 3×3 max-pool, stride 2, padding 1 (NHWC), with a backward pass that holds no scatter.

    Automatic differentiation of ``nn.max_pool`` gives a select-and-scatter, which on a GPU adds the overlapping
    windows' gradients with atomics (an order that varies from run to run). Here each of the nine window offsets
    routes its outputs' gradients to the positions it selected, by strided padding, in a fixed order. Ties go to the
    first maximum in row-major window order, as the select-and-scatter does.
    """
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _max_pool_forward(x):
    y = max_pool_3x3_s2(x)
    return y, (x, y)


def _max_pool_backward(residuals, g):
    x, y = residuals
    h, w = x.shape[1:3]
    out_h, out_w = y.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    g = g.astype(jnp.float32)
    taken = jnp.zeros(y.shape, bool)
    dx = jnp.zeros(padded.shape, jnp.float32)
    for dh in range(3):
        for dw in range(3):
            window = padded[:, dh:dh + 2 * out_h - 1:2, dw:dw + 2 * out_w - 1:2]  # offset (dh, dw) of each window
            hit = (window == y) & ~taken
            taken = taken | hit
            dx = dx + jax.lax.pad(jnp.where(hit, g, 0.0), 0.0, (
                (0, 0, 0), (dh, h + 2 - dh - (2 * out_h - 1), 1), (dw, w + 2 - dw - (2 * out_w - 1), 1), (0, 0, 0)))
    return (dx[:, 1:h + 1, 1:w + 1].astype(x.dtype),)


max_pool_3x3_s2.defvjp(_max_pool_forward, _max_pool_backward)


def resnet_stem(net: ResNet, x, train: bool):
    """The ResNet's stem convs and max-pool (stride 4). A function of the ResNet rather than a submodule, so that
    its variables sit directly under the backbone, where pretrained weights map them, with or without remat."""
    if net.stem == "deep":
        for i, ch in enumerate((net.width, net.width, 2 * net.width)):
            x = conv(ch, 3, 2 if i == 0 else 1, dtype=net.dtype, name=f"stem_conv{i + 1}")(x)
            x = batch_norm(train, net.dtype, f"stem_bn{i + 1}", net.bn, relu=True)(x)
    elif net.stem == "standard":
        x = conv(net.width, 7, 2, dtype=net.dtype, name="conv1")(x)
        x = batch_norm(train, net.dtype, "bn1", net.bn, relu=True)(x)
    else:
        raise ValueError(f"model.stem must be 'deep' or 'standard', got {net.stem!r}")
    return max_pool_3x3_s2(x)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (dilated) → 1×1 bottleneck with expansion 4.

    ``stride_in_1x1`` puts the stride-2 in the first 1×1 conv (original "v1" ResNet, e.g. the Caffe/Keras weights)
    rather than in the 3×3 conv (torchvision's "v1.5").
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    stride_in_1x1: bool = False
    dtype: Any = jnp.float32
    bn: BatchNormSpec = BatchNormSpec()

    @nn.compact
    def __call__(self, x, train: bool):
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        y = conv(self.planes, 1, s1, dtype=self.dtype, name="conv1")(x)
        y = batch_norm(train, self.dtype, "bn1", self.bn, relu=True)(y)
        y = conv(self.planes, 3, s3, self.dilation, dtype=self.dtype, name="conv2")(y)
        y = batch_norm(train, self.dtype, "bn2", self.bn, relu=True)(y)
        y = conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(y)
        y = batch_norm(train, self.dtype, "bn3", self.bn)(y)
        if self.downsample:
            x = conv(self.planes * 4, 1, self.stride, dtype=self.dtype, name="downsample_conv")(x)
            x = batch_norm(train, self.dtype, "downsample_bn", self.bn)(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """Dilated ResNet returning ``(layer1, layer4)`` features.

    Attributes:
      stage_blocks: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      width: channels of the first stage's bottleneck (64 in the real networks; tests use 8).
      stem: 'deep' (three 3×3 convs width→width→2·width, the "v1c" checkpoints) or 'standard' (one 7×7).
      output_stride: 16 (layer4 dilated) or 8 (layers 3 and 4 dilated).
      remat: recompute the activations inside the stem and each bottleneck in the backward pass instead of keeping
        them (``nn.remat``); the variables are the same either way.
      bn: every BatchNorm's ``BatchNormSpec`` (backward pass, statistics groups, running variance); the variables
        are the same either way.
    """

    stage_blocks: Sequence[int] = STAGE_BLOCKS[50]
    width: int = 64
    stem: str = "deep"
    stride_in_1x1: bool = False
    output_stride: int = 16
    dtype: Any = jnp.float32
    remat: bool = False
    bn: BatchNormSpec = BatchNormSpec()

    @nn.compact
    def __call__(self, x, train: bool):
        x = maybe_remat(resnet_stem, self.remat)(self, x, train)

        if self.output_stride == 16:
            strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
        elif self.output_stride == 8:
            strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
        else:
            raise ValueError(f"model.output_stride must be 8 or 16, got {self.output_stride}")

        block = maybe_remat(Bottleneck, self.remat)
        in_ch = x.shape[-1]
        low_level = None
        for stage, blocks in enumerate(self.stage_blocks):
            planes = self.width * 2**stage
            for i in range(blocks):
                if stage == 3:
                    dilation = dilations[3] * MULTI_GRID[i % len(MULTI_GRID)]
                else:
                    dilation = dilations[stage]
                stride = strides[stage] if i == 0 else 1
                x = block(
                    planes,
                    stride=stride,
                    dilation=dilation,
                    downsample=(i == 0 and (stride != 1 or in_ch != planes * 4)),
                    stride_in_1x1=self.stride_in_1x1,
                    dtype=self.dtype,
                    bn=self.bn,
                    name=f"layer{stage + 1}_{i}",
                )(x, train)
                in_ch = planes * 4
            if stage == 0:
                low_level = x
        return low_level, x
