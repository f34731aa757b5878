"""DeepLabV3+ and the dilated ResNet: shapes, parameter counts, resize, mixed precision, dilation and stride placement,
rematerialisation."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from stpg_jax.config import base_config
from stpg_jax.models import DeepLabV3Plus, ResNet, resize_bilinear_align_corners
from stpg_jax.recipe import model_from_config

TINY = dict(stage_blocks=(1, 1, 1, 1), width=8, aspp_channels=16, decoder_channels=16, low_level_channels=8,
            proj_dim=16)


def count_params(module, shape=(1, 64, 64, 3)):
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables["params"]))


@functools.lru_cache(maxsize=None)
def tiny_forward(output_stride, dtype=jnp.float32):
    model = DeepLabV3Plus(num_classes=5, output_stride=output_stride, dtype=dtype, **TINY)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 48, 3), maxval=255.0)  # pixel values
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), x)
    return variables, jax.jit(functools.partial(model.apply, train=False))(variables, x)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shapes(output_stride):
    _, out = tiny_forward(output_stride)
    assert out["logits"].shape == (2, 32, 48, 5) and out["logits"].dtype == jnp.float32
    assert out["features"].shape == (2, 8, 12, 16) and out["features"].dtype == jnp.float32
    assert np.all(np.isfinite(out["logits"]))


def test_r50_standard_stem_backbone_has_torchvision_parameter_count():
    assert count_params(ResNet(stem="standard")) == 23_508_032


def test_r50_deeplabv3plus_parameter_count():
    n = count_params(DeepLabV3Plus(num_classes=21, stem="standard", proj_dim=0))
    assert abs(n - 40.3e6) < 0.1e6, n


def test_deep_stem_adds_the_expected_parameters():
    standard, deep = count_params(ResNet(stem="standard")), count_params(ResNet(stem="deep"))
    bn = lambda c: 2 * c  # noqa: E731  scale + bias
    standard_stem = 7 * 7 * 3 * 64 + bn(64)
    deep_stem = 3 * 3 * 3 * 64 + bn(64) + 3 * 3 * 64 * 64 + bn(64) + 3 * 3 * 64 * 128 + bn(128)
    # layer1_0's conv1 and downsample conv read 128 instead of 64 channels after the deep stem.
    wider_layer1 = (128 - 64) * 64 + (128 - 64) * 256
    assert deep - standard == deep_stem - standard_stem + wider_layer1


def test_projection_head_parameter_count():
    with_head = count_params(DeepLabV3Plus(num_classes=21, stem="standard", proj_dim=256))
    without = count_params(DeepLabV3Plus(num_classes=21, stem="standard", proj_dim=0))
    # 3x3 conv with its bias (as released), BN scale and bias, 1x1 conv with bias.
    assert with_head - without == 3 * 3 * 256 * 256 + 256 + 2 * 256 + 256 * 256 + 256
    legacy = count_params(DeepLabV3Plus(num_classes=21, stem="standard", proj_dim=256, proj_conv_bias=False))
    assert with_head - legacy == 256


def reference_resize(x, out_h, out_w):
    """align_corners=True bilinear interpolation, float64, one output pixel at a time."""
    b, in_h, in_w, c = x.shape
    out = np.zeros((b, out_h, out_w, c), np.float64)
    for i in range(out_h):
        sy = 0.0 if out_h == 1 else i * (in_h - 1) / (out_h - 1)
        y0 = min(int(np.floor(sy)), in_h - 1)
        y1, wy = min(y0 + 1, in_h - 1), sy - y0
        for j in range(out_w):
            sx = 0.0 if out_w == 1 else j * (in_w - 1) / (out_w - 1)
            x0 = min(int(np.floor(sx)), in_w - 1)
            x1, wx = min(x0 + 1, in_w - 1), sx - x0
            out[:, i, j] = ((1 - wy) * (1 - wx) * x[:, y0, x0] + (1 - wy) * wx * x[:, y0, x1]
                            + wy * (1 - wx) * x[:, y1, x0] + wy * wx * x[:, y1, x1])
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((4, 5), (16, 20)), ((7, 9), (29, 13)), ((33, 17), (10, 5)),
                                          ((6, 6), (1, 7)), ((1, 3), (4, 9)), ((2, 257), (3, 2048))])
def test_resize_matches_align_corners_reference(in_hw, out_hw):
    x = np.random.default_rng(0).standard_normal((2, *in_hw, 3))
    got = np.asarray(resize_bilinear_align_corners(jnp.asarray(x, jnp.float32), out_hw))
    np.testing.assert_allclose(got, reference_resize(x, *out_hw), atol=1e-5, rtol=0)


def interpolation_matrix(in_size, out_size):
    """(out, in) float64 matrix of align_corners=True linear interpolation, from the reference formula."""
    a = np.zeros((out_size, in_size))
    for i in range(out_size):
        s = 0.0 if out_size == 1 else i * (in_size - 1) / (out_size - 1)
        lo = min(int(np.floor(s)), in_size - 1)
        a[i, lo] += 1 - (s - lo)
        a[i, min(lo + 1, in_size - 1)] += s - lo
    return a


@pytest.mark.parametrize("in_hw,out_hw", [((4, 5), (16, 20)), ((33, 17), (10, 5)), ((1, 3), (4, 9)), ((6, 6), (1, 7))])
def test_resize_gradient_is_the_transposed_interpolation_without_scatter(in_hw, out_hw):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, *in_hw, 3)), jnp.float32)
    w = rng.standard_normal((2, *out_hw, 3))
    # The upstream gradient is an argument, so that XLA cannot fold the (linear) gradient into a constant.
    grad = jax.jit(jax.grad(lambda a, v: jnp.sum(resize_bilinear_align_corners(a, out_hw) * v)))
    expected = np.einsum("oh,pw,bopc->bhwc", interpolation_matrix(in_hw[0], out_hw[0]),
                         interpolation_matrix(in_hw[1], out_hw[1]), w)
    np.testing.assert_allclose(np.asarray(grad(x, jnp.asarray(w, jnp.float32))), expected, atol=1e-5, rtol=0)
    # Gathers, not scatter-adds: on a GPU those are atomics, whose summation order changes from run to run.
    text = grad.lower(x, jnp.asarray(w, jnp.float32)).compile().as_text()
    assert re.search(r"\sgather\(", text) and not re.search(r"\sscatter\(", text)
    g16 = jax.grad(lambda a: jnp.sum(resize_bilinear_align_corners(a, out_hw).astype(jnp.float32) * w))(
        x.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16, np.float32), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(2, 9, 8, 3), (1, 16, 16, 4), (2, 7, 5, 2)])
def test_stem_max_pool_gradient_matches_autodiff_without_scatter(shape):
    from stpg_jax.models.resnet import max_pool_3x3_s2

    reference = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    rng = np.random.default_rng(4)
    # After a ReLU, and rounded: many ties, which must go where the select-and-scatter sends them.
    x = jnp.asarray(np.maximum(rng.standard_normal(shape), 0).round(1), jnp.float32)
    g = jnp.asarray(rng.standard_normal(reference(x).shape), jnp.float32)
    np.testing.assert_array_equal(max_pool_3x3_s2(x), reference(x))
    grad = jax.jit(lambda a, v: jax.vjp(max_pool_3x3_s2, a)[1](v)[0])
    np.testing.assert_allclose(grad(x, g), jax.vjp(reference, x)[1](g)[0], rtol=0, atol=1e-6)
    text = grad.lower(x, g).compile().as_text()
    assert not re.search(r"\s(scatter|select-and-scatter)\(", text)


def test_resize_keeps_corners():
    x = np.random.default_rng(1).standard_normal((1, 9, 13, 2)).astype(np.float32)
    got = np.asarray(resize_bilinear_align_corners(jnp.asarray(x), (31, 45)))
    for (i, j), (k, l) in [((0, 0), (0, 0)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0)), ((-1, -1), (-1, -1))]:
        np.testing.assert_allclose(got[0, i, j], x[0, k, l], atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    variables, out = tiny_forward(16, jnp.bfloat16)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert out["logits"].dtype == jnp.float32 and out["features"].dtype == jnp.float32
    _, reference = tiny_forward(16)
    # Same parameters (same init key): bf16 compute stays close to float32.
    np.testing.assert_allclose(out["logits"], reference["logits"], atol=0.25 * float(np.abs(reference["logits"]).max()))


def conv_and_block_shapes(backbone, x):
    """Output shapes of every Conv and Bottleneck call, captured without computing anything."""
    def run():
        variables = backbone.init(jax.random.PRNGKey(0), x, train=False)
        return backbone.apply(variables, x, train=False, mutable=["intermediates"],
                              capture_intermediates=lambda module, method: method == "__call__")
    (low, high), state = jax.eval_shape(run)
    shapes = jax.tree_util.tree_map(lambda leaf: leaf.shape, state["intermediates"])
    return low.shape, high.shape, shapes


@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_output_stride_by_dilation(output_stride):
    backbone = ResNet(stage_blocks=(1, 1, 1, 1), width=8, output_stride=output_stride)
    low, high, shapes = conv_and_block_shapes(backbone, jnp.zeros((1, 64, 96, 3)))
    assert low == (1, 16, 24, 32)  # layer1 at stride 4
    assert high == (1, 64 // output_stride, 96 // output_stride, 256)
    assert shapes["layer2_0"]["__call__"][0] == (1, 8, 12, 64)  # stride 8 either way
    layer3 = shapes["layer3_0"]["__call__"][0]
    assert layer3 == ((1, 4, 6, 128) if output_stride == 16 else (1, 8, 12, 128))
    assert shapes["layer4_0"]["__call__"][0][1:3] == layer3[1:3]  # layer4 keeps layer3's resolution


def test_layer4_dilations_follow_multigrid():
    """OS16: layer4 blocks dilate 2/4/8 (DESIGN.md §4); OS8: layer3 at 2 and layer4 at 4/8/16."""
    def dilations(output_stride):
        backbone = ResNet(stage_blocks=(1, 1, 2, 3), width=8, output_stride=output_stride)
        x = jnp.zeros((1, 64, 64, 3))
        seen = {}

        def record(next_fun, args, kwargs, context):
            # The dilation is not a parameter: read it from each bottleneck's 3x3 conv as it is called.
            module = context.module
            if isinstance(module, nn.Conv) and module.name == "conv2" and context.method_name == "__call__":
                seen[module.parent.name] = module.kernel_dilation[0]
            return next_fun(*args, **kwargs)

        def run():
            variables = backbone.init(jax.random.PRNGKey(0), x, train=False)
            with nn.intercept_methods(record):
                return backbone.apply(variables, x, train=False)

        jax.eval_shape(run)
        return seen

    os16, os8 = dilations(16), dilations(8)
    assert [os16[f"layer4_{i}"] for i in range(3)] == [2, 4, 8]
    assert [os16[f"layer3_{i}"] for i in range(2)] == [1, 1]
    assert [os8[f"layer4_{i}"] for i in range(3)] == [4, 8, 16]
    assert [os8[f"layer3_{i}"] for i in range(2)] == [2, 2]


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_stride_in_1x1_moves_the_stride(stride_in_1x1):
    backbone = ResNet(stage_blocks=(1, 1, 1, 1), width=8, stride_in_1x1=stride_in_1x1)
    _, _, shapes = conv_and_block_shapes(backbone, jnp.zeros((1, 64, 64, 3)))
    block = shapes["layer2_0"]  # receives 16x16 (stem /2, max-pool /2), outputs 8x8
    conv1, conv2 = block["conv1"]["__call__"][0][1:3], block["conv2"]["__call__"][0][1:3]
    assert (conv1, conv2) == (((8, 8), (8, 8)) if stride_in_1x1 else ((16, 16), (8, 8)))
    assert block["downsample_conv"]["__call__"][0][1:3] == (8, 8)


# XLA's CPU pipeline strips jax.checkpoint's optimization barriers before its CSE pass, which then merges the
# recomputation back into the forward pass, so remat changes nothing on the CPU by default. GPU and TPU keep the
# barriers until after scheduling; compiling with the expander off gives the CPU the same program. (LLVM -O0 only
# shortens the compile: buffer assignment is done before it.)
KEEP_REMAT_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander", "xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def tiny_train_gradients(remat, bn_backward="autodiff"):
    """Init variables, the compiled value_and_grad of a train-mode loss, and its results, with remat off or on."""
    model = DeepLabV3Plus(num_classes=5, remat=remat, bn_backward=bn_backward, **TINY)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 48, 3), maxval=255.0)  # pixel values
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), x)

    def loss(params, batch_stats, x):
        out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.mean(out["logits"] ** 2) + jnp.mean(out["features"] ** 2), (out, updates["batch_stats"])

    args = (variables["params"], variables["batch_stats"], x)
    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile(KEEP_REMAT_BARRIERS)
    return variables, compiled, compiled(*args)


def test_remat_keeps_the_variables():
    (off, _, _), (on, _, _) = tiny_train_gradients(False), tiny_train_gradients(True)
    assert jax.tree_util.tree_structure(on) == jax.tree_util.tree_structure(off)
    assert set(off) == {"params", "batch_stats"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, on, off)


def test_remat_gives_the_same_outputs_statistics_and_gradients():
    (_, _, ((loss_off, aux_off), grads_off)), (_, _, ((loss_on, aux_on), grads_on)) = (
        tiny_train_gradients(False), tiny_train_gradients(True))
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(close, aux_on, aux_off)  # logits, features and the updated batch_stats
    jax.tree_util.tree_map(close, grads_on, grads_off)
    assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads_off)) > 1e-3  # not trivially zero


def test_remat_reduces_xla_temp_memory():
    off, on = (tiny_train_gradients(remat)[1].memory_analysis().temp_size_in_bytes for remat in (False, True))
    assert on < 0.75 * off, (on, off)


def test_model_from_config_passes_remat_and_reads_configs_without_it():
    model = base_config().model
    assert model_from_config(model, 21).remat is False
    model.remat = True
    assert model_from_config(model, 21).remat is True
    older = ml_collections.ConfigDict({k: v for k, v in model.to_dict().items() if k != "remat"})  # older exports
    assert model_from_config(older, 21).remat is False


def test_closed_form_batchnorm_keeps_variables_outputs_statistics_and_gradients():
    (ref_vars, _, ((loss_ref, aux_ref), grads_ref)) = tiny_train_gradients(False)
    (vars_cf, _, ((loss_cf, aux_cf), grads_cf)) = tiny_train_gradients(False, "closed_form")
    jax.tree_util.tree_map(np.testing.assert_array_equal, vars_cf, ref_vars)  # same names, shapes, initial values
    np.testing.assert_allclose(loss_cf, loss_ref, rtol=1e-6)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(close, aux_cf, aux_ref)  # logits, features and the updated batch_stats
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-6), grads_cf, grads_ref)
    # With remat too (the custom backward passes inside nn.remat).
    (_, _, ((loss_both, _), grads_both)) = tiny_train_gradients(True, "closed_form")
    np.testing.assert_allclose(loss_both, loss_ref, rtol=1e-6)
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-6), grads_both, grads_ref)


def test_closed_form_batchnorm_has_fewer_kernels_and_bytes_in_the_compiled_backward():
    """The point of the closed form: XLA's program for the train-mode gradient makes fewer passes over activations."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import hlo

    totals = {}
    for backward in ("autodiff", "closed_form"):
        compiled = tiny_train_gradients(False, backward)[1]
        program = hlo.Hlo(compiled.as_text())
        work = [i for i in program.computations[program.entry]  # instructions that run (not views or constants)
                if i["op"] not in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")]
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        totals[backward] = (len(work), analysis["bytes accessed"])  # XLA's count of the bytes its kernels touch
    assert totals["closed_form"][0] < totals["autodiff"][0], totals
    assert totals["closed_form"][1] < totals["autodiff"][1], totals


def test_model_from_config_passes_bn_backward():
    model = base_config().model
    assert model_from_config(model, 21).bn_backward == "autodiff"
    model.bn_backward = "closed_form"
    assert model_from_config(model, 21).bn_backward == "closed_form"
    older = ml_collections.ConfigDict({k: v for k, v in model.to_dict().items() if k != "bn_backward"})
    assert model_from_config(older, 21).bn_backward == "autodiff"
