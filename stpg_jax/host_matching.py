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


def assignment_arrays(state):
    """The step's third argument: the assignment its contrastive losses use (None without a contrastive state)."""
    if getattr(state, "contrast", None) is None:
        return None
    return {"assignment": state.contrast.assignment, "matched": state.contrast.matched}


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
            state = self.resolve(state)
            return step_fn(state, batch, assignment_arrays(state))
        self.pending = False
        guess = step_fn(state, batch, assignment_arrays(state))  # with the assignment the state carries
        new, self.last_changed = self._match(state)
        self.ahead += 1
        if not self.last_changed:
            return guess
        self.reruns += 1
        # The guess and the rerun both read only ``state``, so nothing orders them: let the guess finish first, or a
        # backend that runs independent programs at once (the CPU) can interleave their collectives and hang.
        jax.block_until_ready(guess)
        del guess
        state = with_assignment(state, new, self.replicated)
        return step_fn(state, batch, assignment_arrays(state))

    def run(self, step_fn, state, batch, match: bool):
        """The training loop's call (as ``SameStepMatching.run``): the step, then the matching after it if ``match``."""
        out = self.step(step_fn, state, batch)
        self.pending = match
        return out

    def finish(self, state, metrics):
        return self.resolve(state), metrics

    def summary(self) -> str:
        text = f"matching: {self.matchings} run(s), {self.changes} changed the assignment"
        if self.speculate:
            text += f"; {self.ahead} step(s) started ahead of their matching, {self.reruns} run again"
        return text




class SameStepMatching:
    """The released timing (DESIGN.md §8.3): a step's contrastive losses use the assignment matched after that same
    step's prototype and bank update. Use::

        state, metrics = matching.run(step_fn, state, batch, match=<the matching re-runs in this step>)
        ...
        state, metrics = matching.finish(state, metrics)   # before reading metrics or saving a checkpoint

    ``step_fn(state, batch, assignment)`` must not donate its state: a step is run again from its input when its
    guess was wrong. The prototype and bank update does not depend on the loss's assignment, so the step's output
    prototypes are final whatever it guessed: each step starts with the assignment the state carries, its matching
    is computed from its output, and it runs again with that matching only when the two differ. With ``speculate``
    the next step is dispatched before that check, so the device keeps working while the host copies the
    prototypes and matches (right after a change it waits instead: a new assignment may change again); without, the
    host checks each step before dispatching the next. Either way the trajectory is that of the loop that waits for
    every step's matching and runs the step with it, bit for bit.
    """

    def __init__(self, anchors_host: np.ndarray | None, replicated, speculate: bool = True):
        self.anchors_host = None if anchors_host is None else np.asarray(anchors_host)
        self.replicated = replicated
        self.speculate = speculate
        self._pending = None  # (input state, batch, guessed assignment, output) of a step whose matching is unchecked
        self.last_changed = True
        self.ahead = 0  # steps dispatched before the matching of the step they start from was checked
        self.reruns = 0  # steps run again because their guess was wrong
        self.matchings = 0
        self.changes = 0

    def _assignment(self, assignment: np.ndarray):
        return {"assignment": jax.device_put(np.asarray(assignment, np.int32), self.replicated),
                "matched": jax.device_put(np.asarray(True), self.replicated)}

    def _settle(self):
        """The pending step's final (state, metrics): its output when the guess was right, else the step again."""
        state_in, batch, guess, (state_out, metrics) = self._pending
        self._pending = None
        prototypes, guessed, matched = jax.device_get(
            (state_out.contrast.prototypes, guess["assignment"], guess["matched"]))
        new = losses.hungarian_assignment(np.asarray(prototypes), self.anchors_host)
        self.last_changed = not (bool(matched) and np.array_equal(new, guessed))
        self.matchings += 1
        self.changes += self.last_changed
        if not self.last_changed:
            return state_out, metrics
        self.reruns += 1
        return self._step_fn(state_in, batch, self._assignment(new))

    def run(self, step_fn, state, batch, match: bool):
        """Runs a step whose matching re-runs within it if ``match``; returns its (state, metrics), provisional
        until ``finish`` while a matching is pending."""
        self._step_fn = step_fn
        ahead = self._pending is not None
        if ahead and (not self.speculate or self.last_changed):
            state, _ = self._settle()
            ahead = False
        guess = assignment_arrays(state)
        out = step_fn(state, batch, guess)
        if ahead:  # check the step before while this one runs
            previous_out = self._pending[3][0]
            self.ahead += 1
            final_state, final_metrics = self._settle()
            if final_state is not previous_out:  # it ran again: so must this step, from its new output
                # The discarded step and the rerun read the same input: let the first finish, or a backend that
                # runs independent programs at once (the CPU) can interleave their collectives and hang.
                jax.block_until_ready(out)
                del out
                state, guess = final_state, assignment_arrays(final_state)
                out = step_fn(state, batch, guess)
        if match:
            self._pending = (state, batch, guess, out)
        return out

    def finish(self, state, metrics):
        """The final (state, metrics) of the last step (waits for it); ``(state, metrics)`` when nothing is pending."""
        if self._pending is None:
            return state, metrics
        return self._settle()

    def summary(self) -> str:
        text = f"matching: {self.matchings} run(s), {self.changes} changed the assignment"
        return text + f"; {self.ahead} step(s) started ahead of their matching, {self.reruns} run again"
