"""Data parallelism: one 1-D 'data' mesh over every device of every host; batches split, state replicated."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Environment variables whose presence means the run was launched on several hosts.
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> None:
    """Calls jax.distributed.initialize() when a multi-host launch is detected (explicit coordinator variables, or
    SLURM / Open MPI with more than one task). Must run before any other JAX call."""
    multi_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    multi_mpi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if any(v in os.environ for v in _MULTIHOST_ENV) or multi_slurm or multi_mpi:
        jax.distributed.initialize()


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
            raise ValueError(
                f"config.data.{name} = {value} is a global batch size and must be divisible by the {n} devices in "
                f"use; choose a multiple of {n} (the learning rate stays the config's, for the global batch)"
            )


def shard_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assembles the global batch from this process's part (each host loads only its shard)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
