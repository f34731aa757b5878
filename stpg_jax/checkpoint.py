"""Orbax checkpoints in the work directory: the whole train state, the data position and the config.

Layout: ``<workdir>/config.json`` (the run's config, checked on resume) and ``<workdir>/checkpoints/<step>/`` with
the items ``state`` (every array of TrainState) and ``meta`` (step, data-loader state, dataset info).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from stpg_jax.config import FIELDS_ADDED_LATER, MODE_NETWORKS, ConfigError

# Fields that may change between a run and its resumption: they do not alter the state or the trajectory.
RESUME_SAFE_PREFIXES = (
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval.", "data.workers", "data.prefetch",
    "log_images_",  # TensorBoard panels, computed beside the step from its state (stpg_jax/visualize.py)
    "data.root", "data.sbd_root", "data.data_dir", "data.prepare_if_missing", "model.pretrained",
    "model.remat",  # recomputes the same values in the backward pass instead of keeping them
    "model.bn_backward",  # the same variables and BatchNorm gradients, up to float rounding
    "stpg.speculative_matching",  # the same steps in another order on the host
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """On a work directory that holds a run, refuses a config that differs from that run's in any field that
    shapes the state or the trajectory, naming those fields."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        a, b = {**FIELDS_ADDED_LATER, **_flatten(saved)}, _flatten(current)
        diffs = [
            f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(RESUME_SAFE_PREFIXES)
        ]
        if diffs:
            raise ConfigError(
                f"the work directory {workdir} holds a run with another config ({path}); differing fields:\n  "
                + "\n  ".join(diffs)
                + "\nUse a new --workdir, or the same config to resume."
            )


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def this_process_options() -> "ocp.options.MultiprocessingOptions":
    """Orbax options for reading or writing by the calling process alone (no barriers with the other processes)."""
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"stpg_process_{me}"
    )


# Orbax writes an array replicated over several devices "replica-parallel": each device's replica writes one slice,
# each slice a dispatched program (compiled per shape at the first save). That pays for large arrays only; an array
# whose slice would be smaller than this is written whole by one replica. Measured in BENCHMARKS.md §5.
MIN_SLICE_BYTES = 1 << 20


def _state_handler(min_slice_bytes: int | None, multiprocessing=None) -> "ocp.PyTreeCheckpointHandler":
    """The state item's handler: Orbax's type handlers, the array handler with ``min_slice_bytes``; Orbax's own
    handlers where ``min_slice_bytes`` is None or this Orbax's handlers cannot be built so (an older or a newer one)."""
    th = ocp.type_handlers
    processes = {} if multiprocessing is None else {"multiprocessing_options": multiprocessing}
    if min_slice_bytes is not None:
        try:
            store = th.get_type_handler(jax.Array)._array_metadata_store  # the metadata Orbax's own handler writes
            array = th.ArrayHandler(min_slice_bytes_for_replica_parallel=min_slice_bytes, array_metadata_store=store)
            others = [(ty, th.get_type_handler(ty)) for ty in th.supported_types() if ty is not jax.Array]
            registry = th.create_type_handler_registry(*others, (jax.Array, array))
            return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, **processes)
        except (AttributeError, TypeError):
            pass
    return ocp.PyTreeCheckpointHandler(**processes)


class Checkpointer:
    """The work directory's checkpoints. In a multi-process run every process takes part in saving and restoring;
    ``this_process_only`` makes one for reading by the calling process alone (no barriers with the others).
    ``min_slice_bytes``: see MIN_SLICE_BYTES (None: Orbax's default, every replicated array sliced). Checkpoints
    are the same on disk either way."""

    def __init__(self, workdir: str, max_to_keep: int = 2, this_process_only: bool = False,
                 min_slice_bytes: int | None = MIN_SLICE_BYTES):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        multiprocessing = this_process_options() if this_process_only else ocp.options.MultiprocessingOptions()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=not this_process_only, multiprocessing_options=multiprocessing
            ),
            item_handlers={"state": _state_handler(min_slice_bytes, multiprocessing),
                           "meta": ocp.JsonCheckpointHandler(multiprocessing_options=multiprocessing)},
        )

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
        )

    def restore(self, abstract_state: Any, step: int | None = None):
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def latest_step(workdir: str) -> int | None:
    """The latest checkpoint's step in a work directory (None: none yet), read by this process alone; creates
    nothing."""
    ckpt = Checkpointer(workdir, this_process_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def abstract_like(tree: Any, sharding) -> Any:
    """ShapeDtypeStructs with the given sharding, the restore target of Orbax."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a stpg_jax work directory")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


NETWORKS = MODE_NETWORKS["stpg"]  # every network a train state can hold


def load_network(workdir: str, network: str = "gen_student", step: int | None = None):
    """(config, variables, num_classes, step) of one network in a checkpoint of a training work directory: the
    latest checkpoint, or ``step``. Errors name the steps and networks the work directory holds."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    config = load_config(workdir)
    ckpt = Checkpointer(workdir, this_process_only=True)
    try:
        steps = sorted(ckpt.manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} under {ckpt.directory}; it holds steps {steps}")
        # One network alone, as host NumPy arrays: no target shardings, so a checkpoint written on any number of
        # devices or processes loads on this machine's.
        tree = ckpt.manager.item_metadata(step)["state"]
        tree = getattr(tree, "tree", tree)
        if tree.get(network) is None:
            held = [n for n in NETWORKS if tree.get(n) is not None]
            raise ValueError(f"the {config.mode!r} run in {workdir} has no {network}; its checkpoints hold {held}")
        wanted = {network: {k: tree[network][k] for k in ("params", "batch_stats")}}
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=wanted, restore_args=as_numpy, partial_restore=True),
            meta=ocp.args.JsonRestore(),
        ))
        meta, restored = restored["meta"], restored["state"][network]
    finally:
        ckpt.close()
    variables = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
    return config, variables, int(meta["num_classes"]), int(step)


def load_gen_student(workdir: str):
    """(config, variables, num_classes) of the Gen-Student in the latest checkpoint of a training work directory."""
    return load_network(workdir)[:3]
