"""The Hungarian matching between training steps, on the host, without stalling the device.

DESIGN.md §3: after each step of the matching phase the prototypes are matched to the anchors (scipy on the host) and
the next step uses that assignment. Done plainly, the host waits for every step to finish before it can start the
next one, so the device idles while the prototypes travel, the matching runs and the next step is dispatched.

``HostMatching(speculate=True)`` instead starts the next step with the assignment the state already carries, then
runs the matching while that step computes. When the matching gives the same assignment (the common case once the
prototypes settle) the step was exactly the one the plain loop would have run; when it does not, the step is run
again from its input with the new assignment. Either way the trajectory is bitwise the plain loop's. After a
matching that changed the assignment the next step waits for its matching instead (an assignment that has just
changed may change again), so a run of changes wastes one step, not one per change. The cost: the step must not donate
its input state, so the device holds two train states instead of one, and one step is wasted per run of changes
(``reruns``).
"""

from __future__ import annotations

import jax
import numpy as np

from stpg_jax import losses


def with_assignment(state, assignment: np.ndarray, replicated):
    """The state with ``assignment`` (host array, (C,)) as its matching, placed as ``replicated``."""
    contrast = state.contrast.replace(
        assignment=jax.device_put(np.asarray(assignment, np.int32), replicated),
        matched=jax.device_put(np.asarray(True), replicated),
    )
    return state.replace(contrast=contrast)


class HostMatching:
    """Runs train steps and the matching between them. Use::

        state, metrics = matching.step(step_fn, state, batch)
        if the matching re-runs after this step: matching.pending = True
        ...
        state = matching.resolve(state)   # before saving a checkpoint

    With ``speculate=True``, ``step_fn`` must not donate its state argument (the step may have to run again
    from it); with ``speculate=False`` it may.
    """

    def __init__(self, anchors_host: np.ndarray | None, replicated, speculate: bool = True):
        self.anchors_host = None if anchors_host is None else np.asarray(anchors_host)
        self.replicated = replicated
        self.speculate = speculate
        self.pending = False  # the state's prototypes have not been matched yet
        self.ahead = 0  # steps started before the matching they depend on was known
        self.reruns = 0  # of those, the ones run again because the assignment changed
        self.last_changed = True  # did the last matching change the assignment (the first one always does)
        self.matchings = 0
        self.changes = 0  # matchings that changed the assignment

    def resolve(self, state):
        """The state with its pending matching applied (waits for the state); unchanged when none is pending."""
        if self.pending:
            self.pending = False
            new, self.last_changed = self._match(state)
            if self.last_changed:  # otherwise the state already carries it: nothing to send to the device
                state = with_assignment(state, new, self.replicated)
        return state

    def _match(self, state):
        """(assignment of the state's prototypes, whether it differs from the one the state carries)."""
        read = (state.contrast.prototypes, state.contrast.assignment, state.contrast.matched)
        if any(x.is_deleted() for x in read):
            raise ValueError("HostMatching(speculate=True) needs a step that does not donate its state "
                             "(jax.jit without donate_argnums)")
        prototypes, assignment, matched = jax.device_get(read)
        new = losses.hungarian_assignment(np.asarray(prototypes), self.anchors_host)
        changed = not (bool(matched) and np.array_equal(new, assignment))
        self.matchings += 1
        self.changes += changed
        return new, changed

    def step(self, step_fn, state, batch):
        """``step_fn(state, batch)`` after the pending matching, if any; returns its (state, metrics)."""
        # Right after a change, wait for the matching rather than guess again.
        if not self.pending or not self.speculate or self.last_changed:
            return step_fn(self.resolve(state), batch)
        self.pending = False
        guess = step_fn(state, batch)  # with the assignment the state carries
        new, self.last_changed = self._match(state)
        self.ahead += 1
        if not self.last_changed:
            return guess
        self.reruns += 1
        # The guess and the rerun both read only ``state``, so nothing orders them: let the guess finish first, or a
        # backend that runs independent programs at once (the CPU) can interleave their collectives and hang.
        jax.block_until_ready(guess)
        del guess
        return step_fn(with_assignment(state, new, self.replicated), batch)

    def summary(self) -> str:
        text = f"matching: {self.matchings} run(s), {self.changes} changed the assignment"
        if self.speculate:
            text += f"; {self.ahead} step(s) started ahead of their matching, {self.reruns} run again"
        return text
