"""Batches joined and split device by device (stpg_jax.sharding.concat_local / split_local)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stpg_jax import sharding


def parts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, 3, 2)).astype(np.float32) for n in (4, 8, 4)]


def test_one_group_is_the_plain_concatenation_and_split_undoes_it():
    a = parts()
    joined = sharding.concat_local(a, 1)
    np.testing.assert_array_equal(joined, np.concatenate(a))
    for got, want in zip(sharding.split_local(joined, (4, 8, 4), 1), a):
        np.testing.assert_array_equal(got, want)


def test_each_shard_of_the_joined_batch_holds_the_same_shards_of_the_parts():
    a = parts(1)
    joined = np.asarray(sharding.concat_local(a, 4))
    assert not np.array_equal(joined, np.concatenate(a))
    for d in range(4):
        expected = np.concatenate([p[d * len(p) // 4:(d + 1) * len(p) // 4] for p in a])
        np.testing.assert_array_equal(joined[d * 4:(d + 1) * 4], expected)
    for got, want in zip(sharding.split_local(jnp.asarray(joined), (4, 8, 4), 4), a):
        np.testing.assert_array_equal(got, want)


def test_on_a_mesh_the_shards_stay_on_their_devices():
    mesh = sharding.make_mesh(jax.devices())
    bat = sharding.batch_sharded(mesh)
    a = [jax.device_put(p, bat) for p in parts(2)]
    fn = jax.jit(lambda *p: sharding.concat_local(p, 4), out_shardings=bat)
    joined = fn(*a)
    for shard in joined.addressable_shards:
        d = shard.index[0].start // 4
        expected = np.concatenate([np.asarray(p)[d * p.shape[0] // 4:(d + 1) * p.shape[0] // 4] for p in a])
        np.testing.assert_array_equal(np.asarray(shard.data), expected)
    text = fn.lower(*a).compile().as_text()
    assert " collective-permute" not in text and " all-to-all" not in text and " all-gather" not in text
    plain = jax.jit(lambda *p: jnp.concatenate(p), out_shardings=bat).lower(*a).compile().as_text()
    assert " collective-permute" in plain or " all-to-all" in plain or " all-gather" in plain


def test_sizes_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match="does not split into 4"):
        sharding.concat_local([np.zeros((6, 2)), np.zeros((4, 2))], 4)
    with pytest.raises(ValueError, match="do not add up"):
        sharding.split_local(np.zeros((8, 2)), (4, 2), 4)
    with pytest.raises(ValueError, match="does not split into 4"):
        sharding.split_local(np.zeros((8, 2)), (2, 6), 4)
