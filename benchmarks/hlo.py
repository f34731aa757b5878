"""XLA programs read as text: the optimised HLO's instructions and their categories, the kernels and bytes of a
program compiled for a GPU target (and the step-time floor they imply), and where a profiled step's device time goes.

Used by step_time.py: ``--profile`` (summarize_profile) and ``--target`` (read_target, gpu_mesh, kernels, traffic).
Bytes moved: every instruction the program runs as a kernel reads each operand and writes its result once from
device memory (no cache reuse; a custom call's ``u8`` scratch left out; of a conditional the heavier branch, a while
loop's body times its known trip count). The floor: memory-bound kernels at the full bandwidth, convolutions and
matmuls at the dense peak (or their own bytes at the bandwidth, if longer), one after another; the MFU ceiling is
the step's FLOPs at the peak over that floor. Properties of the program, not timings.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import jax

# Optimised HLO, and where a profiled step's device time goes

_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*[({]")
_ATTRS = {"kind": r"\bkind=(k\w+)", "target": r'custom_call_target="([^"]+)"', "calls": r"\bcalls=%?([\w.\-]+)",
          "backend": r'"(?:kind|name)":"(__[\w$]+)"'}


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "({"
        depth -= text[i] in ")}"
        if depth == 0:
            return i
    return len(text) - 1


def parse_instruction(line: str) -> dict | None:
    """One HLO instruction line: name, result shape, opcode, operand names, the attributes after the operands,
    and the fusion kind, custom-call target, called computation and backend kind found among them."""
    head = _HEAD.match(line)
    if not head:
        return None
    rest = line[head.end():]
    if rest.startswith("("):  # a tuple shape
        end = _closing(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode = _OPCODE.match(rest)
    if not opcode:
        return None
    end = _closing(rest, opcode.end() - 1)
    attrs = rest[end + 1:]
    ins = {"name": head[1], "shape": shape, "op": opcode[1], "attrs": attrs,
           "operands": re.findall(r"%([\w.\-]+)", rest[opcode.end() - 1:end + 1])}
    for key, pattern in _ATTRS.items():
        found = re.search(pattern, attrs)
        ins[key] = found[1] if found else ""
    return ins


class Hlo:
    """Optimised HLO text (``compiled.as_text()``): each computation's instructions, and the entry's name."""

    def __init__(self, text: str):
        self.computations, self.entry, current = {}, None, None
        for line in text.splitlines():
            if line.rstrip().endswith("{") and not _HEAD.match(line):
                header = _COMPUTATION.match(line)
                if header and not line.lstrip().startswith("HloModule"):
                    current = header[2]
                    self.computations[current] = []
                    self.entry = current if header[1] else self.entry
                continue
            ins = parse_instruction(line) if current is not None else None
            if ins:
                self.computations[current].append(ins)
        if self.entry is None:
            raise ValueError("no ENTRY computation in the HLO text (expected the optimised HLO of a compiled program)")
        self.instructions = {i["name"]: i for body in self.computations.values() for i in body}

    def inside(self, ins: dict) -> set:
        """Opcodes (and ``custom-call:<target>``) of the computation that a fusion or call runs."""
        body = self.computations.get(ins["calls"], ())
        return {i["op"] for i in body} | {"custom-call:" + i["target"] for i in body if i["target"]}


def categorize(name: str, kernel: str = "", hlo: Hlo | None = None) -> str:
    """The category of HLO instruction ``name`` (from its opcode, fusion kind, custom-call target and fused body),
    or of a kernel known by its name only (a library kernel inside a CUDA-graph command buffer)."""
    kernel = kernel.lower()
    if kernel.startswith(("memcpy", "memset")):
        return "memcpy / memset"
    ins = hlo.instructions.get(name) if hlo else None
    if ins is None:
        names = f"{name.lower()} {kernel}"
        return ("convolution" if any(t in names for t in ("conv", "fprop", "dgrad", "wgrad")) else
                "matmul" if any(t in names for t in ("gemm", "cublas", "dot")) else "other")
    op, target, inside = ins["op"], (ins["target"] + ins["backend"]).lower(), hlo.inside(ins)
    if op == "convolution" or "conv" in target or "convolution" in inside or any("cudnn$conv" in o for o in inside):
        return "convolution"
    if op == "dot" or any(t in target for t in ("gemm", "matmul", "cublas", "triton")) or "dot" in inside:
        return "matmul"
    if op in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all") or op.endswith(
            ("-start", "-done")):
        return "collective"
    for kind in ("scatter", "gather"):
        if op == kind or kind in inside:
            return kind
    if op in ("copy", "transpose") or ins["kind"] == "kLoop" and inside and inside <= {
            "copy", "transpose", "parameter", "bitcast"}:
        return "copy / transpose"
    if op.startswith("reduce") or ins["kind"] == "kInput" or any(o.startswith("reduce") for o in inside):
        return "reduction fusion"
    return "elementwise fusion" if op == "fusion" or ins["kind"] == "kLoop" else "other"


def find_trace(path) -> Path:
    """The newest ``*.trace.json.gz`` that ``jax.profiler.trace`` wrote under ``path``."""
    found = sorted(Path(path).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if not p.name.startswith("perfetto")] or found
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {path} (was it written by jax.profiler.trace?)")
    return found[-1]


def device_events(events: list[dict]) -> tuple[list[dict], str]:
    """The device's kernel events: a GPU's ``Stream #…`` lines; on a CPU, which has no device lines, the XLA
    thunks (host events that carry an ``hlo_op``)."""
    names = {(e["pid"], e.get("tid") if e["name"] == "thread_name" else None): e["args"].get("name", "")
             for e in events if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    kernels = [e for e in complete if re.match(r"/device:(GPU|TPU)", names.get((e["pid"], None), ""))
               and names.get((e["pid"], e.get("tid")), "").lower().startswith("stream")]
    if kernels:
        return kernels, "gpu"
    return [e for e in complete if (e.get("args") or {}).get("hlo_op") and not e["name"].startswith("end:")], "host"


def _instruction_of(event: dict, hlo: Hlo | None) -> tuple[str, bool]:
    """The HLO instruction that launched a kernel, and whether it ran inside a CUDA-graph command buffer: a graph's
    kernels carry the graph's name, so each goes under its own instruction (kernel ``fusion_7`` = ``fusion.7``), a
    library kernel under its own name."""
    op = (event.get("args") or {}).get("hlo_op") or event["name"]
    if not op.startswith("command_buffer"):
        return op, False
    kernel, known = event["name"], hlo.instructions if hlo else {}
    numbered = re.fullmatch(r"(.+)_(\d+)", kernel)
    if kernel not in known and numbered and f"{numbered[1]}.{numbered[2]}" in known:
        return f"{numbered[1]}.{numbered[2]}", True
    return kernel, True


def summarize_profile(trace_dir, hlo_text: str | None = None, steps: int | None = None, top: int = 15) -> dict:
    """Kernel time per step by category and by instruction, busy time (overlapping kernels counted once) and the
    annotated steps' wall time. A memset or memcpy that an instruction issues before its kernel (a cuDNN
    convolution zeroing its output) counts as ``memcpy / memset``, the rest under the instruction's category."""
    trace = find_trace(trace_dir)
    with gzip.open(trace, "rt") as f:
        data = json.load(f)
    all_events = data["traceEvents"] if isinstance(data, dict) else data
    events, source = device_events(all_events)
    hlo = Hlo(hlo_text) if hlo_text else None
    walls = [e["dur"] / 1e3 for e in all_events if e.get("ph") == "X" and "dur" in e
             and e.get("name", "").startswith("train_step")]
    steps = steps or len(walls) or 1
    by_op = defaultdict(lambda: {"us": 0.0, "count": 0, "kernel": "", "memset_us": 0.0, "memset_kernel": ""})
    intervals, graph_us = [], 0.0
    for e in events:
        op, in_graph = _instruction_of(e, hlo)
        entry, dur = by_op[op], float(e["dur"])
        graph_us += dur if in_graph else 0.0
        entry["us"] += dur
        entry["count"] += 1
        if e["name"].lower().startswith(("memset", "memcpy")):
            entry["memset_us"] += dur
            entry["memset_kernel"] = entry["memset_kernel"] or e["name"]
        elif not entry["kernel"]:
            entry["kernel"] = e["name"]
        intervals.append((float(e["ts"]), float(e["ts"]) + dur))
    busy, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        busy, end = busy + max(0.0, b - max(a, end)), max(end, b)
    total = sum(v["us"] for v in by_op.values()) or 1.0
    categories, ops = defaultdict(float), []
    for name, v in by_op.items():
        cat = categorize(name, v["kernel"] or v["memset_kernel"], hlo)
        categories[cat] += v["us"] - v["memset_us"]
        categories["memcpy / memset"] += v["memset_us"]
        ops.append({"op": name, "category": cat, "ms_per_step": v["us"] / steps / 1e3, "share": v["us"] / total,
                    "kernels_per_step": v["count"] / steps, "kernel": (v["kernel"] or v["memset_kernel"])[:90],
                    **({"memset_ms_per_step": v["memset_us"] / steps / 1e3} if v["memset_us"] and v["kernel"] else {})})
    ops.sort(key=lambda o: -o["ms_per_step"])
    return {"trace": str(trace), "source": source, "steps": steps, "distinct_ops": len(ops),
            "kernel_ms_per_step": sum(v["us"] for v in by_op.values()) / steps / 1e3,
            "busy_ms_per_step": busy / steps / 1e3, "command_buffer_ms_per_step": graph_us / steps / 1e3,
            "step_wall_ms": walls, "top_ops": ops[:top],
            "categories": {c: {"ms_per_step": us / steps / 1e3, "share": us / total}
                           for c, us in sorted(categories.items(), key=lambda kv: -kv[1]) if us > 0}}


