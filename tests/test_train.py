"""The training loop end to end on the embedded data: checkpoints, exact resume, SIGTERM, NaN tripwire, events."""

import glob
import json
import os
import signal

import numpy as np
import pytest

from stpg_jax import checkpoint, train
from stpg_jax.config import base_config

pytestmark = pytest.mark.usefixtures("one_device_runs")  # tests/conftest.py: the loop's runs on one device


def loop_config(**overrides):
    c = base_config()
    c.data.synthetic.update(num_labeled=8, num_unlabeled=16, num_val=3, height=40, width=48)
    c.data.update(crop_size=32, batch_labeled=4, batch_unlabeled=4, workers=0)
    # No dropout: each image's mask depends on how the batch is laid out over the devices, and the two-process run
    # (4 devices) is compared with the one-device run.
    c.model.update(stage_blocks=(1, 1, 1, 1), width=8, aspp_channels=16, decoder_channels=16, low_level_channels=8,
                   proj_dim=16, proj_dropout=0.0)
    c.schedule.total_steps = 4
    c.stpg.update(anchor_steps=100, bank_k=2, bank_start_epoch=0, contrastive_start_epoch=0,
                  proximity_start_epoch=1, matching_freeze_epoch=1)
    c.eval.update(window=32, windows_per_batch=4, max_images=3)
    c.log_every_steps = 1
    c.checkpoint_every_steps = 100
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def gen_params(workdir):
    _, variables, _ = checkpoint.load_gen_student(str(workdir))
    return variables


