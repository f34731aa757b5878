"""benchmarks/hlo_traffic.py and compile_for_gpu.py's target handling, on hand-made and CPU-compiled HLO."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import their siblings
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ht = _load("hlo_traffic")

# The shape of XLA's optimised GPU HLO: a loop fusion, a cuDNN convolution with its u8 scratch buffer, a tuple element
# and a bitcast (no kernels), a conditional with a light and a heavy branch, a while loop with a known trip count.
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[1024]{0}, pred[])->f32[1024]{0}}

%fused_add (param_0: f32[1024]) -> f32[1024] {
  %param_0 = f32[1024]{0} parameter(0)
  ROOT %add.1 = f32[1024]{0} add(%param_0, %param_0)
}

%light (p: f32[1024]) -> f32[1024] {
  %p = f32[1024]{0} parameter(0)
  ROOT %negate.1 = f32[1024]{0} negate(%p)
}

%heavy (p.1: f32[1024]) -> f32[1024] {
  %p.1 = f32[1024]{0} parameter(0)
  %copy.3 = f32[1024]{0} copy(%p.1)
  ROOT %negate.2 = f32[1024]{0} negate(%copy.3)
}

%body (t: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %t = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[1024]{0} get-tuple-element(%t), index=1
  %loop_fusion.7 = f32[1024]{0} fusion(%v), kind=kLoop, calls=%fused_add
  ROOT %t.2 = (s32[], f32[1024]{0}) tuple(%i, %loop_fusion.7)
}

%cond (t.1: (s32[], f32[1024])) -> pred[] {
  %t.1 = (s32[], f32[1024]{0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main.9 (x: f32[1024], flag: pred[]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %flag = pred[] parameter(1)
  %loop_fusion.1 = f32[1024]{0} fusion(%x), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/layer1_0/add"}
  %cudnn-conv.4 = (bf16[256]{0}, /*index=1*/u8[4096]{0}) custom-call(%loop_fusion.1), custom_call_target="__cudnn$convForward"
  %gte = bf16[256]{0} get-tuple-element(%cudnn-conv.4), index=0
  %cond.5 = f32[1024]{0} conditional(%flag, %loop_fusion.1, %loop_fusion.1), true_computation=%heavy, false_computation=%light
  %zero = s32[] constant(0)
  %init = (s32[], f32[1024]{0}) tuple(%zero, %cond.5)
  %while.2 = (s32[], f32[1024]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %out = f32[1024]{0} get-tuple-element(%while.2), index=1
  ROOT %bitcast.1 = f32[1024]{0} bitcast(%out)
}
"""


def test_kernels_count_operands_and_results_once_per_execution():
    rows = {r["name"]: r for r in ht.kernels(HLO)}
    assert set(rows) == {"loop_fusion.1", "cudnn-conv.4", "copy.3", "negate.2", "loop_fusion.7"}  # heavy branch
    assert rows["loop_fusion.1"]["bytes"] == 4096 + 4096
    assert rows["loop_fusion.1"]["category"] == "elementwise fusion"
    assert rows["loop_fusion.1"]["op_name"] == "jit(step)/layer1_0/add"
    conv = rows["cudnn-conv.4"]
    assert (conv["bytes_read"], conv["bytes_written"], conv["category"]) == (4096, 512, "convolution")  # no scratch
    assert rows["copy.3"]["bytes"] == 8192 and rows["negate.2"]["bytes"] == 8192
    assert rows["loop_fusion.7"]["repeat"] == 3 and rows["loop_fusion.7"]["bytes"] == 3 * 8192
    # No array here is larger than 4096 bytes; above a 1 KiB cache only the 512-byte convolution result stays.
    assert all(r["bytes_beyond_cache"] == 0 for r in ht.kernels(HLO, cache_bytes=4096))
    beyond = {r["name"]: r["bytes_beyond_cache"] for r in ht.kernels(HLO, cache_bytes=1024)}
    assert beyond["cudnn-conv.4"] == 4096 and beyond["loop_fusion.7"] == 3 * 8192


