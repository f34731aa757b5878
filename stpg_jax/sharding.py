"""Data parallelism: one 1-D 'data' mesh over every device of every host; batches split, state replicated."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stpg_jax.config import ConfigError


class LaunchError(ValueError):
    """A multi-process launch described by the environment in a way that cannot work."""


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name} = {value!r}: expected an integer") from None


# Launchers that start the processes themselves: the variable holding how many, the variables to hand to JAX_* where
# JAX finds no coordinator in theirs, and where JAX looks for it.
_LAUNCHERS = (
    ("an srun step", "SLURM_STEP_NUM_TASKS", "$SLURM_NTASKS", "$SLURM_PROCID", "SLURM_STEP_NODELIST"),
    ("Open MPI", "OMPI_COMM_WORLD_SIZE", "$OMPI_COMM_WORLD_SIZE", "$OMPI_COMM_WORLD_RANK",
     "OMPI_MCA_orte_hnp_uri, which Open MPI 5 no longer sets"),
)


def maybe_initialize_distributed() -> None:
    """Calls jax.distributed.initialize() when the run was launched on several processes. Must run before any other
    JAX call that touches a device.

    Two ways to say so: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` set for every process (optionally ``JAX_LOCAL_DEVICE_IDS``), or an ``srun`` step / Open MPI
    launch of more than one task, whose variables JAX reads itself. One process: no call, no coordinator (a batch
    script's own shell has no step, so a plain `python launch.py` there stays one process).
    """
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    given = [n for n in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if n in os.environ]
    if address and len(given) == 2:
        num, pid = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        if num < 1 or not 0 <= pid < num:
            raise LaunchError(
                f"JAX_NUM_PROCESSES = {num} and JAX_PROCESS_ID = {pid}: expected JAX_NUM_PROCESSES >= 1 and "
                "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES"
            )
        jax.distributed.initialize(address, num, pid)  # JAX reads neither the count nor the index itself
        return
    launcher = next((entry for entry in _LAUNCHERS if entry[1] in os.environ and _env_int(entry[1]) > 1), None)
    if not (address or launcher):
        return
    try:
        jax.distributed.initialize()  # JAX's cluster detection fills in what the environment does not say
    except ValueError as e:  # no cluster JAX knows completes the description; raised before anything starts
        if address:
            missing = " and ".join(sorted({"JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} - set(given)))
            raise LaunchError(
                f"JAX_COORDINATOR_ADDRESS = {address!r} is set but {missing} not: a multi-process launch outside "
                "SLURM / Open MPI needs JAX_NUM_PROCESSES (the number of processes) and JAX_PROCESS_ID "
                "(0 .. JAX_NUM_PROCESSES - 1) in every process"
            ) from None
        name, count, size, rank, where = launcher
        raise LaunchError(
            f"{name} started {os.environ[count]} processes, but JAX finds no coordinator (it looks in {where}; JAX "
            f"says: {str(e).rstrip('.')}); set JAX_COORDINATOR_ADDRESS=<host of process 0>:<free port>, "
            f"JAX_NUM_PROCESSES={size} and JAX_PROCESS_ID={rank} instead"
        ) from None


def wait_for_processes(name: str, timeout_s: int = 3600) -> None:
    """A barrier of every process of the run through JAX's coordination service (not a device collective). For what
    each process compiles at its own pace before a collective: a CPU run's collectives (gloo) give up when a process
    arrives 30 s after another, with no setting to wait longer, and processes that share a host's cores can finish
    compiling the step further apart than that. One process: returns at once."""
    if jax.process_count() == 1:
        return
    # The coordination client (private): jax.experimental.multihost_utils' barrier is itself a device collective.
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def make_mesh(devices=None) -> Mesh:
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def check_divisible(config, mesh: Mesh) -> None:
    """Global batch sizes must split evenly over the devices; the learning rate is never rescaled."""
    n = mesh.devices.size
    for name in ("batch_labeled", "batch_unlabeled"):
        value = config.data[name]
        if value % n:
            raise ConfigError(
                f"config.data.{name} = {value} is a global batch size and must be divisible by the {n} devices in "
                f"use; choose a multiple of {n} (the learning rate stays the config's, for the global batch)"
            )


def concat_local(parts, groups: int):
    """``jnp.concatenate(parts)`` along the batch axis, laid out so that no image changes device.

    Under a mesh that splits the batch axis into ``groups`` equal shards (one per device), shard ``d`` of the result
    holds shard ``d`` of each part, in the order of ``parts``: ``[a_d, b_d, ...]``. A plain concatenation would give
    device ``d`` the ``d``-th slice of ``[a, b, ...]``, whose images live on other devices, and XLA would move them
    there (and move the network's outputs back when they are split). For ``groups == 1`` this is the plain
    concatenation; otherwise the images stand in another order, which ``split_local`` undoes exactly. Every part's
    batch size must be divisible by ``groups``.
    """
    if groups == 1:
        return jnp.concatenate(parts)
    for p in parts:
        if p.shape[0] % groups:
            raise ValueError(f"concat_local: a batch of {p.shape[0]} does not split into {groups} equal shards")
    grouped = [p.reshape(groups, p.shape[0] // groups, *p.shape[1:]) for p in parts]
    joined = jnp.concatenate(grouped, axis=1)
    return joined.reshape(-1, *joined.shape[2:])


def group_ids(sizes, groups: int) -> tuple:
    """The input index (0, 1, ...) of each sample of ``concat_local`` of parts of batch sizes ``sizes``: static, for
    BatchNorm statistics per input (``models.batchnorm``)."""
    if groups == 1:
        return tuple(i for i, n in enumerate(sizes) for _ in range(n))
    one_shard = [i for i, n in enumerate(sizes) for _ in range(n // groups)]
    return tuple(one_shard * groups)


def split_local(x, sizes, groups: int) -> list:
    """The inverse of ``concat_local``: the parts of batch sizes ``sizes``, each in its own order again."""
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"split_local: sizes {tuple(sizes)} do not add up to the batch of {x.shape[0]}")
    if groups == 1:
        offsets = np.cumsum((0, *sizes))
        return [x[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    grouped = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    out, start = [], 0
    for n in sizes:
        if n % groups:
            raise ValueError(f"split_local: a batch of {n} does not split into {groups} equal shards")
        k = n // groups
        out.append(grouped[:, start:start + k].reshape(n, *x.shape[1:]))
        start += k
    return out


def shard_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assembles the global batch from this process's part (each host loads only its shard)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
