"""The real training step compiled for a GPU on a machine without one: XLA's memory analysis and its kernels.

    JAXV=$(python -c "import jax; print(jax.__version__)")
    pip install "jax-cuda13-plugin==$JAXV" "jax-cuda13-pjrt==$JAXV"      # about 400 MB; no CUDA libraries needed
    python benchmarks/compile_for_gpu.py --config=configs/voc_blender.py:1_4 --target h100 --dtypes bfloat16,float32

It builds the step of the config's mode as ``benchmarks/step_time.py`` does (same model, optimiser, settings, jit
shardings and state donation; the state on the host CPU, past every schedule start), then lowers and compiles it for
the GPU described by ``--target`` through JAX's topology API (``jax.experimental.topologies``) and XLA's CUDA
compiler, with no GPU present. Convolution algorithms are not autotuned (that needs the device), so their workspaces
are not in the figures. For each compute dtype it prints:

- XLA's memory analysis of the compiled step: arguments, outputs, aliased (donated) bytes, temporaries and their
  total, per device: what ``step_time.py`` reports as "XLA static" on the GPU itself;
- the compiled program's kernels and memory traffic by category, and the step-time floors and MFU ceiling they
  imply at the target's bandwidth and dense peak (``benchmarks/hlo_traffic.py``; properties of the program, not
  timings), with the step's FLOPs from XLA's cost analysis of the step lowered for the CPU, as in ``step_time.py``.

``--state_init`` compiles instead the two programs that build a new run's initial state (``init_train_state``: the
network initialiser, run once per student, and the rest of the state around the students), once with XLA's own
lowering of jax.random's threefry and once with one kernel per call (``stpg_jax.state.threefry_kernels``, what
``init_train_state`` uses), and prints each one's compile time and kernels: most of a GPU run's start-up before its
first step.

``--target`` is ``h100``, ``h200`` or ``a100`` (``benchmarks/gpu_targets/*.txtpb``, SXM models) or the path of another XLA GPU target
description (text proto). ``--num_devices N`` compiles for N such GPUs on one host, the batch split over them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import sys
import time
from pathlib import Path

# The state is built on the host CPU; the GPU is only a compilation target. Set before JAX is imported.
os.environ["JAX_PLATFORMS"] = "cpu"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hlo_traffic  # noqa: E402
import step_time  # noqa: E402  (puts the repository on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

TARGETS = {"h100": HERE / "gpu_targets" / "h100_sxm.txtpb", "h200": HERE / "gpu_targets" / "h200_sxm.txtpb",
           "a100": HERE / "gpu_targets" / "a100_sxm.txtpb"}
GIB = 2**30


class TargetError(RuntimeError):
    pass


def read_target(spec: str) -> tuple[str, dict]:
    """The target's text proto and the figures this script uses from it (name, bandwidth, L2, memory)."""
    path = TARGETS.get(spec.lower(), Path(spec))
    if not path.is_file():
        raise TargetError(f"--target {spec!r}: expected {', '.join(TARGETS)} or the path of an XLA GPU target "
                          f"description (text proto), and {path} is not a file")
    text = path.read_text()

    def field(name, cast=float):
        m = re.search(rf"^\s*{name}:\s*\"?([^\"\n]+)\"?", text, re.MULTILINE)
        return cast(m[1]) if m else None

    info = {"file": str(path), "device_kind": field("device_description_str", str),
            "memory_bandwidth": field("memory_bandwidth"), "l2_cache_size": field("l2_cache_size", int),
            "device_memory_size": field("device_memory_size", int)}
    if not info["device_kind"] or not info["memory_bandwidth"]:
        raise TargetError(f"{path}: expected device_description_str and gpu_device_info.memory_bandwidth in the "
                          "target description")
    return text, info


def gpu_mesh(target_text: str, num_devices: int):
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target_text,
                                                topology=f"1x1x{num_devices}")
    except Exception as e:  # noqa: BLE001  (no CUDA plugin: NotImplementedError / RuntimeError by version)
        v = jax.__version__
        raise TargetError(
            f"could not create a CUDA topology ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Compiling for a GPU without one needs JAX's CUDA plugin for jax {v}: "
            f"pip install \"jax-cuda13-plugin=={v}\" \"jax-cuda13-pjrt=={v}\"") from e
    return topologies.make_mesh(topology, (num_devices,), ("data",))


