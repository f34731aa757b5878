"""Orbax checkpoints in the work directory: the whole train state, the data position and the config.

Layout: ``<workdir>/config.json`` (the run's config, checked on resume) and ``<workdir>/checkpoints/<step>/`` with
the items ``state`` (every array of TrainState) and ``meta`` (step, data-loader state, dataset info).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from stpg_jax.config import FIELDS_ADDED_LATER, MODE_NETWORKS, ConfigError
from stpg_jax.errors import InputError

# Fields that may change between a run and its resumption: they do not alter the state or the trajectory.
RESUME_SAFE_PREFIXES = (
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval.", "data.workers", "data.prefetch",
    "log_images_",  # TensorBoard panels, computed beside the step from its state (stpg_jax/visualize.py)
    "data.root", "data.sbd_root", "data.data_dir", "data.prepare_if_missing", "model.pretrained",
    "model.remat",  # recomputes the same values in the backward pass instead of keeping them
    "model.bn_backward",  # the same variables and BatchNorm gradients, up to float rounding
    "stpg.speculative_matching",  # the same steps in another order on the host
)


class CheckpointError(ValueError):
    """A checkpoint or work-directory file that cannot be used: the message names it, why, and what was expected.
    ``step``: the damaged checkpoint's step, where it is one."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


DAMAGED_DIR = "damaged_checkpoints"  # <workdir>/damaged_checkpoints/<step>: kept aside, never deleted


def check_workdir(workdir: str) -> None:
    """Refuses, before anything is written, a work directory that is a file, lies under a file, or cannot be written
    (read-only file system, no permission). Creates nothing: writability is probed with a file removed at once."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise CheckpointError(f"the work directory is a file, {workdir}, expected a directory (or a path to create)")
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointError(f"the work directory lies under a file, {existing} (in {workdir}), expected a path "
                              "under directories")
    try:
        fd, probe = tempfile.mkstemp(prefix=".stpg_write_probe", dir=existing)
    except OSError as e:
        raise CheckpointError(f"the work directory cannot be written ({e.strerror or e}), {workdir}, expected a "
                              "writable directory") from e
    os.close(fd)
    os.remove(probe)


def read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({e}), {path}, expected the file this package wrote; "
                              "restore it, or use a new --workdir") from e


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """On a work directory that holds a run, refuses a config that differs from that run's in any field that
    shapes the state or the trajectory, naming those fields."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    if os.path.exists(path):
        saved = read_json(path, "the run's config")
        a = {**FIELDS_ADDED_LATER, **traverse_util.flatten_dict(saved, sep=".")}
        b = traverse_util.flatten_dict(current, sep=".")
        diffs = [
            f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(RESUME_SAFE_PREFIXES)
        ]
        if diffs:
            raise ConfigError(
                f"the config differs from the run's in the work directory, {path}, in {'; '.join(diffs)}; "
                "expected the same config to resume, or a new --workdir"
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
            # The array-metadata store Orbax's default handler writes with, as its public (v1) options hold it, so
            # that checkpoints come out the same on disk.
            store = ocp.v1.options.ArrayOptions.Saving().array_metadata_store
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
        # The loader's position goes in ``meta`` (JSON, written by process 0), not through grain's checkpoint handler:
        # that one writes a file per process named for the process count (process_<i>-of-<n>.json) and restores only
        # onto as many processes, while this position is the global batch index, so a run saved on two processes
        # resumes on one (tests/test_train.py) or on eight.
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
        )

    def restore(self, abstract_state: Any, step: int | None = None):
        step = self.latest_step() if step is None else step
        with reading(self.directory, step):
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

    def restore_newest_intact(self, abstract_state: Any):
        """(state, meta, damaged): the newest checkpoint that reads back whole, and the CheckpointErrors of the newer
        ones that did not. Only reads; if none reads back, raises naming each."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(abstract_state, step)
            except CheckpointError as e:
                damaged.append(e)
                continue
            return state, meta, damaged
        raise CheckpointError(f"no checkpoint in {self.directory} reads back ({'; '.join(map(str, damaged))}); "
                              "expected at least one intact: move the damaged ones elsewhere to start again, or use "
                              "a new --workdir")

    def move_aside(self, step: int) -> str:
        """Moves checkpoint ``step`` to <workdir>/damaged_checkpoints/ (never deleted: a damaged file may still be
        worth a look), so that the run can write that step again; returns where it went."""
        aside = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        os.makedirs(aside, exist_ok=True)
        target, n = os.path.join(aside, str(step)), 1
        while os.path.exists(target):
            target, n = os.path.join(aside, f"{step}.{n}"), n + 1
        shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


@contextlib.contextmanager
def reading(directory: str, step):
    """Turns any failure while Orbax reads checkpoint ``step`` into a CheckpointError naming it. Orbax and
    tensorstore report a truncated, emptied or missing file with several exception types (ValueError, KeyError,
    JSON errors, OSError ...); all of them mean this checkpoint cannot be used."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        text = str(error).strip()
        reason = text.splitlines()[0].split(" See full TensorStore details")[0] if text else type(error).__name__
        if isinstance(error, KeyError):
            reason = f"an item is missing ({reason})"
        raise CheckpointError(f"checkpoint {os.path.join(directory, str(step))} is damaged ({type(error).__name__}: "
                              f"{reason}), expected a whole checkpoint as written by a run", step=step) from error


