"""Time, memory and FLOPs of the real training step; with --profile where its device time goes; with --target its
memory on a GPU, compiled for one on a machine without it.

    python benchmarks/step_time.py --config=configs/voc_blender.py:1_4,model.dtype=bfloat16
    python benchmarks/step_time.py --tiny --steps 3 --warmup 1                 # a CPU smoke test
    python benchmarks/step_time.py --profile /tmp/prof                         # + a jax.profiler trace, summarised
    pip install "jax-cuda13-plugin==$JAXV" "jax-cuda13-pjrt==$JAXV"            # JAXV: the installed jax's version
    python benchmarks/step_time.py --target h100                               # compiled for an H100, not run

The step of the config's mode and compute dtype (``model.dtype``) is built as the Trainer builds it and run on
random batches of the config's shapes, its step counter past every schedule start so that the whole method runs;
nothing reads data or weights.
``--target`` (``h100``, ``h200``, ``a100``: ``gpu_targets/*.txtpb``, or a target file) builds it on the host CPU,
compiles it with XLA's CUDA compiler through JAX's topology API and reports XLA's memory analysis of that program
(convolutions are not autotuned without the device, so their workspaces are not in it). BENCHMARKS.md says what
each figure means and holds the ones measured.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and any(a.startswith("--target") for a in sys.argv):
    os.environ["JAX_PLATFORMS"] = "cpu"  # the state is built on the host CPU; the GPU is only a compilation target

import hlo
from common import (TINY_NETWORK, arg_parser, finish, load_config, log, num_classes_of, report_header, run_cli,
                    write_json)

import jax
import jax.numpy as jnp
import numpy as np

from stpg_jax import losses, sharding
from stpg_jax.build import build as build_parts
from stpg_jax.host_matching import assignment_arrays  # the step's third argument, as the training loop passes it
from stpg_jax.train_step import train_step

# The tiny network at crop 64, batch 2 + 2: the step in under a minute on a CPU (the CI smoke test).
GIB = 2**30
TINY_OVERRIDES = (f"{TINY_NETWORK},data.crop_size=64,data.batch_labeled=2,data.batch_unlabeled=2,"
                  "stpg.bank_capacity=32,stpg.bank_k=4")

# Dense peak TFLOP/s (no sparsity) of the SXM parts by jax's device_kind: (bfloat16, float32 as tf32). Datasheet
# figures; other parts (PCIe, NVL) get no MFU.
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": (989.4, 494.7), "NVIDIA H200": (989.4, 494.7),
               "NVIDIA A100-SXM4-80GB": (312.0, 156.0), "NVIDIA A100-SXM4-40GB": (312.0, 156.0)}


def peak_tflops(device_kind: str, dtype: str):
    peaks = PEAK_TFLOPS.get(device_kind)
    return None if peaks is None else peaks[0] if dtype == "bfloat16" else peaks[1]


# Measurement


def percentiles(times_s):
    t = np.asarray(times_s, np.float64) * 1e3
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "min_ms": float(np.min(t)), "n": int(t.size)}


def time_synchronised(fn, args_of, steps: int, warmup: int):
    """Seconds of each call ``fn(*args_of(i))`` after ``warmup`` calls, each synchronised."""
    times = []
    for i in range(warmup + steps):
        args = args_of(i)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def flops_of(compiled_or_lowered):
    """The 'flops' of XLA's cost analysis (a dict; in JAX before 0.4.36 a list of one); None where there is none."""
    try:
        analysis = compiled_or_lowered.cost_analysis()
        return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"]) or None
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None


def model_flops_per_step(recipe, state, batch):
    """FLOPs of one step from the cost analysis of the step lowered for the host CPU from abstract shapes: the
    GPU's compiled analysis leaves out the cuDNN convolutions (custom calls), nearly all of the work."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                                      (state, batch, assignment_arrays(state)))
    try:
        return flops_of(jax.jit(train_step, static_argnums=0).lower(recipe, *abstract))
    except Exception:  # noqa: BLE001 - report n/a rather than fail the benchmark
        return None


def memory_analysis_of(compiled):
    """XLA's static memory analysis of a compiled program, with its total (arguments + outputs − aliased +
    temporaries); None where the backend has none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}
    if {"argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"} <= out.keys():
        out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                              - out.get("alias_size_in_bytes", 0) + out["temp_size_in_bytes"])
    return out or None


