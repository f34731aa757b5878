"""benchmarks/profile_summary.py on hand-made traces and HLO: the GPU path is checked here without a GPU."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("profile_summary", REPO / "benchmarks" / "profile_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ps = _load()

# The shape of XLA's optimised GPU HLO text: fusions name their computation, cuDNN convolutions are custom calls.
HLO = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_bn (param_0: bf16[8,64,64,256], param_1: f32[256]) -> f32[256] {
  %param_0 = bf16[8,64,64,256]{3,2,1,0} parameter(0)
  %convert.1 = f32[8,64,64,256]{3,2,1,0} convert(%param_0)
  ROOT %reduce.3 = f32[256]{0} reduce(%convert.1, %c), dimensions={0,1,2}, to_apply=%add
}

%fused_relu (param_0: bf16[8,64,64,256], /*index=1*/param_1: bf16[256]) -> bf16[8,64,64,256] {
  ROOT %maximum.2 = bf16[8,64,64,256]{3,2,1,0} maximum(%param_0, %b)
}

%fused_conv (p0: bf16[8,64,64,256], p1: bf16[3,3,256,256]) -> bf16[8,64,64,256] {
  ROOT %convolution.9 = bf16[8,64,64,256]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, dim_labels=b01f_01io->b01f
}

%fused_scatter (p0: f32[8,512,129,21]) -> f32[8,129,129,21] {
  ROOT %scatter.1 = f32[8,129,129,21]{3,2,1,0} scatter(%z, %i, %p0), update_window_dims={0,2,3}
}

ENTRY %main.77 (Arg_0.1: f32[8]) -> f32[8] {
  %cudnn-conv.12 = (bf16[8,64,64,256]{3,2,1,0}, u8[0]{0}) custom-call(%a, %w), window={size=3x3}, custom_call_target="__cudnn$convForward"
  %cudnn-conv-bw-filter.4 = (bf16[3,3,256,256]{3,2,1,0}, u8[0]{0}) custom-call(%a, %g), custom_call_target="__cudnn$convBackwardFilter"
  %input_reduce_fusion.7 = f32[256]{0} fusion(%x, %y), kind=kInput, calls=%fused_bn, metadata={op_name="jit(step)/transpose(jvp(Net))/bn/reduce_sum"}
  %loop_maximum_fusion = bf16[8,64,64,256]{3,2,1,0} fusion(%x, %z), kind=kLoop, calls=%fused_relu
  %conv_fusion.2 = bf16[8,64,64,256]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_conv, backend_config={"fusion_backend_config":{"kind":"__cudnn$fusion"}}
  %scatter_fusion.3 = f32[8,129,129,21]{3,2,1,0} fusion(%u), kind=kLoop, calls=%fused_scatter
  %gemm.5 = (f32[64,256]{1,0}, s8[0]{0}) custom-call(%m, %n), custom_call_target="__cublas$gemm"
  ROOT %copy.3 = f32[8]{0} copy(%Arg_0.1)
}
"""


def test_parse_hlo_reads_opcodes_kinds_targets_and_fused_bodies():
    hlo = ps.parse_hlo(HLO)
    ins = hlo["instructions"]
    assert ins["cudnn-conv.12"] == {"op": "custom-call", "target": "__cudnn$convForward"}
    assert ins["input_reduce_fusion.7"]["kind"] == "kInput" and ins["input_reduce_fusion.7"]["calls"] == "fused_bn"
    assert ins["conv_fusion.2"]["backend_kind"] == "__cudnn$fusion"
    assert hlo["computations"]["fused_bn"] == {"parameter", "convert", "reduce"}
    # A header whose parameter list holds an /*index=N*/ comment still opens its computation.
    assert hlo["computations"]["fused_relu"] == {"maximum"}
    assert "main.77" in hlo["computations"] and "copy" in hlo["computations"]["main.77"]


