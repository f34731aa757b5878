"""Step-time, memory and FLOP benchmark of the real STPG training step (issue 7).

    python benchmarks/step_time.py --config=configs/voc_blender.py:1_4 --dtypes float32,bfloat16 --out step_time.json
    python benchmarks/step_time.py --tiny --steps 3 --warmup 1 --dtypes float32     # CPU smoke test, < 1 min

For each compute dtype it builds the step of the config's mode exactly as the trainer does (same model, optimiser,
settings, jit shardings and state donation: the STPG step keeps its input when the trainer would start steps ahead
of the host matching) on random batches of the config's shapes, with the state's step counter
set past the bank / contrastive / proximity starts so that the timed step runs the whole method. It reports:

- compile time: ``lower`` and ``compile`` timed separately (the persistent compilation cache is switched off);
- step time: median / p10 / p90 over ``--steps`` steps after ``--warmup``, each synchronised with
  ``block_until_ready`` on the new state and metrics, plus the mean of the same number of back-to-back steps with
  one synchronisation at the end (what training sees, since the loop does not wait every step);
- steps/s and images/s (labelled + 2 × unlabelled images per STPG step);
- peak device memory (``peak_bytes_in_use``; each dtype runs in its own process so the peaks do not mix) and XLA's
  static memory analysis of the compiled step;
- FLOPs per step from XLA's cost analysis, achieved TFLOP/s and MFU against the chip's dense peak (bf16 for
  bfloat16 compute, tf32 for float32 compute, which is what XLA uses for float32 convolutions on Hopper);
- the selection + weighted-CE + contrastive + prototype/memory-bank part alone, jitted on its own at the step's
  sizes, and its share of the step. Inside the step XLA may fuse it with its neighbours, so the share is a close
  estimate, not an exact slice of the step;
- for STPG, back-to-back steps with the Hungarian matching on the host after each, as in the matching phase of
  training: waiting for every matching, and starting each step ahead of it (``stpg_jax.host_matching``).

Nothing here reads data or weights: the backbone is randomly initialised (its cost does not depend on the values).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/step_time.py` from a checkout without installing
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_summary  # noqa: E402  (the sibling script)

# A tiny network and crop that runs on a laptop CPU in well under a minute (CI smoke test).
TINY_OVERRIDES = (
    "model.stage_blocks=(1,1,1,1),model.width=8,model.aspp_channels=16,model.decoder_channels=16,"
    "model.low_level_channels=8,model.proj_dim=16,model.output_stride=8,data.crop_size=64,"
    "data.batch_labeled=2,data.batch_unlabeled=2,stpg.bank_capacity=32,stpg.bank_k=4"
)

# Dense peak TFLOP/s (no sparsity) by jax's device_kind: (bfloat16, float32 compute as tf32). Datasheet figures.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": (989.4, 494.7),  # H100 SXM5
    "NVIDIA H100": (989.4, 494.7),
    "NVIDIA H100 PCIe": (756.0, 378.0),
    "NVIDIA H100 NVL": (835.0, 417.5),
    "NVIDIA H200": (989.4, 494.7),
    "NVIDIA H200 NVL": (835.0, 417.5),
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 156.0),
    "NVIDIA A100 80GB PCIe": (312.0, 156.0),
    "NVIDIA A100-PCIE-40GB": (312.0, 156.0),
}

NUM_CLASSES = {"voc": 21, "cityscapes": 19, "camvid": 11, "synthetic": 11}


def log(message: str) -> None:
    print(message, flush=True)



def assignment_arrays(state):
    """The step's third argument, as the training loop passes it (imported late: JAX is set up first)."""
    from stpg_jax.host_matching import assignment_arrays as arrays

    return arrays(state)

# ----------------------------------------------------------------------------------------------------------------
# Config


