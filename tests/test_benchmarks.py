"""benchmarks/ on the CPU: step_time.py in tiny mode end to end, its profile summary on hand-made GPU traces, hlo.py's
reading of hand-made and CPU-compiled HLO and of the GPU targets (step_time.py --target), and the other scripts."""

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
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


st, hlo_lib, common = _load("step_time"), _load("hlo"), _load("common")


def test_step_time_tiny_end_to_end(tmp_path):
    out = tmp_path / "step_time.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--config=configs/voc_blender.py:1_4",
           "--tiny", "--steps", "2", "--warmup", "1", "--num_devices", "1", "--out", str(out),
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
    r = report["result"]
    assert r["mode"] == "stpg" and r["dtype"] == "float32" and r["images_per_step"] == 2 + 2 * 2
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
    assert (tmp_path / "trace" / "step_hlo.txt").stat().st_size > 10_000


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

    assert st.flops_of(Fake({"flops": 3.0})) == 3.0 and st.flops_of(Fake([{"flops": 2.0}])) == 2.0
    assert st.flops_of(Fake(None)) is None and st.flops_of(Fake({})) is None and st.flops_of(Fake({"flops": 0})) is None
    assert st.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert st.peak_tflops("NVIDIA H200", "float32") == pytest.approx(494.7)
    assert st.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == pytest.approx(312.0)
    assert st.peak_tflops("cpu", "bfloat16") is None
    assert st.peak_tflops("NVIDIA H100 PCIe", "bfloat16") is None  # not an SXM part: no peak assumed
    assert st._fmt(None) == "n/a" and st._fmt(0.4123, ".1f", 100, "%") == "41.2%"
    with pytest.raises(SystemExit):
        st.parse_args(["--steps", "0"])


# The shape of XLA's optimised GPU HLO: fusions name their computation, cuDNN convolutions are custom calls with a
# tuple result (a u8 scratch buffer), a conditional and a while loop name theirs.
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
    hlo = hlo_lib.Hlo(HLO + CATEGORIZED)
    conv = hlo.instructions["conv_fusion.2"]
    assert (conv["op"], conv["kind"], conv["calls"], conv["backend"]) == ("fusion", "kCustom", "fused_conv",
                                                                          "__cudnn$fusion")
    assert hlo.instructions["cudnn-conv.4"]["target"] == "__cudnn$convForward"
    assert hlo.inside(hlo.instructions["input_reduce_fusion.7"]) == {"parameter", "convert", "reduce"}
    assert hlo.entry == "main.9" and "copy.3" in {i["name"] for i in hlo.computations["heavy"]}
    expected = {"cudnn-conv.4": "convolution", "cudnn-conv-bw-filter.4": "convolution", "conv_fusion.2": "convolution",
                "input_reduce_fusion.7": "reduction fusion", "loop_maximum_fusion": "elementwise fusion",
                "scatter_fusion.3": "scatter", "gemm.5": "matmul", "copy.8": "copy / transpose", "while.2": "other"}
    assert {name: hlo_lib.categorize(name, "", hlo) for name in expected} == expected
    # Kernels known by their names only (library kernels inside a command buffer), and memsets.
    conv_kernel = "sm90_xmma_fprop_implicit_gemm_bf16"
    assert hlo_lib.categorize(conv_kernel, conv_kernel, hlo) == "convolution"
    assert hlo_lib.categorize("sm90_xmma_gemm_bf16bf16", "sm90_xmma_gemm_bf16bf16", hlo) == "matmul"
    assert hlo_lib.categorize("cudnn-conv.4", "Memset 3", hlo) == "memcpy / memset"
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_lib.Hlo("not HLO at all\n")


def test_a_cpu_compiled_program_parses():
    x = jnp.ones((256, 256), jnp.float32)
    hlo = hlo_lib.Hlo(jax.jit(lambda a: jnp.tanh(a @ a).sum(axis=0)).lower(x).compile().as_text())
    entry = hlo.computations[hlo.entry]
    assert entry and "parameter" in {i["op"] for i in entry}
    assert "matmul" in {hlo_lib.categorize(name, "", hlo) for name in hlo.instructions}


