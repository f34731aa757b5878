"""Where the device time of a profiled step goes: a table from a ``jax.profiler`` trace, no TensorBoard needed.

    python benchmarks/profile_summary.py TRACE_DIR [--hlo STEP_HLO.txt] [--steps N] [--top 20]

``benchmarks/step_time.py --profile DIR`` calls this on its own trace (and writes the optimised HLO of the step next
to it as ``step_hlo.txt``), so one device call returns the answer as text.

It reads the ``*.trace.json.gz`` that ``jax.profiler.trace`` writes under ``plugins/profile/<run>/``, keeps the
device's kernel events (on a GPU: the ``Stream #…`` lines of ``/device:GPU:N``; on a CPU, which has no device lines:
the XLA thunks, the host events that carry an ``hlo_op``), groups them by the HLO instruction that launched them, and
sorts each instruction into a category:

- ``convolution``: cuDNN convolutions (forward, data and filter gradients) and any fusion that holds a convolution;
- ``matmul``: cuBLAS / Triton / CUTLASS GEMMs and dots;
- ``reduction fusion``: fusions whose root reduces (BatchNorm statistics, losses, bias gradients);
- ``elementwise fusion``: loop fusions (BatchNorm apply, ReLU, casts, the optimiser, EMA);
- ``scatter`` / ``gather`` / ``copy / transpose`` / ``other``;
- ``memcpy / memset``: memset and memcpy operations, also those an instruction issues before its kernel (a cuDNN
  convolution zeroing its output): their time counts here, the instruction's kernels under its own category.

A CUDA-graph command buffer (``command_buffer_N``: XLA captures runs of kernels into one graph) is not one
instruction: its kernels are counted one by one under the instructions that launched them (a kernel named
``loop_reduce_fusion_1`` under ``loop_reduce_fusion.1``, found in the HLO; a library kernel under its own name),
and ``command_buffer_ms_per_step`` says how much of the time ran inside graphs.

The category comes from the instruction in the optimised HLO when ``--hlo`` is given (opcode, fusion kind, custom-call
target, and what the fused computation holds), else from the instruction's and the kernel's names. Times are device
busy time per step: the sum of kernel durations over the profiled steps divided by their number, and the union of
the kernels' intervals (overlapping streams counted once), set against the steps' wall time when the trace holds
``train_step`` annotations. With the HLO, each category also gets the bytes its instructions read and write per step
(``hlo_traffic.py``: operands and results, once each) and the rate that implies, to set against the device's memory
bandwidth.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

CATEGORIES = ("convolution", "matmul", "reduction fusion", "elementwise fusion", "scatter", "gather",
              "copy / transpose", "memcpy / memset", "collective", "other")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][\w\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(")


def find_trace(path: str | Path) -> Path:
    """The newest ``*.trace.json.gz`` under ``path`` (a trace folder or the file itself)."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if not p.name.startswith("perfetto")] or found
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {path} (was it written by jax.profiler.trace?)")
    return found[-1]


def parse_hlo(text: str) -> dict:
    """{instruction name: {'op', 'kind', 'target', 'calls'}} and {computation: set of opcodes inside}."""
    instructions, computations = {}, defaultdict(set)
    current = None
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m and line.rstrip().endswith("{"):
            header = _COMP.match(line)
            current = header["name"] if header else None
            continue
        if not m:
            continue
        info = {"op": m["op"]}
        kind = re.search(r"\bkind=(k\w+)", line)
        target = re.search(r'custom_call_target="([^"]+)"', line)
        calls = re.search(r"\bcalls=%?([\w.\-]+)", line)
        if kind:
            info["kind"] = kind[1]
        if target:
            info["target"] = target[1]
        if calls:
            info["calls"] = calls[1]
        backend = re.search(r'"(?:kind|name)":"(__[\w$]+)"', line)
        if backend:
            info["backend_kind"] = backend[1]
        instructions[m["name"]] = info
        if current:
            computations[current].add(m["op"])
            if target:
                computations[current].add("custom-call:" + target[1])
    return {"instructions": instructions, "computations": computations}


def _ops_inside(info: dict, hlo: dict) -> set:
    """Opcodes of the computation a fusion (or call) runs."""
    return set(hlo["computations"].get(info.get("calls"), ()))


