"""The real training step compiled for a GPU on a machine without one: XLA's memory analysis, the program's kernels
and bytes moved, and the step-time floor and MFU ceiling they imply.

    pip install "jax-cuda13-plugin==$JAXV" "jax-cuda13-pjrt==$JAXV"    # JAXV: the installed jax's version
    python benchmarks/compile_for_gpu.py --config=configs/voc_blender.py:1_4 --target h100 --dtypes bfloat16

The step is built as ``step_time.py`` builds it (on the host CPU; only shapes travel), then compiled by XLA's CUDA
compiler for ``--target`` (``h100``, ``h200``, ``a100``: ``gpu_targets/*.txtpb``, or a target file) through JAX's
topology API. Convolutions are not autotuned without the device, so their workspaces are not in the figures.

Bytes moved: every instruction the program runs as a kernel reads each operand and writes its result once from
device memory (no cache reuse; a custom call's ``u8`` scratch left out; of a conditional the heavier branch, a while
loop's body times its known trip count). The floor: memory-bound kernels at the full bandwidth, convolutions and
matmuls at the dense peak (or their own bytes at the bandwidth, if longer), one after another; the MFU ceiling is
the step's FLOPs at the peak over that floor. Properties of the program, not timings.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

if __name__ == "__main__":  # the state is built on the host CPU; the GPU is only a compilation target
    os.environ["JAX_PLATFORMS"] = "cpu"

import step_time
from common import arg_parser, finish, load_config, log, names_of, num_classes_of, report_header, run_cli, write_json

import jax

HERE = Path(__file__).resolve().parent
TARGETS = {name: HERE / "gpu_targets" / f"{name}_sxm.txtpb" for name in ("h100", "h200", "a100")}
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
               "replica-id", "opt-barrier", "add-dependency", "domain"}  # no kernel of their own
COMPUTE = ("convolution", "matmul")
GIB = 2**30


class TargetError(RuntimeError):
    pass


def read_target(spec: str) -> tuple[str, dict]:
    """The target's text proto and the figures used from it (device kind, bandwidth, L2, memory)."""
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
        raise TargetError(f"{path}: expected device_description_str and gpu_device_info.memory_bandwidth")
    return text, info


def gpu_mesh(target_text: str, num_devices: int):
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target_text,
                                                topology=f"1x1x{num_devices}")
    except Exception as e:  # noqa: BLE001  (no CUDA plugin: NotImplementedError / RuntimeError by version)
        v, first = jax.__version__, (str(e).splitlines() or [""])[0]
        raise TargetError(f"could not create a CUDA topology ({type(e).__name__}: {first}). "
                          f"Compiling for a GPU without one needs JAX's CUDA plugin for jax {v}: "
                          f"pip install \"jax-cuda13-plugin=={v}\" \"jax-cuda13-pjrt=={v}\"") from e
    return topologies.make_mesh(topology, (num_devices,), ("data",))


def array_sizes(shape: str, skip_scratch: bool = False) -> list[int]:
    """Bytes of each array in an HLO shape (a tuple's elements); ``u8`` buffers left out if ``skip_scratch``."""
    return [int(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(shape) if dtype in DTYPE_BYTES and not (skip_scratch and dtype == "u8")]


def kernels(text: str) -> list[dict]:
    """One row per kernel-launching instruction the program executes: name, op, category, how often it runs, and
    the bytes it reads and writes in all."""
    hlo = step_time.Hlo(text)

    def walk(name: str, repeat: int) -> list[dict]:
        rows, body = [], hlo.computations.get(name, [])
        shapes = {i["name"]: i["shape"] for i in body}
        for ins in body:
            op, attrs = ins["op"], ins["attrs"]
            if op == "conditional":
                names = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", attrs)
                listed = re.search(r"branch_computations=\{([^}]*)\}", attrs)
                names += re.findall(r"%?([\w.\-]+)", listed[1]) if listed else []
                taken = [walk(b, repeat) for b in names]
                rows += max(taken, key=lambda r: sum(x["bytes"] for x in r)) if taken else []
                continue
            called = re.search(r"(body|to_apply)=%?([\w.\-]+)", attrs) if op in ("while", "call") else None
            if called:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs) if op == "while" else None
                rows += walk(called[2], repeat * (int(trips[1]) if trips else 1))
                continue
            if op in NOT_KERNELS or op == "while":
                continue
            read = sum(b for o in ins["operands"] for b in array_sizes(shapes.get(o, "")))
            written = sum(array_sizes(ins["shape"], skip_scratch=op == "custom-call"))
            rows.append({"name": ins["name"], "op": op, "category": step_time.categorize(ins["name"], "", hlo),
                         "repeat": repeat, "bytes_read": read * repeat, "bytes_written": written * repeat,
                         "bytes": (read + written) * repeat})
        return rows

    return walk(hlo.entry, 1)