def flat(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    result = train.train_and_evaluate(loop_config(), str(workdir))
    return workdir, result


def test_run_writes_checkpoint_events_split_and_eval(uninterrupted):
    workdir, result = uninterrupted
    assert 0.0 <= result["miou"] <= 1.0 and result["iou"].shape == (11,)
    assert os.path.isdir(workdir / "checkpoints" / "4")
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert (workdir / "split_labeled.txt").exists()
    record = json.loads((workdir / "eval_4.json").read_text())
    assert record["step"] == 4 and set(record["iou"]) >= {"road", "pole", "pedestrian"}
    assert record["images"] == 3  # the val images scored (num_val 3, eval.max_images 3)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["schedule"]["total_steps"] == 4


def test_interrupted_run_resumes_the_same_trajectory(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    stopped = train.train_and_evaluate(loop_config(), str(tmp_path), max_steps=2)
    assert stopped == {"stopped_at": 2}
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 2
    train.train_and_evaluate(loop_config(), str(tmp_path))
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 4
    for a, b in zip(flat(gen_params(full_dir)), flat(gen_params(tmp_path))):
        np.testing.assert_array_equal(a, b)


def test_speculative_matching_follows_the_plain_loop_bit_for_bit(tmp_path, monkeypatch):
    # One device, as every run here. Each of the 4 steps uses the matching of its own prototypes (the release's
    # same-step timing): the first always runs again (its guess is the unmatched state); a step is dispatched ahead of
    # the previous step's check unless that one changed the assignment. Logging only at the end: a log step reads the
    # step's final metrics, so the next one waits for its check.
    ahead = train.train_and_evaluate(loop_config(log_every_steps=4), str(tmp_path / "ahead"))
    m = ahead["matching"]
    assert m["reruns"] == m["changes"] >= 1
    assert m["ahead"] >= 1 or m["changes"] >= 3  # only a change in every step but the last leaves none ahead
    # The plain loop runs the same compiled program (one that keeps its input): donating or not changes no number.
    from stpg_jax import build

    monkeypatch.setattr(build.Parts, "donates_state", property(lambda self: False))
    plain = train.train_and_evaluate(loop_config(log_every_steps=4, **{"stpg.speculative_matching": False}),
                                     str(tmp_path / "plain"))
    assert plain["matching"]["ahead"] == 0
    # The same trajectory: the same matchings (after each step, the last one before the final checkpoint).
    assert plain["matching"]["runs"] == ahead["matching"]["runs"] == 4
    assert plain["matching"]["changes"] == ahead["matching"]["changes"] >= 1
    for a, b in zip(flat(gen_params(tmp_path / "ahead")), flat(gen_params(tmp_path / "plain"))):
        np.testing.assert_array_equal(a, b)


def test_steps_start_ahead_of_the_matching_on_one_device_only(uninterrupted):
    # A run on one device may start steps ahead (test_speculative_matching_...); on several CPU devices two steps in
    # flight can hang in XLA's CPU collectives, so a run there matches plainly (as the two-process test's runs do).
    import jax

    from stpg_jax import build, sharding

    m = uninterrupted[1]["matching"]  # logging every step: each step waits for the previous one's check
    assert m["runs"] == 4 and m["reruns"] == m["changes"] >= 1
    for devices, speculates in ((jax.devices()[:1], True), (jax.devices(), False)):
        parts = build.build(loop_config(), 11, steps_per_epoch=0, mesh=sharding.make_mesh(devices))
        assert (parts.speculates, parts.donates_state) == (speculates, False), len(devices)


def test_resume_refuses_another_config(uninterrupted):
    workdir, _ = uninterrupted
    with pytest.raises(ValueError, match=r"model\.width"):
        train.train_and_evaluate(loop_config(**{"model.width": 16}), str(workdir))


def test_a_run_in_the_same_process_reuses_the_compiled_step_only_for_the_same_step(tmp_path, monkeypatch):
    import jax

    from stpg_jax import train_step

    traced = []
    stpg_step = train_step.MODE_STEPS["stpg"]
    monkeypatch.setitem(train_step.MODE_STEPS, "stpg", lambda *args: traced.append(1) or stpg_step(*args))

    def trace(**overrides):
        """Traces the run's step for its shapes (where jit's cache has no trace of them), without lowering it."""
        t = train.Trainer(loop_config(**overrides), str(tmp_path / "run"))
        batch = next(train.make_train_loader(t.bundle, t.config.data, 0, 0, 1))
        batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=t.parts.batch_sharding)
                 for k, v in batch.items()}
        assignment = {"assignment": jax.ShapeDtypeStruct((11,), np.int32, sharding=t.parts.replicated),
                      "matched": jax.ShapeDtypeStruct((), bool, sharding=t.parts.replicated)}
        t.parts.jitted_step().trace(t.parts.recipe, t.parts.abstract_state(), batch, assignment)
        return len(traced)

    first = trace()
    assert trace(checkpoint_every_steps=1, **{"eval.max_images": 1, "stpg.speculative_matching": False},
                 log_every_steps=2) == first
    assert trace(**{"loss.contrastive_weight": 0.5}) == first + 1
    # Any other field the step reads makes another recipe, which jit traces anew (as the loss weight above).
    recipe = train.Trainer(loop_config(), str(tmp_path / "run")).parts.recipe
    for overrides in ({"optim.lr": 0.5}, {"schedule.total_steps": 5}, {"model.proj_dropout": 0.1},
                      {"stpg.ema_decay": 0.9}, {"data.crop_size": 48}):
        assert train.Trainer(loop_config(**overrides), str(tmp_path / "run")).parts.recipe != recipe, overrides
    # The backbone weights enter the initial state as arrays, not the step through their file's path.
    from stpg_jax.build import build

    assert build(loop_config(**{"model.pretrained": "w.npz"}), 11, 0).recipe == build(loop_config(), 11, 0).recipe


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_returns(tmp_path, monkeypatch, signum):
    # The signal arrives while the first batch is loaded: the run must finish that step, save it and return.
    make_loader = train.make_train_loader

    def loader_that_signals(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        fetch = loader.__next__

        class Signalling:
            def __getattr__(self, name):
                return getattr(loader, name)

            def __next__(self):
                if not hasattr(self, "sent"):
                    self.sent = True
                    os.kill(os.getpid(), signum)
                return fetch()

        return Signalling()

    monkeypatch.setattr(train, "make_train_loader", loader_that_signals)
    before = signal.getsignal(signum)
    result = train.train_and_evaluate(loop_config(), str(tmp_path))
    assert result == {"stopped_at": 1, "signal": signal.Signals(signum).name}  # launch.py: exit status 3
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 1
    assert signal.getsignal(signum) is before  # the caller's handler is back


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # The third step starts from parameters gone NaN (as after a blow-up), so its loss is NaN: the run must stop
    # without saving that state. The step is the uninterrupted run's compiled program; only its input is spoiled.
    import jax

    compile_step = train.Trainer.compile_step

    def spoiling_third_step(self):
        step_fn = compile_step(self)

        def run(state, batch, assignment):
            if int(state.step) == 2:  # the third step, also when it runs again with its own matching
                params = jax.tree_util.tree_map(lambda x: x * np.nan, state.pro_student.params)
                state = state.replace(pro_student=state.pro_student.replace(params=params))
            return step_fn(state, batch, assignment)

        return run

    monkeypatch.setattr(train.Trainer, "compile_step", spoiling_third_step)
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step 3: .*last good checkpoint") as info:
        train.train_and_evaluate(loop_config(checkpoint_every_steps=1), str(tmp_path))
    assert "(step 2)" in str(info.value)
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 2
    # The kept checkpoint holds finite parameters.
    assert all(np.all(np.isfinite(x)) for x in flat(gen_params(tmp_path)))


def tiny_backbone_file(path):
    """ImageNet-style weights for loop_config's backbone, written as a converted .npz; returns them."""
    import jax

    from stpg_jax.models import ResNet
    from stpg_jax.models.pretrained import save_converted

    weights = ResNet((1, 1, 1, 1), 8, "deep").init(jax.random.PRNGKey(3), np.zeros((1, 32, 32, 3)), False)
    save_converted(str(path), weights["params"], weights["batch_stats"], stem="deep", stage_blocks=(1, 1, 1, 1),
                   width=8)
    return weights


def test_pretrained_backbone_goes_into_both_students_with_different_heads(tmp_path):
    import jax

    path = str(tmp_path / "backbone.npz")
    weights = tiny_backbone_file(path)
    trainer = train.Trainer(loop_config(**{"model.pretrained": path}), str(tmp_path / "run"))
    state = jax.device_get(trainer.init_state())
    for student in (state.gen_student, state.pro_student):
        for a, b in zip(flat(student.params["backbone"]), flat(weights["params"])):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(flat(student.batch_stats["backbone"]), flat(weights["batch_stats"])):
            np.testing.assert_array_equal(a, b)
    assert not np.allclose(state.gen_student.params["classifier"]["kernel"],
                           state.pro_student.params["classifier"]["kernel"])
    # Teachers start as copies of their students.
    for a, b in zip(flat(state.pro_teacher.params), flat(state.pro_student.params)):
        np.testing.assert_array_equal(a, b)


def test_missing_weights_fail_before_the_data_and_a_resumed_run_does_not_need_them(tmp_path, monkeypatch):
    path = tmp_path / "backbone.npz"
    tiny_backbone_file(path)
    config = loop_config(**{"model.pretrained": str(path)})
    assert train.train_and_evaluate(config, str(tmp_path / "run"), max_steps=2) == {"stopped_at": 2}
    started = gen_params(tmp_path / "run")
    os.remove(path)
    # Resumed: the state comes from the checkpoint, so the weights file is neither read nor needed.
    assert 0.0 <= train.train_and_evaluate(config, str(tmp_path / "run"))["miou"] <= 1.0
    assert checkpoint.Checkpointer(str(tmp_path / "run")).latest_step() == 4
    assert any(not np.array_equal(a, b) for a, b in zip(flat(started), flat(gen_params(tmp_path / "run"))))
    # A new run without its weights file stops before the dataset is read (or prepared), naming the field.
    monkeypatch.setattr(train, "_build_data_in_turn", lambda *a: pytest.fail("the data was built first"))
    with pytest.raises(FileNotFoundError, match=f"config.model.pretrained = '{path}': no such file"):
        train.train_and_evaluate(config, str(tmp_path / "new"))
    assert not (tmp_path / "new" / "config.json").exists()


def test_predict_from_the_work_directory_and_from_its_export(uninterrupted, tmp_path):
    from PIL import Image

    from stpg_jax import load_model, predict

    workdir, _ = uninterrupted
    model, variables, meta = load_model(str(workdir / "export"))
    assert meta["num_classes"] == 11 and meta["dataset_name"] == "synthetic"
    for a, b in zip(flat(variables["params"]), flat(gen_params(workdir)["params"])):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "frame.png")
    masks = {}
    for source in ("work", "export"):
        checkpoint_dir = workdir if source == "work" else workdir / "export"
        predictor = predict.load_predictor(str(checkpoint_dir))
        predict.predict(predictor, [str(tmp_path / "frame.png")], str(tmp_path / source), progress=False)
        mask = np.asarray(Image.open(tmp_path / source / "frame.png"))
        assert mask.shape == (40, 50) and mask.max() < 11
        assert (tmp_path / source / "frame_overlay.jpg").exists()
        masks[source] = mask
    np.testing.assert_array_equal(masks["work"], masks["export"])