def memory_stat(devices, key: str):
    """The largest ``device.memory_stats()[key]`` over ``devices``; None where a backend has no such figure."""
    try:
        return max(int(d.memory_stats()[key]) for d in devices)
    except Exception:  # noqa: BLE001  (no stats: None, or no such key)
        return None


# The real step


def build(config, num_classes: int, mesh):
    """The run's parts as the Trainer builds them (``stpg_jax.build``; steps_per_epoch only places the schedule's
    starts, no data is read), and the step counter at which every part of the method runs."""
    sharding.check_divisible(config, mesh)
    parts = build_parts(config, num_classes, config.schedule.steps_per_epoch or 100, mesh)
    phases = parts.recipe.phases
    return parts, max(phases.bank_start, phases.contrastive_start, phases.proximity_start)


def running_state(parts, start: int):
    """An initial state at step ``start`` with a full, matched bank, so the contrastive terms see every row; random
    unit anchors of the optimised ones' shape, without their 10k-step optimisation."""
    recipe = parts.recipe
    stpg = parts.config.mode == "stpg"
    state = parts.init_state(losses.init_prototypes(jax.random.PRNGKey(1), recipe.num_classes, recipe.feature_dim)
                             if stpg else None)
    state = state.replace(step=jax.device_put(jnp.asarray(start, jnp.int32), parts.replicated))
    if state.contrast is not None:
        bank = state.contrast.bank
        bank = bank._replace(features=jax.random.normal(jax.random.PRNGKey(2), bank.features.shape,
                                                        bank.features.dtype),
                             count=jnp.full_like(bank.count, bank.features.shape[1]))
        contrast = state.contrast.replace(bank=bank, matched=jnp.asarray(True))
        state = state.replace(contrast=jax.device_put(contrast, parts.replicated))
    return state


def batch_shapes(config) -> dict:
    """{name: (shape, dtype)} of the step's batch, as the training loader delivers it."""
    s, bl, bu = config.data.crop_size, config.data.batch_labeled, config.data.batch_unlabeled
    shapes = {"image": ((bl, s, s, 3), np.uint8), "label": ((bl, s, s), np.int32)}
    if config.mode != "supervised":
        shapes.update(unlabeled0=((bu, s, s, 3), np.uint8), unlabeled1=((bu, s, s, 3), np.uint8))
    return shapes


