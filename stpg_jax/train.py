"""The training loop: initialise or resume, step, match on the host, log, evaluate, checkpoint.

Host work that the method needs every step: while the bank is active and matching is not frozen (DESIGN.md §3,
epochs 6..19 on VOC), the prototypes are copied to the host after each step for the Hungarian matching, whose
result is fed back as the (C,) assignment array (same shape, so no recompilation). Outside that window the loop
never waits for the device except at log, evaluation and checkpoint steps.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from stpg_jax import checkpoint, evaluate, export, inference, plots, sharding, visualize
from stpg_jax.build import build, load_pretrained
from stpg_jax.config import validate
from stpg_jax.errors import NonFiniteLossError
from stpg_jax.host_matching import assignment_arrays
from stpg_jax.data import DataError, build_data, make_train_loader
from stpg_jax.state import TrainState


def summary_writer(logdir: str):
    """tensorboardX's SummaryWriter for ``logdir``. tensorboardX imports PyTorch, where it is installed, only for its
    type hints, which cost every ``launch.py`` start about 3 s on a 2-core CPU machine (a run refused at its data
    check: 9.4 s, 5.8 s without). PyTorch is hidden from that first import (``import torch`` then raises
    ImportError, which tensorboardX expects); a PyTorch already imported (a .pth backbone read in this process)
    stays as it is."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            importlib.import_module("tensorboardX")
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir)


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _build_data_in_turn(data_config, workdir):
    """``build_data`` in every process, process 0 first: it prepares the dataset if it is not prepared yet (and
    writes the split record), so that processes sharing a file system do not prepare it side by side; the others
    read it once it is there (or, on hosts without that file system, prepare their own copy)."""
    if jax.process_count() == 1:
        return build_data(data_config, workdir=workdir)
    bundle = build_data(data_config, workdir=workdir) if jax.process_index() == 0 else None
    try:
        multihost_utils.sync_global_devices("stpg_jax: dataset ready")
    except Exception as e:  # process 0 failed (its output names the cause) or the job lost a process
        raise DataError(
            f"process {jax.process_index()}: the processes did not meet once process 0 had built the data "
            f"(see process 0's output for the cause): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    return bundle if bundle is not None else build_data(data_config, workdir=None)


_NOT_LOADED = object()  # Trainer._pretrained before the weights are read


class Trainer:
    """Everything a run needs, built once: data, mesh, the compiled parts (``stpg_jax.build``) and the evaluator."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, load_weights: bool = True):
        """``load_weights``: read ``model.pretrained`` now, before the data, so that a missing or mismatched file
        fails in seconds rather than after a dataset's preparation (a resumed run, whose weights come from its
        checkpoint, passes False)."""
        validate(config)
        self.config, self.workdir = config, workdir
        self._pretrained = load_pretrained(config.model) if load_weights else _NOT_LOADED
        mesh = sharding.make_mesh()
        sharding.check_divisible(config, mesh)
        self.bundle = _build_data_in_turn(config.data, workdir)
        self.info = self.bundle.info
        self.num_classes = self.info.num_classes
        self.steps_per_epoch = config.schedule.steps_per_epoch or self.bundle.steps_per_epoch(
            config.data.batch_labeled, config.data.batch_unlabeled
        )
        self.parts = build(config, self.num_classes, self.steps_per_epoch, mesh)
        self._evaluator = None

    def init_state(self) -> TrainState:
        """The initial state: random heads, the ImageNet backbone of ``model.pretrained`` (if set), the anchors."""
        pretrained = load_pretrained(self.config.model) if self._pretrained is _NOT_LOADED else self._pretrained
        self._pretrained = _NOT_LOADED  # host copies no longer needed
        return self.parts.init_state(self.parts.anchors(), pretrained)

    def compile_together(self, state, batch) -> None:
        """Compiles the step for these arguments now and waits until every process has (``sharding.wait_for_processes``
        says why); the loop's first call then finds it compiled."""
        jitted = self.parts.jitted_step()
        jitted.lower(self.parts.recipe, state, batch, assignment_arrays(state)).compile()
        sharding.wait_for_processes("stpg_jax: the train step compiled")

    def compile_step(self):
        """The jitted train step, ``step(state, batch, assignment)``."""
        return self.parts.step()

    def evaluate(self, state: TrainState, network: str = "gen_student") -> dict:
        """One network of ``state`` (default: the Gen-Student) under the evaluation protocol."""
        c = self.config
        if self._evaluator is None:  # built once: its jitted forward then compiles once per run
            per_batch = c.eval.windows_per_batch
            p = self.parts
            shard = p.batch_sharding if per_batch % p.mesh.devices.size == 0 else None
            self._evaluator = inference.WindowPredictor(p.model, c.eval.window, per_batch, c.eval.stride_rate,
                                                        sharding=shard, flip=c.eval.flip)
        return evaluate.evaluate(self._evaluator, getattr(state, network).variables, self.bundle.val,
                                 self.num_classes, self.info.ignore_index, c.eval.max_images)


