"""Kernels and memory traffic of a compiled XLA program, read from its optimised HLO text.

    python benchmarks/hlo_traffic.py STEP_HLO.txt [--bandwidth_tbs 3.35] [--tflop 20.87 --peak_tflops 989] [--top 25]

The optimised HLO of the training step comes from ``benchmarks/compile_for_gpu.py`` (the step compiled for a GPU
model without one) or from ``benchmarks/step_time.py --profile DIR`` on a real GPU (``DIR/step_hlo.txt``).

Every instruction the program executes as a kernel (fusions, cuDNN / cuBLAS custom calls, copies, scatters, ...;
not parameters, tuples, bitcasts or constants) is listed with the bytes of its operands and of its result (a custom
call's ``u8`` scratch buffer left out) and sorted into ``profile_summary``'s categories. The sum is the step's
memory traffic if every kernel reads each operand and writes its result once from device memory: no cache reuse,
and whole buffers counted where a kernel touches a slice of one (an in-place update, a dynamic slice). Of a
conditional, the branch with the most traffic is counted; a while loop's body as many times as its known trip count
(once if XLA does not know it).

With ``--bandwidth_tbs`` and, optionally, the step's FLOPs and the chip's peak, it prints two lower bounds on the
step time for kernels run one after another (as XLA runs them on one stream): the time to move the non-convolution,
non-matmul traffic at the full memory bandwidth, and the time of the convolutions and matmuls at the peak (or at
the bandwidth, where their own traffic takes longer). Their sum bounds the step from below, so FLOPs / peak over it
bounds the MFU from above. Collectives of a multi-device program count with the memory-bound kernels, at the memory
bandwidth: less time than their transfers between devices take. These are properties of the compiled program, not
measurements of it running.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_summary  # noqa: E402  (the sibling script: its categories)

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*[({]")
# Instructions that launch no kernel of their own.
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
               "replica-id", "opt-barrier", "add-dependency", "domain"}
COMPUTE_CATEGORIES = ("convolution", "matmul")


def array_sizes(shape: str, skip_scratch: bool = False) -> list[int]:
    """Bytes of each array in an HLO shape (a tuple's elements); ``u8`` buffers left out if ``skip_scratch``."""
    sizes = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in DTYPE_BYTES or (skip_scratch and dtype == "u8"):
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        sizes.append(int(n * DTYPE_BYTES[dtype]))
    return sizes


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
    operands = re.findall(r"%([\w.\-]+)", rest[opcode.end() - 1:end + 1])
    return {"name": head[1], "shape": shape, "op": opcode[1], "operands": operands, "attrs": rest[end + 1:]}


def parse_module(text: str) -> tuple[dict, str]:
    """{computation name: [instructions]} and the entry computation's name."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        if line.rstrip().endswith("{") and not _HEAD.match(line):
            header = _COMPUTATION.match(line)
            if header and not line.lstrip().startswith("HloModule"):
                current = header[2]
                computations[current] = []
                if header[1]:
                    entry = current
            continue
        if current is not None:
            instruction = parse_instruction(line)
            if instruction:
                computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (expected the optimised HLO of a compiled program)")
    return computations, entry


def _branches(instruction: dict) -> list[str]:
    attrs = instruction["attrs"]
    names = re.findall(r"(?:true_computation|false_computation)=%?([\w.\-]+)", attrs)
    listed = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if listed:
        names += re.findall(r"%?([\w.\-]+)", listed[1])
    return names


def kernels(text: str, cache_bytes: int = 0) -> list[dict]:
    """One row per kernel-launching instruction executed by the program (see the module docstring).

    ``bytes_beyond_cache``: the part of a kernel's bytes in arrays larger than ``cache_bytes`` (the L2 cache), which
    cannot all come from the cache.
    """
    computations, entry = parse_module(text)
    hlo = profile_summary.parse_hlo(text)

    def walk(name: str, repeat: int) -> list[dict]:
        rows = []
        instructions = computations.get(name, [])
        shapes = {i["name"]: i["shape"] for i in instructions}
        for ins in instructions:
            op = ins["op"]
            if op == "conditional":
                taken = [walk(b, repeat) for b in _branches(ins)]
                if taken:
                    rows += max(taken, key=lambda r: sum(x["bytes"] for x in r))
                continue
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", ins["attrs"])
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins["attrs"])
                if body:
                    rows += walk(body[1], repeat * (int(trips[1]) if trips else 1))
                continue
            if op == "call":
                called = re.search(r"to_apply=%?([\w.\-]+)", ins["attrs"])
                if called:
                    rows += walk(called[1], repeat)
                    continue
            if op in NOT_KERNELS:
                continue
            sizes = [b for o in ins["operands"] for b in array_sizes(shapes.get(o, ""))]
            read = sum(sizes)
            out_sizes = array_sizes(ins["shape"], skip_scratch=op == "custom-call")
            written = sum(out_sizes)
            beyond = sum(b for b in sizes + out_sizes if b > cache_bytes)
            op_name = re.search(r'op_name="([^"]+)"', ins["attrs"])
            rows.append({"name": ins["name"], "op": op, "computation": name, "repeat": repeat,
                         "category": profile_summary.categorize(ins["name"], "", hlo),
                         "bytes_read": read * repeat, "bytes_written": written * repeat,
                         "bytes": (read + written) * repeat, "bytes_beyond_cache": beyond * repeat,
                         "op_name": op_name[1] if op_name else ""})
        return rows

    return walk(entry, 1)


def scope_of(op_name: str) -> str:
    """The transformation scope of an instruction: its op_name's second part ('jvp(DeepLabV3Plus)', ...)."""
    parts = op_name.split("/")
    return parts[1] if len(parts) > 2 else "(other)"


def summarize(rows: list[dict], bandwidth_tbs: float | None = None, tflop: float | None = None,
              peak_tflops: float | None = None, top: int = 20, cache_bytes: int = 0) -> dict:
    categories = defaultdict(lambda: {"kernels": 0, "bytes": 0, "bytes_beyond_cache": 0})
    for r in rows:
        c = categories[r["category"]]
        c["kernels"] += r["repeat"]
        c["bytes"] += r["bytes"]
        c["bytes_beyond_cache"] += r["bytes_beyond_cache"]
    out = {
        "kernels": sum(c["kernels"] for c in categories.values()),
        "bytes": sum(c["bytes"] for c in categories.values()),
        "bytes_beyond_cache": sum(c["bytes_beyond_cache"] for c in categories.values()),
        "cache_bytes": cache_bytes,
        "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1]["bytes"])),
    }
    # The largest contributors, instructions grouped by their source (numbers in layer names folded).
    groups = defaultdict(lambda: {"kernels": 0, "bytes": 0})
    for r in rows:
        key = (r["category"], re.sub(r"\d+", "N", r["op_name"]) or r["op"])
        groups[key]["kernels"] += r["repeat"]
        groups[key]["bytes"] += r["bytes"]
    out["top_sources"] = [{"category": c, "source": s, **v}
                          for (c, s), v in sorted(groups.items(), key=lambda kv: -kv[1]["bytes"])[:top]]
    # By transformation scope, the op_name's second part: e.g. 'DeepLabV3Plus' (a forward pass without gradient),
    # 'jvp(DeepLabV3Plus)' (a forward pass that is differentiated), 'transpose(jvp(DeepLabV3Plus))' (its backward).
    scopes = defaultdict(lambda: {"kernels": 0, "bytes": 0, "memory_bound_bytes": 0})
    for r in rows:
        scope = scopes[scope_of(r["op_name"])]
        scope["kernels"] += r["repeat"]
        scope["bytes"] += r["bytes"]
        if r["category"] not in COMPUTE_CATEGORIES:
            scope["memory_bound_bytes"] += r["bytes"]
    out["scopes"] = dict(sorted(scopes.items(), key=lambda kv: -kv[1]["bytes"])[:top])
    # Collectives by kind: how many each step issues (an asynchronous one counted at its start) and their bytes.
    collectives = defaultdict(lambda: {"ops": 0, "bytes": 0})
    for r in rows:
        if r["category"] == "collective":
            c = collectives[re.sub(r"-(start|done)$", "", r["op"])]
            c["ops"] += 0 if r["op"].endswith("-done") else r["repeat"]
            c["bytes"] += r["bytes"]
    out["collectives"] = dict(sorted(collectives.items(), key=lambda kv: -kv[1]["bytes"]))
    if bandwidth_tbs:
        out["bounds"] = {"bandwidth_tbs": bandwidth_tbs}
        for key in ("bytes", "bytes_beyond_cache"):
            out["bounds"][key] = _bounds(categories, key, bandwidth_tbs * 1e12, tflop, peak_tflops)
    return out


def _bounds(categories: dict, key: str, bandwidth: float, tflop: float | None, peak_tflops: float | None) -> dict:
    """Step-time floors when the traffic ``key`` moves at ``bandwidth`` bytes/s and kernels run one at a time."""
    memory = sum(c[key] for k, c in categories.items() if k not in COMPUTE_CATEGORIES)
    compute = sum(c[key] for k, c in categories.items() if k in COMPUTE_CATEGORIES)
    bound = {"memory_bound_ms": memory / bandwidth * 1e3, "compute_traffic_ms": compute / bandwidth * 1e3}
    if tflop and peak_tflops:
        bound["compute_at_peak_ms"] = tflop / peak_tflops * 1e3
        bound["compute_ms"] = max(bound["compute_at_peak_ms"], bound["compute_traffic_ms"])
        bound["step_floor_ms"] = bound["memory_bound_ms"] + bound["compute_ms"]
        bound["mfu_ceiling"] = bound["compute_at_peak_ms"] / bound["step_floor_ms"]
        bound.update(tflop=tflop, peak_tflops=peak_tflops)
    return bound


def format_summary(s: dict) -> str:
    bounds = s.get("bounds")
    cache = f"GB in arrays > {s['cache_bytes'] / 2**20:g} MiB" if s["cache_bytes"] else ""
    header = "| category | kernels | GB read + written |" + (f" {cache} |" if cache else "")
    if bounds:
        header += f" ms at {bounds['bandwidth_tbs']:g} TB/s |"
    lines = [header, "|---|" + "---:|" * (header.count("|") - 2)]
    total = {"kernels": s["kernels"], "bytes": s["bytes"], "bytes_beyond_cache": s["bytes_beyond_cache"]}
    for name, c in list(s["categories"].items()) + [("total", total)]:
        row = f"| {name} | {c['kernels']} | {c['bytes'] / 1e9:.2f} |"
        if cache:
            row += f" {c['bytes_beyond_cache'] / 1e9:.2f} |"
        if bounds:
            row += f" {c['bytes'] / bounds['bandwidth_tbs'] / 1e9:.2f} |"
        lines.append(row)
    if bounds:
        lines.append("")
        for key, what in (("bytes", "every operand and result from device memory"),
                          ("bytes_beyond_cache", f"only arrays larger than {s['cache_bytes'] / 2**20:g} MiB")):
            if key == "bytes_beyond_cache" and not s["cache_bytes"]:
                continue
            b = bounds[key]
            line = (f"{what}: memory-bound kernels (all but convolution and matmul) >= {b['memory_bound_ms']:.2f} ms")
            if "step_floor_ms" in b:
                line += (f"; convolutions and matmuls >= {b['compute_ms']:.2f} ms ({b['tflop']:.2f} TFLOP at "
                         f"{b['peak_tflops']:g} TFLOP/s = {b['compute_at_peak_ms']:.2f} ms, their traffic "
                         f"{b['compute_traffic_ms']:.2f} ms); kernels one after another: step >= "
                         f"{b['step_floor_ms']:.2f} ms, MFU <= {100 * b['mfu_ceiling']:.1f} %")
            lines.append(line)
    lines += ["", "| scope (op_name's second part) | kernels | GB read + written | of which memory-bound kernels |",
              "|---|---:|---:|---:|"]
    for name, v in s.get("scopes", {}).items():
        lines.append(f"| {name[:80]} | {v['kernels']} | {v['bytes'] / 1e9:.2f} | {v['memory_bound_bytes'] / 1e9:.2f} |")
    if s.get("collectives"):
        lines += ["", "| collective | issued | GB read + written |", "|---|---:|---:|"]
        for name, v in s["collectives"].items():
            lines.append(f"| {name} | {v['ops']} | {v['bytes'] / 1e9:.2f} |")
    lines += ["", "| GB | kernels | category | source (op_name, digits folded) |", "|---:|---:|---|---|"]
    for t in s["top_sources"]:
        lines.append(f"| {t['bytes'] / 1e9:.2f} | {t['kernels']} | {t['category']} | {t['source'][-110:]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("hlo", help="optimised HLO text (compiled.as_text(), step_hlo.txt)")
    p.add_argument("--bandwidth_tbs", type=float, default=0.0, help="device memory bandwidth, TB/s (H100 SXM 3.35)")
    p.add_argument("--tflop", type=float, default=0.0, help="FLOPs of the program, in TFLOP")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="dense peak of the chip for the compute dtype")
    p.add_argument("--cache_mib", type=float, default=0.0,
                   help="also count only arrays larger than this (the L2 cache: 50 MiB on an H100 / H200)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", default="", help="also write the summary here")
    args = p.parse_args(argv)
    path = Path(args.hlo)
    if not path.is_file():
        print(f"error: {path} is not a file (expected optimised HLO text)", file=sys.stderr)
        return 2
    cache_bytes = int(args.cache_mib * 2**20)
    try:
        rows = kernels(path.read_text(), cache_bytes)
    except ValueError as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    summary = summarize(rows, args.bandwidth_tbs or None, args.tflop or None, args.peak_tflops or None, args.top,
                        cache_bytes)
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