def random_batches(config, num_classes: int, batch_sharding, count: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        batch = {k: rng.integers(0, num_classes if k == "label" else 256, shape, dtype)
                 for k, (shape, dtype) in batch_shapes(config).items()}
        batch["label"][rng.random(batch["label"].shape) < 0.05] = config.data.ignore_index
        batches.append({k: jax.device_put(v, batch_sharding) for k, v in batch.items()})
    return batches


def compile_step(parts, state, batch):
    """The run's jitted step lowered and compiled for (state, batch): (compiled, lower seconds, compile seconds)."""
    t0 = time.perf_counter()
    lowered = parts.jitted_step().lower(parts.recipe, state, batch, assignment_arrays(state))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def described(c, num_classes: int) -> dict:
    """What a result measured: the config's dtype, mode, classes, crop and batch."""
    return {"dtype": c.model.dtype, "mode": c.mode, "num_classes": num_classes, "crop_size": c.data.crop_size,
            "batch_labeled": c.data.batch_labeled, "batch_unlabeled": c.data.batch_unlabeled}


# One measurement


def measure(args, save=lambda result: None) -> dict:
    c = load_config(args.config, TINY_OVERRIDES if args.tiny else "")
    num_classes = num_classes_of(c, args.num_classes)
    log(f"config {args.config} mode={c.mode} dataset={c.data.dataset} classes={num_classes} "
        f"crop={c.data.crop_size} batch={c.data.batch_labeled}+{c.data.batch_unlabeled}")
    if args.target:
        return compile_for_target(args, c, num_classes)
    t0 = time.perf_counter()
    devices = jax.devices()[:args.num_devices] if args.num_devices else jax.devices()
    parts, start = build(c, num_classes, sharding.make_mesh(devices))
    state = running_state(parts, start)
    log(f"state initialised in {time.perf_counter() - t0:.1f}s on {len(devices)} device(s) "
        f"({devices[0].device_kind}); step counter set to {start} (past every schedule start)")
    batches = random_batches(c, num_classes, parts.batch_sharding)
    peak_after_init = memory_stat(devices, "peak_bytes_in_use")

    log("compiling the step (lower, then compile)...")
    compiled, lower_s, compile_s = compile_step(parts, state, batches[0])
    log(f"lower {lower_s:.1f}s, compile {compile_s:.1f}s")
    peak_after_compile = memory_stat(devices, "peak_bytes_in_use")  # XLA's GPU autotuning allocates while compiling
    flops_compiled, flops_hlo = flops_of(compiled), model_flops_per_step(parts.recipe, state, batches[0])
    flops = flops_hlo or flops_compiled

    log(f"timing {args.warmup} warm-up + {args.steps} synchronised steps...")
    holder = {"state": state}

    def one_step(batch):
        holder["state"], metrics = compiled(holder["state"], batch, assignment_arrays(holder["state"]))
        return holder["state"], metrics

    stats = percentiles(time_synchronised(one_step, lambda i: (batches[i % 2],), args.steps, args.warmup))
    log(f"median {stats['median_ms']:.2f} ms (p10 {stats['p10_ms']:.2f}, p90 {stats['p90_ms']:.2f}); "
        f"timing {args.steps} back-to-back steps (one synchronisation at the end)...")
    t0 = time.perf_counter()
    for i in range(args.steps):
        out = one_step(batches[i % 2])
    jax.block_until_ready(out)
    pipelined_ms = (time.perf_counter() - t0) / args.steps * 1e3

    images = c.data.batch_labeled + (2 * c.data.batch_unlabeled if c.mode != "supervised" else 0)
    median_s = stats["median_ms"] / 1e3
    peak_tf = peak_tflops(devices[0].device_kind, c.model.dtype) if devices[0].platform == "gpu" else None
    achieved = flops / median_s / 1e12 if flops else None
    result = {
        **described(c, num_classes), "images_per_step": images,
        "lower_s": lower_s, "compile_s": compile_s, "step": stats, "pipelined_mean_ms": pipelined_ms,
        "steps_per_s": 1.0 / median_s, "images_per_s": images / median_s,
        # peak_bytes_in_use only grows: the readings after initialisation and compilation say which phase set it.
        "peak_memory_bytes": memory_stat(devices, "peak_bytes_in_use"),
        "peak_memory_after_init_bytes": peak_after_init, "peak_memory_after_compile_bytes": peak_after_compile,
        "memory_limit_bytes": memory_stat(devices, "bytes_limit"),  # the allocator's pool
        "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "memory_analysis": memory_analysis_of(compiled),
        "flops_per_step": flops, "flops_source": "lowered_hlo_cpu" if flops_hlo else "compiled" if flops else None,
        "achieved_tflops": achieved, "peak_tflops_per_device": peak_tf,
        "mfu": achieved / (peak_tf * len(devices)) if achieved and peak_tf else None,
        "final_loss": float(jax.device_get(out[1])["loss"]),
        "step_counter_after": int(jax.device_get(holder["state"].step)),
    }
    save(result)  # a later phase that runs out of time leaves these figures behind

    if args.profile:  # before the optional phases: a run stopped by its timeout still has the trace
        log(f"profiling {args.profile_steps} steps into {args.profile} ...")
        with jax.profiler.trace(args.profile):
            for i in range(args.profile_steps):
                with jax.profiler.StepTraceAnnotation("train_step", step_num=i):
                    jax.block_until_ready(one_step(batches[i % 2]))
        hlo_text = compiled.as_text()
        Path(args.profile, "step_hlo.txt").write_text(hlo_text)
        try:
            result["profile"] = hlo.summarize_profile(args.profile, hlo_text, steps=args.profile_steps)
            log(f"trace in {args.profile}\n" + hlo.format_profile(result["profile"]))
        except (OSError, ValueError, KeyError) as e:  # a trace the profiler could not write must not lose the timings
            log(f"no profile summary: {e}")
        save(result)

    return result


def compile_for_target(args, c, num_classes: int) -> dict:
    """The step compiled for ``args.num_devices`` GPUs of ``args.target`` from the state's and batch's shapes:
    XLA's memory analysis."""
    target_text, target = args.target_spec
    parts, _ = build(c, num_classes, hlo.gpu_mesh(target_text, args.num_devices))
    state = parts.abstract_state()
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parts.batch_sharding)
             for k, (shape, dtype) in batch_shapes(c).items()}
    compiled, lower_s, compile_s = compile_step(parts, state, batch)
    log(f"lowered in {lower_s:.1f}s, compiled for {args.num_devices} x {target['device_kind']} in {compile_s:.1f}s")
    return {**described(c, num_classes), "donated": parts.donates_state, "lower_s": lower_s, "compile_s": compile_s,
            "memory": memory_analysis_of(compiled), "flops_per_step": model_flops_per_step(parts.recipe, state, batch)}