def all_finite(tree: Any) -> dict:
    """{field: whether every float in it is finite} for the top-level fields of a (train state) pytree that hold
    floats; one small compiled reduction, on the devices that hold the arrays."""
    import jax.numpy as jnp

    fields = dict(tree) if isinstance(tree, dict) else vars(tree)
    floats = {name: [x for x in jax.tree_util.tree_leaves(value) if jnp.issubdtype(x.dtype, jnp.inexact)]
              for name, value in fields.items()}
    floats = {name: leaves for name, leaves in floats.items() if leaves}
    flags = _all_finite_of(floats)
    return {name: bool(ok) for name, ok in jax.device_get(flags).items()}


@jax.jit
def _all_finite_of(floats):
    import jax.numpy as jnp

    return {name: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) for name, leaves in floats.items()}


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
    if not os.path.isfile(path):
        what = "no such directory" if not os.path.isdir(workdir) else f"not a work directory (no {path})"
        raise FileNotFoundError(f"{what}, {workdir}, expected a training work directory (or an export directory)")
    return ml_collections.ConfigDict(read_json(path, "the run's config"))


NETWORKS = MODE_NETWORKS["stpg"]  # every network a train state can hold


def load_network(workdir: str, network: str = "gen_student", step: int | None = None,
                 on_damaged: Callable[[CheckpointError], None] | None = None):
    """(config, variables, num_classes, step) of one network in a checkpoint of a training work directory: the
    latest checkpoint, or ``step``. Errors name the steps and networks the work directory holds. A damaged latest
    checkpoint is passed over for the newest intact one (``on_damaged`` hears of each passed over); a damaged
    ``step`` asked for by number is an error. Reads only: nothing in the work directory changes."""
    if network not in NETWORKS:
        raise InputError(f"unknown network {network!r}, --network, network must be one of {NETWORKS}")
    config = load_config(workdir)
    ckpt = Checkpointer(workdir, this_process_only=True)
    try:
        steps = sorted(ckpt.manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} under {ckpt.directory}; it holds steps {steps}")
        for candidate in reversed(steps if step is None else [step]):
            try:
                variables, meta = _read_network(ckpt, config, workdir, network, candidate)
            except CheckpointError as e:
                if step is not None or candidate == steps[0]:
                    raise
                if on_damaged is not None:
                    on_damaged(e)
                continue
            break
    finally:
        ckpt.close()
    return config, variables, int(meta["num_classes"]), int(candidate)


def _read_network(ckpt: Checkpointer, config, workdir: str, network: str, step: int):
    with reading(ckpt.directory, step):
        # One network alone, as host NumPy arrays: no target shardings, so a checkpoint written on any number of
        # devices or processes loads on this machine's.
        tree = ckpt.manager.item_metadata(step)["state"]
        tree = getattr(tree, "tree", tree)
        if tree is None:
            raise KeyError("state")
    if tree.get(network) is None:
        held = [n for n in NETWORKS if tree.get(n) is not None]
        raise InputError(f"the {config.mode!r} run in {workdir} has no {network}; its checkpoints hold {held}, "
                         "--network expected one of them")
    with reading(ckpt.directory, step):
        wanted = {network: {k: tree[network][k] for k in ("params", "batch_stats")}}
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=wanted, restore_args=as_numpy, partial_restore=True),
            meta=ocp.args.JsonRestore(),
        ))
        meta, restored = restored["meta"], restored["state"][network]
        int(meta["num_classes"])
    return {"params": restored["params"], "batch_stats": restored["batch_stats"]}, meta


def load_gen_student(workdir: str):
    """(config, variables, num_classes) of the Gen-Student in the latest checkpoint of a training work directory."""
    return load_network(workdir)[:3]