def _scalar_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = float(v)
        else:
            for i, x in enumerate(v.reshape(-1)):
                out[f"{k}/{i}"] = float(x)
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, max_steps: int = 0) -> dict:
    """Trains (resuming from the latest checkpoint in ``workdir`` if any) and evaluates the Gen-Student.

    ``max_steps`` > 0 stops this invocation after that many steps with a checkpoint (for jobs with a time limit);
    starting again with the same work directory continues the same trajectory.
    """
    sharding.maybe_initialize_distributed()
    # SIGTERM (preemption, scancel) or a first Ctrl-C from here on: finish the current step, checkpoint, return.
    # A second Ctrl-C interrupts at once.
    stop = {"signal": None}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        return _train(config, workdir, max_steps, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(config, workdir, max_steps, stop) -> dict:
    workdir = os.path.abspath(workdir)
    log = print if jax.process_index() == 0 else (lambda *a, **k: None)
    checkpoint.check_workdir(workdir)
    checkpoint.check_config(workdir, config)
    resuming = checkpoint.latest_step(workdir) is not None
    # Reads (and checks) the weights and the data before anything is written.
    trainer = Trainer(config, workdir, load_weights=not resuming)
    if jax.process_index() == 0:
        checkpoint.write_config(workdir, config)
    _log_header(trainer, log)
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    loader = make_train_loader(trainer.bundle, config.data, config.seed, jax.process_index(), jax.process_count(),
                               with_unlabeled=config.mode != "supervised")
    writer = None
    try:
        if not resuming:
            state, start_step = trainer.init_state(), 0
        else:
            state, meta = _restore_newest_intact(ckpt, trainer.parts.abstract_state(), log)
            loader.set_state(meta["loader"])
            start_step = int(meta["step"])
            log(f"  resumed from {ckpt.directory}/{start_step} (step {start_step})")
        # Only now: a run refused above (no intact checkpoint, say) leaves the work directory as it was.
        writer = summary_writer(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
        return _loop(trainer, state, start_step, ckpt, loader, writer, max_steps, stop, log)
    finally:
        ckpt.wait()
        ckpt.close()
        if hasattr(loader, "close"):
            loader.close()
        if writer is not None:
            writer.close()


def _loop(t: Trainer, state, start_step: int, ckpt, loader, writer, max_steps: int, stop: dict, log) -> dict:
    """Steps from ``start_step`` to the end (or a stop), then the final evaluation and the export."""
    c, parts = t.config, t.parts
    total = parts.recipe.total_steps
    matching = parts.matching(jax.device_get(state.contrast.anchors) if state.contrast is not None else None)
    log_images = visualize.ImageLogger(c, t.bundle, parts.model, parts.replicated)
    progress = _Progress(t, writer, start_step, log)
    step_fn = t.compile_step()
    last_good = start_step
    for step in range(start_step, total):
        batch = sharding.shard_batch(next(loader), parts.batch_sharding)
        if step == start_step:
            log("  compiling the train step (the first step includes XLA compilation)...", flush=True)
            t0 = time.time()
            if jax.process_count() > 1:
                t.compile_together(state, batch)
        state, metrics = matching.run(step_fn, state, batch, parts.matches and parts.recipe.phases.matching_after(step))
        if step == start_step:
            jax.block_until_ready(metrics)
            log(f"  first step done in {time.time() - t0:.1f}s (compile + run)", flush=True)
            progress.restart(step + 1)
        done = step + 1
        is_last = done == total
        stopping = _stopping(stop, done, is_last, bool(max_steps) and done - start_step >= max_steps and not is_last,
                             done % c.log_every_steps == 0 or is_last)
        want_ckpt = done % c.checkpoint_every_steps == 0 or is_last or stopping
        if done % c.log_every_steps == 0 or want_ckpt:
            state, metrics = matching.finish(state, metrics)  # the step's final values (and its matching)
            progress.report(done, metrics, lambda: _kept(last_good, start_step, ckpt.directory))
            if want_ckpt:  # the state holds the matching its next step uses (finished above)
                # The loss above came before this step's update; the state saved is after it.
                bad = [name for name, ok in checkpoint.all_finite(state).items() if not ok]
                if bad:
                    raise NonFiniteLossError(f"non-finite values in {', '.join(bad)} after step {done}; not "
                                             "saved. Stopping; " + _kept(last_good, start_step, ckpt.directory))
                ckpt.save(done, state, {"step": done, "loader": loader.get_state(), "num_classes": t.num_classes,
                                        "dataset": t.info.name})
                last_good = done
        if c.log_images_every_steps and done % c.log_images_every_steps == 0:
            state, metrics = matching.finish(state, metrics)  # pictures of the step's final state
            log_images(done, state, writer)
        if c.eval.every_steps and done % c.eval.every_steps == 0 and not is_last:
            state, metrics = matching.finish(state, metrics)
            _run_eval(t, state, writer, done, log)
        if stopping:
            if matching.matchings:
                log(f"  {matching.summary()}")
            log(f"stopping ({stop['signal']}): checkpoint saved at step {done}; run again to resume")
            ckpt.wait()
            return {"stopped_at": done, **({} if stop["signal"] == "max_steps" else {"signal": stop["signal"]})}
    ckpt.wait()
    if matching.matchings:
        log(f"  {matching.summary()}")
    results = _run_eval(t, state, writer, total, log)
    if parts.matches:
        results["matching"] = {"runs": matching.matchings, "changes": matching.changes, "ahead": matching.ahead,
                               "reruns": matching.reruns}
    if jax.process_index() == 0:
        path = export.export_model(
            os.path.join(t.workdir, "export"), model_config=c.model, num_classes=t.num_classes,
            dataset_name=t.info.name, class_names=t.info.class_names,
            variables=jax.device_get(state.gen_student.variables), eval_window=c.eval.window,
            eval_stride_rate=c.eval.stride_rate, eval_flip=c.eval.flip, overwrite=True,
        )
        log(f"Gen-Student exported to {path} (stpg_jax.load_model / python -m stpg_jax.predict)")
    return results


def _log_header(t: Trainer, log) -> None:
    c = t.config
    log(f"stpg_jax: mode={c.mode} dataset={t.info.name} split={c.split} classes={t.num_classes} "
        f"labelled={len(t.bundle.labeled)} unlabelled={len(t.bundle.unlabeled)} val={len(t.bundle.val)}")
    device = jax.devices()[0]
    kind = device.platform
    if device.device_kind.lower() != kind:  # a GPU names its card ('gpu, NVIDIA H200'); a CPU says 'cpu' twice
        kind += f", {device.device_kind}"
    log(f"  {t.parts.mesh.devices.size} device(s) ({kind}), {jax.process_count()} process(es); "
        f"global batch {c.data.batch_labeled}+{c.data.batch_unlabeled}, crop {c.data.crop_size}; "
        f"{t.steps_per_epoch} steps/epoch, {t.parts.recipe.total_steps} steps")
    if c.mode == "stpg":
        p = t.parts.recipe.phases
        log(f"  schedule (steps): bank/prototypes/matching from {p.bank_start}, contrastive from "
            f"{p.contrastive_start}, proximity from {p.proximity_start}, matching frozen from "
            f"{p.matching_freeze if p.matching_freeze >= 0 else 'never'}; "
            f"{'steps start ahead of the host matching' if t.parts.speculates else 'each step waits for the matching'}")


def _stopping(stop: dict, done: int, is_last: bool, hit_max: bool, agree_now: bool) -> bool:
    """Whether the run stops after step ``done`` (a signal or ``max_steps``); sets ``stop['signal']`` to why."""
    stopping = hit_max or stop["signal"] is not None
    if jax.process_count() > 1 and not hit_max and (stopping or agree_now):
        # Saving and evaluating are collective: every process must stop after the same step. A signal reaches the
        # processes at different steps, so they agree at each log step and at the last (max_steps is the same
        # everywhere).
        stopping = agree_now and _any_process(stopping)
        if stopping and stop["signal"] is None:
            stop["signal"] = "signal received by another process"
    if hit_max:
        stop["signal"] = stop["signal"] or "max_steps"
    return stopping


class _Progress:
    """The log line and TensorBoard scalars of a log step, with the rate since the last one."""

    def __init__(self, t: Trainer, writer, step: int, log):
        c = t.config
        self.images_per_step = c.data.batch_labeled + (2 * c.data.batch_unlabeled if c.mode != "supervised" else 0)
        self.total, self.class_names = t.parts.recipe.total_steps, t.info.class_names
        self.writer, self.log = writer, log
        if writer is not None:
            writer.add_custom_scalars(visualize.class_layout(self.class_names))
        self.restart(step)

    def restart(self, step: int) -> None:
        self.time, self.step = time.time(), step

    def report(self, done: int, metrics, kept) -> None:
        """Logs step ``done``; a non-finite loss raises NonFiniteLossError saying what ``kept()`` says is kept."""
        scalars = _scalar_metrics(jax.device_get(metrics))
        if not math.isfinite(scalars["loss"]):
            bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
            raise NonFiniteLossError(f"non-finite loss at step {done}: {bad}. Stopping; " + kept())
        now = time.time()
        rate = (done - self.step) * self.images_per_step / max(now - self.time, 1e-9)
        eta = (self.total - done) * (now - self.time) / max(done - self.step, 1)
        extra = f" | kept {scalars['kept']:.3f}" if "kept" in scalars else ""
        speed = f" | {rate:.1f} img/s | ETA {_format_seconds(eta)}" if done > self.step else ""
        self.log(f"step {done}/{self.total} | loss {scalars['loss']:.4f} | lr {scalars['lr']:.5f}{extra}{speed}",
                 flush=True)
        if self.writer is not None:
            for k, v in visualize.name_classes(scalars, self.class_names).items():
                self.writer.add_scalar(f"train/{k}", v, done)
            if done > self.step:
                self.writer.add_scalar("train/images_per_second", rate, done)
        self.restart(done)


def _kept(last_good: int, start_step: int, directory: str) -> str:
    """What the work directory holds after a diverged step, as the tripwire says it."""
    if last_good == 0 and start_step == 0:
        return f"no checkpoint was written yet ({directory} holds none of this run); lower optim.lr or check the data"
    return f"the last good checkpoint (step {last_good}) is kept in {directory}"


def _restore_newest_intact(ckpt: checkpoint.Checkpointer, abstract_state, log):
    """The newest checkpoint that reads back whole; newer damaged ones are named and moved aside (by process 0,
    never deleted) so that the resumed run can write their steps again. If none reads back, nothing is moved."""
    state, meta, damaged = ckpt.restore_newest_intact(abstract_state)
    for error in damaged:
        where = ckpt.move_aside(error.step) if jax.process_index() == 0 else checkpoint.DAMAGED_DIR
        log(f"  warning: {error}; moved to {where}, resuming from step {int(meta['step'])}, the newest intact one")
    if damaged and jax.process_count() > 1:
        multihost_utils.sync_global_devices("stpg_jax: damaged checkpoints moved aside")
        ckpt.manager.reload()
    return state, meta


def _any_process(flag: bool) -> bool:
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _run_eval(trainer: Trainer, state: TrainState, writer, step: int, log) -> dict:
    """Evaluates ``eval.networks``, logs and records them; returns the Gen-Student's result."""
    t0 = time.time()
    networks = ("gen_student",) + tuple(n for n in trainer.config.eval.networks if n != "gen_student")
    names = trainer.info.class_names
    count = len(trainer.bundle.val)
    count = min(count, trainer.config.eval.max_images) if trainer.config.eval.max_images else count
    others = f" (and {', '.join(networks[1:])})" if len(networks) > 1 else ""
    log(f"evaluating the Gen-Student{others} at step {step} on {count} val images "
        f"(window {trainer.config.eval.window})...", flush=True)
    results = {name: trainer.evaluate(state, name) for name in networks}
    result = results["gen_student"]
    log(evaluate.format_iou_table(result, names))
    if len(networks) > 1:
        log(evaluate.format_iou_columns(results, names))
    log(f"  evaluation took {time.time() - t0:.1f}s", flush=True)
    if jax.process_index() == 0:
        record = {"step": step, "images": count, **evaluate.result_record(result, names)}
        if len(networks) > 1:
            record["networks"] = {name: evaluate.result_record(r, names) for name, r in results.items()}
        with open(os.path.join(trainer.workdir, f"eval_{step}.json"), "w") as f:
            json.dump(record, f, indent=2)
        plots.save_eval_png(results, names, os.path.join(trainer.workdir, f"eval_{step}.png"), step, log)
    if writer is not None:
        for network, r in results.items():
            prefix = "eval" if network == "gen_student" else f"eval/{network}"
            writer.add_scalar(f"{prefix}/miou", r["miou"], step)
            writer.add_scalar(f"{prefix}/pixel_accuracy", r["pixel_accuracy"], step)
            for name, v in zip(names, r["iou"]):
                if not np.isnan(v):
                    writer.add_scalar(f"{prefix}/iou/{name}", float(v), step)
        writer.flush()
    return result
