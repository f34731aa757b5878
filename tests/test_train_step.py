"""The STPG step on a tiny network: what it updates, what it leaves alone, and that it equals the library math."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stpg_jax import checkpoint, losses, sharding
from stpg_jax.build import build
from stpg_jax.config import base_config
from stpg_jax.recipe import Phases

C, D, S, B = 5, 16, 32, 4


def tiny_config(mode="stpg"):
    c = base_config()
    c.mode = mode
    c.model.update(stage_blocks=(1, 1, 1, 1), width=8, aspp_channels=16, decoder_channels=16,
                   low_level_channels=8, proj_dim=D, proj_dropout=0.0)
    # No dropout: laid out for one device or for four (Recipe.batch_groups), a network's batch holds its images
    # in another order, and each image would draw another dropout mask.
    c.data.batch_labeled = c.data.batch_unlabeled = B
    c.stpg.bank_k = 3
    return c


def make_batch(seed):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, C, (B, S, S)).astype(np.int32)
    label[:, :4] = 255  # some ignored pixels
    return dict(
        image=rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8),
        label=label,
        unlabeled0=rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8),
        unlabeled1=rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8),
    )


class Setup:
    """The parts of a run (``stpg_jax.build``) on a mesh; every phase of the method active from step 0, but the
    contrastive terms from step 1."""

    def __init__(self, mode="stpg", devices=None):
        c = tiny_config(mode)
        # Low bank confidence so an untrained teacher still yields candidates.
        c.stpg.bank_confidence, c.stpg.bank_capacity = 0.0, 8
        c.data.crop_size, c.schedule.total_steps = S, 100
        self.mesh = sharding.make_mesh(devices if devices is not None else jax.devices()[:1])
        self.parts = build(c, C, steps_per_epoch=0, mesh=self.mesh)  # the batch laid out for the mesh's devices
        self.recipe = dataclasses.replace(self.parts.recipe, phases=Phases(contrastive_start=1))
        self.model = self.recipe.model
        self.anchors = losses.make_anchors(C, D, seed=0, steps=300)
        self.rep, self.bat = self.parts.replicated, self.parts.batch_sharding
        self.step = self.parts.jitted_step(donate=True)
        self.mode = mode

    def init(self):
        """The run's initial state (the phases do not enter it): the program a run on this mesh compiles."""
        return self.parts.init_state(self.anchors if self.mode == "stpg" else None)

    def run(self, state, batch):
        return self.step(self.recipe, state, sharding.shard_batch(batch, self.bat), None)


@pytest.fixture(scope="module")
def setup():
    return Setup()


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_two_steps_change_both_students_and_teachers_are_their_ema(setup):
    state = setup.init()
    s0 = host(state)
    state, _ = setup.run(state, make_batch(0))
    s1 = host(state)
    state, metrics = setup.run(state, make_batch(1))
    s2 = host(state)
    assert int(s2.step) == 2
    for name in ("gen_student", "pro_student"):
        assert max_abs_diff(getattr(s0, name).params, getattr(s2, name).params) > 1e-6, name
    # The students start differently (different init keys).
    assert max_abs_diff(s0.gen_student.params, s0.pro_student.params) > 1e-3
    # Each teacher is 0.99·teacher + 0.01·its own (updated) student: no gradient ever reaches a teacher.
    for teacher, student in (("gen_teacher", "gen_student"), ("pro_teacher", "pro_student")):
        for before, after in ((s0, s1), (s1, s2)):
            expected = jax.tree_util.tree_map(lambda t, s: 0.99 * t + 0.01 * s,
                                              getattr(before, teacher).params, getattr(after, student).params)
            assert max_abs_diff(expected, getattr(after, teacher).params) < 1e-6
    # The EMA pairs a teacher with its own student, not the other one.
    wrong = jax.tree_util.tree_map(lambda t, s: 0.99 * t + 0.01 * s, s1.gen_teacher.params, s2.pro_student.params)
    assert max_abs_diff(wrong, s2.gen_teacher.params) > 1e-4
    assert np.isfinite(float(metrics["loss"]))
    for key in ("sup_gen", "sup_pro", "unsup_gen", "unsup_pro", "con_labeled", "con_unlabeled", "kept",
                "consistent", "highly_mismatched", "confidence_gen", "confidence_pro", "lr"):
        assert key in metrics, key
    assert metrics["mismatch_scores"].shape == (C,)
    # The bank took rows (it is on from step 0).
    assert int(np.sum(s2.contrast.bank.count)) > 0


