"""The training loop: initialise or resume, step, match on the host, log, evaluate, checkpoint.

Host work that the method needs every step: while the bank is active and matching is not frozen (DESIGN.md §3,
epochs 6..19 on VOC), the prototypes are copied to the host after each step for the Hungarian matching, whose
result is fed back as the (C,) assignment array (same shape, so no recompilation). Outside that window the loop
never waits for the device except at log, evaluation and checkpoint steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from stpg_jax import checkpoint, evaluate, export, losses, plots, sharding, visualize
from stpg_jax.config import ConfigError, validate
from stpg_jax.data import DataError, build_data, make_train_loader
from stpg_jax.host_matching import HostMatching, SameStepMatching
from stpg_jax.models import model_from_config
from stpg_jax.models.pretrained import load_backbone_weights_for
from stpg_jax.state import TrainState, create_train_state, init_train_state, make_optimizer
from stpg_jax.train_step import StepSettings, make_train_step


class NonFiniteLossError(FloatingPointError):
    pass


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def schedule_steps(config, steps_per_epoch: int) -> dict:
    t = config.stpg
    freeze = t.matching_freeze_epoch
    return {
        "bank_start": t.bank_start_epoch * steps_per_epoch,
        "contrastive_start": t.contrastive_start_epoch * steps_per_epoch,
        "proximity_start": t.proximity_start_epoch * steps_per_epoch,
        "matching_freeze": freeze * steps_per_epoch if freeze >= 0 else -1,
    }


def needs_matching(step: int, sched: dict) -> bool:
    """Whether the Hungarian matching re-runs after training step ``step`` (0-based)."""
    return step >= sched["bank_start"] and (sched["matching_freeze"] < 0 or step < sched["matching_freeze"])


def uses_matching(config) -> bool:
    """Whether a run matches prototypes to anchors on the host (STPG with the contrastive part)."""
    return config.mode == "stpg" and config.stpg.contrastive


def same_step_matching(config) -> bool:
    """Whether a run's contrastive losses use the assignment matched within the same step (DESIGN.md §8.3)."""
    return uses_matching(config) and config.stpg.get("assignment_timing", "previous_step") == "same_step"


def speculative_matching(config, mesh) -> bool:
    """Whether a run starts steps ahead of their host matching (stpg_jax.host_matching), which needs a step that
    keeps its input state. Not on several CPU devices: there, two steps in flight can hang in XLA's CPU
    collectives (seen with virtual devices on 2 cores), and the host shares the cores anyway."""
    if not (uses_matching(config) and config.stpg.speculative_matching):
        return False
    return mesh.devices.size == 1 or mesh.devices.flat[0].platform != "cpu"


def load_pretrained(model_config):
    """(params, batch_stats) of the ImageNet backbone named by ``model.pretrained``, or None for a random init."""
    if not model_config.pretrained:
        return None
    if not os.path.exists(model_config.pretrained):
        raise FileNotFoundError(
            f"config.model.pretrained = {model_config.pretrained!r}: no such file. Point it at ImageNet backbone "
            "weights (.npz, .pth or a converted file; see docs/weights.md), or set it to '' for a random init."
        )
    from stpg_jax.cli import reading_weights

    with reading_weights(model_config.pretrained, "config.model.pretrained"):
        return load_backbone_weights_for(model_config)


def load_anchors(config, num_classes: int, dim: int) -> np.ndarray:
    """The (C, D) anchors of ``stpg.anchors_file`` (a .npy of unit rows, e.g. the released code's VOC 21x256 or
    Cityscapes 19x256 files), or ConfigError naming the field and what was expected."""
    path = config.stpg.anchors_file
    field = f"config.stpg.anchors_file = {path!r}"
    if not os.path.isfile(path):
        raise ConfigError(f"{field}: no such file; expected a .npy file of a ({num_classes}, {dim}) float array")
    try:
        anchors = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{field}: not a readable .npy array ({e}); expected a ({num_classes}, {dim}) float "
                          "array") from None
    if anchors.shape != (num_classes, dim) or not np.issubdtype(anchors.dtype, np.floating):
        raise ConfigError(f"{field}: holds a {anchors.dtype} array of shape {anchors.shape}; expected a "
                          f"({num_classes}, {dim}) float array (classes x model.proj_dim)")
    norms = np.linalg.norm(anchors.astype(np.float64), axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-3):
        raise ConfigError(f"{field}: rows must be unit vectors; their norms range from {norms.min():.4f} to "
                          f"{norms.max():.4f}")
    return anchors.astype(np.float32)


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

# Trainer.compile_step's jitted steps, by everything a step depends on (the last few).
_COMPILED_STEPS: dict = {}