def load_config(spec: str, extra_overrides: str = ""):
    """``path.py[:arg]`` → ``get_config(arg)``, as ml_collections' config_flags does; extra overrides appended."""
    path, _, arg = spec.partition(":")
    if extra_overrides:
        arg = f"{arg},{extra_overrides}" if arg else extra_overrides
    file = Path(path)
    if not file.is_file() and (REPO / path).is_file():
        file = REPO / path
    if not file.is_file():
        raise FileNotFoundError(f"--config: no such config file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_bench_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def num_classes_of(config, override: int = 0) -> int:
    if override:
        return override
    if len(config.data.class_names):
        return len(config.data.class_names)
    if config.data.dataset in NUM_CLASSES:
        return NUM_CLASSES[config.data.dataset]
    raise ValueError(f"dataset {config.data.dataset!r}: pass --num_classes")


def peak_tflops(device_kind: str, dtype: str):
    peaks = PEAK_TFLOPS.get(device_kind)
    if peaks is None:
        return None
    return peaks[0] if dtype == "bfloat16" else peaks[1]


def git_commit(repo: Path = REPO) -> str:
    """The checkout's short commit, with ``-dirty`` when tracked files differ from it ($STPG_COMMIT wins).

    A figure measured with uncommitted changes then says so instead of naming a commit that did not produce it.
    """
    if os.environ.get("STPG_COMMIT"):
        return os.environ["STPG_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=repo, capture_output=True, timeout=30)
        return commit + ("-dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers


def percentiles(times_s):
    t = np.asarray(times_s, np.float64) * 1e3
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "min_ms": float(np.min(t)), "n": int(t.size)}


def time_synchronised(fn, args_cycle, steps: int, warmup: int):
    """Calls ``fn(*args)`` with each call synchronised; returns per-call seconds after the warm-up."""
    times = []
    for i in range(warmup + steps):
        args = args_cycle(i)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def flops_of(compiled_or_lowered):
    """Total 'flops' from XLA's cost analysis; it is a dict in newer JAX, a list of per-module dicts in older."""
    try:
        analysis = compiled_or_lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if analysis is None:
        return None
    if isinstance(analysis, dict):
        analysis = [analysis]
    total = sum(float(a.get("flops", 0.0)) for a in analysis if a)
    return total if total > 0 else None


def model_flops_per_step(step_fn, state, batch):
    """FLOPs of one step from XLA's cost analysis of the step lowered for the host CPU from abstract shapes.

    The GPU's compiled cost analysis leaves out the cuDNN convolutions (custom calls), which are nearly all of the
    work, so MFU uses this hardware-independent count of the program's operations instead.
    """
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                                      (state, batch, assignment_arrays(state)))
    try:
        return flops_of(jax.jit(step_fn).lower(*abstract))
    except Exception:  # noqa: BLE001 - report n/a rather than fail the benchmark
        return None


def memory_analysis_of(compiled):
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}
    if {"argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"} <= out.keys():
        out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                              - out.get("alias_size_in_bytes", 0) + out["temp_size_in_bytes"])
    return out


def memory_stat(devices, key: str):
    """The largest ``device.memory_stats()[key]`` over ``devices``; None where a backend has no such figure."""
    values = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001  (backends without memory stats)
            stats = None
        if not stats or key not in stats:
            return None
        values.append(int(stats[key]))
    return max(values) if values else None


def peak_memory_bytes(devices):
    return memory_stat(devices, "peak_bytes_in_use")


def bytes_in_use(devices):
    return memory_stat(devices, "bytes_in_use")


# ----------------------------------------------------------------------------------------------------------------
# The real step