def _two_processes(workdir, *args):
    """Runs tests/multiprocess_worker.py as processes 0 and 1 of one jax.distributed job; their RESULT lines."""
    import socket
    import subprocess
    import sys
    import tempfile

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
    cache = os.environ.get(
        "STPG_TEST_COMPILATION_CACHE", os.path.join(os.path.dirname(os.path.dirname(worker)), ".jax_cache")
    )
    # Each process writes to a file, not a pipe: a pipe read only after the other process has finished could fill
    # up and stall its writer, and with it the collectives the other process waits in.
    logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(workdir), *args],
            env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": str(i), "STPG_TEST_COMPILATION_CACHE": cache},
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        for i, log in enumerate(logs)
    ]
    try:
        for p in procs:
            p.wait(timeout=300)
    except subprocess.TimeoutExpired:
        timed_out = True
    else:
        timed_out = False
    finally:
        for p in procs:
            p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert not timed_out, "the two processes ran over 300 s:\n" + "\n".join(out[-2000:] for out in outputs)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    results = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    return results, outputs


def test_two_processes_stop_together_and_resume_on_one(tmp_path, capsys):
    # jax.distributed on the CPU: 2 processes x 2 devices, the same global batch as the one-device run. Process 1
    # alone receives SIGTERM while drawing the batch of step 2; saving is collective, so both must stop after step
    # 2 (after the evaluation every 2 steps, also collective). Process 0 then exports alone.
    results, outputs = _two_processes(tmp_path / "two", "2")
    stops = [(r["process_index"], r["process_count"], r.get("stopped_at")) for r in results]
    assert stops == [(0, 2, 2.0), (1, 2, 2.0)]
    assert "stopping (signal received by another process): checkpoint saved at step 2" in outputs[0]
    assert "step 1/4" in outputs[0] and "step 1/4" not in outputs[1]  # progress from process 0 only
    assert json.loads((tmp_path / "two" / "eval_2.json").read_text())["step"] == 2
    assert (tmp_path / "two" / "export_by_process_0" / "model.json").exists()
    # The two processes' state after step 2 is the one-device run's, up to the order of the cross-device sums.
    assert train.train_and_evaluate(loop_config(), str(tmp_path / "one"), max_steps=2) == {"stopped_at": 2}
    for a, b in zip(flat(gen_params(tmp_path / "one")), flat(gen_params(tmp_path / "two"))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    # The two-process checkpoint resumes here (one process, one device) and continues the one-device run's trajectory:
    # the same printed loss at step 3. (Later steps may part by more than rounding: the selection, the bank's
    # candidates and the matching are decisions, which a last-bit difference can flip for a pixel or a class.)
    def step3_line(workdir):
        capsys.readouterr()
        train.train_and_evaluate(loop_config(), str(workdir))
        return [line.split(" | ")[:4] for line in capsys.readouterr().out.splitlines() if line.startswith("step 3/4")]

    one, two = step3_line(tmp_path / "one"), step3_line(tmp_path / "two")
    assert len(two) == 1 and two == one, (one, two)  # step, loss, lr, kept
    assert checkpoint.Checkpointer(str(tmp_path / "two")).latest_step() == 4


def test_evaluate_command_reproduces_the_runs_own_evaluation(uninterrupted, tmp_path):
    import subprocess
    import sys

    workdir, _ = uninterrupted
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(repo, ".jax_cache"))
    out = tmp_path / "results" / "gen_student.json"
    result = subprocess.run([sys.executable, "-m", "stpg_jax.evaluate", f"--checkpoint={workdir}", f"--out={out}"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"gen_student of {workdir} at step 4: 3 synthetic val images, window 32" in result.stdout
    record, during = json.loads(out.read_text()), json.loads((workdir / "eval_4.json").read_text())
    assert (record["network"], record["step"], record["images"]) == ("gen_student", 4, 3)
    assert record["iou"] == during["iou"] and record["miou"] == during["miou"]
    confusion = np.asarray(record["confusion"])
    assert confusion.shape == (11, 11) and confusion.sum() == 3 * 40 * 48  # every val pixel, none ignored
    assert f"{'mIoU':<16} {100 * during['miou']:7.2f}" in result.stdout

    # All four networks of the run in one command, in a table of one column each.
    out = tmp_path / "results" / "all.json"
    result = subprocess.run([sys.executable, "-m", "stpg_jax.evaluate", f"--checkpoint={workdir}", "--network=all",
                             f"--out={out}"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    networks = json.loads(out.read_text())["networks"]
    assert list(networks) == ["gen_student", "pro_student", "gen_teacher", "pro_teacher"]
    assert networks["gen_student"]["iou"] == during["iou"]
    assert networks["pro_teacher"]["confusion"] != networks["gen_student"]["confusion"]
    assert result.stdout.count("the first batch compiles the network") == 1
    header = next(line for line in result.stdout.splitlines() if line.startswith("class"))
    assert header.split() == ["class", "gen_student", "pro_student", "gen_teacher", "pro_teacher"]


def test_evaluate_a_chosen_network_and_the_export(uninterrupted):
    from stpg_jax import evaluate, predict
    from stpg_jax.data import build_data

    workdir, _ = uninterrupted
    val = build_data(loop_config().data).val
    results = {}
    for name, source, network in (("gen", workdir, "gen_student"), ("export", workdir / "export", "gen_student"),
                                  ("pro_teacher", workdir, "pro_teacher")):
        predictor = predict.load_predictor(str(source), network=network)
        run, variables = predictor.window_predictor()
        results[name] = evaluate.evaluate(run, variables, val, 11, progress=False)["confusion"]
    np.testing.assert_array_equal(results["gen"], results["export"])
    assert not np.array_equal(results["gen"], results["pro_teacher"])  # another network, other predictions
    with pytest.raises(ValueError, match="holds its Gen-Student alone"):
        predict.load_predictor(str(workdir / "export"), network="pro_teacher")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3 .* it holds steps \[4\]"):
        checkpoint.load_network(str(workdir), step=3)
    with pytest.raises(ValueError, match="network must be one of"):
        checkpoint.load_network(str(workdir), network="teacher")


def test_evaluation_of_teachers_beside_the_gen_student(uninterrupted, tmp_path):
    import shutil

    workdir, first = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    # The run is finished: started again, it evaluates its last state only, now with two teachers besides.
    config = loop_config(**{"eval.networks": ("gen_student", "gen_teacher", "pro_teacher")})
    result = train.train_and_evaluate(config, str(copy))
    np.testing.assert_array_equal(result["confusion"], first["confusion"])  # the returned result: the Gen-Student's
    record = json.loads((copy / "eval_4.json").read_text())
    assert list(record["networks"]) == ["gen_student", "gen_teacher", "pro_teacher"]
    assert record["networks"]["gen_student"]["iou"] == record["iou"]
    assert record["networks"]["pro_teacher"] != record["networks"]["gen_student"]
    events = b"".join(p.read_bytes() for p in (copy / "tensorboard").glob("events.out.tfevents.*"))
    assert b"eval/pro_teacher/miou" in events and b"eval/gen_teacher/iou/road" in events
