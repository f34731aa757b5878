"""benchmarks/experiment.py: the README's demo figures are the recorded ones (no training here); the runs' commands,
records, statistics, text and figure; runs at once, failing and stopped."""

import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "benchmarks" / "results" / "demo_table.json"
CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
           "bicyclist")


def _load(name):
    sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = _load("experiment")


def table_cells(section: str) -> dict:
    """{row label: [cell text, ...]} of the markdown table in ``section``."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def mean_of(cell: str) -> float:
    return float(cell.split("±")[0])


def test_readme_demo_figures_are_the_recorded_ones():
    report = json.loads(RECORDED.read_text())
    assert report["steps"] is None, "the recorded table must come from the config's own schedule"
    assert ex.readme_problem(report) is None
    section = ex.readme_section()
    assert section is not None, f"README.md lacks the {ex.START} ... {ex.END} section written from {RECORDED}"
    assert section == ex.markdown(report), "README.md's demo section differs from experiment.py --from_json's text"

    # The same figures, recomputed here from the runs' per-class IoUs.
    rows = table_cells(section)
    header = rows.pop("class")
    columns = {heading: m for m, heading in ex.METHODS.items()}
    runs = report["runs"]
    for col, heading in enumerate(header):
        method = columns[heading]
        mine = [r for r in runs if r["method"] == method]
        assert len({r["seed"] for r in mine}) >= 3, (method, "fewer than 3 seeds")
        for cls in CLASSES:
            values = [r["iou"][cls] for r in mine]
            if None in values:  # the class is absent from the val set
                assert rows[cls][col] == "n/a", (method, cls)
                continue
            assert mean_of(rows[cls][col]) == pytest.approx(100 * statistics.fmean(values), abs=0.0051), (method, cls)
        assert mean_of(rows["**mIoU**"][col]) == pytest.approx(100 * statistics.fmean(r["miou"] for r in mine),
                                                               abs=0.0051)
    default = ex.default_run(report)
    assert (default["method"], default["seed"]) == ("stpg", 0)
    assert default["command"] == f"python launch.py --config={ex.DEMO} --workdir={default['workdir']}"
    assert f"**{100 * default['miou']:.2f}**" in section


def test_the_default_run_is_the_readme_demo_command(tmp_path):
    assert "python launch.py --config=configs/demo.py --workdir=runs/demo" in ex.README.read_text()
    assert ex.run_spec(ex.DEMO, "stpg", 0) == ex.DEMO  # the config's own mode and seed
    assert ex.run_spec(ex.DEMO, "stpg", 0, "x.y=1") == "configs/demo.py:1_8,mode=stpg,seed=0,x.y=1"
    assert ex.run_spec(ex.DEMO, "mean_teacher", 2) == "configs/demo.py:1_8,mode=mean_teacher,seed=2"
    assert ex.run_spec(ex.DEMO, "ceiling", 1) == "configs/demo.py:full,mode=supervised,seed=1"
    spec = "configs/demo.py:1_4,model.stage_blocks=(1,1,1,1)"  # the config's overrides stay, after the split
    assert ex.run_spec(spec, "ceiling", 0) == "configs/demo.py:full,model.stage_blocks=(1,1,1,1),mode=supervised,seed=0"
    args = ex.parse_args(["--seeds", "0,1", "--methods", "stpg,ceiling", "--out", str(tmp_path), "--steps", "24"])
    jobs = ex.build_jobs(args)
    assert [(m, s) for m, s, *_ in jobs] == [("stpg", 0), ("ceiling", 0), ("stpg", 1), ("ceiling", 1)]
    method, seed, argv, workdir = jobs[0]
    assert workdir == "runs/demo_table/stpg_seed0" and argv[-1] == f"--workdir={workdir}"
    # 24 steps of the demo's 12 epochs: 2 steps per epoch; generated data needs no data_dir.
    assert argv[2] == ("--config=configs/demo.py:1_8,mode=stpg,seed=0,schedule.total_steps=24,"
                       "schedule.steps_per_epoch=2,eval.every_steps=0")
    assert ex.prepare_command(argv[2][len("--config="):]) is None


def fake_report(steps=None):
    """Three seeds of supervised and STPG with IoUs chosen so that the means and differences are known."""
    runs = []
    for seed in range(3):
        for method, base in (("supervised", 0.40), ("stpg", 0.42)):
            iou = {c: base + 0.01 * seed + 0.001 * i for i, c in enumerate(CLASSES)}
            iou["bicyclist"] = None if method == "stpg" and seed == 1 else iou["bicyclist"]
            spec = ex.run_spec(ex.DEMO, method, seed, f"schedule.total_steps={steps}" if steps else "")
            runs.append({"method": method, "seed": seed, "command": f"python launch.py --config={spec} --workdir=w",
                         "workdir": "w", "wall_s": 60.0 + seed, "returncode": 0, "step": 516,
                         "miou": base + 0.01 * seed + (0.005 if seed == 2 else 0), "pixel_accuracy": 0.9, "iou": iou,
                         "val_images": 100, "split_labeled_sha256_16": "ab"})
    return {"date": "2026-01-01 00:00 UTC", "commit": "0123456789abcdef", "dirty": False,
            "versions": {"jax": "0.0", "flax": "0.0"}, "host": {"cpus": 2}, "config": ex.DEMO, "split": "1_8",
            "steps": steps, "seeds": [0, 1, 2], "methods": ["supervised", "stpg"],
            "default_command": "python launch.py --config=configs/demo.py --workdir=runs/demo",
            "data": {"labeled": 50, "unlabeled": 350, "val": 100, "ceiling_labeled": 400}, "runs": runs}


def test_summary_and_markdown_of_known_runs():
    report = fake_report()
    summary = ex.summarize(report["runs"], ex.METHODS, ex.rare_classes("synthetic"))
    assert list(summary) == ["supervised", "stpg"]
    sky = summary["supervised"]["iou"]["sky"]
    assert sky["mean"] == pytest.approx(0.41) and sky["sd"] == pytest.approx(0.01) and sky["n"] == 3
    assert summary["stpg"]["iou"]["bicyclist"] is None  # n/a in one seed: no mean over the others
    # Rare classes: pole (index 2), sign_symbol (6), fence (7), pedestrian (9), bicyclist (10).
    expected_rare = np.mean([0.40 + 0.001 * i for i in (2, 6, 7, 9, 10)])
    assert summary["supervised"]["rare"]["mean"] == pytest.approx(expected_rare + 0.01)
    # STPG seed 1 has no bicyclist IoU: its rare mean is over the other four.
    stpg_rare = [np.mean([0.42 + 0.01 * seed + 0.001 * i for i in (2, 6, 7, 9) + ((10,) if seed != 1 else ())])
                 for seed in range(3)]
    assert summary["stpg"]["rare"]["mean"] == pytest.approx(np.mean(stpg_rare))

    text = ex.markdown(report)
    rows = table_cells(text)
    assert rows["class"] == ["supervised", "STPG"]
    assert rows["sky"] == ["41.00 ± 1.00", "43.00 ± 1.00"]
    assert rows["bicyclist"][1] == "n/a"
    assert rows["wall time per run (whole command)"] == ["1 min 01 s", "1 min 01 s"]
    assert ("mIoU +2.00 points (per seed +2.00, +2.00, +2.00; 95 % interval of the mean +2.00 to +2.00; STPG ahead in "
            "3 of 3)") in " ".join(text.split())
    assert "commit `0123456`" in text and "50 labelled + 350 unlabelled images, 100 val" in " ".join(text.split())
    assert rows["**mIoU**"] == ["41.17 ± 1.26", "43.17 ± 1.26"]
    assert "prints mIoU **42.00**" in " ".join(text.split())  # the default command's own figure: STPG, seed 0


def test_a_shortened_run_has_no_default_figure():
    report = fake_report(steps=4)
    assert ex.default_run(report) is None
    text = " ".join(ex.markdown(report).split())
    assert "The command" not in text and "4 steps per run (shortened)" in text
    assert "steps=4" in ex.readme_problem(report)


def test_write_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{ex.START}\nold table\n{ex.END}\nafter\n")
    ex.write_readme("new table\nsecond line", readme)
    assert readme.read_text() == f"# title\n\nbefore\n{ex.START}\nnew table\nsecond line\n{ex.END}\nafter\n"
    assert ex.readme_section(readme) == "new table\nsecond line"
    readme.write_text("no markers\n")
    assert ex.readme_section(readme) is None
    with pytest.raises(ValueError, match="needs exactly one"):
        ex.write_readme("x", readme)


def test_from_json_writes_the_readme_only_from_a_complete_table(tmp_path, capsys):
    out = tmp_path / "results"
    report = fake_report()
    ex.save(report, str(out), "demo_table")
    assert json.loads((out / "demo_table.json").read_text()) == report
    assert (out / "demo_table.md").read_text() == ex.markdown(report) + "\n"
    # Mean teacher and the ceiling are missing: the README is not written.
    assert ex.main(["--from_json", "--write_readme", "--out", str(out), "--no-plot"]) == 2
    assert "fewer than 3 seeds of mean_teacher, ceiling" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no .*camvid_table.json"):
        ex.main(["--config=configs/camvid.py:1_8", "--from_json", "--out", str(out)])


def test_runs_of_one_split_must_share_the_labelled_images():
    runs = [{"method": m, "miou": 0.5, "step": 4, "split_labeled_sha256_16": d}
            for m, d in (("supervised", "a"), ("stpg", "a"), ("ceiling", "b"))]
    ex.check_runs(runs)
    with pytest.raises(RuntimeError, match="different labelled images"):
        ex.check_runs(runs + [{**runs[0], "method": "mean_teacher", "split_labeled_sha256_16": "c"}])
    with pytest.raises(RuntimeError, match="different steps"):
        ex.check_runs(runs + [{**runs[1], "step": 3}])


def test_arguments(tmp_path, monkeypatch):
    for bad in (["--steps", "4"], ["--smoke"],  # would replace the recorded table
                ["--methods", "fixmatch"], ["--seeds", "0,0"], ["--seeds", "x"], ["--seeds", "-1"],
                ["--overrides", "mode=stpg", "--out", "o"], ["--overrides", "seed=3", "--out", "o"],
                ["--config=configs/camvid.py:1_8,seed=1"]):
        with pytest.raises(SystemExit):
            ex.parse_args(bad)
    args = ex.parse_args(["--smoke", "--seeds", "3,1", "--out", "x"])
    assert args.seed_list == [3, 1] and args.method_list == list(ex.METHODS) and args.steps == 4
    assert args.name == "demo_table"
    monkeypatch.chdir(tmp_path)  # work directories as the runs see them from the repository root
    assert ex.repo_path(str(ex.REPO / "runs" / "x")) == "runs/x"
    assert ex.repo_path("elsewhere") == str(tmp_path / "elsewhere")


def test_camvid_commands(tmp_path):
    args = ex.parse_args(["--config=configs/camvid.py:1_8", "--methods", "supervised,stpg", "--steps", "120",
                          "--seeds", "0,2", "--workdir_root", str(tmp_path), "--out", str(tmp_path),
                          "--overrides", "data.root=/d,model.dtype=bfloat16"])
    jobs = ex.build_jobs(args)
    assert [(m, s) for m, s, *_ in jobs] == [("supervised", 0), ("stpg", 0), ("supervised", 2), ("stpg", 2)]
    method, seed, cmd, workdir = jobs[3]
    assert cmd[1] == "launch.py" and workdir == str(tmp_path / "stpg_seed2") and f"--workdir={workdir}" in cmd
    assert (f"--config=configs/camvid.py:1_8,mode=stpg,seed=2,schedule.total_steps=120,schedule.steps_per_epoch=3,"
            f"eval.every_steps=0,data.data_dir={tmp_path / 'prepared'},data.root=/d,model.dtype=bfloat16") in cmd
    assert ex.prepare_command(cmd[2][len("--config="):])[1:] == ["-m", "stpg_jax.data.prepare", "--dataset", "camvid",
                                                                 "--manual_dir", "/d", "--data_dir",
                                                                 str(tmp_path / "prepared")]
    assert args.name == "camvid_table"


def _eval_json(workdir: Path, miou: float, iou: dict, step: int = 4):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"eval_{step}.json").write_text(json.dumps({"step": step, "images": 7, "miou": miou, "iou": iou}))


def _record(method, seed, miou, iou, wall_s=1.0):
    return {"method": method, "seed": seed, "command": "c", "workdir": "w", "wall_s": wall_s, "returncode": 0,
            "step": 4, "miou": miou, "pixel_accuracy": 0.9, "iou": iou, "split_labeled_sha256_16": "ab"}


def test_a_runs_record_and_the_methods_compared_over_seeds(tmp_path):
    # A run's record holds its last evaluation; without one its result fields are None.
    assert ex.record("stpg", 2, "c", str(tmp_path / "stpg"), 1.0, 1)["miou"] is None
    _eval_json(tmp_path / "stpg", 0.4525, {"sky": 0.905, "sign_symbol": None})
    (tmp_path / "stpg" / "split_labeled.txt").write_text("a\nb\n")
    r = ex.record("stpg", 2, "c", str(tmp_path / "stpg"), 60.04, 0)
    assert (r["step"], r["miou"], r["iou"], r["wall_s"], r["val_images"]) == (
        4, 0.4525, {"sky": 0.905, "sign_symbol": None}, 60.0, 7)
    assert len(r["split_labeled_sha256_16"]) == 16
    text = ex.markdown_table([{**r, "method": "supervised"}, {**r, "wall_s": 120.0}], ex.METHODS, ("sign_symbol",))
    assert "| sky | 90.50 | 90.50 |" in text and "| **mIoU** | 45.25 | 45.25 |" in text
    assert "| sign_symbol | n/a | n/a |" in text and "| wall time per run (whole command) | 1 min 00 s | 2 min 00 s |" in text

    # Seed-paired mIoU differences: per seed, mean, Student-t 95 % interval of the mean, seeds ahead.
    runs = [_record(m, seed, v, {"sky": v, "pole": v / 2})
            for seed, values in enumerate(((0.40, 0.41, 0.43), (0.42, 0.42, 0.43), (0.41, 0.43, 0.42)))
            for m, v in zip(("supervised", "mean_teacher", "stpg"), values)]
    text = ex.paired_text(runs, "mean_teacher", "supervised", ex.METHODS, ("pole",))
    assert text == ("mean teacher − supervised, paired by seed: mIoU +1.00 points (per seed +1.00, +0.00, +2.00; "
                    "95 % interval of the mean -1.48 to +3.48; mean teacher ahead in 2 of 3), rare classes +0.50 points.")
    assert "(per seed +3.00, +1.00, +1.00; 95 % interval of the mean -1.20 to +4.54; STPG ahead in 3 of 3)" in (
        ex.paired_text(runs, "stpg", "supervised", ex.METHODS))
    assert ex.paired_text(runs, "stpg", "fixmatch", {**ex.METHODS, "fixmatch": "f"}) is None
    summary = ex.summarize(runs, ex.METHODS, ("pole",))
    assert summary["stpg"]["miou"]["mean"] == pytest.approx(0.4267, abs=1e-4) and summary["stpg"]["miou"]["n"] == 3
    assert summary["supervised"]["rare"]["mean"] == pytest.approx(0.205)
    # A class absent in one seed has no mean; a run that did not finish is left out.
    runs[0]["iou"]["pole"] = None
    unfinished = {**_record("stpg", 3, None, None), "returncode": 1}
    summary = ex.summarize(runs + [unfinished], ex.METHODS)
    assert summary["supervised"]["iou"]["pole"] is None and summary["stpg"]["seeds"] == [0, 1, 2]
    assert "| pole | n/a | " in ex.markdown_table(runs, ex.METHODS)


def test_without_matplotlib_it_stops_before_training_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    started = []
    monkeypatch.setattr(ex, "measure", lambda *a: started.append(a) or fake_report())
    with pytest.raises(SystemExit) as info:
        ex.run_cli(lambda: ex.main(["--methods", "stpg", "--out", str(tmp_path)]), ex.plots.PlotsUnavailable)
    assert info.value.code == 2 and not started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "matplotlib" in err[0] and "--no-plot" in err[0]
    assert ex.main(["--methods", "supervised,stpg", "--seeds", "0", "--out", str(tmp_path), "--no-plot"]) == 0
    assert started


def test_it_writes_its_results_and_figure_and_keeps_existing_work_directories(tmp_path, monkeypatch, capsys):
    def fake(jobs, parallel):
        assert parallel and len({seed for _, seed, *_ in jobs}) == 1  # one seed's runs at once
        assert all(env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.450" for *_, env in jobs)
        return [{**_record(m, seed, 0.40 + 0.01 * seed, {"sky": 0.9, "pole": None}), "workdir": w}
                for m, seed, _, w, _ in jobs], None

    monkeypatch.setattr(ex, "run_methods", fake)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    argv = ["--methods", "supervised,stpg", "--seeds", "0,1", "--out", str(tmp_path), "--parallel",
            "--workdir_root", str(tmp_path / "runs")]
    assert ex.main(argv) == 0
    from PIL import Image

    with Image.open(tmp_path / "demo_table.png") as im:
        assert im.format == "PNG" and im.width >= 600
    text = (tmp_path / "demo_table.md").read_text()
    words = " ".join(text.split())  # the intro is wrapped where its date and commit put the breaks
    assert "| **mIoU** | 40.50 ± 0.71 | 40.50 ± 0.71 |" in text and "2 training seeds (0, 1" in words
    assert "each seed's runs together on one device" in words and "(whole command, concurrent)" in text
    report = json.loads((tmp_path / "demo_table.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("supervised", 0), ("stpg", 0), ("supervised", 1),
                                                                  ("stpg", 1)]
    assert report["commit"] and report["steps"] is None and report["seeds"] == [0, 1] and report["parallel"]

    # A run there would resume: nothing is deleted or run, and the results stay.
    (tmp_path / "runs" / "supervised_seed0").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        ex.main(argv)
    assert (tmp_path / "runs" / "supervised_seed0").is_dir() and json.loads(
        (tmp_path / "demo_table.json").read_text()) == report


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_runs_at_once_fail_apart_and_stop_together(tmp_path, monkeypatch):
    # Two fake runs at once: each writes its own log; the one that fails is reported, the other one's evaluation read.
    ok = ("import json, os, sys, time; time.sleep(0.5); print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']); "
          "open(os.path.join(sys.argv[1], 'eval_4.json'), 'w').write(json.dumps({'step': 4, 'miou': 0.45, "
          "'iou': {'sky': 0.9}}))")
    jobs = [("supervised", 1, ["python", "-c", ok, str(tmp_path / "supervised")], str(tmp_path / "supervised"),
             {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.300"}),
            ("stpg", 1, ["python", "-c", "import sys; print('boom'); sys.exit(3)"], str(tmp_path / "stpg"), None)]
    (sup, stpg), stopped_by = ex.run_methods(jobs, parallel=True)
    assert stopped_by is None
    assert sup["returncode"] == 0 and sup["miou"] == pytest.approx(0.45) and sup["seed"] == 1
    assert stpg["returncode"] == 3 and stpg["miou"] is None
    assert (tmp_path / "supervised" / "train.log").read_text() == "0.300\n"
    assert (tmp_path / "stpg" / "train.log").read_text() == "boom\n"
    assert sup["wall_s"] is not None and stpg["wall_s"] is not None

    # A run that dies leaving a worker behind (as when the OOM killer ends a trainer): the worker is ended with it.
    orphaning = ("import subprocess, sys; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                 "print(w.pid, flush=True); sys.exit(5)")
    (run,), _ = ex.run_methods([("stpg", 0, ["python", "-c", orphaning], str(tmp_path / "o"), None)], parallel=False)
    assert run["returncode"] == 5
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
                raise ex.Interrupted("SIGTERM")
            time.sleep(seconds)

    monkeypatch.setattr(ex, "time", Clock)
    (run,), stopped_by = ex.run_methods([("stpg", 0, [sys.executable, "-c", "import time; time.sleep(60)"],
                                          str(tmp_path / "s"), None)], parallel=True)
    assert stopped_by == "SIGTERM" and run["returncode"] == -15 and run["miou"] is None
    assert shlex.split(run["command"])[1:3] == ["-c", "import time; time.sleep(60)"]


def test_figure_of_known_runs(tmp_path):
    from PIL import Image

    path = ex.write_figure(fake_report()["runs"], ex.METHODS, str(tmp_path / "demo_table.png"), "t")
    assert path == str(tmp_path / "demo_table.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 200
    assert ex.write_figure([], ex.METHODS, str(tmp_path / "none.png"), "t") == ""
