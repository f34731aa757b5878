"""HostMatching and SameStepMatching: a step started before its matching is known is kept only when the matching
agrees, and the trajectory is the plain loop's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from stpg_jax import losses
from stpg_jax.host_matching import HostMatching, SameStepMatching

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


def fake_step(state, batch, assignment=None):
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


# SameStepMatching: a step's loss uses the matching of the prototypes that step itself produces.
T = 8


@struct.dataclass
class LoggedState:
    count: jax.Array
    contrast: Contrast
    log: jax.Array  # (T, C): the loss assignment each step used, -1 = unmatched


def same_step(state, batch, assignment):
    """Prototypes become the batch's permutation matrix (so the matching after this step is that permutation); the
    'loss' records the assignment it was given, which the output state carries."""
    seen = jnp.where(assignment["matched"], assignment["assignment"], -1)
    contrast = state.contrast.replace(prototypes=batch, assignment=assignment["assignment"],
                                      matched=assignment["matched"])
    return state.replace(count=state.count + 1, contrast=contrast, log=state.log.at[state.count].set(seen)), seen


def logged_initial_state():
    return LoggedState(jnp.zeros((), jnp.int32), initial_state().contrast, jnp.full((T, C), -9, jnp.int32))


@pytest.mark.parametrize("speculate", [True, False])
def test_same_step_matching_equals_the_loop_that_waits_for_every_matching(speculate):
    step_fn = jax.jit(same_step)
    perms = [PERM_A, PERM_A, PERM_B, PERM_B, PERM_B, PERM_A, PERM_A, PERM_B]
    match = [False, True, True, True, True, True, True, False]  # no matching in the first and the last step

    # The plain loop: every step waits for its own matching and runs with it.
    plain = logged_initial_state()
    for perm, m in zip(perms, match):
        carried = {"assignment": plain.contrast.assignment, "matched": plain.contrast.matched}
        guess, _ = step_fn(plain, jnp.asarray(ANCHORS[perm]), carried)
        if m:
            new = losses.hungarian_assignment(np.asarray(guess.contrast.prototypes), ANCHORS)
            carried = {"assignment": jnp.asarray(new, jnp.int32), "matched": jnp.asarray(True)}
        plain, _ = step_fn(plain, jnp.asarray(ANCHORS[perm]), carried)

    matching = SameStepMatching(ANCHORS, None, speculate=speculate)
    state, metrics = logged_initial_state(), None
    for perm, m in zip(perms, match):
        state, metrics = matching.run(step_fn, state, jnp.asarray(ANCHORS[perm]), m)
    state, metrics = matching.finish(state, metrics)

    # Step 0 unmatched; each matched step sees its own permutation; the last (not matched) keeps step 6's.
    expected = [[-1] * C] + [p.tolist() for p in perms[1:7]] + [perms[6].tolist()]
    assert np.asarray(plain.log).tolist() == expected
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (matching.matchings, matching.changes) == (6, 3)  # unmatched -> A, A -> B, B -> A
    assert matching.reruns == 3  # steps 1, 2 and 5 ran again with their own matching
    # Ahead: steps dispatched before the previous step's matching was checked, never right after a change: steps 5
    # and 6 (step 6 was dispatched again once step 5 ran again).
    assert matching.ahead == (2 if speculate else 0)