def summarize(rows: list[dict], bandwidth_tbs: float | None = None, tflop: float | None = None,
              peak_tflops: float | None = None) -> dict:
    """Kernels and bytes by category, collectives by kind, and (with the bandwidth) the step floor: memory-bound
    kernels at the bandwidth plus convolutions and matmuls at the peak or at the bandwidth, whichever is longer."""
    categories = defaultdict(lambda: {"kernels": 0, "bytes": 0})
    collectives = defaultdict(lambda: {"ops": 0, "bytes": 0})
    for r in rows:
        categories[r["category"]]["kernels"] += r["repeat"]
        categories[r["category"]]["bytes"] += r["bytes"]
        if r["category"] == "collective":  # an asynchronous one counted once, at its start
            c = collectives[re.sub(r"-(start|done)$", "", r["op"])]
            c["ops"] += 0 if r["op"].endswith("-done") else r["repeat"]
            c["bytes"] += r["bytes"]
    out = {"kernels": sum(c["kernels"] for c in categories.values()),
           "bytes": sum(c["bytes"] for c in categories.values()),
           "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1]["bytes"])),
           "collectives": dict(sorted(collectives.items(), key=lambda kv: -kv[1]["bytes"]))}
    if bandwidth_tbs:
        bandwidth = bandwidth_tbs * 1e12
        memory = sum(c["bytes"] for k, c in categories.items() if k not in COMPUTE)
        compute = sum(c["bytes"] for k, c in categories.items() if k in COMPUTE)
        b = out["bounds"] = {"bandwidth_tbs": bandwidth_tbs, "memory_bound_ms": memory / bandwidth * 1e3,
                             "compute_traffic_ms": compute / bandwidth * 1e3}
        if tflop and peak_tflops:
            b.update(tflop=tflop, peak_tflops=peak_tflops, compute_at_peak_ms=tflop / peak_tflops * 1e3)
            b["compute_ms"] = max(b["compute_at_peak_ms"], b["compute_traffic_ms"])
            b["step_floor_ms"] = b["memory_bound_ms"] + b["compute_ms"]
            b["mfu_ceiling"] = b["compute_at_peak_ms"] / b["step_floor_ms"]
    return out


def format_traffic(s: dict) -> str:
    b = s.get("bounds")
    lines = ["| category | kernels | GB read + written |" + (f" ms at {b['bandwidth_tbs']:g} TB/s |" if b else ""),
             "|---|---:|---:|" + ("---:|" if b else "")]
    for name, c in list(s["categories"].items()) + [("total", s)]:
        lines.append(f"| {name} | {c['kernels']} | {c['bytes'] / 1e9:.2f} |"
                     + (f" {c['bytes'] / b['bandwidth_tbs'] / 1e9:.2f} |" if b else ""))
    if b:
        line = f"\nmemory-bound kernels (all but convolution and matmul) >= {b['memory_bound_ms']:.2f} ms"
        if "step_floor_ms" in b:
            line += (f"; convolutions and matmuls >= {b['compute_ms']:.2f} ms ({b['tflop']:.2f} TFLOP at "
                     f"{b['peak_tflops']:g} TFLOP/s = {b['compute_at_peak_ms']:.2f} ms, their traffic "
                     f"{b['compute_traffic_ms']:.2f} ms); kernels one after another: step >= "
                     f"{b['step_floor_ms']:.2f} ms, MFU <= {100 * b['mfu_ceiling']:.1f} %")
        lines.append(line)
    if s["collectives"]:
        lines += ["", "| collective | issued | GB read + written |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['ops']} | {v['bytes'] / 1e9:.2f} |" for k, v in s["collectives"].items()]
    return "\n".join(lines)


