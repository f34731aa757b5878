"""CPU smoke tests of benchmarks/: step_time.py in tiny mode end to end, and the helpers of the scripts."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

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


common = _load("common")


def test_step_time_tiny_end_to_end(tmp_path):
    out = tmp_path / "step_time.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--config=configs/voc_blender.py:1_4",
           "--tiny", "--steps", "2", "--warmup", "1", "--dtypes", "float32", "--parts", "all",
           "--num_devices", "1", "--out", str(out), "--profile", str(tmp_path / "trace"), "--profile_steps", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in ("compiling the step", "| dtype | lower s | compile s | median ms", "| float32 |",
                 "Selection + contrastive + memory-bank part alone", "Profile of 1 step(s) (host XLA thunks",
                 "| category | ms/step | share of kernel time |"):
        assert text in proc.stdout

    report = json.loads(out.read_text())
    assert report["device"]["platform"] == "cpu" and report["device"]["count"] == 1
    assert report["commit"] and report["date"] and report["command"].startswith("python benchmarks/step_time.py")
    r = report["results"]["float32"]
    assert r["mode"] == "stpg" and r["images_per_step"] == 2 + 2 * 2
    for key in ("lower_s", "compile_s", "pipelined_mean_ms", "steps_per_s", "images_per_s", "flops_per_step",
                "achieved_tflops", "losses_part_share"):
        assert _positive(r[key]), (key, r[key])
    for key in ("median_ms", "p10_ms", "p90_ms"):
        assert _positive(r["step"][key]), (key, r["step"])
    assert r["step"]["n"] == 2 and r["step"]["p10_ms"] <= r["step"]["median_ms"] <= r["step"]["p90_ms"]
    assert _positive(r["losses_part"]["all"]["median_ms"])
    # The loop with the host matching after each step, plain and started ahead (one device: the trainer speculates).
    loop = r["matching_loop"]
    assert loop["plain"]["ahead"] == 0 and 1 <= loop["speculative"]["ahead"] <= 2
    assert 0 <= loop["speculative"]["reruns"] <= loop["speculative"]["ahead"] and _positive(loop["speculative"]["mean_ms"])
    assert "| dtype | no matching | plain | speculative | steps run again |" in proc.stdout
    assert r["losses_part"]["sizes"]["N_labeled"] == 2 * 16 * 16  # Bl · (S/4)²
    # No dense-peak figure for a CPU: MFU is n/a, and the peak memory is n/a or a positive count.
    assert r["mfu"] is None and r["peak_tflops_per_device"] is None
    assert r["peak_memory_bytes"] is None or _positive(r["peak_memory_bytes"])
    assert math.isfinite(r["final_loss"])
    # The timed steps ran past the contrastive start: the counter went on from there (then the profiled step).
    assert r["step_counter_after"] == 1600 + 1 + 2 + 2
    # The profile: every kernel of the traced step is counted once, convolutions among them, and the optimised HLO
    # of the step lies beside the trace.
    prof = r["profile"]
    assert prof["source"] == "host" and prof["steps"] == 1 and prof["distinct_ops"] > 50
    assert prof["categories"]["convolution"]["ms_per_step"] > 0
    assert sum(c["share"] for c in prof["categories"].values()) == pytest.approx(1.0)
    assert 0 < prof["busy_ms_per_step"] <= prof["kernel_ms_per_step"] * 1.0001
    assert (tmp_path / "trace" / "float32" / "step_hlo.txt").stat().st_size > 10_000


def test_git_commit_marks_uncommitted_changes(tmp_path, monkeypatch):
    st = _load("step_time")
    monkeypatch.delenv("STPG_COMMIT", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert st.git_commit(tmp_path) == head
    (tmp_path / "b.txt").write_text("untracked files do not count\n")
    assert st.git_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert st.git_commit(tmp_path) == head + "-dirty"
    assert st.git_commit(tmp_path / "missing") == "unknown"
    monkeypatch.setenv("STPG_COMMIT", "abc1234")
    assert st.git_commit(tmp_path) == "abc1234"


def test_step_time_helpers():
    st = _load("step_time")

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
    assert st.peak_tflops("cpu", "bfloat16") is None
    argv = ["--config=configs/voc_blender.py:1_4", "--dtypes", "float32,bfloat16", "--out=x.json", "--steps", "4"]
    assert st._child_argv(argv, "bfloat16", "/t/b.json") == [
        "--config=configs/voc_blender.py:1_4", "--steps", "4", "--dtypes", "bfloat16", "--out", "/t/b.json",
        "--in_process", "--no_table"]
    config = st.load_config("configs/camvid.py:1_8", "model.dtype=bfloat16")
    assert config.model.dtype == "bfloat16" and st.num_classes_of(config) == 11
    assert st._fmt(None) == "n/a" and st._fmt(0.4123, ".1f", 100, "%") == "41.2%"


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


ce = _load("camvid_experiment")


def _eval_json(workdir: Path, miou: float, iou: dict, step: int = 4):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"eval_{step}.json").write_text(json.dumps({"step": step, "miou": miou, "iou": iou}))


def test_camvid_experiment_commands_and_results(tmp_path):
    args = ce.parse_args(["--methods", "supervised,stpg", "--steps", "120", "--workdir_root", str(tmp_path),
                          "--overrides", "data.root=/d,model.dtype=bfloat16"])
    commands = ce.build_commands(args)
    assert [m for m, *_ in commands] == ["supervised", "stpg"]
    method, cmd, workdir = commands[1]
    assert cmd[1] == "launch.py" and workdir == str(tmp_path / "stpg") and f"--workdir={workdir}" in cmd
    assert (f"--config=configs/camvid.py:1_8,mode=stpg,schedule.total_steps=120,schedule.steps_per_epoch=3,"
            f"eval.every_steps=0,data.data_dir={tmp_path / 'prepared'},data.root=/d,model.dtype=bfloat16") in cmd
    assert ce.prepare_command(cmd[2][len("--config="):])[1:] == [
        "-m", "stpg_jax.data.prepare", "--dataset", "camvid", "--manual_dir", "/d", "--data_dir", str(tmp_path / "prepared")]
    assert args.mem_fraction == pytest.approx(0.45)

    # A run's result is its last evaluation, in %.
    assert ce.result_of(str(tmp_path / "stpg")) is None
    _eval_json(tmp_path / "stpg", 0.4525, {"sky": 0.905, "sign_symbol": None})
    result = ce.result_of(str(tmp_path / "stpg"))
    assert result == {"step": 4, "miou": pytest.approx(45.25), "iou": {"sky": pytest.approx(90.5), "sign_symbol": None}}
    table = ce.iou_table([{"supervised": {"result": result, "wall_s": 60.0}, "stpg": {"result": result, "wall_s": 120.0}}])
    assert "| sky | 90.50 | 90.50 |" in table and "| **mIoU** | **45.25** | **45.25** |" in table
    assert "| sign_symbol | n/a | n/a |" in table and "| wall time (train + eval), s | 60 | 120 |" in table

    for bad in (["--methods", "fixmatch"], ["--mem_fraction", "0.6"], ["--overrides", "mode=stpg"]):
        with pytest.raises(SystemExit):
            ce.parse_args(bad + ["--steps", "10", "--workdir_root", str(tmp_path)])
    with pytest.raises(SystemExit):
        ce.parse_args(["--steps", "10"])  # training needs --workdir_root


def test_camvid_experiment_combines_seeds(tmp_path, capsys):
    def report(seed, miou, sky, split="d31e", steps=200):
        result = {"miou": miou, "iou": {"sky": sky, "pole": None if seed == 2 else 0.0}}
        return {"config": "configs/camvid.py:1_8", "steps": steps, "commit": "abc1234",
                "overrides": f"seed={seed},data.crop_size=224" if seed else "data.crop_size=224",
                "split": {"sha256_16": {"supervised": split, "stpg": split}},
                "runs": {"supervised": {"result": result, "wall_s": 100.0 + seed},
                         "stpg": {"result": result, "wall_s": 300.0}}}

    paths = []
    for i, r in enumerate([report(0, 40.0, 90.0), report(1, 41.0, 92.0)]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    assert ce.main(["--combine", *map(str, paths), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "camvid_results_combined.md").read_text()
    from PIL import Image

    with Image.open(tmp_path / "out" / "camvid_results_combined.png") as im:
        assert im.format == "PNG" and im.width >= 600
    assert "seeds 0 (config default), 1" in text
    assert "| sky | 91.00 (90.00 / 92.00) | 91.00 (90.00 / 92.00) |" in text
    assert "| **mIoU** | **40.50 (40.00 / 41.00)** |" in text and "| 100 (100 / 101) | 300 (300 / 300) |" in text
    assert "n/a" in ce.combine_results([report(0, 40, 90), report(2, 41, 92)], ["a", "b"])

    # Repeats that differ in more than the seed are refused, naming the file and the field.
    for other, field in ((report(1, 41, 92, split="ffff"), "labelled split"), (report(1, 41, 92, steps=300), "steps"),
                         (report(0, 41, 92), "same training seed"),
                         ({**report(1, 41, 92), "parallel": True}, "concurrent runs")):
        with pytest.raises(ValueError, match=field):
            ce.combine_results([report(0, 40, 90), other], ["a.json", "b.json"])
    assert ce.main(["--combine", str(paths[0]), str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"config": "c"}))
    assert ce.main(["--combine", str(paths[0]), str(tmp_path / "other.json"), "--out", str(tmp_path)]) == 2
    assert "lacks the field 'steps'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ce.parse_args(["--combine", str(paths[0])])  # no --out
    assert "Paired by seed" not in ce.combine_results([report(0, 40, 90)], ["a"])  # one repeat: nothing to pair

    # Seed-paired mIoU differences: per repeat, mean, sample sd, Student-t 95 % interval, repeats ahead.
    def runs(sup, mt, stpg):
        return {m: {"result": {"miou": v, "iou": {"sky": v}}, "wall_s": 1.0}
                for m, v in (("stpg", stpg), ("mean_teacher", mt), ("supervised", sup))}
    paired = ce.paired_differences([runs(40, 41, 43), runs(42, 42, 43), runs(41, 43, 42)])
    assert "| mean_teacher − supervised | +1.00 / +0.00 / +2.00 | +1.00 | 1.00 | -1.48 to +3.48 | 2 of 3 |" in paired
    assert "| stpg − supervised | +3.00 / +1.00 / +1.00 | +1.67 | 1.15 | -1.20 to +4.54 | 3 of 3 |" in paired
    assert "| stpg − mean_teacher | +2.00 / +1.00 / -1.00 |" in paired
    assert ce.paired_differences([runs(40, 41, 43)]) is None


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
    result = {"step": 4, "miou": 40.0, "iou": {"sky": 90.0, "pole": None}}
    monkeypatch.setattr(ce, "run_methods", lambda jobs, parallel: (
        {m: {"command": "c", "returncode": 0, "wall_s": 1.0, "result": result} for m, *_ in jobs}, None))
    assert ce.main(["--config=configs/demo.py:1_8", "--methods", "supervised,stpg", "--workdir_root",
                    str(tmp_path)]) == 0
    from PIL import Image

    with Image.open(tmp_path / "camvid_results.png") as im:
        assert im.format == "PNG" and im.width >= 600
    assert "| **mIoU** | **40.00** | **40.00** |" in (tmp_path / "camvid_results.md").read_text()
    report = json.loads((tmp_path / "camvid_results.json").read_text())
    assert report["runs"]["stpg"]["result"] == result and report["commit"] and report["steps"] == 300
    assert (tmp_path / "commands.txt").read_text().count("launch.py") == 2


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
    runs, stopped_by = ce.run_methods(jobs, parallel=True)
    assert stopped_by is None
    assert runs["supervised"]["returncode"] == 0 and runs["supervised"]["result"]["miou"] == pytest.approx(45.0)
    assert runs["stpg"]["returncode"] == 3 and runs["stpg"]["result"] is None
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
    assert stopped_by == "SIGTERM" and runs["stpg"]["returncode"] == -15 and runs["stpg"]["result"] is None


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
