"""CPU smoke tests of benchmarks/: step_time.py in tiny mode end to end, and the helpers of both scripts."""

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
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


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


def test_camvid_experiment_commands_and_parsing(tmp_path):
    ce = _load("camvid_experiment")
    args = ce.parse_args(["--methods", "supervised,stpg", "--steps", "120", "--workdir_root", str(tmp_path),
                          "--overrides", "data.root=/d,model.dtype=bfloat16"])
    commands = ce.build_commands(args)
    assert [m for m, _ in commands] == ["supervised", "stpg"]
    cmd = commands[1][1]
    assert cmd[1] == "launch.py"
    assert ("--config=configs/camvid.py:1_8,mode=stpg,schedule.total_steps=120,schedule.steps_per_epoch=3,"
            "eval.every_steps=0,data.root=/d,model.dtype=bfloat16") in cmd
    assert f"--workdir={tmp_path / 'stpg'}" in cmd

    log = ("step 10/10 | loss 1.0\nclass              IoU %\nsky                90.50\nsign_symbol         n/a\n"
           "mIoU               45.25\n  evaluation took 1.0s\n")
    result = ce.parse_iou_table(log)
    assert result["miou"] == pytest.approx(45.25) and result["iou"]["sky"] == pytest.approx(90.5)
    assert result["iou"]["sign_symbol"] is None
    table = ce.markdown_table({"supervised": {"result": result, "wall_s": 60.0},
                               "stpg": {"result": result, "wall_s": 120.0}})
    assert "| sky | 90.50 | 90.50 |" in table and "| **mIoU** | **45.25** | **45.25** |" in table

    with pytest.raises(SystemExit):
        ce.parse_args(["--methods", "fixmatch", "--steps", "10", "--workdir_root", str(tmp_path)])


def test_camvid_experiment_combines_seeds(tmp_path, capsys):
    ce = _load("camvid_experiment")

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

    # The figure again from the table as printed (here kept in a Markdown file): the same values per seed.
    (tmp_path / "notes.md").write_text("# notes\n\n| class | x |\n|---|---:|\n| a | 1 |\n\n## run\n\n" + text)
    per_method, names = ce.parse_combined_table((tmp_path / "notes.md").read_text(), "## run")
    assert names == ["sky", "pole", "mIoU"]
    assert per_method["stpg"] == [{"sky": 90.0, "pole": 0.0, "mIoU": 40.0}, {"sky": 92.0, "pole": 0.0, "mIoU": 41.0}]
    assert ce.main(["--plot_markdown", str(tmp_path / "notes.md"), "--section", "## run", "--out",
                    str(tmp_path / "md")]) == 0
    assert (tmp_path / "md" / "camvid_results_combined.png").exists()
    assert ce.main(["--plot_markdown", str(tmp_path / "notes.md"), "--section", "## none", "--out",
                    str(tmp_path / "md")]) == 2
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
    with pytest.raises(SystemExit):
        ce.parse_args(["--steps", "10"])  # training needs --workdir_root


def test_camvid_experiment_without_matplotlib_stops_before_training_in_one_line(tmp_path, monkeypatch, capsys):
    ce = _load("camvid_experiment")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    started = []
    monkeypatch.setattr(ce, "run_experiment", lambda *a: started.append(a) or 0)
    with pytest.raises(SystemExit) as info:
        ce.run_cli(lambda: ce.main(["--methods", "stpg", "--workdir_root", str(tmp_path)]),
                   ce.plots.PlotsUnavailable)
    assert info.value.code == 2 and not started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "matplotlib" in err[0] and "--no-plot" in err[0]
    assert ce.main(["--methods", "stpg", "--workdir_root", str(tmp_path), "--no-plot"]) == 0 and started


