"""Every command from the real command line: a bad input, a damaged file or a diverged run ends in one `error:` line
that names the file or field, with its documented exit status (stpg_jax.cli), and leaves the work directory as it
was; a damaged latest checkpoint is passed over for the newest intact one; SIGTERM / Ctrl-C exit with status 3."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from stpg_jax import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
CACHE = os.environ.get("STPG_TEST_COMPILATION_CACHE", str(REPO / ".jax_cache"))
# The smallest run the CLI trains (tests/test_train.py's loop_config as config-string overrides), supervised: one
# network, the cheapest step to compile. Three steps, a checkpoint after each.
TINY = ",".join([
    "mode=supervised", "data.synthetic.num_labeled=8", "data.synthetic.num_unlabeled=16", "data.synthetic.num_val=3",
    "data.synthetic.height=40", "data.synthetic.width=48", "data.crop_size=32", "data.batch_labeled=4",
    "data.batch_unlabeled=4", "model.width=8", "model.aspp_channels=16", "model.decoder_channels=16",
    "model.low_level_channels=8", "model.proj_dim=16", "schedule.total_steps=3", "eval.window=32",
    "eval.max_images=3", "log_every_steps=1", "checkpoint_every_steps=1", "keep_checkpoints=3",
])
CONFIG = f"--config={REPO}/configs/demo.py:1_8,{TINY}"


def environment():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # one CPU device; see tests/conftest.py
    env["PYTHONUNBUFFERED"] = "1"  # progress lines as they are printed
    return env


def command(cwd, *args):
    """``args`` (a script path or ``-m module`` first) as a command of its own; its CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=environment(), capture_output=True,
                          text=True, timeout=600)


def launch(cwd, *args):
    return command(cwd, REPO / "launch.py", *args, f"--compilation_cache={CACHE}")