def reference_terms(setup, state, batch):
    """Recomputes the step's selection and contrastive terms with the library functions, outside the step, running
    each network once per input as the released code does (the step joins them, with BatchNorm statistics per
    input)."""
    t = setup.recipe.config.stpg
    key = jax.random.fold_in(state.rng, state.step)
    k_mix, k_gen, k_pro, k_tg, k_tp = jax.random.split(key, 5)
    x_l, y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])  # uint8: the network normalises them
    u0, u1 = jnp.asarray(batch["unlabeled0"]), jnp.asarray(batch["unlabeled1"])
    mask = losses.cutmix_box_mask(k_mix, B, S, S)
    u_mix = losses.mix(u0, u1, mask)

    def fwd(net, images, k):
        out, _ = setup.model.apply(net.variables, images, train=True, rngs={"dropout": k}, mutable=["batch_stats"])
        return out

    def fwd_each(net, parts, k):
        outs = [fwd(net, p, k) for p in parts]
        return {name: jnp.concatenate([o[name] for o in outs]) for name in outs[0]}

    tg = fwd_each(state.gen_teacher, [u0, u1, x_l], k_tg)
    tp = fwd_each(state.pro_teacher, [u0, u1], k_tp)
    yhat_g, conf_g = losses.pseudo_labels(tg["logits"][:B], tg["logits"][B:2 * B], mask)
    yhat_p, _ = losses.pseudo_labels(tp["logits"][:B], tp["logits"][B:2 * B], mask)

    # Bank update from the Gen-Teacher's labelled features (paper default), before the loss.
    feats_t = tg["features"][2 * B:]
    h, w = feats_t.shape[1:3]
    y_small = losses.nearest_resize(y, (h, w))
    logits_small = tg["logits"][2 * B:][:, (np.arange(h) * S) // h][:, :, (np.arange(w) * S) // w]
    cand = losses.bank_candidates(jax.nn.softmax(logits_small, -1), y_small, t.bank_confidence).reshape(-1)
    assigned = state.contrast.assigned_anchors()
    bank = losses.update_memory_bank(state.contrast.bank, feats_t.reshape(-1, D), y_small.reshape(-1), cand,
                                     assigned, B * t.bank_k, True)

    g = fwd_each(state.gen_student, [x_l, u_mix], k_gen)
    p = fwd_each(state.pro_student, [x_l, u_mix], k_pro)
    sel = losses.select_pixels(yhat_g, jnp.argmax(p["logits"][B:], -1), C, variant="consistent+high")
    unsup_pro = losses.weighted_cross_entropy(p["logits"][B:], yhat_g, conf_g * sel["keep"])
    f = g["features"]
    con_l = losses.dual_contrastive_loss(f[:B].reshape(-1, D), y_small.reshape(-1), assigned, bank.features,
                                         bank.count, num_classes=C)
    con_u = losses.dual_contrastive_loss(f[B:].reshape(-1, D), losses.nearest_resize(yhat_p, (h, w)).reshape(-1),
                                         assigned, bank.features, bank.count, num_classes=C)
    return dict(kept=jnp.mean(sel["keep"]), consistent=jnp.mean(sel["consistent"]),
                highly_mismatched=jnp.mean(sel["high"]), mismatch_scores=sel["scores"], unsup_pro=unsup_pro,
                con_labeled=con_l, con_unlabeled=con_u)


def test_selection_and_contrastive_terms_equal_the_library_functions(setup):
    state, _ = setup.run(setup.init(), make_batch(0))  # one step first: the bank holds rows
    batch = make_batch(1)
    # The reference as one program: run op by op it would compile each of its hundreds of operations.
    expected = host(jax.jit(functools.partial(reference_terms, setup))(host(state), batch))
    _, metrics = setup.run(state, batch)
    metrics = host(metrics)
    assert float(expected["con_labeled"]) > 0 and float(expected["con_unlabeled"]) > 0
    assert 0 < float(expected["kept"]) < 1
    for k, v in expected.items():
        np.testing.assert_allclose(metrics[k], v, rtol=2e-4, atol=1e-5, err_msg=k)


def test_changing_the_assignment_does_not_recompile(setup):
    state = setup.init()
    state, _ = setup.run(state, make_batch(0))
    compiled_before = setup.step._cache_size()
    perm = np.roll(np.arange(C, dtype=np.int32), 1)
    state = state.replace(contrast=state.contrast.replace(
        assignment=jax.device_put(perm, setup.rep), matched=jax.device_put(np.asarray(True), setup.rep)))
    state, _ = setup.run(state, make_batch(1))
    assert setup.step._cache_size() == compiled_before
    np.testing.assert_array_equal(np.asarray(state.contrast.assignment), perm)
    # After matching, the assigned anchors are the permuted anchors.
    np.testing.assert_allclose(np.asarray(state.contrast.assigned_anchors()), np.asarray(setup.anchors)[perm],
                               rtol=1e-6)


@pytest.fixture(scope="module")
def multi():
    """The step on four devices, its batch laid out for them."""
    assert len(jax.devices()) == 4
    return Setup(devices=jax.devices())


def test_sharded_step_equals_single_device(setup, multi):
    """Four devices, each network's batch joined device by device, against one device and plain concatenation."""
    assert (multi.recipe.batch_groups, setup.recipe.batch_groups) == (4, 1)
    batches = [make_batch(0), make_batch(1)]
    single_state, multi_state = setup.init(), multi.init()
    for batch in batches:
        single_state, single_metrics = setup.run(single_state, batch)
        multi_state, multi_metrics = multi.run(multi_state, batch)
    single_metrics, multi_metrics = host(single_metrics), host(multi_metrics)
    for k in ("loss", "sup_gen", "unsup_pro", "con_labeled", "kept"):
        np.testing.assert_allclose(multi_metrics[k], single_metrics[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert max_abs_diff(host(single_state.gen_student.params), host(multi_state.gen_student.params)) < 1e-4
    assert max_abs_diff(host(single_state.pro_teacher.params), host(multi_state.pro_teacher.params)) < 1e-4


def test_contrastive_terms_wait_for_their_start(setup):
    state, m0 = setup.run(setup.init(), make_batch(0))
    m0 = host(m0)
    assert float(m0["con_labeled"]) == 0.0 and float(m0["con_unlabeled"]) == 0.0
    np.testing.assert_allclose(m0["loss"], m0["sup_gen"] + m0["sup_pro"] + m0["unsup_gen"] + m0["unsup_pro"],
                               rtol=1e-6)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host(state.gen_student.params)))
    _, m1 = setup.run(state, make_batch(1))
    m1 = host(m1)
    assert float(m1["con_labeled"]) > 0 and float(m1["con_unlabeled"]) > 0
    np.testing.assert_allclose(
        m1["loss"], m1["sup_gen"] + m1["sup_pro"] + m1["unsup_gen"] + m1["unsup_pro"]
        + setup.recipe.config.loss.contrastive_weight * (m1["con_labeled"] + m1["con_unlabeled"]), rtol=1e-5)


def test_sharded_step_moves_no_image_between_devices(multi):
    """Students' and teachers' joined inputs stay where they were loaded: the compiled program holds no
    collective-permute or all-to-all (a plain concatenation of the 4-device batches needs 44 and 7 here)."""
    state, batch = multi.init(), sharding.shard_batch(make_batch(0), multi.bat)
    text = multi.step.lower(multi.recipe, state, batch, None).compile().as_text()
    assert " all-reduce" in text  # the check sees collectives at all (BatchNorm statistics, gradients)
    assert " collective-permute" not in text and " all-to-all" not in text


def test_initial_state_is_compiled_onto_the_mesh_with_each_students_own_init(setup):
    parts = build(setup.parts.config, C, steps_per_epoch=0, mesh=sharding.make_mesh(jax.devices()))
    state = parts.init_state(setup.anchors)
    for leaf in jax.tree_util.tree_leaves(state):
        assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(parts.abstract_state())
    # Each student is what the network's own initialiser gives for its key (one vmapped initialiser for both).
    k_gen, k_pro = jax.random.split(jax.random.PRNGKey(parts.config.seed), 5)[:2]
    alone = jax.jit(lambda k: setup.model.init({"params": k, "dropout": k}, jnp.zeros((1, S, S, 3), jnp.uint8)))
    for net, k in ((state.gen_student, k_gen), (state.pro_student, k_pro)):
        assert max_abs_diff(host(net.variables), host(alone(k))) < 1e-6
    assert max_abs_diff(host(state.gen_student.params), host(state.pro_student.params)) > 1e-2
    np.testing.assert_array_equal(np.asarray(state.contrast.anchors), setup.anchors)
    # Teachers equal their students but own their buffers (a donated step may overwrite either).
    for teacher, student in ((state.gen_teacher, state.gen_student), (state.pro_teacher, state.pro_student)):
        assert max_abs_diff(host(teacher.variables), host(student.variables)) == 0
        for t, s in zip(jax.tree_util.tree_leaves(teacher), jax.tree_util.tree_leaves(student)):
            assert (t.addressable_shards[0].data.unsafe_buffer_pointer()
                    != s.addressable_shards[0].data.unsafe_buffer_pointer())


def test_save_restore_continues_the_same_trajectory(setup, tmp_path):
    batches = [make_batch(i) for i in range(3)]
    state = setup.init()
    for batch in batches:
        state, metrics = setup.run(state, batch)
    uninterrupted = host(state)

    state = setup.init()
    for batch in batches[:2]:
        state, _ = setup.run(state, batch)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(2, state, {"step": 2})
    ckpt.wait()
    abstract = checkpoint.abstract_like(setup.init(), setup.rep)
    restored, meta = ckpt.restore(abstract)
    ckpt.close()
    assert meta["step"] == 2 and int(restored.step) == 2
    restored, _ = setup.run(restored, batches[2])
    resumed = host(restored)
    assert max_abs_diff(uninterrupted, resumed) == 0.0


@functools.lru_cache(maxsize=None)
def other_mode(mode):
    return Setup(mode=mode)


@pytest.mark.parametrize("mode", ["supervised", "mean_teacher"])
def test_baseline_modes(mode):
    st = other_mode(mode)
    state = st.init()
    assert state.pro_student is None and state.contrast is None
    s0 = host(state)
    state, metrics = st.run(state, make_batch(0))
    s1 = host(state)
    assert max_abs_diff(s0.gen_student.params, s1.gen_student.params) > 1e-6
    if mode == "supervised":
        assert s1.gen_teacher is None and "unsup_gen" not in metrics
        np.testing.assert_allclose(metrics["loss"], metrics["sup_gen"])
    else:
        expected = jax.tree_util.tree_map(lambda t, s: 0.99 * t + 0.01 * s, s0.gen_teacher.params,
                                          s1.gen_student.params)
        assert max_abs_diff(expected, s1.gen_teacher.params) < 1e-6
        np.testing.assert_allclose(metrics["loss"], metrics["sup_gen"] + metrics["unsup_gen"], rtol=1e-6)