def compile_dtype(args, dtype: str, target_text: str, target: dict) -> dict:
    from jax.sharding import NamedSharding, PartitionSpec as P

    from stpg_jax import sharding

    config = step_time.load_config(args.config, f"model.dtype={dtype}")
    num_classes = step_time.num_classes_of(config, args.num_classes)
    mesh = gpu_mesh(target_text, args.num_devices)
    sharding.check_divisible(config, mesh)
    t0 = time.perf_counter()
    # On the host CPU (only shapes and dtypes travel to the target), the step laid out for the target's devices.
    b = step_time.build(config, num_classes, 1, batch_groups=args.num_devices)
    batch = step_time.random_batches(config, num_classes, b["batch_sharding"], count=1)[0]
    step_time.log(f"[{dtype}] state built on the CPU in {time.perf_counter() - t0:.1f}s")
    flops = step_time.model_flops_per_step(b["step_fn"], b["state"], batch)

    replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def abstract(tree, where):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), tree)

    state, batch = abstract(b["state"], replicated), abstract(batch, batch_sharded)
    assignment = step_time.assignment_arrays(state)
    del b["state"]
    keeps_input = b["speculates"] or b["same_step"]  # as the Trainer compiles it
    jitted = jax.jit(b["step_fn"], in_shardings=(replicated, batch_sharded, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=() if keeps_input else 0)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch, assignment)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    step_time.log(f"[{dtype}] lowered in {lower_s:.1f}s, compiled for {args.num_devices} x {target['device_kind']} "
                  f"in {compile_s:.1f}s")
    text = compiled.as_text()
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        path = os.path.join(args.hlo_dir, f"step_{dtype}.hlo.txt")
        Path(path).write_text(text)
        step_time.log(f"[{dtype}] optimised HLO written to {path}")
    peak = step_time.peak_tflops(target["device_kind"], dtype)
    cache = target["l2_cache_size"] or 0
    rows = hlo_traffic.kernels(text, cache)
    # Per device: the FLOPs of the whole step split evenly over the devices.
    tflop = flops / 1e12 / args.num_devices if flops else None
    traffic = hlo_traffic.summarize(rows, target["memory_bandwidth"] / 1e12, tflop, peak, args.top, cache)
    return {"dtype": dtype, "mode": config.mode, "num_classes": num_classes, "crop_size": config.data.crop_size,
            "batch_labeled": config.data.batch_labeled, "batch_unlabeled": config.data.batch_unlabeled,
            "donated": not b["speculates"], "lower_s": lower_s, "compile_s": compile_s,
            "memory": step_time.memory_analysis_of(compiled), "flops_per_step": flops,
            "peak_tflops": peak, "traffic": traffic}