def test_summary_bounds_and_table():
    s = ht.summarize(ht.kernels(HLO), bandwidth_tbs=1e-6, tflop=2e-9, peak_tflops=1e-6, top=3)  # 1 MB/s, 1 MFLOP/s
    assert s["kernels"] == 7 and s["bytes"] == 8192 + 4608 + 16384 + 3 * 8192
    assert s["categories"]["convolution"] == {"kernels": 1, "bytes": 4608, "bytes_beyond_cache": 4608}
    b = s["bounds"]["bytes"]
    memory = s["bytes"] - 4608
    assert b["memory_bound_ms"] == pytest.approx(memory / 1e6 * 1e3)
    assert b["compute_at_peak_ms"] == pytest.approx(2.0)  # 2000 FLOP at 1 MFLOP/s
    assert b["compute_ms"] == pytest.approx(4.608)  # the convolution's own 4608 bytes at 1 MB/s take longer
    assert b["mfu_ceiling"] == pytest.approx(b["compute_at_peak_ms"] / (b["memory_bound_ms"] + b["compute_ms"]))
    assert s["scopes"]["layer1_0"] == {"kernels": 1, "bytes": 8192, "memory_bound_bytes": 8192}
    assert s["scopes"]["(other)"]["kernels"] == 6  # no op_name: the convolution, the branch and the loop body
    table = ht.format_summary(s)
    assert "| convolution | 1 | 0.00 |" in table and "MFU <= " in table and "| layer1_0 | 1 | 0.00 | 0.00 |" in table
    assert len(s["top_sources"]) == 3


# Collectives as XLA's GPU pipeline leaves them: asynchronous pairs, one returning a tuple.
HLO_COLLECTIVES = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[1024]{0})->f32[1024]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %all-reduce-start.1 = f32[1024]{0} all-reduce-start(%x), replica_groups={{0,1}}, to_apply=%add
  %all-reduce-done.1 = f32[1024]{0} all-reduce-done(%all-reduce-start.1)
  %all-reduce-start.2 = f32[1024]{0} all-reduce-start(%all-reduce-done.1), replica_groups={{0,1}}, to_apply=%add
  %all-reduce-done.2 = f32[1024]{0} all-reduce-done(%all-reduce-start.2)
  %collective-permute-start = (f32[1024]{0}, f32[1024]{0}) collective-permute-start(%all-reduce-done.2), source_target_pairs={{0,1},{1,0}}
  ROOT %collective-permute-done = f32[1024]{0} collective-permute-done(%collective-permute-start)
}
"""


def test_collectives_by_kind():
    rows = ht.kernels(HLO_COLLECTIVES)
    assert {r["category"] for r in rows} == {"collective"}
    s = ht.summarize(rows)
    assert list(s["collectives"]) == ["all-reduce", "collective-permute"]  # most bytes first
    assert s["collectives"]["all-reduce"] == {"ops": 2, "bytes": 4 * (4096 + 4096)}
    assert s["collectives"]["collective-permute"] == {"ops": 1, "bytes": 2 * (4096 + 8192)}
    table = ht.format_summary(s)
    assert "| all-reduce | 2 | 0.00 |" in table and "| collective-permute | 1 | 0.00 |" in table
    assert "| collective |" not in ht.format_summary(ht.summarize(ht.kernels(HLO)))  # none: no table


def test_a_cpu_compiled_program_parses():
    x = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(lambda a: jnp.tanh(a @ a).sum(axis=0)).lower(x).compile()
    rows = ht.kernels(compiled.as_text())
    assert rows, "no kernels found in XLA's CPU HLO"
    assert sum(r["bytes"] for r in rows) >= 256 * 256 * 4 + 256 * 4  # the input is read, the result written
    assert any(r["category"] == "matmul" for r in rows)


def test_cli_errors_name_the_file(tmp_path):
    script = str(REPO / "benchmarks" / "hlo_traffic.py")
    missing = subprocess.run([sys.executable, script, str(tmp_path / "none.txt")], capture_output=True, text=True)
    assert missing.returncode == 2 and "none.txt is not a file" in missing.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("not HLO at all\n")
    proc = subprocess.run([sys.executable, script, str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "bad.txt" in proc.stderr and "ENTRY" in proc.stderr, proc.stderr


def test_gpu_targets_and_the_missing_plugin_message(monkeypatch):
    cg = _load("compile_for_gpu")
    for name, kind, bandwidth, l2, peak in (("h100", "NVIDIA H100 80GB HBM3", 3.35232e12, 50, 989.4),
                                            ("h200", "NVIDIA H200", 4.8e12, 50, 989.4),
                                            ("a100", "NVIDIA A100-SXM4-80GB", 2.039e12, 40, 312.0)):
        text, info = cg.read_target(name)
        assert (info["device_kind"], info["memory_bandwidth"], info["l2_cache_size"]) == (kind, bandwidth, l2 * 2**20)
        assert "cuda_compute_capability" in text and cg.step_time.peak_tflops(kind, "bfloat16") == peak
    with pytest.raises(cg.TargetError, match="expected h100, h200, a100 or the path"):
        cg.read_target("h300")
    from jax.experimental import topologies

    def no_plugin(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(cg.TargetError, match=r"pip install \"jax-cuda13-plugin==" + jax.__version__):
        cg.gpu_mesh(cg.read_target("h100")[0], 1)