@pytest.mark.parametrize("op, expected", [
    ("cudnn-conv.12", "convolution"), ("cudnn-conv-bw-filter.4", "convolution"), ("conv_fusion.2", "convolution"),
    ("input_reduce_fusion.7", "reduction fusion"), ("loop_maximum_fusion", "elementwise fusion"),
    ("scatter_fusion.3", "scatter"), ("gemm.5", "matmul"), ("copy.3", "copy / transpose"),
])
def test_categorize_with_hlo(op, expected):
    assert ps.categorize(op, "", ps.parse_hlo(HLO)) == expected


def test_categorize_from_names_alone():
    assert ps.categorize("x", "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert ps.categorize("x", "sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert ps.categorize("loop_add_fusion.3") == "elementwise fusion"
    assert ps.categorize("input_reduce_fusion") == "reduction fusion"
    assert ps.categorize("scatter.7") == "scatter"
    assert ps.categorize("x", "Memcpy HtoD") == "memcpy / memset"
    assert ps.categorize("while.2") == "other"


def _write_trace(path: Path, events):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_summary_of_a_gpu_trace(tmp_path):
    gpu, host = 7, 1
    meta = [
        {"ph": "M", "pid": gpu, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": gpu, "tid": 20, "name": "thread_name", "args": {"name": "Stream #20(Compute)"}},
        {"ph": "M", "pid": gpu, "tid": 21, "name": "thread_name", "args": {"name": "Stream #21(Compute)"}},
        {"ph": "M", "pid": gpu, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": host, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    events = []
    for step in range(2):  # two steps of 100 µs each; 80 µs of kernels per step, 10 µs of them overlapping
        t0 = 1000.0 * step
        events.append({"ph": "X", "pid": host, "tid": 1, "ts": t0, "dur": 100.0, "name": "train_step",
                       "args": {"step_num": str(step)}})
        events += [
            {"ph": "X", "pid": gpu, "tid": 20, "ts": t0, "dur": 40.0, "name": "sm90_xmma_fprop_implicit_gemm",
             "args": {"hlo_op": "cudnn-conv.12", "hlo_module": "jit_step"}},
            {"ph": "X", "pid": gpu, "tid": 20, "ts": t0 + 40, "dur": 20.0, "name": "input_reduce_fusion_7",
             "args": {"hlo_op": "input_reduce_fusion.7"}},
            {"ph": "X", "pid": gpu, "tid": 21, "ts": t0 + 50, "dur": 20.0, "name": "scatter_fusion_3",
             "args": {"hlo_op": "scatter_fusion.3"}},
            # The XLA Ops line repeats the ops and must not be counted twice.
            {"ph": "X", "pid": gpu, "tid": 2, "ts": t0, "dur": 40.0, "name": "cudnn-conv.12",
             "args": {"hlo_op": "cudnn-conv.12"}},
        ]
    _write_trace(tmp_path / "plugins" / "profile" / "run1" / "host.trace.json.gz", meta + events)
    (tmp_path / "step_hlo.txt").write_text(HLO)

    s = ps.summarize(tmp_path, HLO)
    assert s["source"] == "gpu" and s["steps"] == 2
    assert s["kernel_ms_per_step"] == pytest.approx(0.080)
    assert s["busy_ms_per_step"] == pytest.approx(0.070)  # the two streams overlap for 10 µs
    assert s["step_wall_ms"] == [pytest.approx(0.1)] * 2
    assert s["categories"]["convolution"]["share"] == pytest.approx(0.5)
    assert s["categories"]["scatter"]["ms_per_step"] == pytest.approx(0.020)
    assert list(s["categories"])[0] == "convolution"
    assert s["top_ops"][0]["op"] == "cudnn-conv.12" and s["top_ops"][0]["kernels_per_step"] == 1
    # Bytes from the HLO (operands defined in the computation, and results): the convolution writes
    # bf16[8,64,64,256] = 16 MiB per step in 40 µs.
    conv_bytes = 8 * 64 * 64 * 256 * 2
    assert s["categories"]["convolution"]["gb_per_step"] == pytest.approx(conv_bytes / 1e9)
    assert s["categories"]["convolution"]["achieved_gb_s"] == pytest.approx(conv_bytes / 40e-6 / 1e9)
    assert s["top_ops"][0]["achieved_gb_s"] == pytest.approx(conv_bytes / 40e-6 / 1e9)
    # Kernel time by scope: the reduction is named as part of a backward pass, the rest carries no op_name.
    assert s["scopes"] == {"(other)": pytest.approx(0.060), "transpose(jvp(Net))": pytest.approx(0.020)}
    text = ps.format_summary(s)
    assert "| convolution | 0.04 | 50.0 % | 0.02 | 419 |" in text and "busy 0.07 ms/step" in text
    assert "| transpose(jvp(Net)) | 0.02 |" in text

    # The command-line entry point finds step_hlo.txt beside the trace and writes the JSON.
    out = tmp_path / "summary.json"
    assert ps.main([str(tmp_path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["categories"]["reduction fusion"]["share"] == pytest.approx(0.25)


def test_command_buffer_kernels_are_counted_under_their_own_instructions(tmp_path):
    """Kernels captured in a CUDA graph carry the graph's name as hlo_op; each is counted under its fusion."""
    gpu = 7
    meta = [{"ph": "M", "pid": gpu, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": gpu, "tid": 20, "name": "thread_name", "args": {"name": "Stream #20(Compute)"}}]
    graph = {"hlo_op": "command_buffer_31"}
    kernels = [("input_reduce_fusion_7", 30.0), ("loop_maximum_fusion", 10.0),
               ("cutlass_tensorop_bf16_s16816fprop_optimized", 40.0), ("Memset 3", 5.0)]
    events, t = [], 0.0
    for name, dur in kernels:
        events.append({"ph": "X", "pid": gpu, "tid": 20, "ts": t, "dur": dur, "name": name, "args": graph})
        t += dur
    events.append({"ph": "X", "pid": gpu, "tid": 20, "ts": t, "dur": 15.0, "name": "sm90_xmma_fprop_implicit_gemm",
                   "args": {"hlo_op": "cudnn-conv.12"}})
    _write_trace(tmp_path / "t.trace.json.gz", meta + events)

    s = ps.summarize(tmp_path, HLO, steps=1)
    assert s["command_buffer_ms_per_step"] == pytest.approx(0.085)
    assert s["kernel_ms_per_step"] == pytest.approx(0.100)
    ops = {o["op"]: o for o in s["top_ops"]}
    assert "command_buffer_31" not in ops
    # "input_reduce_fusion_7" is the kernel of HLO instruction input_reduce_fusion.7: its category, bytes and scope.
    assert ops["input_reduce_fusion.7"]["category"] == "reduction fusion"
    assert ops["input_reduce_fusion.7"]["gb_per_step"] > 0
    assert s["scopes"]["transpose(jvp(Net))"] == pytest.approx(0.030)
    assert ops["loop_maximum_fusion"]["category"] == "elementwise fusion"
    # Library kernels inside the graph go by their own names.
    assert s["categories"]["convolution"]["ms_per_step"] == pytest.approx(0.055)
    assert s["categories"]["memcpy / memset"]["ms_per_step"] == pytest.approx(0.005)
    assert "other" not in s["categories"]
    assert "0.09 ms/step of it inside CUDA-graph command buffers" in ps.format_summary(s)

    # Without the HLO the kernels are still split out and sorted by their names.
    s = ps.summarize(tmp_path, steps=1)
    assert s["categories"]["reduction fusion"]["ms_per_step"] == pytest.approx(0.030)
    assert s["categories"]["convolution"]["ms_per_step"] == pytest.approx(0.055)


def test_a_convolutions_memset_counts_as_memset_and_its_kernel_as_convolution(tmp_path):
    gpu = 7
    meta = [{"ph": "M", "pid": gpu, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": gpu, "tid": 20, "name": "thread_name", "args": {"name": "Stream #20(Compute)"}}]
    conv = {"hlo_op": "cudnn-conv-bw-filter.4"}
    events = [{"ph": "X", "pid": gpu, "tid": 20, "ts": 0.0, "dur": 6.0, "name": "Memset 3", "args": conv},
              {"ph": "X", "pid": gpu, "tid": 20, "ts": 6.0, "dur": 30.0, "name": "sm90_xmma_wgrad_implicit_gemm",
               "args": conv}]
    _write_trace(tmp_path / "t.trace.json.gz", meta + events)
    for hlo in (HLO, None):
        s = ps.summarize(tmp_path, hlo, steps=1)
        assert s["categories"]["convolution"]["ms_per_step"] == pytest.approx(0.030)
        assert s["categories"]["memcpy / memset"]["ms_per_step"] == pytest.approx(0.006)
        (op,) = s["top_ops"]
        assert op["category"] == "convolution" and op["kernel"] == "sm90_xmma_wgrad_implicit_gemm"
        assert op["ms_per_step"] == pytest.approx(0.036) and op["memset_ms_per_step"] == pytest.approx(0.006)


def test_summary_without_device_lines_uses_host_thunks(tmp_path):
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 1, "tid": 3, "ts": 0.0, "dur": 30.0, "name": "convolution.1",
               "args": {"hlo_op": "convolution.1"}},
              {"ph": "X", "pid": 1, "tid": 3, "ts": 30.0, "dur": 0.1, "name": "end: convolution.1",
               "args": {"hlo_op": "convolution.1"}},
              {"ph": "X", "pid": 1, "tid": 3, "ts": 40.0, "dur": 10.0, "name": "loop_add_fusion",
               "args": {"hlo_op": "loop_add_fusion"}},
              {"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 60.0, "name": "PjitFunction(step)"}]
    _write_trace(tmp_path / "plugins" / "profile" / "r" / "vm.trace.json.gz", events)
    s = ps.summarize(tmp_path, steps=1)
    assert s["source"] == "host" and s["kernel_ms_per_step"] == pytest.approx(0.040)
    assert s["categories"]["convolution"]["share"] == pytest.approx(0.75)


def test_missing_trace_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ps.find_trace(tmp_path)


def test_device_without_stream_lines_falls_back_to_its_xla_ops_line(tmp_path):
    events = [{"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "pid": 3, "tid": 1, "name": "thread_name", "args": {"name": "XLA Modules"}},
              {"ph": "M", "pid": 3, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
              {"ph": "X", "pid": 3, "tid": 1, "ts": 0.0, "dur": 50.0, "name": "jit_step(1)"},
              {"ph": "X", "pid": 3, "tid": 2, "ts": 0.0, "dur": 20.0, "name": "cudnn-conv.1"},
              {"ph": "X", "pid": 3, "tid": 2, "ts": 20.0, "dur": 20.0, "name": "loop_add_fusion"}]
    _write_trace(tmp_path / "t.trace.json.gz", events)
    s = ps.summarize(tmp_path, steps=1)
    assert s["source"] == "device xla ops" and s["kernel_ms_per_step"] == pytest.approx(0.040)
    assert s["categories"]["convolution"]["share"] == pytest.approx(0.5)
    assert "(device xla ops;" in ps.format_summary(s)


def test_per_stream_processes_of_older_traces_skip_the_aggregate_stream(tmp_path):
    meta = [{"ph": "M", "pid": p, "name": "process_name", "args": {"name": name}} for p, name in
            [(1, "/device:GPU:0/stream:7 Compute"), (2, "/device:GPU:0/stream:all Compute"),
             (3, "/device:GPU:0/stream:7 Tensors")]]
    kernel = {"ph": "X", "tid": 0, "ts": 0.0, "dur": 30.0, "name": "loop_add_fusion", "args": {}}
    _write_trace(tmp_path / "t.trace.json.gz", meta + [{**kernel, "pid": p} for p in (1, 2, 3)])
    s = ps.summarize(tmp_path, steps=1)
    assert s["source"] == "gpu" and s["kernel_ms_per_step"] == pytest.approx(0.030)
