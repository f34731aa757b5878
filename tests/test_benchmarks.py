"""benchmarks/ on the CPU: step_time.py in tiny mode end to end, its profile summary on hand-made GPU traces, the
kernel and byte counts of compile_for_gpu.py on hand-made and CPU-compiled HLO, and the other scripts' helpers."""

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py and each other


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


st, cg, common = _load("step_time"), _load("compile_for_gpu"), _load("common")


def test_step_time_tiny_end_to_end(tmp_path):
    out = tmp_path / "step_time.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--config=configs/voc_blender.py:1_4",
           "--tiny", "--steps", "2", "--warmup", "1", "--dtypes", "float32", "--num_devices", "1", "--out", str(out),
           "--profile", str(tmp_path / "trace"), "--profile_steps", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in ("compiling the step", "| dtype | lower s | compile s | median ms", "| float32 |",
                 "Profile of 1 step(s) (host XLA thunks", "| category | ms/step | share of kernel time |"):
        assert text in proc.stdout

    report = json.loads(out.read_text())
    assert report["device"]["platform"] == "cpu" and report["device"]["count"] == 1
    assert report["commit"] and report["date"] and report["command"].startswith("python benchmarks/step_time.py")
    r = report["results"]["float32"]
    assert r["mode"] == "stpg" and r["images_per_step"] == 2 + 2 * 2
    for key in ("lower_s", "compile_s", "pipelined_mean_ms", "steps_per_s", "images_per_s", "flops_per_step",
                "achieved_tflops"):
        assert _positive(r[key]), (key, r[key])
    assert r["flops_source"] == "lowered_hlo_cpu" and _positive(r["memory_analysis"]["total_bytes"])
    assert r["step"]["n"] == 2 and 0 < r["step"]["p10_ms"] <= r["step"]["median_ms"] <= r["step"]["p90_ms"]
    # No dense-peak figure for a CPU: MFU is n/a, and the peak memory is n/a or a positive count.
    assert r["mfu"] is None and r["peak_tflops_per_device"] is None
    assert r["peak_memory_bytes"] is None or _positive(r["peak_memory_bytes"])
    assert math.isfinite(r["final_loss"])
    # The counter was set past the contrastive start, then went on: warm-up, timed and back-to-back steps.
    assert r["step_counter_after"] == 1600 + 1 + 2 + 2
    # Every kernel of the traced step is counted once, convolutions among them; the step's HLO lies beside the trace.
    prof = r["profile"]
    assert prof["source"] == "host" and prof["steps"] == 1 and prof["distinct_ops"] > 50
    assert prof["categories"]["convolution"]["ms_per_step"] > 0
    assert sum(c["share"] for c in prof["categories"].values()) == pytest.approx(1.0)
    assert 0 < prof["busy_ms_per_step"] <= prof["kernel_ms_per_step"] * 1.0001
    assert (tmp_path / "trace" / "float32" / "step_hlo.txt").stat().st_size > 10_000


def test_git_commit_marks_uncommitted_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("STPG_COMMIT", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    full = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert common.git_commit(tmp_path) == head and common.git_commit(tmp_path, full=True) == full
    (tmp_path / "b.txt").write_text("untracked files do not count\n")
    assert common.git_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert common.git_commit(tmp_path) == head + "-dirty"
    assert common.git_commit(tmp_path / "missing") == "unknown"
    monkeypatch.setenv("STPG_COMMIT", "abc1234")
    assert common.git_commit(tmp_path) == "abc1234"


def test_common_helpers(tmp_path):
    with pytest.raises(FileNotFoundError, match="no eval"):
        common.last_eval(str(tmp_path))
    for step, miou in ((50, 0.1), (516, 0.5), (100, 0.2)):
        (tmp_path / f"eval_{step}.json").write_text(json.dumps({"step": step, "miou": miou}))
    (tmp_path / "eval_notes.json").write_text("{}")
    assert common.last_eval(str(tmp_path)) == {"step": 516, "miou": 0.5}
    config = common.load_config("configs/camvid.py:1_8", "model.dtype=bfloat16")
    assert config.model.dtype == "bfloat16" and common.num_classes_of(config) == 11
    with pytest.raises(FileNotFoundError, match="no_such.py"):
        common.load_config("configs/no_such.py")
    common.write_json(str(tmp_path / "a" / "r.json"), {"x": 1})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 1}
    assert not (tmp_path / "a" / "r.json.tmp").exists()