# Report


def _fmt(value, spec=".2f", scale=1.0, suffix=""):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value * scale:{spec}}{suffix}"


def markdown_table(r: dict) -> str:
    return ("| dtype | lower s | compile s | median ms | p10 ms | p90 ms | back-to-back ms | images/s | peak mem GiB "
            "| XLA mem GiB | GFLOP/step | TFLOP/s | MFU |\n|---|" + "---:|" * 12 + "\n"
            f"| {r['dtype']} | {_fmt(r['lower_s'], '.1f')} | {_fmt(r['compile_s'], '.1f')} "
            f"| {_fmt(r['step']['median_ms'])} | {_fmt(r['step']['p10_ms'])} | {_fmt(r['step']['p90_ms'])} "
            f"| {_fmt(r['pipelined_mean_ms'])} | {_fmt(r['images_per_s'], '.1f')} "
            f"| {_fmt(r['peak_memory_bytes'], '.2f', 1 / GIB)} "
            f"| {_fmt((r['memory_analysis'] or {}).get('total_bytes'), '.2f', 1 / GIB)} "
            f"| {_fmt(r['flops_per_step'], '.1f', 1e-9)} | {_fmt(r['achieved_tflops'], '.1f')} "
            f"| {_fmt(r['mfu'], '.1f', 100, '%')} |")


def target_table(report: dict) -> str:
    r, m = report["result"], report["result"]["memory"] or {}
    gib = [_fmt(m.get(f"{k}_bytes"), ".2f", 1 / GIB) for k in ("argument_size_in", "output_size_in", "alias_size_in",
                                                                  "temp_size_in", "total")]
    return (f"{report['config']} compiled for {report['num_devices']} x {report['target']['device_kind']} without "
            "a GPU; XLA's memory analysis per device:\n\n| dtype | state donated | arguments GiB | outputs GiB "
            "| aliased GiB | temporaries GiB | total GiB | GFLOP/step |\n|---|---|" + "---:|" * 6 + "\n"
            f"| {r['dtype']} | {'yes' if r['donated'] else 'no'} | " + " | ".join(gib)
            + f" | {_fmt(r['flops_per_step'], '.1f', 1e-9)} |")


def parse_args(argv=None):
    p = arg_parser(__doc__, "configs/voc_blender.py:1_4")
    p.add_argument("--num_classes", type=int, default=0, help="for 'folder' datasets (others know theirs)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    p.add_argument("--profile", default="", help="write a jax.profiler trace of a few steps into this folder")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny network, crop 64, batch 2+2: a CPU smoke test")
    p.add_argument("--num_devices", type=int, default=0,
                   help="use the first N devices (0 = all); with --target the GPUs compiled for (0 = 1)")
    p.add_argument("--target", default="", help="compile for h100, h200, a100 or an XLA GPU target description file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.num_devices < 0:
        p.error("--steps must be >= 1, --warmup and --num_devices >= 0")
    if args.target:
        args.num_devices = args.num_devices or 1
        args.target_spec = hlo.read_target(args.target)  # a bad --target fails here
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # honest compile times
    load_config(args.config, TINY_OVERRIDES if args.tiny else "")  # a bad --config fails here
    report = {**report_header("step_time.py", argv), "jax_version": jax.__version__,
              "config": args.config + (f" + tiny ({TINY_OVERRIDES})" if args.tiny else ""), "result": None}
    if args.target:
        report.update(target=args.target_spec[1], num_devices=args.num_devices, result=measure(args))
        return finish(report, target_table(report), args.out, f" | jax {report['jax_version']}")
    devices = jax.devices()[:args.num_devices] if args.num_devices else jax.devices()
    report["device"] = {"kind": devices[0].device_kind, "platform": devices[0].platform, "count": len(devices)}

    def save(result):  # after each phase: a run stopped by its timeout keeps what it measured
        report["result"] = result
        if args.out:
            write_json(args.out, report)

    save(measure(args, save))
    d = report["device"]
    return finish(report, markdown_table(report["result"]), args.out,
                  f" | jax {report['jax_version']} | {d['count']} x {d['kind']} ({d['platform']})")


if __name__ == "__main__":
    run_cli(main, hlo.TargetError)