def one_error(result, *needles, status=cli.EXIT_ERROR):
    """The single `error:` line of a failed command, which names each of ``needles``; no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == status, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert str(needle) in errors[0], errors[0]
    return errors[0]


def snapshot(root):
    """Every file under ``root`` with its bytes (None: ``root`` does not exist)."""
    root = pathlib.Path(root)
    if not root.exists():
        return None
    if root.is_file():
        return root.read_bytes()
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished three-step run, trained through launch.py: checkpoints 1, 2 and 3. Tests that damage it copy it."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    result = launch(workdir.parent, CONFIG, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]
    return workdir


def copy_of(workdir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    return copy


# ---- bad input that fails before anything is read or compiled ------------------------------------------------------

@pytest.mark.parametrize("config,needles", [
    (f"--config={REPO}/configs/nonexistent.py", ["no such config file", "configs/nonexistent.py"]),
    # In the config string, a value of the wrong type names its field (not Python's parser).
    (f"--config={REPO}/configs/demo.py:1_8,optim.lr=abc", ["optim.lr", "abc", "float"]),
    (f"--config={REPO}/configs/demo.py:1_8,optim.lrr=0.1", ["optim.lrr", "allowed", "'lr'"]),
    (f"--config={REPO}/configs/demo.py:1_3", ["1_3", "1_16", "full"]),
    # A count of zero would divide by zero deep inside the run.
    (f"--config={REPO}/configs/demo.py:1_8,log_every_steps=0", ["config.log_every_steps", "at least 1"]),
])
def test_config_mistakes_are_named(tmp_path, config, needles):
    result = launch(tmp_path, config, f"--workdir={tmp_path}/w")
    one_error(result, *needles)
    assert "malformed node" not in result.stderr
    assert not (tmp_path / "w").exists()  # nothing written


def test_unwritable_work_directories_are_refused_before_anything_is_written(tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # Root writes into a read-only folder anyway; /sys refuses new files even to root.
    unwritable = "/sys/stpg_jax_test" if os.geteuid() == 0 else locked / "w"
    for workdir, needles in [(tmp_path / "a_file", ["is a file", "a_file"]),
                             (tmp_path / "a_file" / "w", ["under a file", "a_file"]),
                             (unwritable, ["cannot be written", unwritable])]:
        result = launch(tmp_path, CONFIG, f"--workdir={workdir}")
        one_error(result, *needles)
        assert (tmp_path / "a_file").read_text() == "keep me"
        assert not os.path.exists(workdir) or workdir == tmp_path / "a_file"
    assert os.listdir(locked) == []


def _refused_pickle(path, marker):
    import pickle

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps({"conv1.weight": RunsCode()}))


@pytest.mark.parametrize("name", ["random.bin", "random.npz", "random.pth", "refused_pickle.pth"])
def test_unusable_pretrained_weights_are_named(tmp_path, name):
    path, marker = tmp_path / name, tmp_path / "code_ran"
    if name.startswith("random"):
        path.write_bytes(os.urandom(4096))
    else:
        _refused_pickle(path, marker)
    result = launch(tmp_path, f"{CONFIG},model.pretrained={path}", f"--workdir={tmp_path}/w")
    one_error(result, "config.model.pretrained", path)
    assert not marker.exists()  # the pickle's code did not run
    assert not (tmp_path / "w").exists()


def test_prepare_refuses_an_empty_split_list(tmp_path):
    root = tmp_path / "camvid"
    for sub in ("train", "trainannot", "val", "valannot"):
        (root / sub).mkdir(parents=True)
    (root / "train.txt").write_text("")
    before = snapshot(root)
    result = command(tmp_path, "-m", "stpg_jax.data.prepare", "--dataset", "camvid", "--manual_dir", root,
                     "--data_dir", tmp_path / "tfds")
    one_error(result, "train split is empty", root / "train.txt")
    assert "No examples were yielded" not in result.stderr
    assert snapshot(root) == before
    result = command(tmp_path, "-m", "stpg_jax.data.prepare", "--dataset", "camvid")
    one_error(result, "--manual_dir")  # argparse's mistakes as one line too


def test_convert_weights_refuses_unreadable_source_and_existing_output(tmp_path):
    source, out = tmp_path / "random.pth", tmp_path / "out.npz"
    source.write_bytes(os.urandom(4096))
    out.write_bytes(b"an earlier result")
    one_error(command(tmp_path, "-m", "stpg_jax.convert_weights", source, out), "exists", out)
    assert out.read_bytes() == b"an earlier result"
    one_error(command(tmp_path, "-m", "stpg_jax.convert_weights", source, tmp_path / "new.npz"), "source", source)
    assert not (tmp_path / "new.npz").exists()


# ---- arguments of evaluate and predict on a trained work directory -------------------------------------------------

@pytest.mark.parametrize("module,args,needles", [
    ("evaluate", ["--step=-5"], ["--step=-5"]),
    ("evaluate", ["--step=7"], ["step 7", "[1, 2, 3]"]),
    ("evaluate", ["--network=teacher"], ["'teacher'", "gen_student"]),
    ("evaluate", ["--out=existing.json"], ["exists", "existing.json"]),
    ("predict", ["--images=empty", "--out=masks"], ["no images", "empty"]),  # a folder holding no images
    ("predict", ["--images=empty", "--out=existing.json"], ["existing file", "existing.json"]),
    ("evaluate", ["--checkpoint=nowhere"], ["no such directory", "nowhere"]),
])
def test_evaluate_and_predict_arguments_are_named(trained, tmp_path, module, args, needles):
    (tmp_path / "empty").mkdir()
    (tmp_path / "existing.json").write_text("an earlier result")
    before = snapshot(trained)
    result = command(tmp_path, "-m", f"stpg_jax.{module}", f"--checkpoint={trained}", *args)  # the last one wins
    one_error(result, *needles)
    assert snapshot(trained) == before
    assert (tmp_path / "existing.json").read_text() == "an earlier result"
    assert not (tmp_path / "masks").exists()


# ---- damaged files in a work directory -----------------------------------------------------------------------------

def damage(checkpoint_dir, how):
    """Damages one checkpoint as a full disk, a killed copy or a careless hand would."""
    if how == "truncated":  # each array data file cut to its first 100 bytes
        for p in (checkpoint_dir / "state").rglob("*"):
            if p.is_file() and p.parent.name == "d":
                p.write_bytes(p.read_bytes()[:100])
    elif how == "emptied":
        for p in checkpoint_dir.rglob("*"):
            if p.is_file():
                p.write_bytes(b"")
    elif how == "no_state":
        shutil.rmtree(checkpoint_dir / "state")


@pytest.mark.parametrize("how", ["truncated", "emptied", "no_state"])
def test_a_damaged_checkpoint_asked_for_by_step_is_named(trained, tmp_path, how):
    workdir = copy_of(trained, tmp_path)
    damage(workdir / "checkpoints" / "3", how)
    before = snapshot(workdir)
    result = command(tmp_path, "-m", "stpg_jax.evaluate", f"--checkpoint={workdir}", "--step=3")
    one_error(result, workdir / "checkpoints" / "3", "damaged")
    assert snapshot(workdir) == before


def test_evaluate_passes_over_a_damaged_latest_checkpoint_and_says_so(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    damage(workdir / "checkpoints" / "3", "emptied")
    before = snapshot(workdir)
    result = command(tmp_path, "-m", "stpg_jax.evaluate", f"--checkpoint={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{workdir}/checkpoints/3 is damaged" in warnings[0], result.stderr[-3000:]
    assert f"gen_student of {workdir} at step 2" in result.stdout
    assert snapshot(workdir) == before  # a reading command moves nothing


def test_invalid_config_json_and_another_model_width_are_refused(trained, tmp_path):
    before = snapshot(trained)
    one_error(launch(tmp_path, CONFIG.replace("model.width=8", "model.width=16"), f"--workdir={trained}"),
              "model.width", "8 in the checkpoint, 16 now")
    assert snapshot(trained) == before
    workdir = copy_of(trained, tmp_path)
    (workdir / "config.json").write_text('{"mode": "supervised", ')
    before = snapshot(workdir)
    one_error(launch(tmp_path, CONFIG, f"--workdir={workdir}"), workdir / "config.json", "not valid JSON")
    one_error(command(tmp_path, "-m", "stpg_jax.evaluate", f"--checkpoint={workdir}"), workdir / "config.json")
    assert snapshot(workdir) == before


def test_resume_passes_over_a_damaged_latest_checkpoint_and_keeps_it_aside(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    damage(workdir / "checkpoints" / "3", "truncated")
    damaged = snapshot(workdir / "checkpoints" / "3")
    result = launch(tmp_path, CONFIG, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stdout.splitlines() if "is damaged" in line)
    assert f"{workdir}/checkpoints/3" in warning and "resuming from step 2" in warning
    assert snapshot(workdir / "damaged_checkpoints" / "3") == damaged  # moved, byte for byte, not deleted
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]  # step 3 trained and saved again
    # Every checkpoint damaged: refused, naming each, and nothing moved or written.
    for step in ("1", "2", "3"):
        damage(workdir / "checkpoints" / step, "no_state")
    before = snapshot(workdir)
    one_error(launch(tmp_path, CONFIG, f"--workdir={workdir}"), *(workdir / "checkpoints" / s for s in "123"))
    assert snapshot(workdir) == before


# ---- runs that stop: interrupted, diverged -------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_run_checkpoints_and_exits_with_its_own_status(tmp_path, signum):
    workdir = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), CONFIG, f"--workdir={workdir}",
                             f"--compilation_cache={CACHE}"], cwd=tmp_path, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # This line comes once the signal handlers are in place and long before the first step has run.
        for line in proc.stdout:
            if line.startswith("stpg_jax: mode="):
                proc.send_signal(signum)
                break
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-3000:]
    assert f"stopping ({signal.Signals(signum).name}): checkpoint saved at step 1" in out
    assert os.listdir(workdir / "checkpoints") == ["1"]


def test_a_run_that_diverges_before_its_first_checkpoint_writes_none(tmp_path):
    # An infinite learning rate: the first step's loss (before its update) is finite, its updated parameters are not.
    workdir = tmp_path / "w"
    result = launch(tmp_path, f"{CONFIG},optim.lr=1e400", f"--workdir={workdir}")
    line = one_error(result, "non-finite", "gen_student", "after step 1", status=cli.EXIT_DIVERGED)
    assert "no checkpoint was written yet" in line and "last good checkpoint" not in line
    assert os.listdir(workdir / "checkpoints") == []
