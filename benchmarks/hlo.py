"""XLA programs read as text, for step_time.py: the optimised HLO's instructions and their categories, where a
profiled step's device time goes (``--profile``: summarize_profile), and the GPU targets that ``--target`` compiles
for (read_target, gpu_mesh)."""

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
_OPCODE = re.compile(r"(?<![\w.%\-])([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*[({]")
_ATTRS = {"kind": r"\bkind=(k\w+)", "target": r'custom_call_target="([^"]+)"', "calls": r"\bcalls=%?([\w.\-]+)",
          "backend": r'"(?:kind|name)":"(__[\w$]+)"'}


def parse_instruction(line: str) -> dict | None:
    """One HLO instruction line: its name and opcode (the first lower-case word before a bracket after the result's
    shape, whose layouts use upper-case letters only), and the fusion kind, custom-call target, called computation
    and backend kind among what follows."""
    head = _HEAD.match(line)
    opcode = _OPCODE.search(line, head.end()) if head else None
    if not opcode:
        return None
    rest = line[opcode.end():]
    return {"name": head[1], "op": opcode[1],
            **{key: (found[1] if (found := re.search(pattern, rest)) else "") for key, pattern in _ATTRS.items()}}


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
    annotated steps' wall time. A memset or memcpy (a cuDNN convolution zeroing its output first) counts as
    ``memcpy / memset``, whichever instruction issued it."""
    trace = find_trace(trace_dir)
    with gzip.open(trace, "rt") as f:
        data = json.load(f)
    all_events = data["traceEvents"] if isinstance(data, dict) else data
    events, source = device_events(all_events)
    hlo = Hlo(hlo_text) if hlo_text else None
    walls = [e["dur"] / 1e3 for e in all_events if e.get("ph") == "X" and "dur" in e
             and e.get("name", "").startswith("train_step")]
    steps = steps or len(walls) or 1
    by_op, categories = defaultdict(lambda: {"us": 0.0, "count": 0, "kernel": ""}), defaultdict(float)
    intervals, graph_us = [], 0.0
    for e in events:
        (op, in_graph), dur = _instruction_of(e, hlo), float(e["dur"])
        entry, memset = by_op[op], e["name"].lower().startswith(("memset", "memcpy"))
        graph_us += dur if in_graph else 0.0
        entry["us"], entry["count"] = entry["us"] + dur, entry["count"] + 1
        entry["kernel"] = entry["kernel"] or ("" if memset else e["name"])
        categories["memcpy / memset" if memset else categorize(op, e["name"], hlo)] += dur
        intervals.append((float(e["ts"]), float(e["ts"]) + dur))
    busy, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        busy, end = busy + max(0.0, b - max(a, end)), max(end, b)
    total = sum(v["us"] for v in by_op.values()) or 1.0
    ops = sorted(({"op": name, "category": categorize(name, v["kernel"], hlo), "ms_per_step": v["us"] / steps / 1e3,
                   "share": v["us"] / total, "kernels_per_step": v["count"] / steps, "kernel": v["kernel"][:90]}
                  for name, v in by_op.items()), key=lambda o: -o["ms_per_step"])
    return {"trace": str(trace), "source": source, "steps": steps, "distinct_ops": len(ops),
            "kernel_ms_per_step": total / steps / 1e3 if by_op else 0.0,
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


# GPU targets: a program compiled for a GPU without one

HERE = Path(__file__).resolve().parent
TARGETS = {name: HERE / "gpu_targets" / f"{name}_sxm.txtpb" for name in ("h100", "h200", "a100")}


class TargetError(RuntimeError):
    pass


def read_target(spec: str) -> tuple[str, dict]:
    """The target's text proto, and its file and device kind."""
    path = TARGETS.get(spec.lower(), Path(spec))
    if not path.is_file():
        raise TargetError(f"--target {spec!r}: expected {', '.join(TARGETS)} or the path of an XLA GPU target "
                          f"description (text proto), and {path} is not a file")
    text = path.read_text()
    kind = re.search(r'^\s*device_description_str:\s*"([^"\n]+)"', text, re.MULTILINE)
    if not kind:
        raise TargetError(f"{path}: expected an XLA GPU target description with a device_description_str")
    return text, {"file": str(path), "device_kind": kind[1]}


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
