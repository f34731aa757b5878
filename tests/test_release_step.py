"""The released training step's semantics (DESIGN.md §8): BatchNorm per input in one joined pass, LeakyReLU in ASPP,
exact mismatch scores, anchors from a file, the `reference=release` switch and the release's augmentation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stpg_jax import losses, sharding
from stpg_jax.config import ConfigError, RELEASE_FIELDS, base_config, finalize
from stpg_jax.data import augment
from stpg_jax.models import DeepLabV3Plus
from stpg_jax.models import inputs as model_inputs
from stpg_jax.build import load_anchors
from stpg_jax.models.batchnorm import BEFORE_LAST_GROUP, BatchNorm, BatchNormSpec

S = 32
TINY = dict(stage_blocks=(1, 1, 1, 1), width=8, aspp_channels=16, decoder_channels=16, low_level_channels=8,
            proj_dim=8, proj_dropout=0.0)


def inputs(sizes, seed=0):
    """Inputs of different statistics, as a labelled batch and CutMix / weak views differ."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes))
    # Pixel values (the network normalises them): grey 128 ± 50·(1 + i), shifted by 20·i.
    return [128.0 + 50.0 * (1.0 + i) * jax.random.normal(k, (n, S, S, 3)) + 20.0 * i
            for i, (k, n) in enumerate(zip(keys, sizes))]


@functools.lru_cache(maxsize=None)
def model_and_variables(bn_backward):
    model = DeepLabV3Plus(num_classes=5, bn_backward=bn_backward, **TINY)
    variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, S, S, 3)))
    return model, variables


def separate(model, variables, parts):
    """The release: one pass per input, each updating the running averages it hands to the next."""
    stats, outs, history = variables["batch_stats"], [], []
    for x in parts:
        history.append(stats)
        out, mutated = model.apply({"params": variables["params"], "batch_stats": stats}, x, train=True,
                                   mutable=["batch_stats"])
        stats = mutated["batch_stats"]
        outs.append(out)
    return outs, stats, history[-1]


def joined(model, variables, parts, groups=1):
    sizes = [p.shape[0] for p in parts]
    grouped = model.clone(bn_groups=sharding.group_ids(sizes, groups))
    out, mutated = grouped.apply(variables, sharding.concat_local(parts, groups), train=True,
                                 mutable=["batch_stats", BEFORE_LAST_GROUP])
    pieces = {k: sharding.split_local(v, sizes, groups) for k, v in out.items()}
    return ([{k: v[i] for k, v in pieces.items()} for i in range(len(parts))], mutated["batch_stats"],
            mutated[BEFORE_LAST_GROUP])


def assert_trees_close(a, b, rtol=1e-3, atol=1e-4):  # float noise of a 5-conv-deep network
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                                   atol=atol), a, b)


@pytest.mark.parametrize("bn_backward", ["autodiff", "closed_form"])
@pytest.mark.parametrize("sizes", [(4, 4), (4, 4, 4)], ids=["student", "teacher"])
def test_grouped_pass_equals_one_pass_per_input(bn_backward, sizes):
    model, variables = model_and_variables(bn_backward)
    parts = inputs(sizes)
    ref_outs, ref_stats, ref_before_last = jax.jit(functools.partial(separate, model))(variables, parts)
    outs, stats, before_last = jax.jit(functools.partial(joined, model))(variables, parts)
    assert_trees_close(outs, ref_outs)
    assert_trees_close(stats, ref_stats)
    assert_trees_close(before_last, ref_before_last)
    # The inputs differ enough that one joint set of statistics would not do.
    plain, _ = model.apply(variables, jnp.concatenate(parts), train=True, mutable=["batch_stats"])
    assert np.max(np.abs(np.asarray(plain["logits"][:sizes[0]]) - np.asarray(ref_outs[0]["logits"]))) > 1e-2