def test_step_time_helpers():
    class Fake:
        def __init__(self, analysis):
            self.analysis = analysis

        def cost_analysis(self):
            return self.analysis

    assert st.flops_of(Fake({"flops": 3.0})) == 3.0
    assert st.flops_of(Fake([{"flops": 2.0}, {"flops": 5.0}])) == 7.0
    assert st.flops_of(Fake(None)) is None and st.flops_of(Fake([{}])) is None
    assert st.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert st.peak_tflops("NVIDIA H200", "float32") == pytest.approx(494.7)
    assert st.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == pytest.approx(312.0)
    assert st.peak_tflops("cpu", "bfloat16") is None
    argv = ["--config=configs/voc_blender.py:1_4", "--dtypes", "float32,bfloat16", "--out=x.json", "--steps", "4"]
    assert st._child_argv(argv, "bfloat16", "/t/b.json") == [
        "--config=configs/voc_blender.py:1_4", "--steps", "4", "--dtypes", "bfloat16", "--out", "/t/b.json"]
    assert st._fmt(None) == "n/a" and st._fmt(0.4123, ".1f", 100, "%") == "41.2%"
    with pytest.raises(SystemExit):
        st.parse_args(["--dtypes", "float16"])


# The shape of XLA's optimised GPU HLO: fusions name their computation, cuDNN convolutions are custom calls with a u8
# scratch buffer, a tuple element and a bitcast launch no kernel, a conditional has a light and a heavy branch, a
# while loop a known trip count.
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[1024]{0}, pred[])->f32[1024]{0}}

%fused_add (param_0: f32[1024]) -> f32[1024] {
  %param_0 = f32[1024]{0} parameter(0)
  ROOT %add.1 = f32[1024]{0} add(%param_0, %param_0)
}

%fused_bn (param_0: bf16[8,64,64,256], /*index=1*/param_1: f32[256]) -> f32[256] {
  %param_0 = bf16[8,64,64,256]{3,2,1,0} parameter(0)
  %convert.1 = f32[8,64,64,256]{3,2,1,0} convert(%param_0)
  ROOT %reduce.3 = f32[256]{0} reduce(%convert.1, %c), dimensions={0,1,2}, to_apply=%add
}

%fused_conv (p0: bf16[8,64,64,256], p1: bf16[3,3,256,256]) -> bf16[8,64,64,256] {
  ROOT %convolution.9 = bf16[8,64,64,256]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, dim_labels=b01f_01io->b01f
}

