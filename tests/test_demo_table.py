"""The README's demo figures are the ones benchmarks/demo_table.py recorded (no training here)."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "benchmarks" / "results" / "demo_table.json"
CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
           "bicyclist")


def _load_script():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("demo_table", REPO / "benchmarks" / "demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dt = _load_script()


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


@pytest.mark.skipif(not RECORDED.exists(), reason="benchmarks/demo_table.py has not recorded the table yet")
def test_readme_demo_figures_are_the_recorded_ones():
    report = json.loads(RECORDED.read_text())
    assert report["steps"] is None, "the recorded table must come from the config's own schedule"
    section = dt.readme_section()
    assert section is not None, f"README.md lacks the {dt.START} ... {dt.END} section written from {RECORDED}"
    assert section == dt.markdown(report), "README.md's demo section differs from demo_table.py --from_json's text"

    # The same figures, recomputed here from the runs' per-class IoUs.
    rows = table_cells(section)
    header = rows.pop("class")
    columns = {dt.METHODS[m][2]: m for m in dt.METHODS}
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
            expected = 100 * statistics.fmean(values)
            assert mean_of(rows[cls][col]) == pytest.approx(expected, abs=0.0051), (method, cls)
        assert mean_of(rows["**mIoU**"][col]) == pytest.approx(100 * statistics.fmean(r["miou"] for r in mine),
                                                               abs=0.0051)
    default = next(r for r in runs if r["method"] == "stpg" and r["seed"] == 0)
    assert default["command"] == f"python launch.py --config={dt.CONFIG} --workdir={default['workdir']}"
    assert f"**{100 * default['miou']:.2f}**" in section


def test_the_default_run_is_the_readme_demo_command():
    readme = dt.README.read_text()
    assert dt.DEFAULT_COMMAND in readme
    assert dt.run_command("stpg", 0, "runs/demo") == shlex_split(dt.DEFAULT_COMMAND)
    assert dt.run_spec("stpg", 0, steps=4) == "configs/demo.py:1_8,mode=stpg,seed=0,schedule.total_steps=4"
    assert dt.run_spec("mean_teacher", 2) == "configs/demo.py:1_8,mode=mean_teacher,seed=2"
    assert dt.run_spec("ceiling", 1) == "configs/demo.py:full,mode=supervised,seed=1"


def shlex_split(text):
    import shlex

    return shlex.split(text)


def fake_report():
    """Three seeds of supervised and STPG with IoUs chosen so that the means and differences are known."""
    runs = []
    for seed in range(3):
        for method, base in (("supervised", 0.40), ("stpg", 0.42)):
            iou = {c: base + 0.01 * seed + 0.001 * i for i, c in enumerate(CLASSES)}
            iou["bicyclist"] = None if method == "stpg" and seed == 1 else iou["bicyclist"]
            runs.append({"method": method, "seed": seed, "command": "x", "workdir": "w", "wall_s": 60.0 + seed,
                         "returncode": 0, "step": 516, "miou": base + 0.01 * seed + (0.005 if seed == 2 else 0),
                         "pixel_accuracy": 0.9, "iou": iou, "split_labeled_sha256_16": "ab"})
    return {"date": "2026-01-01 00:00 UTC", "commit": "0123456789abcdef", "dirty": False,
            "versions": {"jax": "0.0", "flax": "0.0"}, "host": {"cpus": 2}, "config": "configs/demo.py",
            "split": "1_8", "steps": None, "seeds": [0, 1, 2], "methods": ["supervised", "stpg"],
            "default_command": dt.DEFAULT_COMMAND,
            "data": {"labeled": 50, "unlabeled": 350, "val": 100, "ceiling_labeled": 400}, "runs": runs}


def test_summary_and_markdown_of_known_runs():
    report = fake_report()
    summary = dt.compare.summarize(report["runs"], dt.METHODS, dt.RARE)
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

    text = dt.markdown(report)
    rows = table_cells(text)
    assert rows["class"] == ["supervised", "STPG"]
    assert rows["sky"] == ["41.00 ± 1.00", "43.00 ± 1.00"]
    assert rows["bicyclist"][1] == "n/a"
    assert rows["wall time per run (whole command)"] == ["1 min 01 s", "1 min 01 s"]
    assert ("mIoU +2.00 points (per seed +2.00, +2.00, +2.00; 95 % interval of the mean +2.00 to +2.00; STPG ahead in "
            "3 of 3)") in " ".join(text.split())
    assert "commit `0123456`" in text
    assert rows["**mIoU**"] == ["41.17 ± 1.26", "43.17 ± 1.26"]
    assert "prints mIoU **42.00**" in text  # the default command's own figure: STPG, seed 0


def test_a_shortened_run_has_no_default_figure():
    report = fake_report()
    report["steps"] = 4
    assert dt.default_run(report) is None
    assert "The demo command" not in dt.markdown(report)
    with pytest.raises(LookupError):
        dt.default_table(report)


def test_print_default_is_the_commands_own_table():
    from stpg_jax.evaluate import format_iou_table

    report = fake_report()
    run = dt.default_run(report)
    expected = format_iou_table({"iou": np.array([run["iou"][c] for c in CLASSES], float), "miou": run["miou"]},
                                CLASSES)
    assert dt.default_table(report) == expected
    assert expected.splitlines()[-1].split() == ["mIoU", "42.00"]


def test_write_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{dt.START}\nold table\n{dt.END}\nafter\n")
    dt.write_readme("new table\nsecond line", readme)
    assert readme.read_text() == f"# title\n\nbefore\n{dt.START}\nnew table\nsecond line\n{dt.END}\nafter\n"
    assert dt.readme_section(readme) == "new table\nsecond line"
    readme.write_text("no markers\n")
    assert dt.readme_section(readme) is None
    with pytest.raises(ValueError, match="needs exactly one"):
        dt.write_readme("x", readme)


def test_from_json_writes_the_readme_only_from_a_complete_table(tmp_path, capsys):
    out = tmp_path / "results"
    report = fake_report()
    dt.save(report, str(out))
    assert json.loads((out / dt.JSON_NAME).read_text()) == report
    assert (out / dt.MD_NAME).read_text() == dt.markdown(report) + "\n"
    # Mean teacher and the ceiling are missing: the README is not written.
    assert dt.main(["--from_json", "--write_readme", "--out", str(out)]) == 2
    assert "fewer than 3 seeds of mean_teacher, ceiling" in capsys.readouterr().err
    assert dt.main(["--print_default", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["mIoU", "42.00"]


def test_runs_of_one_split_must_share_the_labelled_images():
    runs = [{"method": "supervised", "split_labeled_sha256_16": "a"},
            {"method": "stpg", "split_labeled_sha256_16": "a"},
            {"method": "ceiling", "split_labeled_sha256_16": "b"}]
    dt.check_splits(runs)
    with pytest.raises(RuntimeError, match="different labelled images"):
        dt.check_splits(runs + [{"method": "mean_teacher", "split_labeled_sha256_16": "c"}])
    with pytest.raises(RuntimeError, match="different steps"):
        dt.check_splits([{**r, "step": 516} for r in runs] + [{"method": "stpg", "split_labeled_sha256_16": "a",
                                                                "step": 400}])


def test_arguments():
    with pytest.raises(SystemExit):
        dt.parse_args(["--steps", "4"])  # would replace the recorded table
    with pytest.raises(SystemExit):
        dt.parse_args(["--methods", "fixmatch"])
    with pytest.raises(SystemExit):
        dt.parse_args(["--seeds", "0,0"])
    args = dt.parse_args(["--steps", "4", "--seeds", "3,1", "--out", "x"])
    assert args.seed_list == [3, 1] and args.method_list == list(dt.METHODS)


def test_work_directories_as_the_runs_see_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dt.repo_path(str(dt.REPO / "runs" / "x")) == "runs/x"
    assert dt.repo_path("elsewhere") == str(tmp_path / "elsewhere")


def test_existing_work_directories_are_not_resumed(tmp_path):
    (tmp_path / "supervised_seed0").mkdir()
    args = dt.parse_args(["--steps", "1", "--seeds", "0", "--methods", "supervised", "--out", str(tmp_path / "o"),
                          "--workdir_root", str(tmp_path)])
    with pytest.raises(FileExistsError, match="--overwrite"):
        dt.measure(args)
    assert (tmp_path / "supervised_seed0").is_dir() and not (tmp_path / "o").exists()  # nothing deleted or run


def test_figure_of_known_runs(tmp_path):
    from PIL import Image

    path = dt.write_figure(fake_report(), tmp_path / "demo_table.png")
    assert path == str(tmp_path / "demo_table.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 200
    assert dt.write_figure({**fake_report(), "runs": []}, tmp_path / "none.png") == ""