def build(config, num_classes: int, num_devices: int, batch_groups: int = 0):
    """Model, optimiser, settings, mesh, jitted step and an initial state past every schedule start.

    ``batch_groups``: the devices the step's batch is laid out for (``StepSettings.batch_groups``); by default the
    mesh's, as the Trainer sets it.
    """
    from stpg_jax import losses, sharding
    from stpg_jax.models import model_from_config
    from stpg_jax.state import init_train_state, make_optimizer
    from stpg_jax.train import same_step_matching, speculative_matching
    from stpg_jax.train_step import StepSettings, make_train_step

    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    mesh = sharding.make_mesh(devices)
    sharding.check_divisible(config, mesh)
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    c = config
    steps_per_epoch = c.schedule.steps_per_epoch or 100  # only places the schedule's starts; no data is read
    total_steps = c.schedule.total_steps or c.schedule.epochs * steps_per_epoch
    settings = StepSettings.from_config(c, num_classes, steps_per_epoch, batch_groups=batch_groups or len(devices))
    model = model_from_config(c.model, num_classes)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)["params"])
    tx, schedule = make_optimizer(c.optim, total_steps, abstract, train_projection_head=c.stpg.train_projection_head)
    dim = c.model.proj_dim or c.model.decoder_channels
    # Random unit anchors: the same shape as the optimised ones, without the 10k-step optimisation.
    anchors = losses.init_prototypes(jax.random.PRNGKey(1), num_classes, dim) if c.mode == "stpg" else None

    state = init_train_state(model, tx, jax.random.PRNGKey(c.seed), replicated, anchors=anchors,  # as the Trainer
                             mode=c.mode, num_classes=num_classes, crop_size=min(c.data.crop_size, 64), proj_dim=dim,
                             bank_capacity=c.stpg.bank_capacity)
    start = max(settings.bank_start_step, settings.contrastive_start_step, settings.proximity_start_step)
    state = state.replace(step=jax.device_put(jnp.asarray(start, jnp.int32), replicated))
    if state.contrast is not None:  # a full, matched bank: the contrastive terms see every row
        key = jax.random.PRNGKey(2)
        bank = state.contrast.bank
        bank = bank._replace(features=jax.random.normal(key, bank.features.shape, bank.features.dtype),
                             count=jnp.full_like(bank.count, bank.features.shape[1]))
        contrast = state.contrast.replace(bank=bank, matched=jnp.asarray(True))
        state = state.replace(contrast=jax.device_put(contrast, replicated))

    step = make_train_step(model, tx, schedule, settings)
    speculates = speculative_matching(c, mesh)
    keeps_input = speculates or same_step_matching(c)  # then the step keeps its input, as the Trainer compiles it
    jitted = jax.jit(step, in_shardings=(replicated, batch_sharding, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=() if keeps_input else 0)
    return dict(model=model, settings=settings, mesh=mesh, devices=devices, state=state, jitted=jitted, step_fn=step,
                batch_sharding=batch_sharding, replicated=replicated, start_step=start, speculates=speculates,
                same_step=same_step_matching(c))


def random_batches(config, num_classes: int, batch_sharding, count: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    s, bl, bu = config.data.crop_size, config.data.batch_labeled, config.data.batch_unlabeled
    batches = []
    for _ in range(count):
        label = rng.integers(0, num_classes, (bl, s, s), dtype=np.int32)
        label[rng.random((bl, s, s)) < 0.05] = config.data.ignore_index
        batch = {"image": rng.integers(0, 256, (bl, s, s, 3), dtype=np.uint8), "label": label}
        if config.mode != "supervised":
            batch["unlabeled0"] = rng.integers(0, 256, (bu, s, s, 3), dtype=np.uint8)
            batch["unlabeled1"] = rng.integers(0, 256, (bu, s, s, 3), dtype=np.uint8)
        batches.append({k: jax.device_put(v, batch_sharding) for k, v in batch.items()})
    return batches


# ----------------------------------------------------------------------------------------------------------------
# The selection + contrastive + memory-bank part alone


def losses_part_functions(settings, num_classes: int, bl: int, bu: int, crop: int, feat_hw, dim: int,
                          bank_capacity: int):
    """Jitted pieces of the method-specific losses at the step's sizes, and random inputs for them.

    Per step the STPG step runs: selection on the Pro-Student's (Bu,S,S) predictions; two weighted CEs on (Bu,S,S,C)
    logits, forward and backward to the logits; the dual contrastive loss on the labelled (Bl·h·w, D) and the
    unlabelled (Bu·h·w, D) features, forward and backward to the features; prototypes and the memory bank from the
    teacher's labelled (Bl·h·w, D) features.
    """
    from stpg_jax import losses

    h, w = feat_hw
    s = settings
    key = jax.random.PRNGKey(3)
    ks = jax.random.split(key, 12)
    c = num_classes
    inputs = dict(
        g_u=jax.random.normal(ks[0], (bu, crop, crop, c), jnp.float32),
        p_u=jax.random.normal(ks[1], (bu, crop, crop, c), jnp.float32),
        gen_target=jax.random.randint(ks[2], (bu, crop, crop), 0, c),
        pro_target=jax.random.randint(ks[3], (bu, crop, crop), 0, c),
        gen_conf=jax.random.uniform(ks[4], (bu, crop, crop)),
        pro_conf=jax.random.uniform(ks[5], (bu, crop, crop)),
        feats=jax.random.normal(ks[6], (bl + bu, h, w, dim), jnp.float32),
        y=jax.random.randint(ks[7], (bl, crop, crop), 0, c),
        yhat_p=jax.random.randint(ks[8], (bu, crop, crop), 0, c),
        teacher_feats=jax.random.normal(ks[9], (bl, h, w, dim), jnp.float32),
        # Confident teacher logits so that a realistic share of pixels are bank candidates.
        teacher_logits=8.0 * jax.random.normal(ks[10], (bl, h, w, c), jnp.float32),
        anchors=losses.init_prototypes(ks[11], c, dim),
        prototypes=losses.init_prototypes(ks[0], c, dim),
        bank=losses.init_memory_bank(c, bank_capacity, dim)._replace(
            features=jax.random.normal(ks[1], (c, bank_capacity, dim), jnp.float32),
            count=jnp.full((c,), bank_capacity, jnp.int32)),
    )

    def selection(x):
        pi = jnp.argmax(x["p_u"], axis=-1)
        return losses.select_pixels(x["pro_target"], pi, c, variant=s.selection)["keep"]

    def weighted_ce(x, keep):
        def f(g_u, p_u):
            return (losses.weighted_cross_entropy(g_u, x["gen_target"], x["gen_conf"], s.ignore_index)
                    + losses.weighted_cross_entropy(p_u, x["pro_target"], x["pro_conf"] * keep, s.ignore_index))
        return jax.value_and_grad(f, argnums=(0, 1))(x["g_u"], x["p_u"])

    def contrastive(x):
        def f(feats):
            y_small = losses.nearest_resize(x["y"], (h, w))
            p_small = losses.nearest_resize(x["yhat_p"], (h, w))
            args = dict(num_classes=c, ignore_index=s.ignore_index, temperature=s.contrastive_temperature)
            lab = losses.dual_contrastive_loss(feats[:bl].reshape(-1, dim), y_small.reshape(-1), x["anchors"],
                                               x["bank"].features, x["bank"].count, **args)
            unl = losses.dual_contrastive_loss(feats[bl:].reshape(-1, dim), p_small.reshape(-1), x["anchors"],
                                               x["bank"].features, x["bank"].count, **args)
            return s.contrastive_weight * (lab + unl)
        return jax.value_and_grad(f)(x["feats"])

    def bank(x):
        y_small = losses.nearest_resize(x["y"], (h, w))
        probs = jax.nn.softmax(x["teacher_logits"], axis=-1)
        cand = losses.bank_candidates(probs, y_small, s.bank_confidence, s.ignore_index).reshape(-1)
        flat_feats, flat_labels = x["teacher_feats"].reshape(-1, dim), y_small.reshape(-1)
        protos = losses.update_prototypes(x["prototypes"], flat_feats, flat_labels, cand, s.prototype_momentum)
        new_bank = losses.update_memory_bank(x["bank"], flat_feats, flat_labels, cand, x["anchors"], s.bank_n_add,
                                             jnp.asarray(True))
        return protos, new_bank

    def combined(x):
        keep = selection(x)
        return weighted_ce(x, keep), contrastive(x), bank(x)

    keep_fixed = jnp.ones((bu, crop, crop), jnp.float32)
    parts = {
        "selection": jax.jit(selection),
        "weighted_ce_fwd_bwd": jax.jit(lambda x: weighted_ce(x, keep_fixed)),
        "contrastive_fwd_bwd": jax.jit(contrastive),
        "prototypes_and_bank": jax.jit(bank),
        "all": jax.jit(combined),
    }
    return parts, inputs


def network_breakdown(b, state, batch, config, steps: int) -> dict:
    """Times one network's passes as the step runs them, to say what dominates a step.

    teacher_forward: one teacher on [u0, u1, x_l] (2·Bu + Bl images, train-mode BatchNorm, no gradient);
    student_forward_backward: one student's loss and gradient on [x_l, u_mix] (Bl + Bu images, a plain CE on
    random targets, so the network's cost without the method's losses). STPG runs two of each per step.
    """
    model = b["model"]
    net = state.gen_student
    x_l = batch["image"]
    u0, u1 = batch.get("unlabeled0", x_l[:0]), batch.get("unlabeled1", x_l[:0])
    teacher_in = jnp.concatenate([u0, u1, x_l]).astype(jnp.float32) / 255.0
    student_in = jnp.concatenate([x_l, u0]).astype(jnp.float32) / 255.0
    targets = jnp.concatenate([batch["label"], batch["label"][: u0.shape[0]]])
    targets = jnp.where(targets == config.data.ignore_index, 0, targets)

    @jax.jit
    def teacher_forward(params, batch_stats, images):
        out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                   rngs={"dropout": jax.random.PRNGKey(0)}, mutable=["batch_stats"])
        return out["logits"], out["features"], mutated["batch_stats"]

    @jax.jit
    def student_forward_backward(params, batch_stats, images, labels):
        def loss_fn(p):
            out, mutated = model.apply({"params": p, "batch_stats": batch_stats}, images, train=True,
                                       rngs={"dropout": jax.random.PRNGKey(0)}, mutable=["batch_stats"])
            logp = jax.nn.log_softmax(out["logits"], axis=-1)
            nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)
            return jnp.mean(nll) + 1e-3 * jnp.mean(out["features"] ** 2), mutated["batch_stats"]
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    result = {}
    for name, fn, args in (("teacher_forward", teacher_forward, (net.params, net.batch_stats, teacher_in)),
                           ("student_forward_backward", student_forward_backward,
                            (net.params, net.batch_stats, student_in, targets))):
        jax.block_until_ready(fn(*args))  # compile
        result[name] = percentiles(time_synchronised(fn, lambda i: args, max(steps, 10), 3))
    return result