def test_gpu_targets_and_the_missing_plugin_message(tmp_path, monkeypatch):
    for name, kind, peak in (("h100", "NVIDIA H100 80GB HBM3", 989.4), ("h200", "NVIDIA H200", 989.4),
                             ("a100", "NVIDIA A100-SXM4-80GB", 312.0)):
        text, info = hlo_lib.read_target(name)
        assert info["device_kind"] == kind and "cuda_compute_capability" in text
        assert st.peak_tflops(kind, "bfloat16") == peak  # the device kinds jax reports are the keys of the peaks
    with pytest.raises(hlo_lib.TargetError, match="expected h100, h200, a100 or the path"):
        hlo_lib.read_target("h300")
    (tmp_path / "t.txtpb").write_text("gpu_device_info { }\n")
    with pytest.raises(hlo_lib.TargetError, match="device_description_str"):
        hlo_lib.read_target(str(tmp_path / "t.txtpb"))
    from jax.experimental import topologies

    def no_plugin(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(hlo_lib.TargetError, match=r"pip install \"jax-cuda13-plugin==" + jax.__version__):
        hlo_lib.gpu_mesh(hlo_lib.read_target("h100")[0], 1)


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
    s = hlo_lib.summarize_profile(tmp_path, HLO + CATEGORIZED)
    assert s["source"] == "gpu" and s["steps"] == 2 and s["step_wall_ms"] == [pytest.approx(0.1)] * 2
    assert s["kernel_ms_per_step"] == pytest.approx(0.080)
    assert s["busy_ms_per_step"] == pytest.approx(0.070)  # the two streams overlap for 10 µs
    assert list(s["categories"]) == ["convolution", "reduction fusion", "scatter"]
    assert s["categories"]["convolution"]["share"] == pytest.approx(0.5)
    assert s["top_ops"][0]["op"] == "cudnn-conv.4" and s["top_ops"][0]["kernels_per_step"] == 1
    text = hlo_lib.format_profile(s)
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
    s = hlo_lib.summarize_profile(tmp_path, HLO + CATEGORIZED, steps=1)
    assert s["command_buffer_ms_per_step"] == pytest.approx(0.085) and s["kernel_ms_per_step"] == pytest.approx(0.1)
    ops = {o["op"]: o for o in s["top_ops"]}
    assert "command_buffer_31" not in ops
    assert ops["input_reduce_fusion.7"]["category"] == "reduction fusion"
    assert ops["loop_maximum_fusion"]["category"] == "elementwise fusion"
    assert s["categories"]["convolution"]["ms_per_step"] == pytest.approx(0.055)  # the library kernel by its name
    assert s["categories"]["memcpy / memset"]["ms_per_step"] == pytest.approx(0.005) and "other" not in s["categories"]
    assert "0.09 ms/step of it inside CUDA-graph command buffers" in hlo_lib.format_profile(s)


def test_profile_counts_a_convolutions_memset_apart_from_its_kernel(tmp_path):
    _trace(tmp_path / "t.trace.json.gz", [_kernel(20, 0.0, 6.0, "Memset 3", "cudnn-conv-bw-filter.4"),
                                          _kernel(20, 6.0, 30.0, "sm90_xmma_wgrad_implicit_gemm",
                                                  "cudnn-conv-bw-filter.4")])
    s = hlo_lib.summarize_profile(tmp_path, HLO + CATEGORIZED, steps=1)
    assert s["categories"]["convolution"]["ms_per_step"] == pytest.approx(0.030)
    assert s["categories"]["memcpy / memset"]["ms_per_step"] == pytest.approx(0.006)
    (op,) = s["top_ops"]
    assert op["category"] == "convolution" and op["kernel"] == "sm90_xmma_wgrad_implicit_gemm"
    assert op["ms_per_step"] == pytest.approx(0.036) and op["kernels_per_step"] == 2


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
    s = hlo_lib.summarize_profile(tmp_path, HLO, steps=1)
    assert s["source"] == "host" and s["kernel_ms_per_step"] == pytest.approx(0.040)
    assert s["categories"]["convolution"]["share"] == pytest.approx(0.75)
    with pytest.raises(FileNotFoundError, match="no_trace"):
        hlo_lib.summarize_profile(tmp_path / "no_trace")


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
    ("step_time.py", ["--config=configs/demo.py:data.nokey=1", "--target", "h100"]),
    ("eval_speed.py", ["--config=configs/demo.py:data.nokey=1"]),
    ("loader_throughput.py", ["--config=configs/demo.py:data.nokey=1", "--workers", "0"]),
    ("experiment.py", ["--config=configs/no_such.py:1_8", "--no-plot"]),
])
def test_benchmark_scripts_say_a_bad_config_in_one_line(script, args):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("no_such.py" if script == "experiment.py" else "data.nokey") in errors[0]
