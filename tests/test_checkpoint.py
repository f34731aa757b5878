"""Checkpointer on a state replicated over the 4 CPU devices: which arrays Orbax slices across replicas, and that
checkpoints written with Orbax's default handler and with ours read back either way."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from stpg_jax import checkpoint, sharding


@pytest.fixture(scope="module")
def replicated():
    assert len(jax.devices()) == 4
    return sharding.replicated(sharding.make_mesh(jax.devices()))


def make_state(replicated):
    rng = np.random.default_rng(0)
    tree = {
        "bn_scale": rng.normal(size=(256,)).astype(np.float32),  # 1 KiB: a slice per device would be 256 bytes
        "kernel": rng.normal(size=(3, 3, 256, 512)).astype(np.float32),  # 4.5 MiB: 1.1 MiB per device
        "step": np.int32(7),
    }
    return jax.device_put(tree, replicated)


def record_slices(monkeypatch):
    """The shapes of the arrays Orbax slices across replicas (one call per device's slice), as they happen."""
    calls = []
    slice_in_dim = jax.lax.slice_in_dim

    def counting(operand, *args, **kwargs):
        calls.append(tuple(operand.shape))
        return slice_in_dim(operand, *args, **kwargs)

    monkeypatch.setattr(jax.lax, "slice_in_dim", counting)
    return calls


def assert_same(restored, state, replicated):
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value), err_msg=key)
        assert restored[key].sharding.is_equivalent_to(replicated, value.ndim), key


@pytest.mark.parametrize("min_slice_bytes, sliced", [
    (checkpoint.MIN_SLICE_BYTES, {(3, 3, 256, 512)}),  # the kernel only
    (None, {(3, 3, 256, 512), (256,)}),  # Orbax's default: every array with a dimension divisible by 4
])
def test_replicated_arrays_are_sliced_across_devices_only_when_large(tmp_path, monkeypatch, replicated,
                                                                      min_slice_bytes, sliced):
    state = make_state(replicated)
    calls = record_slices(monkeypatch)
    ckpt = checkpoint.Checkpointer(str(tmp_path), min_slice_bytes=min_slice_bytes)
    ckpt.save(3, state, {"step": 3})
    ckpt.wait()
    assert set(calls) == sliced and len(calls) == 4 * len(sliced)  # one slice per device
    restored, meta = ckpt.restore(checkpoint.abstract_like(state, replicated))
    ckpt.close()
    assert meta == {"step": 3}
    assert_same(restored, state, replicated)


def test_checkpoints_of_orbax_standard_handler_read_both_ways(tmp_path, replicated):
    """Runs saved with Orbax's StandardSave (as earlier versions of this package did) resume, and Orbax's
    StandardRestore reads ours."""
    state = make_state(replicated)
    abstract = checkpoint.abstract_like(state, replicated)
    standard = ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_names=("state", "meta"),
                                     options=ocp.CheckpointManagerOptions(create=True))
    standard.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 1})))
    standard.wait_until_finished()

    ours = checkpoint.Checkpointer(str(tmp_path))
    restored, meta = ours.restore(abstract)
    assert meta == {"step": 1}
    assert_same(restored, state, replicated)
    ours.save(2, restored, {"step": 2})
    ours.wait()
    ours.close()

    again = standard.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
    standard.close()
    assert again["meta"] == {"step": 2}
    assert_same(again["state"], state, replicated)


def test_our_handler_writes_the_files_orbax_default_handler_writes(tmp_path, replicated):
    """The array metadata included (array_metadatas/: each array's write and chunk shapes)."""
    state = make_state(replicated)

    def files(min_slice_bytes):
        ckpt = checkpoint.Checkpointer(str(tmp_path / str(min_slice_bytes)), min_slice_bytes=min_slice_bytes)
        ckpt.save(1, state, {"step": 1})
        ckpt.wait()
        ckpt.close()
        top = tmp_path / str(min_slice_bytes) / "checkpoints" / "1" / "state"
        # Not the data files: tensorstore names them at random.
        return sorted(str(f.relative_to(top)) for f in top.rglob("*") if f.is_file() and f.parent.name != "d")

    ours = files(checkpoint.MIN_SLICE_BYTES)
    assert ours == files(None)
    assert "array_metadatas/process_0" in ours


def test_an_orbax_without_the_slice_threshold_saves_as_orbax_does(tmp_path, monkeypatch, replicated):
    def old_array_handler(*args, min_slice_bytes_for_replica_parallel=None, **kwargs):
        raise TypeError("__init__() got an unexpected keyword argument 'min_slice_bytes_for_replica_parallel'")

    monkeypatch.setattr(ocp.type_handlers, "ArrayHandler", old_array_handler)
    state = make_state(replicated)
    calls = record_slices(monkeypatch)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(1, state, {"step": 1})
    ckpt.wait()
    assert set(calls) == {(3, 3, 256, 512), (256,)}  # every array, as Orbax's own handler slices
    restored, _ = ckpt.restore(checkpoint.abstract_like(state, replicated))
    ckpt.close()
    assert_same(restored, state, replicated)


def test_load_network_reads_one_network_and_names_those_a_run_lacks(tmp_path):
    from stpg_jax.config import base_config

    config = base_config()
    config.mode = "supervised"
    checkpoint.write_config(str(tmp_path), config)
    rng = np.random.default_rng(0)
    net = {"params": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
           "batch_stats": {"mean": rng.normal(size=(4,)).astype(np.float32)}}
    state = {"step": np.int32(5), "gen_student": net, "gen_teacher": None, "pro_student": None, "pro_teacher": None}
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(5, state, {"num_classes": 4})
    ckpt.wait()
    ckpt.close()
    config_read, variables, num_classes, step = checkpoint.load_network(str(tmp_path))
    assert (config_read.mode, num_classes, step) == ("supervised", 4, 5)
    for part in ("params", "batch_stats"):
        for key, value in net[part].items():
            np.testing.assert_array_equal(variables[part][key], value)
    with pytest.raises(ValueError, match=r"the 'supervised' run in .* has no gen_teacher; .* hold \['gen_student'\]"):
        checkpoint.load_network(str(tmp_path), network="gen_teacher")