def test_camvid_experiment_writes_its_figure_beside_the_table(tmp_path, monkeypatch):
    ce = _load("camvid_experiment")
    result = {"miou": 40.0, "iou": {"sky": 90.0, "pole": None}}
    monkeypatch.setattr(ce, "run_methods", lambda jobs, parallel: (
        {m: {"command": "c", "returncode": 0, "wall_s": 1.0, "result": result} for m, *_ in jobs}, None))
    assert ce.main(["--config=configs/demo.py:1_8", "--methods", "supervised,stpg", "--workdir_root",
                    str(tmp_path)]) == 0
    from PIL import Image

    with Image.open(tmp_path / "camvid_results.png") as im:
        assert im.format == "PNG" and im.width >= 600
    assert (tmp_path / "camvid_results.md").exists()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_camvid_experiment_parallel_building_blocks(tmp_path, capsys, monkeypatch):
    ce = _load("camvid_experiment")
    methods = ["supervised", "mean_teacher", "stpg"]
    assert ce.memory_fractions("", methods) == pytest.approx(dict.fromkeys(methods, 0.3))
    assert ce.memory_fractions("0.25", methods) == pytest.approx(dict.fromkeys(methods, 0.25))
    assert ce.memory_fractions("stpg=0.5", methods) == pytest.approx(
        {"supervised": 0.2, "mean_teacher": 0.2, "stpg": 0.5})
    for bad in ("0.5", "stpg=0.95", "fixmatch=0.1"):
        with pytest.raises(ValueError):
            ce.memory_fractions(bad, methods)
    args = ce.parse_args(["--workdir_root", str(tmp_path), "--parallel", "--mem_fraction", "stpg=0.4"])
    assert args.parallel
    assert args.mem_fractions == pytest.approx({"supervised": 0.25, "mean_teacher": 0.25, "stpg": 0.4})
    assert not ce.parse_args(["--workdir_root", str(tmp_path)]).parallel

    # Each concurrent run gets its share of the device memory, unless the user's environment names one.
    env = ce.child_env(0.3, base={"PATH": "/bin"})
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.300" and env["PYTHONUNBUFFERED"] == "1"
    assert ce.child_env(0.3, base={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2"})["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in ce.child_env(None, base={})

    # The dataset is prepared once, from the runs' own config fields.
    spec = ce.config_spec(ce.build_commands(ce.parse_args(
        ["--workdir_root", str(tmp_path), "--data_dir", "/p", "--overrides", "data.root=/d"]))[0][1])
    assert ce.prepare_command(spec)[1:] == ["-m", "stpg_jax.data.prepare", "--dataset", "camvid", "--manual_dir",
                                            "/d", "--data_dir", "/p"]

    # Two fake runs at once: each writes its own log and prefixed stdout; the failing one is reported, the other
    # still finishes with its table.
    table = "class              IoU %\\nsky                90.50\\nmIoU               45.25"
    ok = (f"import os, time; time.sleep(0.5); print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']); "
          f"print('  1 device(s) (gpu, NVIDIA H200), 1 process(es); global batch 8+8'); "
          f"print('  matching: 3 run(s), 1 changed the assignment'); print('{table}')")
    bad = "import sys; print('boom'); sys.exit(3)"
    jobs = [("supervised", ["python", "-c", ok], str(tmp_path / "supervised"), ce.child_env(0.3)),
            ("stpg", ["python", "-c", bad], str(tmp_path / "stpg"), ce.child_env(0.6))]
    runs, stopped_by = ce.run_methods(jobs, parallel=True)
    assert stopped_by is None
    assert runs["supervised"]["returncode"] == 0 and runs["supervised"]["result"]["miou"] == pytest.approx(45.25)
    assert runs["stpg"]["returncode"] == 3 and runs["stpg"]["result"] is None
    assert runs["supervised"]["devices"] == "1 device(s) (gpu, NVIDIA H200)" and runs["stpg"]["devices"] is None
    assert runs["supervised"]["matching"] == "3 run(s), 1 changed the assignment" and runs["stpg"]["matching"] is None
    assert (tmp_path / "supervised" / "train.log").read_text().startswith("0.300\n  1 device(s)")
    assert (tmp_path / "stpg" / "train.log").read_text() == "boom\n"
    out = capsys.readouterr().out
    assert "[supervised] 0.300\n" in out and "[supervised] mIoU               45.25\n" in out
    assert "[stpg] boom\n" in out and "=== stpg: FAILED (exit status 3, no IoU table)" in out
    assert "concurrent" in ce.markdown_table(runs, concurrent=True)

    # Stopping: SIGTERM reaches the whole process group of a run that ignores nothing.
    run = ce.Run("sleeper", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                 str(tmp_path / "sleeper.log"))
    deadline = time.time() + 60
    while not run.lines and time.time() < deadline:
        time.sleep(0.05)
    ce.stop_runs([run], grace_s=5.0)
    assert run.returncode == -15 and run.wall_s < 30

    # A run that dies while a worker it started still holds its output (as when the OOM killer ends a trainer and
    # leaves its loader processes) is reported once the drain time is over, and the worker is ended with it.
    monkeypatch.setattr(ce, "DRAIN_S", 0.5)
    orphaning = ("import subprocess, sys; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                 "print(w.pid, flush=True); sys.exit(5)")
    run = ce.Run("orphaning", [sys.executable, "-c", orphaning], str(tmp_path / "orphaning.log"))
    assert run.wait(30) == 5
    worker = int(run.lines[0])
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def test_loader_throughput_on_the_demo_data(tmp_path, capsys):
    lt = _load("loader_throughput")
    out = tmp_path / "loader.json"
    report = lt.main(["--config=configs/demo.py", "--workers", "0", "--batches", "3", "--warmup", "1",
                      "--out", str(out)])
    (row,) = report["results"]
    config = lt.load_config("configs/demo.py")
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


def test_loader_throughput_names_a_bad_config_key_in_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loader_throughput.py"),
                           "--config=configs/demo.py:data.nokey=1", "--workers", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'data.nokey'")


@pytest.mark.parametrize("script, args", [
    ("step_time.py", ["--config=configs/demo.py:data.nokey=1", "--tiny"]),
    ("compile_for_gpu.py", ["--config=configs/demo.py:data.nokey=1"]),
    ("eval_speed.py", ["--config=configs/demo.py:data.nokey=1"]),
    ("camvid_experiment.py", ["--config=configs/no_such.py:1_8", "--workdir_root=unused", "--dry_run"]),
])
def test_benchmark_scripts_say_a_bad_config_in_one_line(script, args):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1, proc.stderr[-2000:]
    assert ("no_such.py" if script == "camvid_experiment.py" else "data.nokey") in proc.stderr
