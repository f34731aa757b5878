"""What tests/test_errors*.py share: commands run as a user runs them, and the checks of their one error line."""

import os
import pathlib
import shutil
import subprocess
import sys

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


def train_tiny_run(tmp_path_factory):
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