def compile_state_init(args, target_text: str, target: dict) -> dict:
    """Compile times of ``init_train_state``'s two programs for the target, without and with threefry kernels."""
    import functools

    from jax.sharding import NamedSharding, PartitionSpec as P

    from stpg_jax.models import model_from_config
    from stpg_jax.state import assemble_train_state, init_network, make_optimizer, threefry_kernels

    c = step_time.load_config(args.config)
    num_classes = step_time.num_classes_of(c, args.num_classes)
    mesh = gpu_mesh(target_text, args.num_devices)
    rep = NamedSharding(mesh, P())
    model = model_from_config(c.model, num_classes)
    crop = min(c.data.crop_size, 64)  # the Trainer's dummy input (its forward pass is traced, then left out)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)["params"])
    tx, _ = make_optimizer(c.optim, 1000, params, train_projection_head=c.stpg.train_projection_head)
    dim = c.model.proj_dim or c.model.decoder_channels

    def on_target(tree):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)

    key = on_target(jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    net = on_target(jax.eval_shape(lambda: init_network(model, jax.random.PRNGKey(0), crop)))
    anchors = on_target(jax.ShapeDtypeStruct((num_classes, dim), jnp.float32)) if c.mode == "stpg" else None
    pro = net if c.mode == "stpg" else None
    programs = {
        "network initialiser": lambda: jax.jit(lambda k: init_network(model, k, crop), out_shardings=rep).lower(key),
        "rest of the state": lambda: jax.jit(
            functools.partial(assemble_train_state, tx, mode=c.mode, num_classes=num_classes, proj_dim=dim,
                              bank_capacity=c.stpg.bank_capacity),
            out_shardings=rep, donate_argnums=(1, 2)).lower(key, net, pro, anchors=anchors),
    }
    results = {}
    for lowering, context in (("XLA rounds", contextlib.nullcontext), ("threefry kernels", threefry_kernels)):
        for name, lower in programs.items():
            with context():
                t0 = time.perf_counter()
                lowered = lower()
                lower_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                compiled = lowered.compile()
                compile_s = time.perf_counter() - t0
            kernels = len(hlo_traffic.kernels(compiled.as_text()))
            step_time.log(f"[state init, {lowering}] {name}: lowered in {lower_s:.1f}s, compiled for "
                          f"{args.num_devices} x {target['device_kind']} in {compile_s:.1f}s, {kernels} kernels")
            results[f"{lowering} / {name}"] = {"lowering": lowering, "program": name, "lower_s": lower_s,
                                               "compile_s": compile_s, "kernels": kernels}
    return results


def format_state_init(report: dict) -> str:
    t = report["target"]
    lines = [f"{report['config']}: the initial state's programs compiled for {report['num_devices']} x "
             f"{t['device_kind']} without a GPU ({report['date']}, commit {report['commit']}, jax "
             f"{report['jax_version']})", "", "| threefry lowering | program | lower s | compile s | kernels |",
             "|---|---|---:|---:|---:|"]
    for r in report["state_init"].values():
        lines.append(f"| {r['lowering']} | {r['program']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} "
                     f"| {r['kernels']} |")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    t = report["target"]
    lines = [f"{report['config']} compiled for {report['num_devices']} x {t['device_kind']} without a GPU "
             f"({report['date']}, commit {report['commit']}, jax {report['jax_version']}); per device:", "",
             "| dtype | state donated | arguments GiB | outputs GiB | aliased GiB | temporaries GiB | total GiB "
             "| kernels | GB moved | MFU ceiling |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"].values():
        m = r["memory"] or {}
        g = {k: m.get(k, float("nan")) / GIB for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                         "alias_size_in_bytes", "temp_size_in_bytes", "total_bytes")}
        bound = r["traffic"].get("bounds", {}).get("bytes", {})
        ceiling = f"{100 * bound['mfu_ceiling']:.1f} %" if "mfu_ceiling" in bound else "n/a"
        lines.append(f"| {r['dtype']} | {'yes' if r['donated'] else 'no'} | {g['argument_size_in_bytes']:.2f} "
                     f"| {g['output_size_in_bytes']:.2f} | {g['alias_size_in_bytes']:.2f} "
                     f"| {g['temp_size_in_bytes']:.2f} | {g['total_bytes']:.2f} | {r['traffic']['kernels']} "
                     f"| {r['traffic']['bytes'] / 1e9:.1f} | {ceiling} |")
    for r in report["results"].values():
        lines += ["", f"### {r['dtype']}: kernels and traffic of the compiled step", "",
                  hlo_traffic.format_summary(r["traffic"])]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/voc_blender.py:1_4",
                   help="config file, with the split and overrides after ':' (as launch.py takes it)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated compute dtypes")
    p.add_argument("--target", default="h100", help="h100, h200, a100, or an XLA GPU target description file")
    p.add_argument("--num_devices", type=int, default=1, help="GPUs on the one host the batch is split over")
    p.add_argument("--num_classes", type=int, default=0, help="for 'folder' datasets (others know theirs)")
    p.add_argument("--top", type=int, default=15, help="rows of the largest-traffic sources")
    p.add_argument("--hlo_dir", default="", help="write each dtype's optimised HLO here")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--state_init", action="store_true",
                   help="compile the initial state's programs (with and without threefry kernels), not the step")
    args = p.parse_args(argv)
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtype_list:
        if d not in ("float32", "bfloat16"):
            p.error(f"--dtypes: unknown dtype {d!r} (float32, bfloat16)")
    if args.num_devices < 1:
        p.error("--num_devices must be >= 1")
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    target_text, target = read_target(args.target)
    step_time.load_config(args.config)  # a bad --config fails here, before anything is built
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": step_time.git_commit(),
        "jax_version": jax.__version__,
        "command": "python benchmarks/compile_for_gpu.py " + " ".join(argv),
        "config": args.config,
        "target": target,
        "num_devices": args.num_devices,
        "results": {},
    }
    if args.state_init:
        report["state_init"] = compile_state_init(args, target_text, target)
        if args.out:
            step_time.write_json(args.out, report)
        print("\n" + format_state_init(report), flush=True)
        return report
    for dtype in args.dtype_list:
        report["results"][dtype] = compile_dtype(args, dtype, target_text, target)
        if args.out:
            step_time.write_json(args.out, report)
    print("\n" + format_report(report), flush=True)
    return report


if __name__ == "__main__":
    step_time.run_cli(main, TargetError)