def format_profile(s: dict) -> str:
    walls = s["step_wall_ms"]
    source = {"gpu": "device kernels", "host": "host XLA thunks"}[s["source"]]
    lines = [f"Profile of {s['steps']} step(s) ({source}; {s['distinct_ops']} HLO instructions): kernel time "
             f"{s['kernel_ms_per_step']:.2f} ms/step, busy {s['busy_ms_per_step']:.2f} ms/step"
             + (f", step wall {sum(walls) / len(walls):.2f} ms" if walls else "")
             + (f"; {s['command_buffer_ms_per_step']:.2f} ms/step of it inside CUDA-graph command buffers"
                if s["command_buffer_ms_per_step"] else ""),
             "", "| category | ms/step | share of kernel time |", "|---|---:|---:|"]
    lines += [f"| {name} | {c['ms_per_step']:.2f} | {100 * c['share']:.1f} % |" for name, c in s["categories"].items()]
    lines += ["", "| HLO instruction | category | ms/step | share | kernels/step | first kernel |",
              "|---|---|---:|---:|---:|---|"]
    lines += [f"| {o['op']} | {o['category']} | {o['ms_per_step']:.3f} | {100 * o['share']:.1f} % "
              f"| {o['kernels_per_step']:.0f} | {o['kernel'].replace('|', '/')} |" for o in s["top_ops"]]
    return "\n".join(lines)



# A program compiled for a GPU target: its kernels and the bytes they move

HERE = Path(__file__).resolve().parent
TARGETS = {name: HERE / "gpu_targets" / f"{name}_sxm.txtpb" for name in ("h100", "h200", "a100")}
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
               "replica-id", "opt-barrier", "add-dependency", "domain"}  # no kernel of their own
COMPUTE = ("convolution", "matmul")


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
    hlo = Hlo(text)

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
            rows.append({"name": ins["name"], "op": op, "category": categorize(ins["name"], "", hlo),
                         "repeat": repeat, "bytes_read": read * repeat, "bytes_written": written * repeat,
                         "bytes": (read + written) * repeat})
        return rows

    return walk(hlo.entry, 1)


def traffic(rows: list[dict], bandwidth_tbs: float | None = None, tflop: float | None = None,
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