@pytest.mark.parametrize("bn_backward", ["autodiff", "closed_form"])
def test_grouped_gradient_equals_the_sum_over_separate_passes(bn_backward):
    model, variables = model_and_variables(bn_backward)
    parts = inputs((4, 4))
    weights = [jax.random.normal(jax.random.PRNGKey(7 + i), (4, S, S, 5)) for i in range(2)]

    def loss_separate(params):
        outs, _, _ = separate(model, {**variables, "params": params}, parts)
        return sum(jnp.sum(jnp.tanh(o["logits"]) * w) for o, w in zip(outs, weights))

    def loss_joined(params):
        outs, _, _ = joined(model, {**variables, "params": params}, parts)
        return sum(jnp.sum(jnp.tanh(o["logits"]) * w) for o, w in zip(outs, weights))

    ref = jax.jit(jax.grad(loss_separate))(variables["params"])
    got = jax.jit(jax.grad(loss_joined))(variables["params"])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):  # relative L2, per tensor
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 1e-4 * np.linalg.norm(np.asarray(b)) + 1e-6


def test_grouped_pass_on_four_devices_equals_one_device():
    """Under the mesh each group's statistics cover the global batch: the same numbers as on one device."""
    model, variables = model_and_variables("closed_form")
    parts = inputs((4, 4, 4), seed=3)
    mesh = sharding.make_mesh(jax.devices())
    assert mesh.devices.size == 4
    rep, bat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    fn = jax.jit(functools.partial(joined, model, groups=4), in_shardings=(rep, bat), out_shardings=rep)
    parts_sharded = [jax.device_put(p, bat) for p in parts]
    outs, stats, _ = fn(jax.device_put(variables, rep), parts_sharded)
    ref_outs, ref_stats, _ = jax.jit(functools.partial(separate, model))(variables, parts)
    assert_trees_close(outs, ref_outs)
    assert_trees_close(stats, ref_stats)


def test_unbiased_running_variance_and_group_order():
    x = inputs((2, 3))
    bn = BatchNorm(use_running_average=False, momentum=0.9, spec=BatchNormSpec(groups=(0, 0, 1, 1, 1),
                                                                               unbiased_running_var=True))
    variables = bn.init(jax.random.PRNGKey(0), jnp.concatenate(x))
    _, mutated = bn.apply(variables, jnp.concatenate(x), mutable=["batch_stats"])
    mean, var = 0.0, 1.0
    for part in x:  # PyTorch: running_var ← 0.9 running_var + 0.1 · unbiased batch variance, per pass in order
        flat = np.asarray(part, np.float64).reshape(-1, 3)
        mean = 0.9 * mean + 0.1 * flat.mean(0)
        var = 0.9 * var + 0.1 * flat.var(0, ddof=1)
    np.testing.assert_allclose(mutated["batch_stats"]["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mutated["batch_stats"]["var"], var, rtol=1e-4)


def test_aspp_uses_leaky_relu_and_the_switch_restores_relu():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, S, S, 3), maxval=255.0)  # pixel values
    outs = {}
    for act in ("leaky_relu", "relu"):
        model = DeepLabV3Plus(num_classes=5, aspp_activation=act, **TINY)
        variables = model.init(jax.random.PRNGKey(1), x)
        _, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                               capture_intermediates=lambda m, _: m.name == "aspp")
        outs[act] = np.asarray(jax.tree_util.tree_leaves(state["intermediates"])[0])
    assert outs["relu"].min() >= 0.0
    negative = outs["leaky_relu"][outs["leaky_relu"] < 0]
    assert negative.size > 0 and negative.min() > -0.1  # slope 0.01 of roughly unit-normal BN outputs


def test_pro_head_has_a_bias_and_channel_dropout():
    model = DeepLabV3Plus(num_classes=5, **{**TINY, "proj_dropout": 0.5})
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, S, S, 3), maxval=255.0)  # pixel values
    variables = model.init(jax.random.PRNGKey(1), x)
    assert "bias" in variables["params"]["proj_conv1"]
    legacy = DeepLabV3Plus(num_classes=5, proj_conv_bias=False, **TINY).init(jax.random.PRNGKey(1), x)
    assert "bias" not in legacy["params"]["proj_conv1"]
    # Dropout2d: a channel is dropped over the whole map or not at all. Seen through the 1x1 conv's input.
    _, state = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)},
                           mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda m, _: m.name == "proj_conv2")
    del state  # (the output mixes channels; check the dropout module directly)
    from flax import linen as nn
    y = nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=False).apply({}, jnp.ones((2, 6, 6, 16)),
                                                                         rngs={"dropout": jax.random.PRNGKey(3)})
    zero = np.asarray(y) == 0
    assert np.all(zero.all((1, 2)) | (~zero).all((1, 2))) and zero.any() and (~zero).any()