class Trainer:
    """Everything a run needs, built once: data, model, optimiser, compiled step, mesh and checkpointer."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, load_weights: bool = True):
        """``load_weights``: read ``model.pretrained`` now, before the data, so that a missing or mismatched file
        fails in seconds rather than after a dataset's preparation (a resumed run, whose weights come from its
        checkpoint, passes False)."""
        validate(config)
        self.config, self.workdir = config, workdir
        self._pretrained = load_pretrained(config.model) if load_weights else _NOT_LOADED
        self.mesh = sharding.make_mesh()
        sharding.check_divisible(config, self.mesh)
        self.replicated = sharding.replicated(self.mesh)
        self.batch_sharding = sharding.batch_sharded(self.mesh)

        self.bundle = _build_data_in_turn(config.data, workdir)
        self.info = self.bundle.info
        self.num_classes = self.info.num_classes
        self.steps_per_epoch = config.schedule.steps_per_epoch or self.bundle.steps_per_epoch(
            config.data.batch_labeled, config.data.batch_unlabeled
        )
        self.total_steps = config.schedule.total_steps or config.schedule.epochs * self.steps_per_epoch
        self.sched = schedule_steps(config, self.steps_per_epoch)

        self.model = model_from_config(config.model, self.num_classes)
        self.settings = StepSettings.from_config(config, self.num_classes, self.steps_per_epoch,
                                                batch_groups=self.mesh.devices.size)
        # The optimiser needs only the parameter tree's structure (abstract, no compute).
        abstract = jax.eval_shape(
            lambda: self.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)["params"]
        )
        self.tx, self.lr_schedule = make_optimizer(
            config.optim, self.total_steps, abstract, train_projection_head=config.stpg.train_projection_head
        )
        self._predictor = None

    def _state_kwargs(self) -> dict:
        c = self.config
        return dict(mode=c.mode, num_classes=self.num_classes, crop_size=min(c.data.crop_size, 64),
                    proj_dim=c.model.proj_dim or c.model.decoder_channels, bank_capacity=c.stpg.bank_capacity)

    def init_state(self) -> TrainState:
        """The initial state: random heads, the ImageNet backbone of ``model.pretrained`` (if set), the anchors."""
        c = self.config
        kwargs = self._state_kwargs()
        anchors = None
        if c.mode == "stpg" and c.stpg.get("anchors_file", ""):
            anchors = load_anchors(c, self.num_classes, kwargs["proj_dim"])
        elif c.mode == "stpg":
            anchors = losses.make_anchors(self.num_classes, kwargs["proj_dim"], seed=c.seed, steps=c.stpg.anchor_steps,
                                          temperature=c.stpg.anchor_temperature)
        pretrained = load_pretrained(c.model) if self._pretrained is _NOT_LOADED else self._pretrained
        self._pretrained = _NOT_LOADED  # host copies no longer needed
        # Built by compiled programs straight onto the devices; the weights enter as an argument, not as constants
        # baked into a program. The dummy forward of the initialiser needs no more than a 64-pixel crop.
        return init_train_state(self.model, self.tx, jax.random.PRNGKey(c.seed), self.replicated, anchors=anchors,
                                pretrained=pretrained, **kwargs)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and placement of the state, the target a checkpoint is restored into: traced, not run (no
        weights file read, no network initialised, no anchors optimised)."""
        c = self.config
        kwargs = self._state_kwargs()
        anchors = None
        if c.mode == "stpg":
            anchors = jax.ShapeDtypeStruct((self.num_classes, kwargs["proj_dim"]), jnp.float32)

        def build(key, anchors):
            return create_train_state(self.model, self.tx, key, anchors=anchors, **kwargs)

        shapes = jax.eval_shape(build, jax.eval_shape(jax.random.PRNGKey, c.seed), anchors)
        return checkpoint.abstract_like(shapes, self.replicated)

    @property
    def speculates(self) -> bool:
        """Whether steps start ahead of the host matching (stpg_jax.host_matching); the step then keeps its input."""
        return speculative_matching(self.config, self.mesh)

    @property
    def donates_state(self) -> bool:
        """Whether the compiled step donates its input state: not when a step may run again from its input (steps
        ahead of the matching, or the same-step assignment)."""
        return not (self.speculates or same_step_matching(self.config))

    def matching(self, anchors_host):
        """The host matching between (or within) steps, for the run's assignment timing."""
        kind = SameStepMatching if same_step_matching(self.config) else HostMatching
        return kind(anchors_host, self.replicated, speculate=self.speculates)

    def compile_step(self):
        """The jitted train step. A run in the same process with the same step (a run resumed there after
        ``max_steps``, say) gets the same jitted function back, which traces and compiles nothing again."""
        c = self.config
        key = (self.model, self.settings, c.optim.to_json(), self.total_steps, bool(c.stpg.train_projection_head),
               self.mesh, self.donates_state)
        if key not in _COMPILED_STEPS:
            step = make_train_step(self.model, self.tx, self.lr_schedule, self.settings)
            if len(_COMPILED_STEPS) >= 4:
                _COMPILED_STEPS.pop(next(iter(_COMPILED_STEPS)))
            _COMPILED_STEPS[key] = jax.jit(
                step,
                in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                out_shardings=(self.replicated, self.replicated),
                donate_argnums=0 if self.donates_state else (),
            )
        return _COMPILED_STEPS[key]

    def evaluate(self, state: TrainState, network: str = "gen_student") -> dict:
        """One network of ``state`` (default: the Gen-Student) under the evaluation protocol."""
        c = self.config
        if self._predictor is None:  # built once: its jitted forward then compiles once per run
            n_dev = self.mesh.devices.size
            per_batch = c.eval.windows_per_batch
            shard = self.batch_sharding if per_batch % n_dev == 0 else None
            self._predictor = evaluate.make_window_predictor(
                self.model, c.eval.window, per_batch, c.eval.stride_rate, sharding=shard, flip=c.eval.flip
            )
        predictor = self._predictor
        return evaluate.evaluate(
            predictor, getattr(state, network).variables, self.bundle.val, self.num_classes, self.info.ignore_index,
            c.eval.max_images,
        )


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
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    checkpoint.check_workdir(workdir)
    checkpoint.check_config(workdir, config)
    resuming = checkpoint.latest_step(workdir) is not None
    # Reads (and checks) the weights and the data before anything is written.
    trainer = Trainer(config, workdir, load_weights=not resuming)
    if is_main:
        checkpoint.write_config(workdir, config)
    c = config
    log(f"stpg_jax: mode={c.mode} dataset={trainer.info.name} split={c.split} classes={trainer.num_classes} "
        f"labelled={len(trainer.bundle.labeled)} unlabelled={len(trainer.bundle.unlabeled)} "
        f"val={len(trainer.bundle.val)}")
    device = jax.devices()[0]
    kind = device.platform
    if device.device_kind.lower() != kind:  # a GPU names its card ('gpu, NVIDIA H200'); a CPU says 'cpu' twice
        kind += f", {device.device_kind}"
    log(f"  {trainer.mesh.devices.size} device(s) ({kind}), {jax.process_count()} process(es); "
        f"global batch {c.data.batch_labeled}+{c.data.batch_unlabeled}, crop {c.data.crop_size}; "
        f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps")
    if c.mode == "stpg":
        log(f"  schedule (steps): bank/prototypes/matching from {trainer.sched['bank_start']}, contrastive from "
            f"{trainer.sched['contrastive_start']}, proximity from {trainer.sched['proximity_start']}, matching "
            f"frozen from {trainer.sched['matching_freeze'] if trainer.sched['matching_freeze'] >= 0 else 'never'}; "
            f"{'steps start ahead of the host matching' if trainer.speculates else 'each step waits for the matching'}")

    ckpt = checkpoint.Checkpointer(workdir, c.keep_checkpoints)
    loader = make_train_loader(
        trainer.bundle, c.data, c.seed, jax.process_index(), jax.process_count(), with_unlabeled=c.mode != "supervised"
    )
    start_step = 0
    if not resuming:
        state = trainer.init_state()
    else:
        state, meta = _restore_newest_intact(ckpt, trainer.abstract_state(), log)
        loader.set_state(meta["loader"])
        start_step = int(meta["step"])
        log(f"  resumed from {ckpt.directory}/{start_step} (step {start_step})")
    matching_on = uses_matching(c)
    multi_process = jax.process_count() > 1
    matching = trainer.matching(jax.device_get(state.contrast.anchors) if state.contrast is not None else None)

    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if is_main else None
    if writer is not None:
        writer.add_custom_scalars(visualize.class_layout(trainer.info.class_names))
    log_images = visualize.ImageLogger(c, trainer.bundle, trainer.model, trainer.replicated)

    def save(step, state):
        ckpt.save(step, state, {"step": step, "loader": loader.get_state(), "num_classes": trainer.num_classes,
                                "dataset": trainer.info.name})

    step_fn = trainer.compile_step()
    images_per_step = c.data.batch_labeled + (2 * c.data.batch_unlabeled if c.mode != "supervised" else 0)
    last_good = start_step
    t_log, step_log = time.time(), start_step
    results: dict[str, Any] = {}
    try:
        for step in range(start_step, trainer.total_steps):
            batch = sharding.shard_batch(next(loader), trainer.batch_sharding)
            if step == start_step:
                log("  compiling the train step (the first step includes XLA compilation)...", flush=True)
                t0 = time.time()
            state, metrics = matching.run(step_fn, state, batch, matching_on and needs_matching(step, trainer.sched))
            if step == start_step:
                jax.block_until_ready(metrics)
                log(f"  first step done in {time.time() - t0:.1f}s (compile + run)", flush=True)
                t_log, step_log = time.time(), step + 1

            done = step + 1
            is_last = done == trainer.total_steps
            hit_max = bool(max_steps) and done - start_step >= max_steps and not is_last
            stopping = hit_max or stop["signal"] is not None
            agree_now = done % c.log_every_steps == 0 or is_last
            if multi_process and not hit_max and (stopping or agree_now):
                # Saving and evaluating are collective: every process must stop after the same step. A signal
                # reaches the processes at different steps, so they agree at each log step and at the last
                # (max_steps is the same everywhere).
                stopping = agree_now and _any_process(stopping)
                if stopping and stop["signal"] is None:
                    stop["signal"] = "signal received by another process"
            if hit_max:
                stop["signal"] = stop["signal"] or "max_steps"
            want_ckpt = done % c.checkpoint_every_steps == 0 or is_last or stopping
            if done % c.log_every_steps == 0 or want_ckpt:
                state, metrics = matching.finish(state, metrics)  # the step's final values (and its matching)
                scalars = _scalar_metrics(jax.device_get(metrics))
                if not math.isfinite(scalars["loss"]):
                    bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
                    raise NonFiniteLossError(f"non-finite loss at step {done}: {bad}. Stopping; "
                                             + _kept(last_good, start_step, ckpt.directory))
                now = time.time()
                rate = (done - step_log) * images_per_step / max(now - t_log, 1e-9)
                eta = (trainer.total_steps - done) * (now - t_log) / max(done - step_log, 1)
                extra = ""
                if "kept" in scalars:
                    extra = f" | kept {scalars['kept']:.3f}"
                speed = f" | {rate:.1f} img/s | ETA {_format_seconds(eta)}" if done > step_log else ""
                log(f"step {done}/{trainer.total_steps} | loss {scalars['loss']:.4f} | lr {scalars['lr']:.5f}"
                    f"{extra}{speed}", flush=True)
                if writer is not None:
                    for k, v in visualize.name_classes(scalars, trainer.info.class_names).items():
                        writer.add_scalar(f"train/{k}", v, done)
                    if done > step_log:
                        writer.add_scalar("train/images_per_second", rate, done)
                t_log, step_log = now, done
                if want_ckpt:  # the state holds the matching its next step uses (finished above)
                    # The loss above came before this step's update; the state saved is after it.
                    bad = [name for name, ok in checkpoint.all_finite(state).items() if not ok]
                    if bad:
                        raise NonFiniteLossError(f"non-finite values in {', '.join(bad)} after step {done}; not "
                                                 "saved. Stopping; " + _kept(last_good, start_step, ckpt.directory))
                    save(done, state)
                    last_good = done
            if c.log_images_every_steps and done % c.log_images_every_steps == 0:
                state, metrics = matching.finish(state, metrics)  # pictures of the step's final state
                log_images(done, state, writer)
            if c.eval.every_steps and done % c.eval.every_steps == 0 and not is_last:
                state, metrics = matching.finish(state, metrics)
                results = _run_eval(trainer, state, writer, done, log)
            if stopping:
                if matching.matchings:
                    log(f"  {matching.summary()}")
                log(f"stopping ({stop['signal']}): checkpoint saved at step {done}; run again to resume")
                ckpt.wait()
                return {"stopped_at": done, **({} if stop["signal"] == "max_steps" else {"signal": stop["signal"]})}
        ckpt.wait()
        if matching.matchings:
            log(f"  {matching.summary()}")
        results = _run_eval(trainer, state, writer, trainer.total_steps, log)
        if matching_on:
            results["matching"] = {"runs": matching.matchings, "changes": matching.changes, "ahead": matching.ahead,
                                   "reruns": matching.reruns}
        if is_main:
            path = export.export_model(
                os.path.join(workdir, "export"), model_config=c.model, num_classes=trainer.num_classes,
                dataset_name=trainer.info.name, class_names=trainer.info.class_names,
                variables=jax.device_get(state.gen_student.variables), eval_window=c.eval.window,
                eval_stride_rate=c.eval.stride_rate, eval_flip=c.eval.flip, overwrite=True,
            )
            log(f"Gen-Student exported to {path} (stpg_jax.load_model / python -m stpg_jax.predict)")
        return results
    finally:
        ckpt.wait()
        ckpt.close()
        if hasattr(loader, "close"):
            loader.close()
        if writer is not None:
            writer.close()


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
        record = {"step": step, **evaluate.result_record(result, names)}
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
