"""HostMatching: a step started before its matching is known is kept only when the matching agrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from stpg_jax.host_matching import HostMatching

C = 3
ANCHORS = np.eye(C, dtype=np.float32)
PERM_A, PERM_B = np.array([0, 1, 2]), np.array([2, 0, 1])


@struct.dataclass
class Contrast:
    prototypes: jax.Array
    assignment: jax.Array
    matched: jax.Array


@struct.dataclass
class State:
    count: jax.Array
    contrast: Contrast


def initial_state():
    return State(jnp.zeros((), jnp.int32),
                 Contrast(jnp.zeros((C, C)), jnp.arange(C, dtype=jnp.int32), jnp.asarray(False)))


def fake_step(state, batch):
    """Prototypes become the batch's permutation matrix; the metrics say which assignment the step saw."""
    seen = jnp.where(state.contrast.matched, state.contrast.assignment, -1)
    contrast = state.contrast.replace(prototypes=batch)
    return state.replace(count=state.count + 1, contrast=contrast), seen


@pytest.fixture(scope="module")
def steps():
    # The plain loop may donate the state, as the trainer does then; the speculative one must not.
    return {False: jax.jit(fake_step, donate_argnums=0), True: jax.jit(fake_step)}


def run(step_fn, perms, speculate):
    matching = HostMatching(ANCHORS, None, speculate=speculate)
    state, seen = initial_state(), []
    for perm in perms:
        # Class c's prototype is anchor perm[c], so the Hungarian assignment is perm itself.
        state, metrics = matching.step(step_fn, state, jnp.asarray(ANCHORS[perm]))
        seen.append(np.asarray(metrics).tolist())
        matching.pending = True
    return matching.resolve(state), seen, matching


def test_steps_see_the_assignment_of_the_step_before(steps):
    perms = [PERM_A, PERM_A, PERM_B, PERM_B, PERM_B, PERM_A, PERM_A]
    plain_state, plain_seen, plain = run(steps[False], perms, speculate=False)
    assert plain_seen == [[-1] * C] + [p.tolist() for p in perms[:-1]]
    assert plain.ahead == 0 and plain.reruns == 0

    state, seen, matching = run(steps[True], perms, speculate=True)
    assert seen == plain_seen
    # Steps 1 and 2 wait (the first matching changes the unmatched state; so the next waits too); step 3 starts
    # ahead and runs again (A -> B), step 4 waits after that change, steps 5 and 6 start ahead, 6 runs again (B -> A).
    assert (matching.ahead, matching.reruns) == (3, 2)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(plain_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(state.contrast.assignment).tolist() == PERM_A.tolist()
    assert matching.summary() == ("matching: 7 run(s), 3 changed the assignment; 3 step(s) started ahead of their "
                                  "matching, 2 run again")
    assert (plain.matchings, plain.changes) == (7, 3)


def test_nothing_pending_runs_the_step_as_is(steps):
    matching = HostMatching(ANCHORS, None)
    state, seen = matching.step(steps[True], initial_state(), jnp.asarray(ANCHORS[PERM_B]))
    assert int(seen[0]) == -1 and matching.ahead == 0
    assert matching.resolve(state) is state


def test_speculating_with_a_donating_step_is_refused(steps):
    matching = HostMatching(ANCHORS, None, speculate=True)
    matching.pending, matching.last_changed = True, False
    with pytest.raises(ValueError, match="does not donate"):
        matching.step(steps[False], initial_state(), jnp.asarray(ANCHORS[PERM_A]))