%fused_scatter (p0: f32[8,512,129,21]) -> f32[8,129,129,21] {
  ROOT %scatter.1 = f32[8,129,129,21]{3,2,1,0} scatter(%z, %i, %p0), update_window_dims={0,2,3}
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

# Instructions of each category, as profiled kernels name them (the conditional and loop above add none).
CATEGORIZED = """
%profiled (a: f32[8]) -> f32[8] {
  %cudnn-conv-bw-filter.4 = (bf16[3,3,256,256]{3,2,1,0}, u8[0]{0}) custom-call(%a, %g), custom_call_target="__cudnn$convBackwardFilter"
  %input_reduce_fusion.7 = f32[256]{0} fusion(%x, %y), kind=kInput, calls=%fused_bn
  %loop_maximum_fusion = f32[1024]{0} fusion(%x), kind=kLoop, calls=%fused_add
  %conv_fusion.2 = bf16[8,64,64,256]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_conv, backend_config={"fusion_backend_config":{"kind":"__cudnn$fusion"}}
  %scatter_fusion.3 = f32[8,129,129,21]{3,2,1,0} fusion(%u), kind=kLoop, calls=%fused_scatter
  %gemm.5 = (f32[64,256]{1,0}, s8[0]{0}) custom-call(%m, %n), custom_call_target="__cublas$gemm"
  ROOT %copy.8 = f32[8]{0} copy(%a)
}
"""


def test_hlo_instructions_and_their_categories():
    hlo = st.Hlo(HLO + CATEGORIZED)
    conv = hlo.instructions["conv_fusion.2"]
    assert (conv["op"], conv["kind"], conv["calls"], conv["backend"]) == ("fusion", "kCustom", "fused_conv",
                                                                          "__cudnn$fusion")
    assert hlo.instructions["cudnn-conv.4"]["target"] == "__cudnn$convForward"
    assert hlo.inside(hlo.instructions["input_reduce_fusion.7"]) == {"parameter", "convert", "reduce"}
    assert hlo.entry == "main.9" and "copy.3" in {i["name"] for i in hlo.computations["heavy"]}
    expected = {"cudnn-conv.4": "convolution", "cudnn-conv-bw-filter.4": "convolution", "conv_fusion.2": "convolution",
                "input_reduce_fusion.7": "reduction fusion", "loop_maximum_fusion": "elementwise fusion",
                "scatter_fusion.3": "scatter", "gemm.5": "matmul", "copy.8": "copy / transpose", "while.2": "other"}
    assert {name: st.categorize(name, "", hlo) for name in expected} == expected
    # Kernels known by their names only (library kernels inside a command buffer), and memsets.
    conv_kernel = "sm90_xmma_fprop_implicit_gemm_bf16"
    assert st.categorize(conv_kernel, conv_kernel, hlo) == "convolution"
    assert st.categorize("sm90_xmma_gemm_bf16bf16", "sm90_xmma_gemm_bf16bf16", hlo) == "matmul"
    assert st.categorize("cudnn-conv.4", "Memset 3", hlo) == "memcpy / memset"
    with pytest.raises(ValueError, match="ENTRY"):
        st.Hlo("not HLO at all\n")


def test_kernels_count_operands_and_results_once_per_execution():
    rows = {r["name"]: r for r in cg.kernels(HLO)}
    assert set(rows) == {"loop_fusion.1", "cudnn-conv.4", "copy.3", "negate.2", "loop_fusion.7"}  # heavy branch
    assert rows["loop_fusion.1"]["bytes"] == 4096 + 4096 and rows["loop_fusion.1"]["category"] == "elementwise fusion"
    conv = rows["cudnn-conv.4"]
    assert (conv["bytes_read"], conv["bytes_written"], conv["category"]) == (4096, 512, "convolution")  # no scratch
    assert rows["copy.3"]["bytes"] == 8192 and rows["negate.2"]["bytes"] == 8192
    assert rows["loop_fusion.7"]["repeat"] == 3 and rows["loop_fusion.7"]["bytes"] == 3 * 8192


def test_step_floor_and_mfu_ceiling():
    s = cg.summarize(cg.kernels(HLO), bandwidth_tbs=1e-6, tflop=2e-9, peak_tflops=1e-6)  # 1 MB/s, 1 MFLOP/s
    assert s["kernels"] == 7 and s["bytes"] == 8192 + 4608 + 16384 + 3 * 8192
    assert s["categories"]["convolution"] == {"kernels": 1, "bytes": 4608}
    b = s["bounds"]
    assert b["memory_bound_ms"] == pytest.approx((s["bytes"] - 4608) / 1e6 * 1e3)
    assert b["compute_at_peak_ms"] == pytest.approx(2.0)  # 2000 FLOP at 1 MFLOP/s
    assert b["compute_ms"] == pytest.approx(4.608)  # the convolution's own 4608 bytes at 1 MB/s take longer
    assert b["step_floor_ms"] == pytest.approx(b["memory_bound_ms"] + b["compute_ms"])
    assert b["mfu_ceiling"] == pytest.approx(b["compute_at_peak_ms"] / b["step_floor_ms"])
    table = cg.format_traffic(s)
    assert "| convolution | 1 | 0.00 |" in table and f"step >= {b['step_floor_ms']:.2f} ms" in table
    assert "| collective |" not in table  # none: no table
    assert "bounds" not in cg.summarize(cg.kernels(HLO))


def test_collectives_by_kind():
    hlo = """ENTRY %main (x: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %all-reduce-start.1 = f32[1024]{0} all-reduce-start(%x), replica_groups={{0,1}}, to_apply=%add
  %all-reduce-done.1 = f32[1024]{0} all-reduce-done(%all-reduce-start.1)
  %all-reduce-start.2 = f32[1024]{0} all-reduce-start(%all-reduce-done.1), replica_groups={{0,1}}, to_apply=%add
  %all-reduce-done.2 = f32[1024]{0} all-reduce-done(%all-reduce-start.2)
  %collective-permute-start = (f32[1024]{0}, f32[1024]{0}) collective-permute-start(%all-reduce-done.2), source_target_pairs={{0,1},{1,0}}
  ROOT %collective-permute-done = f32[1024]{0} collective-permute-done(%collective-permute-start)
}
"""
    s = cg.summarize(cg.kernels(hlo))
    assert list(s["categories"]) == ["collective"] and list(s["collectives"]) == ["all-reduce", "collective-permute"]
    assert s["collectives"]["all-reduce"] == {"ops": 2, "bytes": 4 * (4096 + 4096)}  # a pair issued once
    assert s["collectives"]["collective-permute"] == {"ops": 1, "bytes": 2 * (4096 + 8192)}
    assert "| all-reduce | 2 | 0.00 |" in cg.format_traffic(s)


def test_a_cpu_compiled_program_parses():
    x = jnp.ones((256, 256), jnp.float32)
    rows = cg.kernels(jax.jit(lambda a: jnp.tanh(a @ a).sum(axis=0)).lower(x).compile().as_text())
    assert sum(r["bytes"] for r in rows) >= 256 * 256 * 4 + 256 * 4  # the input is read, the result written
    assert any(r["category"] == "matmul" for r in rows)


def test_gpu_targets_and_the_missing_plugin_message(monkeypatch):
    for name, kind, bandwidth, l2, peak in (("h100", "NVIDIA H100 80GB HBM3", 3.35232e12, 50, 989.4),
                                            ("h200", "NVIDIA H200", 4.8e12, 50, 989.4),
                                            ("a100", "NVIDIA A100-SXM4-80GB", 2.039e12, 40, 312.0)):
        text, info = cg.read_target(name)
        assert (info["device_kind"], info["memory_bandwidth"], info["l2_cache_size"]) == (kind, bandwidth, l2 * 2**20)
        assert "cuda_compute_capability" in text and st.peak_tflops(kind, "bfloat16") == peak
    with pytest.raises(cg.TargetError, match="expected h100, h200, a100 or the path"):
        cg.read_target("h300")
    from jax.experimental import topologies

    def no_plugin(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(cg.TargetError, match=r"pip install \"jax-cuda13-plugin==" + jax.__version__):
        cg.gpu_mesh(cg.read_target("h100")[0], 1)


def _trace(path: Path, events, gpu: int = 7, streams=(20, 21)):
    """A *.trace.json.gz with one GPU process and its stream lines, beside an XLA Ops line that repeats the ops."""
    meta = [{"ph": "M", "pid": gpu, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": gpu, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    meta += [{"ph": "M", "pid": gpu, "tid": t, "name": "thread_name", "args": {"name": f"Stream #{t}(Compute)"}}
             for t in streams]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def _kernel(tid, ts, dur, name, op=None):
    return {"ph": "X", "pid": 7, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": {"hlo_op": op or name}}


def test_profile_of_a_gpu_trace(tmp_path):
    events = []
    for step in range(2):  # two steps of 100 µs; 80 µs of kernels each, 10 µs of them on two streams at once
        t0 = 1000.0 * step
        events += [{"ph": "X", "pid": 1, "tid": 1, "ts": t0, "dur": 100.0, "name": "train_step"},
                   _kernel(20, t0, 40.0, "sm90_xmma_fprop_implicit_gemm", "cudnn-conv.4"),
                   _kernel(20, t0 + 40, 20.0, "input_reduce_fusion_7", "input_reduce_fusion.7"),
                   _kernel(21, t0 + 50, 20.0, "scatter_fusion_3", "scatter_fusion.3"),
                   _kernel(2, t0, 40.0, "cudnn-conv.4")]  # the XLA Ops line: not counted again
    _trace(tmp_path / "plugins" / "profile" / "run1" / "host.trace.json.gz", events)
    s = st.summarize_profile(tmp_path, HLO + CATEGORIZED)
    assert s["source"] == "gpu" and s["steps"] == 2 and s["step_wall_ms"] == [pytest.approx(0.1)] * 2
    assert s["kernel_ms_per_step"] == pytest.approx(0.080)
    assert s["busy_ms_per_step"] == pytest.approx(0.070)  # the two streams overlap for 10 µs
    assert list(s["categories"]) == ["convolution", "reduction fusion", "scatter"]
    assert s["categories"]["convolution"]["share"] == pytest.approx(0.5)
    assert s["top_ops"][0]["op"] == "cudnn-conv.4" and s["top_ops"][0]["kernels_per_step"] == 1
    text = st.format_profile(s)
    assert "| convolution | 0.04 | 50.0 % |" in text and "busy 0.07 ms/step, step wall 0.10 ms" in text


def test_profile_counts_command_buffer_kernels_under_their_own_instructions(tmp_path):
    """Kernels captured in a CUDA graph carry the graph's name as hlo_op; each is counted under its instruction."""
    events, t = [], 0.0
    for name, dur in (("input_reduce_fusion_7", 30.0), ("loop_maximum_fusion", 10.0),
                      ("cutlass_tensorop_bf16_s16816fprop_optimized", 40.0), ("Memset 3", 5.0)):
        events.append(_kernel(20, t, dur, name, "command_buffer_31"))
        t += dur
    events.append(_kernel(20, t, 15.0, "sm90_xmma_fprop_implicit_gemm", "cudnn-conv.4"))
    _trace(tmp_path / "t.trace.json.gz", events)
    s = st.summarize_profile(tmp_path, HLO + CATEGORIZED, steps=1)
    assert s["command_buffer_ms_per_step"] == pytest.approx(0.085) and s["kernel_ms_per_step"] == pytest.approx(0.1)
    ops = {o["op"]: o for o in s["top_ops"]}
    assert "command_buffer_31" not in ops
    assert ops["input_reduce_fusion.7"]["category"] == "reduction fusion"
    assert ops["loop_maximum_fusion"]["category"] == "elementwise fusion"
    assert s["categories"]["convolution"]["ms_per_step"] == pytest.approx(0.055)  # the library kernel by its name
    assert s["categories"]["memcpy / memset"]["ms_per_step"] == pytest.approx(0.005) and "other" not in s["categories"]
    assert "0.09 ms/step of it inside CUDA-graph command buffers" in st.format_profile(s)


def test_profile_counts_a_convolutions_memset_apart_from_its_kernel(tmp_path):
    _trace(tmp_path / "t.trace.json.gz", [_kernel(20, 0.0, 6.0, "Memset 3", "cudnn-conv-bw-filter.4"),
                                          _kernel(20, 6.0, 30.0, "sm90_xmma_wgrad_implicit_gemm",
                                                  "cudnn-conv-bw-filter.4")])
    s = st.summarize_profile(tmp_path, HLO + CATEGORIZED, steps=1)
    assert s["categories"]["convolution"]["ms_per_step"] == pytest.approx(0.030)
    assert s["categories"]["memcpy / memset"]["ms_per_step"] == pytest.approx(0.006)
    (op,) = s["top_ops"]
    assert op["category"] == "convolution" and op["kernel"] == "sm90_xmma_wgrad_implicit_gemm"
    assert op["ms_per_step"] == pytest.approx(0.036) and op["memset_ms_per_step"] == pytest.approx(0.006)


def test_profile_without_device_lines_uses_host_thunks(tmp_path):
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 1, "tid": 3, "ts": 0.0, "dur": 30.0, "name": "cudnn-conv.4",
               "args": {"hlo_op": "cudnn-conv.4"}},
              {"ph": "X", "pid": 1, "tid": 3, "ts": 30.0, "dur": 0.1, "name": "end: cudnn-conv.4",
               "args": {"hlo_op": "cudnn-conv.4"}},
              {"ph": "X", "pid": 1, "tid": 3, "ts": 40.0, "dur": 10.0, "name": "loop_fusion.1",
               "args": {"hlo_op": "loop_fusion.1"}},
              {"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 60.0, "name": "PjitFunction(step)"}]
    (tmp_path / "r").mkdir()
    with gzip.open(tmp_path / "r" / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = st.summarize_profile(tmp_path, HLO, steps=1)
    assert s["source"] == "host" and s["kernel_ms_per_step"] == pytest.approx(0.040)
    assert s["categories"]["convolution"]["share"] == pytest.approx(0.75)
    with pytest.raises(FileNotFoundError, match="no_trace"):
        st.summarize_profile(tmp_path / "no_trace")


ce = _load("camvid_experiment")
compare = _load("compare")


def _eval_json(workdir: Path, miou: float, iou: dict, step: int = 4):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"eval_{step}.json").write_text(json.dumps({"step": step, "miou": miou, "iou": iou}))


def test_camvid_experiment_commands_and_results(tmp_path):
    args = ce.parse_args(["--methods", "supervised,stpg", "--steps", "120", "--seeds", "0,2", "--workdir_root",
                          str(tmp_path), "--overrides", "data.root=/d,model.dtype=bfloat16"])
    assert args.seed_list == [0, 2]
    commands = ce.build_commands(args, 2)
    assert [m for m, *_ in commands] == ["supervised", "stpg"]
    method, cmd, workdir = commands[1]
    assert cmd[1] == "launch.py" and workdir == str(tmp_path / "stpg_seed2") and f"--workdir={workdir}" in cmd
    assert (f"--config=configs/camvid.py:1_8,mode=stpg,seed=2,schedule.total_steps=120,schedule.steps_per_epoch=3,"
            f"eval.every_steps=0,data.data_dir={tmp_path / 'prepared'},data.root=/d,model.dtype=bfloat16") in cmd
    assert ce.prepare_command(cmd[2][len("--config="):])[1:] == ["-m", "stpg_jax.data.prepare", "--dataset", "camvid",
                                                                 "--manual_dir", "/d", "--data_dir",
                                                                 str(tmp_path / "prepared")]
    assert args.mem_fraction == pytest.approx(0.45)

    # A run's record holds its last evaluation; without one its result fields are None.
    assert compare.record("stpg", 2, "c", str(tmp_path / "stpg"), 1.0, 1)["miou"] is None
    _eval_json(tmp_path / "stpg", 0.4525, {"sky": 0.905, "sign_symbol": None})
    (tmp_path / "stpg" / "split_labeled.txt").write_text("a\nb\n")
    r = compare.record("stpg", 2, "c", str(tmp_path / "stpg"), 60.04, 0)
    assert (r["step"], r["miou"], r["iou"], r["wall_s"]) == (4, 0.4525, {"sky": 0.905, "sign_symbol": None}, 60.0)
    assert len(r["split_labeled_sha256_16"]) == 16
    text = ce.results_text([{**r, "method": "supervised"}, {**r, "wall_s": 120.0}], ("sign_symbol",), False)
    assert "| sky | 90.50 | 90.50 |" in text and "| **mIoU** | 45.25 | 45.25 |" in text
    assert "| sign_symbol | n/a | n/a |" in text and "| wall time per run (train + eval) | 1 min 00 s | 2 min 00 s |" in text
    assert "stpg − supervised, paired by seed: mIoU +0.00 points (per seed +0.00; stpg ahead in 0 of 1)" in text

    for bad in (["--methods", "fixmatch"], ["--mem_fraction", "0.6"], ["--overrides", "mode=stpg"],
                ["--overrides", "seed=3"], ["--seeds", "1,1"], ["--seeds", "x"]):
        with pytest.raises(SystemExit):
            ce.parse_args(bad + ["--steps", "10", "--workdir_root", str(tmp_path)])
    with pytest.raises(SystemExit):
        ce.parse_args(["--steps", "10"])  # training needs --workdir_root


def _record(method, seed, miou, iou, wall_s=1.0):
    return {"method": method, "seed": seed, "command": "c", "workdir": "w", "wall_s": wall_s, "returncode": 0,
            "step": 4, "miou": miou, "pixel_accuracy": 0.9, "iou": iou, "split_labeled_sha256_16": "ab"}


def test_methods_compared_over_seeds():
    # Seed-paired mIoU differences: per seed, mean, Student-t 95 % interval of the mean, seeds ahead.
    runs = [_record(m, seed, v, {"sky": v, "pole": v / 2})
            for seed, values in enumerate(((0.40, 0.41, 0.43), (0.42, 0.42, 0.43), (0.41, 0.43, 0.42)))
            for m, v in zip(("supervised", "mean_teacher", "stpg"), values)]
    text = compare.paired_text(runs, "mean_teacher", "supervised", ce.HEADINGS, ("pole",))
    assert text == ("mean_teacher − supervised, paired by seed: mIoU +1.00 points (per seed +1.00, +0.00, +2.00; "
                    "95 % interval of the mean -1.48 to +3.48; mean_teacher ahead in 2 of 3), rare classes +0.50 points.")
    assert "(per seed +3.00, +1.00, +1.00; 95 % interval of the mean -1.20 to +4.54; stpg ahead in 3 of 3)" in (
        compare.paired_text(runs, "stpg", "supervised", ce.HEADINGS))
    assert compare.paired_text(runs, "stpg", "fixmatch", {**ce.HEADINGS, "fixmatch": "f"}) is None
    summary = compare.summarize(runs, ce.METHODS, ("pole",))
    assert summary["stpg"]["miou"]["mean"] == pytest.approx(0.4267, abs=1e-4) and summary["stpg"]["miou"]["n"] == 3
    assert summary["supervised"]["rare"]["mean"] == pytest.approx(0.205)
    # A class absent in one seed has no mean; a run that did not finish is left out.
    runs[0]["iou"]["pole"] = None
    unfinished = {**_record("stpg", 3, None, None), "returncode": 1}
    summary = compare.summarize(runs + [unfinished], ce.METHODS)
    assert summary["supervised"]["iou"]["pole"] is None and summary["stpg"]["seeds"] == [0, 1, 2]
    assert "| pole | n/a | " in compare.markdown_table(runs, ce.HEADINGS)


def test_camvid_experiment_without_matplotlib_stops_before_training_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    started = []
    monkeypatch.setattr(ce, "run_experiment", lambda *a: started.append(a) or 0)
    with pytest.raises(SystemExit) as info:
        ce.run_cli(lambda: ce.main(["--methods", "stpg", "--workdir_root", str(tmp_path)]), ce.plots.PlotsUnavailable)
    assert info.value.code == 2 and not started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "matplotlib" in err[0] and "--no-plot" in err[0]
    assert ce.main(["--methods", "stpg", "--workdir_root", str(tmp_path), "--no-plot"]) == 0 and started


def test_camvid_experiment_writes_its_results_and_figure(tmp_path, monkeypatch):
    def fake(jobs, parallel, seed):
        return {m: _record(m, seed, 0.40 + 0.01 * seed, {"sky": 0.9, "pole": None}) for m, *_ in jobs}, None

    monkeypatch.setattr(ce, "run_methods", fake)
    assert ce.main(["--config=configs/demo.py:1_8", "--methods", "supervised,stpg", "--seeds", "0,1",
                    "--workdir_root", str(tmp_path)]) == 0
    from PIL import Image

    with Image.open(tmp_path / "camvid_results.png") as im:
        assert im.format == "PNG" and im.width >= 600
    text = (tmp_path / "camvid_results.md").read_text()
    assert "| **mIoU** | 40.50 ± 0.71 | 40.50 ± 0.71 |" in text and "training seeds 0, 1" in text
    report = json.loads((tmp_path / "camvid_results.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("supervised", 0), ("stpg", 0), ("supervised", 1),
                                                                  ("stpg", 1)]
    assert report["commit"] and report["steps"] == 300 and report["seeds"] == [0, 1]
    assert (tmp_path / "commands.txt").read_text().count("launch.py") == 4


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_camvid_experiment_runs_at_once_and_stops(tmp_path, monkeypatch):
    # Two fake runs at once: each writes its own log; the one that fails is reported, the other one's evaluation read.
    ok = ("import json, os, sys, time; time.sleep(0.5); print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']); "
          "open(os.path.join(sys.argv[1], 'eval_4.json'), 'w').write(json.dumps({'step': 4, 'miou': 0.45, "
          "'iou': {'sky': 0.9}}))")
    jobs = [("supervised", ["python", "-c", ok, str(tmp_path / "supervised")], str(tmp_path / "supervised"),
             {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.300"}),
            ("stpg", ["python", "-c", "import sys; print('boom'); sys.exit(3)"], str(tmp_path / "stpg"), None)]
    runs, stopped_by = ce.run_methods(jobs, parallel=True, seed=1)
    assert stopped_by is None
    assert runs["supervised"]["returncode"] == 0 and runs["supervised"]["miou"] == pytest.approx(0.45)
    assert runs["supervised"]["seed"] == 1 and runs["stpg"]["returncode"] == 3 and runs["stpg"]["miou"] is None
    assert (tmp_path / "supervised" / "train.log").read_text() == "0.300\n"
    assert (tmp_path / "stpg" / "train.log").read_text() == "boom\n"
    assert runs["supervised"]["wall_s"] is not None and runs["stpg"]["wall_s"] is not None

    # A run that dies leaving a worker behind (as when the OOM killer ends a trainer): the worker is ended with it.
    orphaning = ("import subprocess, sys; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                 "print(w.pid, flush=True); sys.exit(5)")
    runs, _ = ce.run_methods([("stpg", ["python", "-c", orphaning], str(tmp_path / "o"), None)], parallel=False)
    assert runs["stpg"]["returncode"] == 5
    worker = int((tmp_path / "o" / "train.log").read_text())
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)

    # SIGTERM while runs go (the script's handler raises Interrupted): every run still going is stopped.
    class Clock:
        calls, time = 0, staticmethod(time.time)

        @classmethod
        def sleep(cls, seconds):
            cls.calls += 1
            if cls.calls == 3:
                raise ce.Interrupted("SIGTERM")
            time.sleep(seconds)

    monkeypatch.setattr(ce, "time", Clock)
    runs, stopped_by = ce.run_methods([("stpg", [sys.executable, "-c", "import time; time.sleep(60)"],
                                        str(tmp_path / "s"), None)], parallel=True)
    assert stopped_by == "SIGTERM" and runs["stpg"]["returncode"] == -15 and runs["stpg"]["miou"] is None


def test_loader_throughput_on_the_demo_data(tmp_path, capsys):
    lt = _load("loader_throughput")
    out = tmp_path / "loader.json"
    report = lt.main(["--config=configs/demo.py", "--workers", "0", "--batches", "3", "--warmup", "1",
                      "--out", str(out)])
    (row,) = report["results"]
    config = common.load_config("configs/demo.py")
    # An STPG batch decodes the labelled images and both unlabelled streams.
    assert row["images_per_batch"] == config.data.batch_labeled + 2 * config.data.batch_unlabeled
    assert row["batches"] == 3 and _positive(row["batches_per_s"]) and _positive(row["mean_batch_ms"])
    assert row["images_per_s"] == pytest.approx(row["batches_per_s"] * row["images_per_batch"])
    assert json.loads(out.read_text())["results"][0]["workers"] == 0
    assert "| workers | first batch s | batches/s |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        lt.parse_args(["--workers", "two"])


def test_eval_speed_on_the_demo_val_set_and_on_random_images(tmp_path, capsys):
    es = _load("eval_speed")
    out = tmp_path / "eval.json"
    report = es.main(["--config=configs/demo.py", "--images", "3", "--warmup", "1", "--out", str(out)])
    assert report["source"] == "synthetic val images" and report["window"] == 96
    assert (report["images"], report["timed_images"]) == (3, 2) and _positive(report["images_per_s"])
    assert report["ms_per_image"] == pytest.approx(1e3 / report["images_per_s"])
    assert json.loads(out.read_text())["windows_per_batch"] == 4
    # 200 x 100 at window 96, stride 64: 3 x 2 windows.
    report = es.main(["--config=configs/demo.py", "--size", "100x200", "--images", "2", "--warmup", "1"])
    assert report["source"] == "random 100x200 images" and report["windows_per_image"] == 6
    assert "| images | windows per image |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        es.main(["--config=configs/demo.py", "--size", "100by200", "--images", "2", "--warmup", "1"])


@pytest.mark.parametrize("script, args", [
    ("step_time.py", ["--config=configs/demo.py:data.nokey=1", "--tiny"]),
    ("compile_for_gpu.py", ["--config=configs/demo.py:data.nokey=1"]),
    ("eval_speed.py", ["--config=configs/demo.py:data.nokey=1"]),
    ("loader_throughput.py", ["--config=configs/demo.py:data.nokey=1", "--workers", "0"]),
    ("camvid_experiment.py", ["--config=configs/no_such.py:1_8", "--workdir_root=unused", "--dry_run"]),
])
def test_benchmark_scripts_say_a_bad_config_in_one_line(script, args):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("no_such.py" if script == "camvid_experiment.py" else "data.nokey") in errors[0]