# ----------------------------------------------------------------------------------------------------------------
# One dtype


def time_matching_loop(compiled, state, batches, steps: int, b, speculate: bool, warmup: int = 3):
    """Mean ms per step of ``steps`` back-to-back steps with the Hungarian matching on the host after each
    (stpg_jax.host_matching, as train.py runs it), after ``warmup`` untimed ones (where the first matching of the
    benchmark's random state changes its assignment)."""
    from stpg_jax.host_matching import HostMatching, SameStepMatching

    kind = SameStepMatching if b["same_step"] else HostMatching
    matching = kind(jax.device_get(state.contrast.anchors), b["replicated"], speculate)
    t0 = ahead = reruns = None
    metrics = None
    for i in range(warmup + steps):
        if i == warmup:
            state = jax.block_until_ready(state)
            t0, ahead, reruns = time.perf_counter(), matching.ahead, matching.reruns
        state, metrics = matching.run(compiled, state, batches[i % len(batches)], True)
    state = jax.block_until_ready(matching.finish(state, metrics)[0])
    mean_ms = (time.perf_counter() - t0) / steps * 1e3
    return state, {"mean_ms": mean_ms, "steps": steps, "ahead": matching.ahead - ahead,
                   "reruns": matching.reruns - reruns}


def run_dtype(args, dtype: str, save=lambda result: None) -> dict:
    overrides = f"model.dtype={dtype}"
    if args.tiny:
        overrides = f"{TINY_OVERRIDES},{overrides}"
    config = load_config(args.config, overrides)
    num_classes = num_classes_of(config, args.num_classes)
    c = config
    log(f"[{dtype}] config {args.config} mode={c.mode} dataset={c.data.dataset} classes={num_classes} "
        f"crop={c.data.crop_size} batch={c.data.batch_labeled}+{c.data.batch_unlabeled} "
        f"depth={c.model.depth if not len(c.model.stage_blocks) else tuple(c.model.stage_blocks)} "
        f"width={c.model.width}")

    t0 = time.perf_counter()
    b = build(config, num_classes, args.num_devices)
    log(f"[{dtype}] state initialised in {time.perf_counter() - t0:.1f}s on {len(b['devices'])} device(s) "
        f"({b['devices'][0].device_kind}); step counter set to {b['start_step']} (past every schedule start)")
    batches = random_batches(config, num_classes, b["batch_sharding"])
    state = b["state"]
    peak_after_init = peak_memory_bytes(b["devices"])

    log(f"[{dtype}] compiling the step (lower, then compile)...")
    t0 = time.perf_counter()
    lowered = b["jitted"].lower(state, batches[0], assignment_arrays(state))
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    log(f"[{dtype}] lower {lower_s:.1f}s, compile {compile_s:.1f}s")
    peak_after_compile = peak_memory_bytes(b["devices"])  # XLA's GPU autotuning allocates while compiling
    flops_compiled = flops_of(compiled)
    flops_hlo = model_flops_per_step(b["step_fn"], state, batches[0])
    flops = flops_hlo or flops_compiled
    memory_static = memory_analysis_of(compiled)

    log(f"[{dtype}] timing {args.warmup} warm-up + {args.steps} synchronised steps...")
    holder = {"state": state}

    def one_step(batch):
        holder["state"], metrics = compiled(holder["state"], batch, assignment_arrays(holder["state"]))
        return holder["state"], metrics

    times = time_synchronised(one_step, lambda i: (batches[i % len(batches)],), args.steps, args.warmup)
    stats = percentiles(times)
    log(f"[{dtype}] median {stats['median_ms']:.2f} ms (p10 {stats['p10_ms']:.2f}, p90 {stats['p90_ms']:.2f})")

    log(f"[{dtype}] timing {args.steps} back-to-back steps (one synchronisation at the end)...")
    t0 = time.perf_counter()
    out = None
    for i in range(args.steps):
        out = one_step(batches[i % len(batches)])
    jax.block_until_ready(out)
    pipelined_ms = (time.perf_counter() - t0) / args.steps * 1e3
    metrics = jax.device_get(out[1])
    loss = float(metrics["loss"])
    step_after = int(jax.device_get(holder["state"].step))

    peak = peak_memory_bytes(b["devices"])
    images = c.data.batch_labeled + (2 * c.data.batch_unlabeled if c.mode != "supervised" else 0)
    median_s = stats["median_ms"] / 1e3
    kind = b["devices"][0].device_kind
    peak_tf = peak_tflops(kind, dtype) if b["devices"][0].platform == "gpu" else None
    achieved = flops / median_s / 1e12 if flops else None
    result = {
        "dtype": dtype,
        "mode": c.mode,
        "num_classes": num_classes,
        "crop_size": c.data.crop_size,
        "batch_labeled": c.data.batch_labeled,
        "batch_unlabeled": c.data.batch_unlabeled,
        "images_per_step": images,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "step": stats,
        "pipelined_mean_ms": pipelined_ms,
        "steps_per_s": 1.0 / median_s,
        "images_per_s": images / median_s,
        "peak_memory_bytes": peak,
        # Where the peak was reached: peak_bytes_in_use only grows, so these say whether initialisation or the
        # compile (autotuning workspace) rather than the step set it.
        "peak_memory_after_init_bytes": peak_after_init,
        "peak_memory_after_compile_bytes": peak_after_compile,
        "bytes_in_use_after_steps": bytes_in_use(b["devices"]),
        "memory_limit_bytes": memory_stat(b["devices"], "bytes_limit"),  # the allocator's pool (see MEM_FRACTION)
        "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "memory_analysis": memory_static,
        "flops_per_step": flops,
        "flops_source": "lowered_hlo_cpu" if flops_hlo else ("compiled" if flops_compiled else None),
        "flops_per_step_compiled": flops_compiled,
        "achieved_tflops": achieved,
        "peak_tflops_per_device": peak_tf,
        "mfu": achieved / (peak_tf * len(b["devices"])) if achieved and peak_tf else None,
        "losses_part": {},
        "losses_part_share": None,
        "breakdown": {},
        "final_loss": loss,
        "step_counter_after": step_after,
    }
    save(result)  # a later phase that runs out of time leaves these figures behind

    if args.profile:  # before the optional phases: a run stopped by its timeout still has the trace
        trace_dir = os.path.join(args.profile, dtype)
        log(f"[{dtype}] profiling {args.profile_steps} steps into {trace_dir} ...")
        with jax.profiler.trace(trace_dir):
            for i in range(args.profile_steps):
                with jax.profiler.StepTraceAnnotation("train_step", step_num=i):
                    holder["state"], out = compiled(holder["state"], batches[i % len(batches)],
                                                    assignment_arrays(holder["state"]))
                    jax.block_until_ready(out)
        hlo_text = compiled.as_text()
        Path(trace_dir, "step_hlo.txt").write_text(hlo_text)
        try:
            summary = profile_summary.summarize(trace_dir, hlo_text, steps=args.profile_steps)
        except (OSError, ValueError, KeyError) as e:  # a trace the profiler could not write must not lose the timings
            log(f"[{dtype}] no profile summary: {e}")
        else:
            result["profile"] = summary
            log(f"[{dtype}] trace in {trace_dir}\n" + profile_summary.format_summary(summary))
        save(result)

    if b["speculates"] and args.matching_loop:
        log(f"[{dtype}] timing {args.steps} back-to-back steps with the host matching after each, as train.py runs "
            "the matching phase: waiting for each matching, then starting each step ahead of it...")
        result["matching_loop"] = {}
        for speculate in (False, True):
            holder["state"], timing = time_matching_loop(compiled, holder["state"], batches, args.steps, b, speculate)
            result["matching_loop"]["speculative" if speculate else "plain"] = timing
            log(f"[{dtype}]   {'speculative' if speculate else 'plain'}: {timing['mean_ms']:.2f} ms/step "
                f"({timing['reruns']} of {timing['ahead']} steps started ahead were run again)")
        save(result)

    # The losses part alone, at the step's sizes.
    variables = jax.eval_shape(
        lambda: b["model"].init(jax.random.PRNGKey(0), jnp.zeros((1, c.data.crop_size, c.data.crop_size, 3)),
                                train=False))
    out_shape = jax.eval_shape(
        lambda v: b["model"].apply(v, jnp.zeros((1, c.data.crop_size, c.data.crop_size, 3)), train=False),
        variables)
    h, w, dim = out_shape["features"].shape[1:]
    if c.mode == "stpg" and args.parts != "none":
        log(f"[{dtype}] timing the selection + contrastive + memory-bank part alone...")
        parts, inputs = losses_part_functions(b["settings"], num_classes, c.data.batch_labeled,
                                              c.data.batch_unlabeled, c.data.crop_size, (h, w), dim,
                                              c.stpg.bank_capacity)
        if args.parts == "all":
            parts = {"all": parts["all"]}
        parts_result = {}
        for name, fn in parts.items():
            jax.block_until_ready(fn(inputs))  # compile
            parts_result[name] = percentiles(time_synchronised(fn, lambda i: (inputs,), max(args.steps, 10), 3))
        parts_result["sizes"] = {"N_labeled": c.data.batch_labeled * h * w,
                                 "N_unlabeled": c.data.batch_unlabeled * h * w, "D": int(dim),
                                 "pixels_unlabeled": c.data.batch_unlabeled * c.data.crop_size ** 2,
                                 "classes": num_classes, "bank_capacity": c.stpg.bank_capacity,
                                 "bank_n_add": b["settings"].bank_n_add}
        result["losses_part"] = parts_result
        result["losses_part_share"] = parts_result["all"]["median_ms"] / stats["median_ms"]
        log(f"[{dtype}] losses part {parts_result['all']['median_ms']:.3f} ms, "
            f"{100 * result['losses_part_share']:.1f}% of the step")
        save(result)

    if args.breakdown:
        log(f"[{dtype}] timing one network's passes at the step's batch sizes (breakdown)...")
        result["breakdown"] = network_breakdown(b, holder["state"], batches[0], c, args.steps)
        for name, r in result["breakdown"].items():
            log(f"[{dtype}]   {name}: {r['median_ms']:.2f} ms")
        save(result)

    return result


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value, spec=".2f", scale=1.0, suffix=""):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value * scale:{spec}}{suffix}"