def categorize(op_name: str, kernel_name: str = "", hlo: dict | None = None) -> str:
    """The category of one HLO instruction (see the module docstring)."""
    low = op_name.lower()
    kernel = kernel_name.lower()
    if kernel.startswith("memcpy") or kernel.startswith("memset") or "memcpy" in low:
        return "memcpy / memset"
    info = (hlo or {}).get("instructions", {}).get(op_name)
    if info:
        op, target = info["op"], info.get("target", "") + info.get("backend_kind", "")
        inside = _ops_inside(info, hlo)
        if op == "convolution" or "conv" in target.lower() or "convolution" in inside or any(
                "cudnn$conv" in o for o in inside):
            return "convolution"
        if op == "dot" or any(t in target.lower() for t in ("gemm", "matmul", "cublas", "triton")) or "dot" in inside:
            return "matmul"
        if op in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all") or op.endswith(
                "-start") or op.endswith("-done"):
            return "collective"
        if op == "scatter" or "scatter" in inside:
            return "scatter"
        if op == "gather" or "gather" in inside:
            return "gather"
        if op in ("copy", "transpose") or info.get("kind") == "kLoop" and inside <= {"copy", "transpose", "parameter",
                                                                                        "bitcast"} and inside:
            return "copy / transpose"
        if op.startswith("reduce") or info.get("kind") == "kInput" or any(o.startswith("reduce") for o in inside):
            return "reduction fusion"
        if op == "fusion" or info.get("kind") == "kLoop":
            return "elementwise fusion"
        return "other"
    # No HLO: names only (XLA names fusions after their contents, e.g. "loop_add_fusion", "input_reduce_fusion").
    if "conv" in low or any(t in kernel for t in ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm")):
        return "convolution"
    if any(t in low for t in ("gemm", "dot", "matmul", "cublas")) or any(t in kernel for t in ("gemm", "cublas")):
        return "matmul"
    if any(t in low for t in ("all-reduce", "all-gather", "reduce-scatter", "collective")):
        return "collective"
    if "scatter" in low:
        return "scatter"
    if "gather" in low:
        return "gather"
    if low.startswith(("copy", "transpose")) or "transpose" in low:
        return "copy / transpose"
    if "reduce" in low or low.startswith("input_"):
        return "reduction fusion"
    if "fusion" in low or low.startswith("loop_"):
        return "elementwise fusion"
    return "other"


def _instruction_of(event: dict, known: set) -> tuple[str, bool]:
    """The HLO instruction a kernel event belongs to, and whether it ran inside a command buffer."""
    args = event.get("args") or {}
    op = args.get("hlo_op") or event["name"]
    if not op.startswith("command_buffer"):
        return op, False
    kernel = event["name"]
    if kernel in known:
        return kernel, True
    numbered = re.fullmatch(r"(.+)_(\d+)", kernel)  # XLA names a fusion's kernel after it, "." becoming "_"
    if numbered and f"{numbered[1]}.{numbered[2]}" in known:
        return f"{numbered[1]}.{numbered[2]}", True
    return kernel, True  # no HLO, or a library kernel (cuDNN, cuBLAS, memset): grouped by its own name


def _is_memory_op(kernel_name: str) -> bool:
    """A memset or memcpy (CUPTI names them "Memset …" / "Memcpy …"), not a compute kernel."""
    return kernel_name.lower().startswith(("memset", "memcpy"))


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def read_trace(trace_path: Path) -> list[dict]:
    """All events of a ``*.trace.json.gz`` (Chrome trace format)."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events: list[dict]) -> tuple[list[dict], str]:
    """The device's kernel events, and where they came from ('gpu', 'device xla ops', 'device' or 'host')."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device_pids = {pid for pid, name in processes.items() if re.match(r"/device:(GPU|TPU)", name)}
    on_device = [e for e in complete if e["pid"] in device_pids]

    def line(e):
        return threads.get((e["pid"], e.get("tid")), "").lower()

    def stream(e):  # xprof: one process per device, a "Stream #N(...)" line per stream; older traces: one process
        # per stream ("/device:GPU:0/stream:7 Compute"), beside an aggregate "stream:all" that repeats every kernel
        name = processes.get(e["pid"], "")
        if "/stream:" in name:
            return "stream:all" not in name and "Tensors" not in name and "Memcpy" not in name
        return line(e).startswith("stream")

    kernels = [e for e in on_device if stream(e)]
    if kernels:
        return kernels, "gpu"
    if on_device:  # no per-stream kernel lines: the device's XLA op line, else whatever the device shows
        ops = [e for e in on_device if line(e) == "xla ops"]
        return (ops, "device xla ops") if ops else (on_device, "device")
    # CPU: the thunks carry the HLO instruction; "end: …" markers and listener records do not.
    host = [e for e in complete if (e.get("args") or {}).get("hlo_op") and not e["name"].startswith("end:")]
    return host, "host"


def step_walls(events: list[dict]) -> list[float]:
    """Durations (µs) of the ``train_step`` annotations (``jax.profiler.StepTraceAnnotation``), if any."""
    return [e["dur"] for e in events if e.get("ph") == "X" and e.get("name", "").startswith("train_step")
            and "dur" in e]


def summarize(trace_dir: str | Path, hlo_text: str | None = None, steps: int | None = None, top: int = 20) -> dict:
    trace = find_trace(trace_dir)
    all_events = read_trace(trace)
    events, source = device_events(all_events)
    hlo = parse_hlo(hlo_text) if hlo_text else None
    walls = step_walls(all_events)
    steps = steps or len(walls) or 1
    by_op = defaultdict(lambda: {"us": 0.0, "count": 0, "kernel": "", "memset_us": 0.0})
    intervals = []
    known = set(hlo["instructions"]) if hlo else set()
    graph_us = 0.0
    for e in events:
        op, in_graph = _instruction_of(e, known)
        graph_us += float(e["dur"]) if in_graph else 0.0
        entry = by_op[op]
        entry["us"] += float(e["dur"])
        entry["count"] += 1
        if _is_memory_op(e["name"]):  # e.g. a cuDNN convolution zeroing its output before its kernel
            entry["memset_us"] += float(e["dur"])
            entry["memset_kernel"] = entry.get("memset_kernel") or e["name"]
        elif not entry["kernel"]:
            entry["kernel"] = e["name"]
        intervals.append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    total_us = sum(v["us"] for v in by_op.values())
    traffic = _traffic_by_instruction(hlo_text) if hlo_text else {}
    categories = {c: 0.0 for c in CATEGORIES}
    category_bytes = defaultdict(float)
    scope_us = defaultdict(float)
    ops = []
    for name, v in by_op.items():
        kernel = v["kernel"] or v.get("memset_kernel", "")
        cat = categorize(name, kernel, hlo)
        # An instruction's memsets and copies count as such; its other kernels under the instruction's category.
        categories[cat] += v["us"] - v["memset_us"]
        categories["memcpy / memset"] += v["memset_us"]
        op = {"op": name, "category": cat, "ms_per_step": v["us"] / steps / 1e3,
              "share": v["us"] / total_us if total_us else 0.0, "kernels_per_step": v["count"] / steps,
              "kernel": kernel[:90]}
        if v["memset_us"] and v["kernel"]:
            op["memset_ms_per_step"] = v["memset_us"] / steps / 1e3
        if name in traffic:
            nbytes, scope = traffic[name]
            category_bytes[cat] += nbytes
            scope_us[scope] += v["us"]
            op["gb_per_step"] = nbytes / 1e9
            op["achieved_gb_s"] = nbytes / (v["us"] / steps / 1e6) / 1e9 if v["us"] else None
        ops.append(op)
    ops.sort(key=lambda o: -o["ms_per_step"])
    summary_categories = {}
    for c, us in sorted(categories.items(), key=lambda kv: -kv[1]):
        if us <= 0:
            continue
        entry = {"ms_per_step": us / steps / 1e3, "share": us / total_us if total_us else 0.0}
        if traffic:  # bytes the category's profiled instructions read and write per step, and the rate achieved
            entry["gb_per_step"] = category_bytes[c] / 1e9
            entry["achieved_gb_s"] = category_bytes[c] / (us / steps / 1e6) / 1e9
        summary_categories[c] = entry
    return {
        "trace": str(trace),
        "source": source,
        "steps": steps,
        "kernel_ms_per_step": total_us / steps / 1e3,
        "busy_ms_per_step": _union_length(intervals) / steps / 1e3,
        "command_buffer_ms_per_step": graph_us / steps / 1e3,
        "step_wall_ms": [w / 1e3 for w in walls],
        "categories": summary_categories,
        # Kernel time by transformation scope (forward passes, their backward, ...), when the HLO names them.
        "scopes": {k: us / steps / 1e3 for k, us in sorted(scope_us.items(), key=lambda kv: -kv[1])[:top]},
        "top_ops": ops[:top],
        "distinct_ops": len(ops),
    }


def _traffic_by_instruction(hlo_text: str) -> dict:
    """{instruction: (bytes read + written per step, scope)} from ``hlo_traffic`` (empty if the HLO cannot be
    read)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import hlo_traffic  # the sibling script; imported here, as it imports this module

    try:
        rows = hlo_traffic.kernels(hlo_text)
    except ValueError:
        return {}
    out = {}
    for r in rows:
        nbytes, _ = out.get(r["name"], (0, None))
        out[r["name"]] = (nbytes + r["bytes"], hlo_traffic.scope_of(r["op_name"]))
    return out


def format_summary(s: dict) -> str:
    walls = s["step_wall_ms"]
    wall = f", step wall {sum(walls) / len(walls):.2f} ms (mean of {len(walls)} annotated steps)" if walls else ""
    source = {"gpu": "device kernels", "host": "host XLA thunks"}.get(s["source"], s["source"])
    lines = [f"Profile of {s['steps']} step(s) ({source}; "
             f"{s['distinct_ops']} HLO instructions): kernel time {s['kernel_ms_per_step']:.2f} ms/step, "
             f"busy {s['busy_ms_per_step']:.2f} ms/step{wall}"
             + (f"; {s['command_buffer_ms_per_step']:.2f} ms/step of it inside CUDA-graph command buffers, counted "
                "under each kernel's own instruction" if s.get("command_buffer_ms_per_step") else ""), ""]
    traffic = any("gb_per_step" in c for c in s["categories"].values())
    if traffic:
        lines += ["| category | ms/step | share of kernel time | GB read + written / step | GB/s achieved |",
                  "|---|---:|---:|---:|---:|"]
    else:
        lines += ["| category | ms/step | share of kernel time |", "|---|---:|---:|"]
    for name, c in s["categories"].items():
        row = f"| {name} | {c['ms_per_step']:.2f} | {100 * c['share']:.1f} % |"
        if traffic:
            row += f" {c['gb_per_step']:.2f} | {c['achieved_gb_s']:.0f} |"
        lines.append(row)
    if s.get("scopes"):
        lines += ["", "| scope (op_name's second part) | kernel ms/step |", "|---|---:|"]
        lines += [f"| {name[:80]} | {ms:.2f} |" for name, ms in s["scopes"].items()]
    lines += ["", "| HLO instruction | category | ms/step | share | kernels/step | GB/s | first kernel |",
              "|---|---|---:|---:|---:|---:|---|"]
    for o in s["top_ops"]:
        rate = f"{o['achieved_gb_s']:.0f}" if o.get("achieved_gb_s") else ""
        lines.append(f"| {o['op']} | {o['category']} | {o['ms_per_step']:.3f} | {100 * o['share']:.1f} % "
                     f"| {o['kernels_per_step']:.0f} | {rate} | {o['kernel'].replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace_dir", help="the folder given to jax.profiler.trace (or a *.trace.json.gz)")
    p.add_argument("--hlo", default="", help="optimised HLO text of the profiled program (step_time.py writes "
                                             "step_hlo.txt); sharper categories")
    p.add_argument("--steps", type=int, default=0, help="steps in the trace (default: its train_step annotations)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", default="", help="also write the summary here")
    args = p.parse_args(argv)
    hlo_path = Path(args.hlo) if args.hlo else None
    if hlo_path is None:
        guess = Path(args.trace_dir) / "step_hlo.txt"
        hlo_path = guess if guess.is_file() else None
    summary = summarize(args.trace_dir, hlo_path.read_text() if hlo_path else None, args.steps or None, args.top)
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