def test_mismatch_scores_keep_the_pixels_the_release_keeps():
    """DESIGN.md §8.8's example: 15 pixels labelled 1 and predicted 0 among 405 k are highly mismatched."""
    confusion = np.array([[200001, 10, 20], [15, 200000, 15], [7, 12, 5000]])
    teacher = np.repeat(np.repeat(np.arange(3), 3), confusion.reshape(-1))
    student = np.repeat(np.tile(np.arange(3), 3), confusion.reshape(-1))
    sel = jax.jit(functools.partial(losses.select_pixels, num_classes=3))(teacher, student)
    np.testing.assert_array_equal(np.asarray(sel["confusion"]), confusion)
    high = np.asarray(sel["high"]) > 0
    assert int(np.sum(high & (teacher == 1) & (student == 0))) == 15
    assert float(sel["scores"][1]) > float(sel["scores"][0])


def anchors_config(path):
    c = base_config()
    c.stpg.anchors_file = str(path)
    return c


def test_anchors_file_loads_and_wrong_files_are_refused_by_name(tmp_path):
    anchors = losses.make_anchors(5, 8, seed=0, steps=50)
    good = tmp_path / "anchors.npy"
    np.save(good, anchors)
    np.testing.assert_array_equal(load_anchors(anchors_config(good), 5, 8), np.asarray(anchors, np.float32))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.asarray(anchors)[:4])
    with pytest.raises(ConfigError, match=r"stpg\.anchors_file.*\(4, 8\).*expected a \(5, 8\)"):
        load_anchors(anchors_config(wrong), 5, 8)
    scaled = tmp_path / "scaled.npy"
    np.save(scaled, 2 * np.asarray(anchors))
    with pytest.raises(ConfigError, match=r"stpg\.anchors_file.*unit vectors"):
        load_anchors(anchors_config(scaled), 5, 8)
    with pytest.raises(ConfigError, match=r"stpg\.anchors_file.*no such file"):
        load_anchors(anchors_config(tmp_path / "missing.npy"), 5, 8)


def test_reference_release_sets_every_paper_vs_release_field():
    splits = {"1_4": {}}
    paper = finalize(base_config(), "1_4", splits)
    release = finalize(base_config(), "1_4,reference=release", splits)
    for key, value in RELEASE_FIELDS.items():
        section, name = key.split(".")
        assert release[section][name] == value and paper[section][name] != value or key == "model.depth", key
    explicit = finalize(base_config(), "1_4,reference=release,stpg.prototype_momentum=0.95", splits)
    assert explicit.stpg.prototype_momentum == 0.95 and explicit.stpg.bank_source == "pro_teacher"
    with pytest.raises(ConfigError, match="reference"):
        finalize(base_config(), "1_4,reference=pytorch", splits)


def test_release_augmentation_pads_centred_with_exact_zero_after_normalisation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (21, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (21, 30), dtype=np.uint8)
    scales = (0.5,)
    out, lab, box = augment.weak_augment(np.random.default_rng(1), image, label, 24, scales)
    top, left, h, w = box.tolist()
    assert (h, w) == (10, 15)  # int(21 · 0.5), int(30 · 0.5): rounded down
    assert (top, left) == ((24 - 10) // 2, (24 - 15) // 2)  # centred
    assert (lab[:top] == 255).all() and (lab[top + h:] == 255).all() and (lab[:, :left] == 255).all()
    x = np.asarray(model_inputs.normalize(out[None], model_inputs.box_mask(box[None], 24, 24)))[0]
    inside = np.zeros((24, 24), bool)
    inside[top:top + h, left:left + w] = True
    assert (x[~inside] == 0).all() and (np.abs(x[inside]).sum(-1) > 0).all()
    # Bilinear without antialiasing: halving picks the mean of each 2x2 block's centre pair (half-pixel centres).
    half = augment.resize_linear(image[:20, :30], 10, 15)
    expected = image[:20, :30].astype(np.float32).reshape(10, 2, 15, 2, 3).mean((1, 3))
    np.testing.assert_array_equal(half, np.clip(np.rint(expected), 0, 255).astype(np.uint8))
