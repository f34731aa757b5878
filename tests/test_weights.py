"""PyTorch ResNet state dicts → flax backbone: equal forwards, strict key checking, conversion command, merging."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stpg_jax import cli, convert_weights
from stpg_jax.models import DeepLabV3Plus, ResNet
from stpg_jax.models import pretrained
from stpg_jax.models.pretrained import WeightsMismatchError, load_backbone_weights, merge_backbone

torch = pytest.importorskip("torch")
nn = torch.nn

WIDTH = 8
BLOCKS = (2, 1, 1, 1)
MULTI_GRID = (1, 2, 4)


class TorchBottleneck(nn.Module):
    def __init__(self, in_ch, planes, stride, dilation, stride_in_1x1):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, planes, 1, s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or in_ch != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """Dilated ResNet in the three naming styles: 'standard', deep 'sequential' (CPS/U2PL), deep 'deep_base'."""

    def __init__(self, naming, stride_in_1x1, output_stride):
        super().__init__()
        self.naming = naming
        w = WIDTH
        if naming == "standard":
            self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
        elif naming == "sequential":
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, 1, 1, bias=False),
            )
            self.bn1 = nn.BatchNorm2d(2 * w)
        else:
            self.conv1, self.bn1 = nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w)
            self.conv2, self.bn2 = nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w)
            self.conv3, self.bn3 = nn.Conv2d(w, 2 * w, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * w)
        strides, dilations = ((1, 2, 2, 1), (1, 1, 1, 2)) if output_stride == 16 else ((1, 2, 1, 1), (1, 1, 2, 4))
        in_ch = w if naming == "standard" else 2 * w
        for stage, n in enumerate(BLOCKS):
            blocks = []
            for i in range(n):
                d = dilations[stage] * (MULTI_GRID[i % 3] if stage == 3 else 1)
                blocks.append(TorchBottleneck(in_ch, w * 2**stage, strides[stage] if i == 0 else 1, d, stride_in_1x1))
                in_ch = w * 2**stage * 4
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(in_ch, 5)

    def forward(self, x):
        if self.naming == "deep_base":
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            x = torch.relu(self.bn3(self.conv3(x)))
        else:
            x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 3, 2, 1)
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


def make_torch_resnet(naming, stride_in_1x1, output_stride, seed=0):
    torch.manual_seed(seed)
    net = TorchResNet(naming, stride_in_1x1, output_stride)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so a swapped BN field shows
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def flax_forward():
    """One jitted backbone forward per (stem, stride_in_1x1, output_stride), shared by the tests."""
    cache = {}

    def get(stem, stride_in_1x1, output_stride):
        key = (stem, stride_in_1x1, output_stride)
        if key not in cache:
            model = ResNet(BLOCKS, WIDTH, stem, stride_in_1x1, output_stride)
            cache[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)


def torch_features(net, image):
    with torch.no_grad():
        low, high = net(torch.from_numpy(image.transpose(0, 3, 1, 2)))
    return low.numpy().transpose(0, 2, 3, 1), high.numpy().transpose(0, 2, 3, 1)


CASES = [
    ("standard", False, 16),
    ("standard", True, 16),
    ("sequential", False, 16),
    ("sequential", True, 16),
    ("deep_base", True, 16),
    ("sequential", False, 8),
]


@pytest.mark.parametrize("naming,stride_in_1x1,output_stride", CASES)
def test_flax_forward_equals_pytorch(tmp_path, flax_forward, image, naming, stride_in_1x1, output_stride):
    net = make_torch_resnet(naming, stride_in_1x1, output_stride)
    path = tmp_path / "resnet.pth"
    torch.save(net.state_dict(), path)
    stem = "standard" if naming == "standard" else "deep"

    params, batch_stats = load_backbone_weights(str(path), stem=stem, stage_blocks=BLOCKS)
    low, high = flax_forward(stem, stride_in_1x1, output_stride)({"params": params, "batch_stats": batch_stats}, image)

    want_low, want_high = torch_features(net, image)
    assert high.shape == want_high.shape == (2, 64 // output_stride, 64 // output_stride, 32 * WIDTH)
    np.testing.assert_allclose(np.asarray(low), want_low, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(high), want_high, rtol=1e-4, atol=1e-4)


def test_wrong_stride_placement_is_visible(tmp_path, flax_forward, image):
    # The forward comparison above can tell the two placements apart (it is not vacuous).
    net = make_torch_resnet("standard", True, 16)
    path = tmp_path / "resnet.pth"
    torch.save(net.state_dict(), path)
    params, batch_stats = load_backbone_weights(str(path), stem="standard", stage_blocks=BLOCKS)
    _, high = flax_forward("standard", False, 16)({"params": params, "batch_stats": batch_stats}, image)
    assert np.abs(np.asarray(high) - torch_features(net, image)[1]).max() > 1e-2


@pytest.fixture(scope="module")
def state_dict():
    return {k: v.clone() for k, v in make_torch_resnet("standard", False, 16).state_dict().items()}


def _save(tmp_path, obj, name="weights.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def test_fc_and_num_batches_tracked_are_the_only_skipped_keys(state_dict):
    state = pretrained._strip_prefixes({k: v.numpy() for k, v in state_dict.items()})
    _, _, report = pretrained.convert_state_dict(state, stem="standard", stage_blocks=BLOCKS)
    assert set(report["skipped"]) == {k for k in state if k.startswith("fc.") or k.endswith("num_batches_tracked")}
    assert "fc.weight" in report["skipped"] and "layer1.0.bn1.num_batches_tracked" in report["skipped"]
    assert len(report["used"]) + len(report["skipped"]) == len(state)
    assert report["width"] == WIDTH and report["stage_blocks"] == BLOCKS


def test_missing_key_is_named(tmp_path, state_dict):
    state = dict(state_dict)
    del state["layer1.0.bn2.running_var"]
    with pytest.raises(WeightsMismatchError, match=r"missing from the file: layer1\.0\.bn2\.running_var"):
        load_backbone_weights(_save(tmp_path, state), stem="standard", stage_blocks=BLOCKS)


def test_extra_key_is_named(tmp_path, state_dict):
    state = dict(state_dict, **{"layer1.0.conv4.weight": torch.zeros(WIDTH, WIDTH, 1, 1)})
    with pytest.raises(WeightsMismatchError, match=r"unused keys in the file: layer1\.0\.conv4\.weight"):
        load_backbone_weights(_save(tmp_path, state), stem="standard", stage_blocks=BLOCKS)


def test_wrong_shape_is_named(tmp_path, state_dict):
    state = dict(state_dict, **{"layer2.0.conv2.weight": torch.zeros(2 * WIDTH, 2 * WIDTH, 1, 1)})
    with pytest.raises(WeightsMismatchError, match=r"wrong shape: layer2\.0\.conv2\.weight: file \(16, 16, 1, 1\)"):
        load_backbone_weights(_save(tmp_path, state), stem="standard", stage_blocks=BLOCKS)


def test_model_with_other_layout_is_refused(tmp_path, state_dict):
    path = _save(tmp_path, state_dict)
    with pytest.raises(WeightsMismatchError, match=r"missing from the file: .*layer1\.2\.conv1\.weight"):
        load_backbone_weights(path, stem="standard", stage_blocks=(3, 1, 1, 1))
    deep_names = r"unused keys in the file: conv1\.weight\n.*missing from the file: conv1\.0\.weight"
    with pytest.raises(WeightsMismatchError, match=deep_names):
        load_backbone_weights(path, stem="deep", stage_blocks=BLOCKS)


def test_load_for_model_config(tmp_path, state_dict):
    from stpg_jax.config import base_config

    config = base_config().model
    config.pretrained = _save(tmp_path, state_dict)
    config.stem, config.stage_blocks = "standard", BLOCKS
    with pytest.raises(WeightsMismatchError, match=r"wrong shape: bn1\.bias: file \(8,\), model needs \(64,\)"):
        pretrained.load_backbone_weights_for(config)  # width 64 in the config, 8 in the file
    config.width = WIDTH
    params, _ = pretrained.load_backbone_weights_for(config)
    assert params["layer4_0"]["conv3"]["kernel"].shape == (1, 1, 8 * WIDTH, 32 * WIDTH)
    config.stage_blocks = ()  # depth 50: (3, 4, 6, 3)
    with pytest.raises(WeightsMismatchError, match=r"layer3\.5\.conv1\.weight"):
        pretrained.load_backbone_weights_for(config)


def test_wrapped_and_prefixed_state_dict(tmp_path, state_dict):
    want, _ = load_backbone_weights(_save(tmp_path, state_dict, "plain.pth"), stem="standard", stage_blocks=BLOCKS)
    for wrapped in (
        {"state_dict": {"module." + k: v for k, v in state_dict.items()}, "epoch": 3},
        {"model": {"backbone." + k: v for k, v in state_dict.items()}},
    ):
        got, _ = load_backbone_weights(_save(tmp_path, wrapped), stem="standard", stage_blocks=BLOCKS)
        np.testing.assert_array_equal(got["layer4_0"]["conv2"]["kernel"], want["layer4_0"]["conv2"]["kernel"])


class Payload:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def test_pickled_code_is_never_run(tmp_path, state_dict):
    path = _save(tmp_path, dict(state_dict, extra=Payload()))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_backbone_weights(path, stem="standard", stage_blocks=BLOCKS)


def test_mmseg_stem_names_are_refused_with_a_reason():
    keys = ["stem.0.weight", "layer1.0.conv1.weight"]
    with pytest.raises(WeightsMismatchError, match="mmcv"):
        pretrained.infer_layout(keys)


def test_npz_source_with_float16_convs(tmp_path, state_dict, flax_forward, image):
    arrays = {k: v.numpy() for k, v in state_dict.items() if "num_batches" not in k}
    arrays = {k: v.astype(np.float16) if v.ndim == 4 else v for k, v in arrays.items()}
    path = tmp_path / "weights.npz"
    np.savez(path, **arrays)
    params, _ = load_backbone_weights(str(path), stem="standard", stage_blocks=BLOCKS)
    kernel = params["conv1"]["kernel"]
    assert kernel.dtype == np.float32 and kernel.shape == (7, 7, 3, WIDTH)
    np.testing.assert_array_equal(kernel, arrays["conv1.weight"].astype(np.float32).transpose(2, 3, 1, 0))


def test_convert_command_round_trip(tmp_path, capsys, flax_forward, image):
    net = make_torch_resnet("sequential", False, 16, seed=3)
    source = _save(tmp_path, net.state_dict(), "r.pth")
    out = str(tmp_path / "r_flax.npz")
    assert convert_weights.main([source, out]) == 0
    printed = capsys.readouterr().out
    n_params = sum(p.numel() for name, p in net.named_parameters() if not name.startswith("fc."))
    assert f"{n_params:,} parameters" in printed and "stem deep (sequential names)" in printed

    params, batch_stats = load_backbone_weights(out, stem="deep", stage_blocks=BLOCKS)
    low, high = flax_forward("deep", False, 16)({"params": params, "batch_stats": batch_stats}, image)
    np.testing.assert_allclose(np.asarray(high), torch_features(net, image)[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(WeightsMismatchError, match=r"missing from the file: .*params/layer2_1/conv1/kernel"):
        load_backbone_weights(out, stem="deep", stage_blocks=(2, 2, 1, 1))


def test_convert_command_reports_mismatch(tmp_path, capsys, state_dict):
    source = _save(tmp_path, dict(state_dict, **{"aux.weight": torch.zeros(1)}))
    with pytest.raises(SystemExit) as exited:
        cli.run(convert_weights.main, [source, str(tmp_path / "o.npz")])
    assert exited.value.code == cli.EXIT_ERROR
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "aux.weight" in errors[0]
    assert not (tmp_path / "o.npz").exists()


def test_merge_backbone_keeps_heads(tmp_path, state_dict):
    model = DeepLabV3Plus(
        num_classes=3, stage_blocks=BLOCKS, width=WIDTH, stem="standard", aspp_channels=8,
        decoder_channels=8, low_level_channels=4, proj_dim=4,
    )
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(jnp.zeros((1, 32, 32, 3)))
    params, batch_stats = load_backbone_weights(_save(tmp_path, state_dict), stem="standard", stage_blocks=BLOCKS)

    merged = merge_backbone(variables, params, batch_stats)
    np.testing.assert_array_equal(merged["params"]["backbone"]["layer3_0"]["conv2"]["kernel"],
                                  params["layer3_0"]["conv2"]["kernel"])
    np.testing.assert_array_equal(merged["batch_stats"]["backbone"]["bn1"]["var"], batch_stats["bn1"]["var"])
    assert not np.array_equal(variables["params"]["backbone"]["conv1"]["kernel"], params["conv1"]["kernel"])
    for head in ("aspp", "decoder1", "classifier"):
        leaves = jax.tree_util.tree_leaves
        for a, b in zip(leaves(merged["params"][head]), leaves(variables["params"][head])):
            np.testing.assert_array_equal(a, b)

    del params["layer2_0"]["downsample_bn"]
    with pytest.raises(WeightsMismatchError, match="params/backbone/layer2_0/downsample_bn/scale: not in the loaded"):
        merge_backbone(variables, params, batch_stats)
    with pytest.raises(WeightsMismatchError, match="no 'backbone'"):
        merge_backbone({"params": {}, "batch_stats": {}}, params, batch_stats)
