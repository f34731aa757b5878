"""Commands on a trained work directory: evaluate and predict arguments, damaged checkpoints asked for or passed over,
invalid run files (split from tests/test_errors.py so that the two run on separate test workers)."""

import os
import shutil

import pytest

from cli_cases import CONFIG, command, copy_of, launch, one_error, snapshot, train_tiny_run



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished three-step run, trained through launch.py: checkpoints 1, 2 and 3. Tests that damage it copy it."""
    return train_tiny_run(tmp_path_factory)


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

