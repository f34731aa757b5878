"""Every command from the real command line: a bad input, a damaged file or a diverged run ends in one `error:` line
that names the file or field, with its documented exit status (stpg_jax.cli), and leaves the work directory as it
was; a damaged latest checkpoint is passed over for the newest intact one; SIGTERM / Ctrl-C exit with status 3."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from stpg_jax import cli
from cli_cases import CACHE, CONFIG, REPO, command, environment, launch, one_error, snapshot

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
    source.write_bytes(np.random.default_rng(0).bytes(4096))
    out.write_bytes(b"an earlier result")
    one_error(command(tmp_path, "-m", "stpg_jax.convert_weights", source, out), "exists", out)
    assert out.read_bytes() == b"an earlier result"
    one_error(command(tmp_path, "-m", "stpg_jax.convert_weights", source, tmp_path / "new.npz"), "source", source)
    assert not (tmp_path / "new.npz").exists()


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