def compile_dtype(args, dtype: str, target_text: str, target: dict) -> dict:
    from jax.sharding import NamedSharding, PartitionSpec as P

    from stpg_jax import sharding

    config = load_config(args.config, f"model.dtype={dtype}")
    num_classes = num_classes_of(config, args.num_classes)
    mesh = gpu_mesh(target_text, args.num_devices)
    sharding.check_divisible(config, mesh)
    t0 = time.perf_counter()
    b = step_time.build(config, num_classes, 1, batch_groups=args.num_devices)  # laid out for the target's devices
    batch = step_time.random_batches(config, num_classes, b["batch_sharding"], count=1)[0]
    log(f"[{dtype}] state built on the CPU in {time.perf_counter() - t0:.1f}s")
    flops = step_time.model_flops_per_step(b["step_fn"], b["state"], batch)
    replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def abstract(tree, where):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), tree)

    state, batch = abstract(b.pop("state"), replicated), abstract(batch, batch_sharded)
    keeps_input = b["speculates"] or b["same_step"]  # as the Trainer compiles it
    jitted = jax.jit(b["step_fn"], in_shardings=(replicated, batch_sharded, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=() if keeps_input else 0)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch, step_time.assignment_arrays(state))
    lower_s, t0 = time.perf_counter() - t0, time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    log(f"[{dtype}] lowered in {lower_s:.1f}s, compiled for {args.num_devices} x {target['device_kind']} in "
        f"{compile_s:.1f}s")
    text = compiled.as_text()
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        Path(args.hlo_dir, f"step_{dtype}.hlo.txt").write_text(text)
    peak = step_time.peak_tflops(target["device_kind"], dtype)
    tflop = flops / 1e12 / args.num_devices if flops else None  # per device: the step's FLOPs split evenly
    return {"dtype": dtype, "mode": config.mode, "num_classes": num_classes, "crop_size": config.data.crop_size,
            "batch_labeled": config.data.batch_labeled, "batch_unlabeled": config.data.batch_unlabeled,
            "donated": not keeps_input, "lower_s": lower_s, "compile_s": compile_s,
            "memory": step_time.memory_analysis_of(compiled), "flops_per_step": flops, "peak_tflops": peak,
            "traffic": summarize(kernels(text), target["memory_bandwidth"] / 1e12, tflop, peak)}


def format_report(report: dict) -> str:
    lines = [f"{report['config']} compiled for {report['num_devices']} x {report['target']['device_kind']} without "
             "a GPU; per device:", "",
             "| dtype | state donated | arguments GiB | outputs GiB | aliased GiB | temporaries GiB | total GiB "
             "| kernels | GB moved | step floor ms | MFU ceiling |", "|---|---|" + "---:|" * 9]
    for r in report["results"].values():
        m, t = r["memory"] or {}, r["traffic"]
        gib = [f"{m.get(f'{k}_bytes', float('nan')) / GIB:.2f}" for k in ("argument_size_in", "output_size_in",
                                                                           "alias_size_in", "temp_size_in", "total")]
        bound = t.get("bounds", {})
        floor = f"{bound['step_floor_ms']:.2f}" if "step_floor_ms" in bound else "n/a"
        ceiling = f"{100 * bound['mfu_ceiling']:.1f} %" if "mfu_ceiling" in bound else "n/a"
        lines.append(f"| {r['dtype']} | {'yes' if r['donated'] else 'no'} | " + " | ".join(gib)
                     + f" | {t['kernels']} | {t['bytes'] / 1e9:.1f} | {floor} | {ceiling} |")
    for r in report["results"].values():
        lines += ["", f"{r['dtype']}: kernels and bytes of the compiled step", "", format_traffic(r["traffic"])]
    return "\n".join(lines)


def parse_args(argv=None):
    p = arg_parser(__doc__, "configs/voc_blender.py:1_4", dtypes="bfloat16,float32")
    p.add_argument("--target", default="h100", help="h100, h200, a100, or an XLA GPU target description file")
    p.add_argument("--num_devices", type=int, default=1, help="GPUs on the one host the batch is split over")
    p.add_argument("--hlo_dir", default="", help="write each dtype's optimised HLO here")
    args = p.parse_args(argv)
    args.dtype_list = names_of(p, "--dtypes", args.dtypes, ("float32", "bfloat16"))
    if args.num_devices < 1:
        p.error("--num_devices must be >= 1")
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    target_text, target = read_target(args.target)
    load_config(args.config)  # a bad --config fails here, before anything is built
    report = {**report_header("compile_for_gpu.py", argv), "jax_version": jax.__version__, "config": args.config,
              "target": target, "num_devices": args.num_devices, "results": {}}
    for dtype in args.dtype_list:
        report["results"][dtype] = compile_dtype(args, dtype, target_text, target)
        if args.out:
            write_json(args.out, report)
    return finish(report, format_report(report), "", f" | jax {report['jax_version']}")


if __name__ == "__main__":
    run_cli(main, TargetError)
