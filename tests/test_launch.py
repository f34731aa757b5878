"""launch.py from the command line: one clear line on stderr for missing data, unknown keys and unknown splits."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def launch(tmp_path, *args, **extra_env):
    """launch.py in a subprocess on one CPU device; ``extra_env`` adds (or, with None, removes) variables."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    for name, value in extra_env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    # Run from an empty directory so the config's relative data.root (data/voc) cannot exist.
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_clear_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], result.stderr
    return errors[0]


def test_missing_voc_data_names_the_expected_directory(tmp_path):
    # A random init: the weights file would be missing too, and is checked first.
    result = launch(tmp_path, f"--config={REPO}/configs/voc_blender.py:1_4,model.pretrained=",
                    f"--workdir={tmp_path}/w")
    line = assert_one_clear_error(result, "data/voc")
    assert "does not exist" in line or "not found" in line
    # absl/tfds INFO and warning chatter stays off the console.
    assert [l for l in result.stderr.splitlines() if l.strip()] == [line], result.stderr


@pytest.mark.parametrize("override,key", [("--config.no_such_key=1", "no_such_key")])
def test_unknown_override_key_is_named(tmp_path, override, key):
    result = launch(tmp_path, f"--config={REPO}/configs/voc_blender.py:1_4", f"--workdir={tmp_path}/w", override)
    assert_one_clear_error(result, key, "allowed")


def test_mistyped_split_names_the_allowed_splits(tmp_path):
    result = launch(tmp_path, f"--config={REPO}/configs/voc_blender.py:1_5", f"--workdir={tmp_path}/w")
    assert_one_clear_error(result, "1_5", "1_16", "1_8", "1_4", "1_2", "full")


def test_compilation_cache_folder():
    from stpg_jax.host import compilation_cache_dir

    assert compilation_cache_dir("default", "runs/a", {}) == os.path.join("runs/a", "xla_cache")
    assert compilation_cache_dir("/cache/xla", "runs/a", {}) == "/cache/xla"
    assert compilation_cache_dir("", "runs/a", {}) is None
    # JAX reads JAX_COMPILATION_CACHE_DIR itself; the flag does not override it.
    env = {"JAX_COMPILATION_CACHE_DIR": "/shared/xla"}
    assert compilation_cache_dir("default", "runs/a", env) == compilation_cache_dir("", "runs/a", env) == "/shared/xla"


def test_incomplete_multi_process_environment_is_named(tmp_path):
    # JAX itself reads only the address from the environment; the process count and index must come with it.
    result = launch(tmp_path, f"--config={REPO}/configs/demo.py", f"--workdir={tmp_path}/w",
                    JAX_COORDINATOR_ADDRESS="localhost:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=None)
    assert_one_clear_error(result, "JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID")
    assert not (tmp_path / "w").exists()  # nothing written


def test_malformed_process_variables_are_named(monkeypatch):
    from stpg_jax import sharding

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(sharding.LaunchError, match="JAX_NUM_PROCESSES = 'two': expected an integer"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(sharding.LaunchError, match="0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES"):
        sharding.maybe_initialize_distributed()


def test_batch_not_divisible_by_the_devices_is_one_line(tmp_path):
    result = launch(tmp_path, f"--config={REPO}/configs/demo.py:1_8,data.batch_labeled=3", f"--workdir={tmp_path}/w",
                    XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert_one_clear_error(result, "config.data.batch_labeled = 3", "2 devices")


def clear_launcher_variables(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("env,initialized", [
    # An sbatch script's own shell: several tasks allocated, but no srun step: one process.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, False),
    # Inside `srun -n 4`: JAX's SLURM detection takes over.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "node[1-2]",
      "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NODELIST": "node1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, False),
    # Open MPI with several ranks: JAX's detection takes over (without the ORTE URI it fails: the test below).
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, False),  # mpirun -n 1
    ({}, False),
])
def test_scheduler_environments_decide_whether_to_initialize(monkeypatch, env, initialized):
    import jax

    from stpg_jax import sharding

    clear_launcher_variables(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(a))
    sharding.maybe_initialize_distributed()
    assert calls == ([()] if initialized else [])


def test_a_launch_jax_cannot_complete_names_the_variables_to_set(monkeypatch):
    import jax

    from stpg_jax import sharding

    clear_launcher_variables(monkeypatch)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")

    def no_cluster(*args, **kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(sharding.LaunchError, match=r"an srun step started 4 processes, .*coordinator_address should "
                                                   r"be defined.*JAX_NUM_PROCESSES=\$SLURM_NTASKS and "
                                                   r"JAX_PROCESS_ID=\$SLURM_PROCID"):
        sharding.maybe_initialize_distributed()


def test_open_mpi_without_its_orte_uri_asks_for_the_jax_variables(tmp_path):
    # Open MPI 5 sets no OMPI_MCA_orte_hnp_uri: JAX's own detection finds no coordinator, and the line says what to set.
    result = launch(tmp_path, f"--config={REPO}/configs/demo.py", f"--workdir={tmp_path}/w", OMPI_COMM_WORLD_SIZE="2",
                    OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_LOCAL_RANK="0", OMPI_MCA_orte_hnp_uri=None,
                    JAX_COORDINATOR_ADDRESS=None)
    assert_one_clear_error(result, "Open MPI started 2 processes", "OMPI_MCA_orte_hnp_uri",
                           "JAX_PROCESS_ID=$OMPI_COMM_WORLD_RANK")
    assert not (tmp_path / "w").exists()  # nothing written
