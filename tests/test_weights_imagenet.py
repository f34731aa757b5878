"""The shared ImageNet ResNet-50 weights load into the backbone and match an independent NumPy forward."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from stpg_jax.models import ResNet
from stpg_jax.models import pretrained

WEIGHTS = os.environ.get(
    "STPG_IMAGENET_R50",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "weights", "resnet50_imagenet.npz"),
)
pytestmark = pytest.mark.skipif(not os.path.exists(WEIGHTS), reason=f"{WEIGHTS} not present")

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


# ---- NumPy reference: NHWC, PyTorch-layout weights, stride in the 1×1 conv, layer4 dilated 2/4/8 (output stride 16).


def np_conv(x, w, stride=1, dilation=1):
    """Conv of NHWC ``x`` with an OIHW ``w``, 'same'-style padding dilation·(k−1)/2, via im2col."""
    out_ch, in_ch, kh, kw = w.shape
    pad = dilation * (kh - 1) // 2
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, wd, _ = x.shape
    ho = (h - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd - dilation * (kw - 1) - 1) // stride + 1
    cols = [
        x[:, i * dilation: i * dilation + stride * (ho - 1) + 1: stride,
          j * dilation: j * dilation + stride * (wo - 1) + 1: stride, :]
        for i in range(kh) for j in range(kw)
    ]
    cols = np.concatenate(cols, axis=-1)  # (n, ho, wo, kh*kw*in_ch), (i, j, c) order
    return cols @ w.transpose(2, 3, 1, 0).reshape(kh * kw * in_ch, out_ch)


def np_bn(x, s, name):
    scale = s[f"{name}.weight"] / np.sqrt(s[f"{name}.running_var"] + 1e-5)
    return (x - s[f"{name}.running_mean"]) * scale + s[f"{name}.bias"]


def np_maxpool(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    return np.max([x[:, i: i + 2 * ho - 1: 2, j: j + 2 * wo - 1: 2] for i in range(3) for j in range(3)], axis=0)


def np_resnet50(x, s):
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = np_maxpool(relu(np_bn(np_conv(x, s["conv1.weight"], 2), s, "bn1")))
    low = None
    for stage, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 1))):
        for i in range(blocks):
            p = f"layer{stage + 1}.{i}"
            st = stride if i == 0 else 1
            dilation = (2, 4, 8)[i] if stage == 3 else 1
            y = relu(np_bn(np_conv(x, s[f"{p}.conv1.weight"], st), s, f"{p}.bn1"))
            y = relu(np_bn(np_conv(y, s[f"{p}.conv2.weight"], 1, dilation), s, f"{p}.bn2"))
            y = np_bn(np_conv(y, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in s:
                x = np_bn(np_conv(x, s[f"{p}.downsample.0.weight"], st), s, f"{p}.downsample.1")
            x = relu(y + x)
        if stage == 0:
            low = x
    return low, x


@pytest.fixture(scope="module")
def source():
    with np.load(WEIGHTS) as f:
        return {k: f[k].astype(np.float32) for k in f.files}


def test_every_key_is_used(source):
    params, batch_stats, report = pretrained.convert_state_dict(source, stem="standard", stage_blocks=(3, 4, 6, 3))
    assert report["skipped"] == [] and sorted(report["used"]) == sorted(source)
    assert len(source) == 265
    n_params = sum(v.size for v in traverse_util.flatten_dict(params).values())
    assert n_params == 23_508_032  # ResNet-50 without its fc layer


def test_features_equal_numpy_forward(source):
    params, batch_stats = pretrained.load_backbone_weights(WEIGHTS, stem="standard", stage_blocks=(3, 4, 6, 3))
    rgb = np.random.default_rng(0).uniform(0, 1, size=(1, 64, 64, 3)).astype(np.float32)
    x = (rgb - MEAN) / STD

    model = ResNet(stem="standard", stride_in_1x1=True, output_stride=16)
    low, high = jax.jit(lambda v, x: model.apply(v, x, train=False))({"params": params, "batch_stats": batch_stats}, x)
    want_low, want_high = np_resnet50(x, source)

    assert high.shape == want_high.shape == (1, 4, 4, 2048)
    assert low.shape == want_low.shape == (1, 16, 16, 256)
    np.testing.assert_allclose(np.asarray(low), want_low, rtol=1e-4, atol=1e-4 * np.abs(want_low).max())
    np.testing.assert_allclose(np.asarray(high), want_high, rtol=1e-3, atol=1e-4 * np.abs(want_high).max())
    # Trained weights give sparse, non-degenerate layer-4 activations.
    assert 0.05 < (want_high > 0).mean() < 0.95