def markdown_tables(report: dict) -> str:
    rows = [
        "| dtype | lower s | compile s | median ms | p10 ms | p90 ms | back-to-back ms | steps/s | images/s | "
        "peak mem GiB | XLA mem GiB | GFLOP/step | TFLOP/s | MFU | losses part ms | share |",
        "|---|" + "---:|" * 15,
    ]
    for r in report["results"].values():
        mem_static = (r["memory_analysis"] or {}).get("total_bytes")
        part = r["losses_part"].get("all", {}).get("median_ms") if r["losses_part"] else None
        rows.append(
            f"| {r['dtype']} | {_fmt(r['lower_s'], '.1f')} | {_fmt(r['compile_s'], '.1f')} "
            f"| {_fmt(r['step']['median_ms'])} | {_fmt(r['step']['p10_ms'])} | {_fmt(r['step']['p90_ms'])} "
            f"| {_fmt(r['pipelined_mean_ms'])} | {_fmt(r['steps_per_s'], '.3f')} | {_fmt(r['images_per_s'], '.1f')} "
            f"| {_fmt(r['peak_memory_bytes'], '.2f', 2**-30)} | {_fmt(mem_static, '.2f', 2**-30)} "
            f"| {_fmt(r['flops_per_step'], '.1f', 1e-9)} | {_fmt(r['achieved_tflops'], '.1f')} "
            f"| {_fmt(r['mfu'], '.1f', 100, '%')} | {_fmt(part)} | {_fmt(r['losses_part_share'], '.1f', 100, '%')} |"
        )
    out = "\n".join(rows)
    parts = [r for r in report["results"].values() if r["losses_part"]]
    if parts:
        names = [k for k in parts[0]["losses_part"] if k != "sizes"]
        lines = ["", "", "Selection + contrastive + memory-bank part alone (median ms, jitted separately; sizes: "
                 + ", ".join(f"{k}={v}" for k, v in parts[0]["losses_part"]["sizes"].items()) + ")", "",
                 "| dtype | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for r in parts:
            lines.append(f"| {r['dtype']} | " + " | ".join(_fmt(r["losses_part"][n]["median_ms"], ".3f")
                                                          for n in names) + " |")
        out += "\n".join(lines)
    looped = [r for r in report["results"].values() if r.get("matching_loop")]
    if looped:
        lines = ["", "", "Back-to-back steps with the Hungarian matching on the host after each (ms/step, the same "
                 "compiled step; plain: each step waits for the matching, speculative: it starts ahead, "
                 "stpg_jax.host_matching)", "",
                 "| dtype | no matching | plain | speculative | steps run again |", "|---|---:|---:|---:|---:|"]
        for r in looped:
            plain, spec = r["matching_loop"]["plain"], r["matching_loop"]["speculative"]
            lines.append(f"| {r['dtype']} | {_fmt(r['pipelined_mean_ms'])} | {_fmt(plain['mean_ms'])} "
                         f"| {_fmt(spec['mean_ms'])} | {spec['reruns']} of {spec['ahead']} |")
        out += "\n".join(lines)
    broken = [r for r in report["results"].values() if r.get("breakdown")]
    if broken:
        lines = ["", "", "One network's passes at the step's batch sizes (median ms; STPG runs two teachers and two "
                 "students per step)", "",
                 "| dtype | teacher forward | student forward+backward | 2 x (teacher + student) | step |",
                 "|---|---:|---:|---:|---:|"]
        for r in broken:
            t = r["breakdown"]["teacher_forward"]["median_ms"]
            st = r["breakdown"]["student_forward_backward"]["median_ms"]
            lines.append(f"| {r['dtype']} | {t:.2f} | {st:.2f} | {2 * (t + st):.2f} | {r['step']['median_ms']:.2f} |")
        out += "\n".join(lines)
    return out


def header(report: dict) -> str:
    d = report["device"]
    return (f"{report['date']} | commit {report['commit']} | jax {report['jax_version']} | {d['count']} x "
            f"{d['kind']} ({d['platform']}) | host {report['host']}\ncommand: {report['command']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/voc_blender.py:1_4",
                   help="config file, with the split and overrides after ':' (as launch.py takes it)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    p.add_argument("--steps", type=int, default=30, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--profile", default="", help="write a jax.profiler trace of a few steps into this folder")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny network, crop 64, batch 2+2: a CPU smoke test")
    p.add_argument("--parts", choices=("each", "all", "none"), default="each",
                   help="losses part: time each piece and the whole ('each'), only the whole, or skip it")
    p.add_argument("--breakdown", action="store_true",
                   help="also time one teacher forward and one student forward+backward at the step's batch sizes")
    p.add_argument("--no_matching_loop", dest="matching_loop", action="store_false",
                   help="skip timing the loop with the host matching after every step (STPG with contrastive)")
    p.add_argument("--num_classes", type=int, default=0, help="for 'folder' datasets (others know theirs)")
    p.add_argument("--num_devices", type=int, default=0, help="use the first N devices (0 = all)")
    p.add_argument("--in_process", action="store_true",
                   help="run every dtype in this process (by default each runs in its own, so the peak-memory "
                        "readings do not mix)")
    p.add_argument("--no_table", action="store_true", help=argparse.SUPPRESS)  # set for the per-dtype processes
    args = p.parse_args(argv)
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtype_list:
        if d not in ("float32", "bfloat16"):
            p.error(f"--dtypes: unknown dtype {d!r} (float32, bfloat16)")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def run_cli(main, *errors) -> None:
    """Runs a benchmark script's ``main``: a bad config, a missing file or one of ``errors`` ends it with one
    ``error:`` line (as launch.py says them) and exit status 2; an integer ``main`` returns is the exit status."""
    from stpg_jax.config import ConfigError

    try:
        code = main()
    except (ConfigError, FileNotFoundError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def _child_argv(argv, dtype, out):
    skip = {"--dtypes", "--out"}
    kept, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in skip:
            i += 1 if "=" in a else 2
            continue
        kept.append(a)
        i += 1
    return kept + ["--dtypes", dtype, "--out", out, "--in_process", "--no_table"]


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Honest compile times: never read a persistent compilation cache.
    jax.config.update("jax_enable_compilation_cache", False)
    load_config(args.config, TINY_OVERRIDES if args.tiny else "")  # a bad --config fails here, once

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "jax_version": jax.__version__,
        "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "command": "python benchmarks/step_time.py " + " ".join(argv),
        "config": args.config + (f" + tiny ({TINY_OVERRIDES})" if args.tiny else ""),
        "results": {},
    }
    if len(args.dtype_list) > 1 and not args.in_process:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for dtype in args.dtype_list:
                out = os.path.join(tmp, f"{dtype}.json")
                cmd = [sys.executable, os.path.abspath(__file__)] + _child_argv(argv, dtype, out)
                log(f"[{dtype}] running in its own process: {' '.join(cmd[1:])}")
                rc = subprocess.run(cmd).returncode
                if rc != 0:
                    raise SystemExit(f"the {dtype} run failed with exit status {rc}")
                with open(out) as f:
                    child = json.load(f)
                report["results"].update(child["results"])
                report["device"] = child["device"]
    else:
        devices = jax.devices()[:args.num_devices] if args.num_devices else jax.devices()
        report["device"] = {"kind": devices[0].device_kind, "platform": devices[0].platform, "count": len(devices)}
        for dtype in args.dtype_list:
            def save(result, dtype=dtype):
                report["results"][dtype] = result
                if args.out:
                    write_json(args.out, report)

            save(run_dtype(args, dtype, save))

    if not args.no_table:
        print("\n" + header(report) + "\n\n" + markdown_tables(report), flush=True)
    if args.out:
        write_json(args.out, report)
        log(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    run_cli(main)
