"""TensorBoard panels, per-class scalars and PNG charts (issue 29), from one short training run with images on."""

import io
import os
import struct
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2, layout_pb2

from stpg_jax import losses, plots, train, visualize
from stpg_jax.config import ConfigError, base_config, validate
from stpg_jax.data import build_data
from test_train import loop_config  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.usefixtures("one_device_runs")  # as test_train.py, whose compiled step the run reuses

COUNT, EVERY, STEPS, CROP = 2, 2, 4, 32


def read_events(logdir):
    """Every Event of the event files under ``logdir`` (TFRecord framing: length, its CRC, data, data CRC)."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def summaries(events):
    """{tag: {step: Summary.Value}}."""
    out = {}
    for e in events:
        for v in e.summary.value:
            out.setdefault(v.tag, {})[e.step] = v
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # test_train.py's loop run with pictures on: the pictures do not enter the step, so this run reuses that file's
    # compiled step (tests/conftest.py keeps both files on one worker).
    config = loop_config(**{"log_images_every_steps": EVERY, "log_images_count": COUNT,
                            "schedule.total_steps": STEPS})
    workdir = tmp_path_factory.mktemp("images")
    result = train.train_and_evaluate(config, str(workdir))
    return workdir, config, result, summaries(read_events(workdir / "tensorboard"))


def trained_networks(workdir, mode):
    """The networks of ``mode`` from the run's last checkpoint, as the panel function takes them."""
    from stpg_jax import checkpoint
    from stpg_jax.config import MODE_NETWORKS
    from stpg_jax.state import Network

    networks = {}
    for name in MODE_NETWORKS[mode]:
        _, variables, _, _ = checkpoint.load_network(str(workdir), name)
        networks[name] = Network(variables["params"], variables["batch_stats"])
    return networks


def strip_panels(value, columns):
    """The decoded PNG of an image summary, cut into its panels: {column: (S, S, 3)}; checks the gaps are white."""
    strip = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))
    assert (value.image.height, value.image.width) == strip.shape[:2]
    gap, size = visualize.PANEL_GAP, strip.shape[0]
    assert strip.shape[1] == len(columns) * size + (len(columns) - 1) * gap
    panels = {}
    for k, col in enumerate(columns):
        x = k * (size + gap)
        panels[col] = strip[:, x:x + size]
        if k:
            assert np.all(strip[:, x - gap:x] == 255)
    return panels


def ids_from_colours(panel, palette):
    """Class ids of a palette-coloured panel; fails on any colour outside the palette."""
    match = np.all(panel[:, :, None, :] == np.asarray(palette)[None, None], axis=-1)  # (S, S, C)
    assert np.all(match.sum(-1) == 1), "a colour outside the palette (or one used twice)"
    return match.argmax(-1)


def test_image_summaries_under_the_documented_tags_with_their_sizes(run):
    _, _, _, tags = run
    image_tags = sorted(t for t in tags if t.startswith("images/") and t != "images/legend/text_summary")
    assert image_tags == [f"images/{s}/{i}" for s in ("unlabeled", "val") for i in range(COUNT)]
    for tag in image_tags:
        assert sorted(tags[tag]) == list(range(EVERY, STEPS + 1, EVERY))
        columns = visualize.panel_columns("stpg", tag.startswith("images/val"))
        assert len(columns) == (8 if "val" in tag else 7)
        for value in tags[tag].values():
            assert value.image.height == CROP
            assert value.image.width == len(columns) * CROP + (len(columns) - 1) * visualize.PANEL_GAP
    assert "images/legend/text_summary" in tags


def test_label_panels_hold_only_palette_colours_and_the_image_panels_the_fixed_images(run):
    _, config, _, tags = run
    bundle = build_data(config.data)
    palette = bundle.info.palette
    for split, source in (("unlabeled", bundle.unlabeled), ("val", bundle.val)):
        columns = visualize.panel_columns("stpg", split == "val")
        for i in range(COUNT):
            item = source[i]
            image, label = visualize.centre_crop(item["image"], item.get("label"), CROP)
            for value in tags[f"images/{split}/{i}"].values():
                panels = strip_panels(value, columns)
                np.testing.assert_array_equal(panels["image"], image)
                for col in ("gen_teacher_labels", "pro_teacher_labels", "gen_student_prediction"):
                    ids_from_colours(panels[col], palette)
                if split == "val":  # the synthetic val crops hold no ignored pixel
                    np.testing.assert_array_equal(ids_from_colours(panels["ground_truth"], palette), label)
                for col in ("gen_teacher_confidence", "pro_teacher_confidence"):
                    grey = panels[col].astype(int)
                    assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])
                    # max softmax probability of 11 classes: at least 1/11
                    assert grey.min() >= np.floor(255 / 11)
                ids_from_colours(panels["selection"], visualize.SELECTION_COLORS)


def test_selection_panel_follows_the_mismatch_scores_of_the_panel_batch(run):
    # The trained run's networks with the Pro-Student replaced by its teacher: then pi is the Pro-Teacher's labels,
    # and over the panel batch a pixel is consistent where the teachers agree, highly mismatched where
    # m[gen label] > m[pro label], low otherwise.
    from stpg_jax.recipe import model_from_config

    workdir, config, _, _ = run
    networks = trained_networks(workdir, "stpg")
    networks["pro_student"] = networks["pro_teacher"]
    panels = visualize.make_panel_fn(model_from_config(config.model, 11), "stpg", 11)
    saw_mismatch = False
    for source in ("unlabeled", "val"):
        images, _ = visualize.fixed_images(getattr(build_data(config.data), source), COUNT, CROP, False)
        maps = {k: np.asarray(v) for k, v in panels(networks, images, np.zeros(2, np.uint32)).items()}
        gen, pro = maps["gen_teacher_labels"], maps["pro_teacher_labels"]
        scores = np.asarray(losses.mismatch_scores(losses.confusion_matrix(gen, pro, 11)))
        expected = np.where(gen == pro, 0, np.where(scores[gen] > scores[pro], 1, 2))
        np.testing.assert_array_equal(maps["selection"], expected)
        saw_mismatch |= bool(np.any(expected > 0))
    assert saw_mismatch  # otherwise the check above would hold for an all-consistent panel too


def test_mismatch_scores_are_logged_by_class_name_with_a_per_class_layout(run):
    _, config, _, tags = run
    names = build_data(config.data).info.class_names
    assert {f"train/mismatch_scores/{n}" for n in names} <= set(tags)
    assert not any(t.startswith("train/mismatch_scores/") and t.rsplit("/", 1)[1].isdigit() for t in tags)
    assert {f"eval/iou/{n}" for n in names} & set(tags)
    value = next(iter(tags["custom_scalars__config__"].values()))
    layout = layout_pb2.Layout.FromString(value.tensor.string_val[0])
    per_class = next(c for c in layout.category if c.title == "per class")
    assert [c.title for c in per_class.chart] == list(names)
    road = next(c for c in per_class.chart if c.title == "road")
    assert list(road.multiline.tag) == ["^eval/iou/road$", "^train/mismatch_scores/road$"]


def test_eval_png_is_written_and_opens(run):
    workdir, _, _, _ = run
    with Image.open(workdir / f"eval_{STEPS}.png") as im:
        im.load()
        assert im.format == "PNG" and im.width >= 600 and 300 <= im.height <= 1000


def test_image_logging_is_off_by_default_and_rejects_negative_values():
    assert base_config().log_images_every_steps == 0
    c = base_config()
    c.log_images_every_steps = -1
    with pytest.raises(ConfigError, match="log_images_every_steps"):
        validate(c)


def test_rare_classes_are_those_under_the_pixel_share():
    confusion = np.diag([970, 15, 0, 15])  # shares 0.97, 0.015, 0 (absent), 0.015
    np.testing.assert_array_equal(plots.rare_from_confusion(confusion), [False, True, False, True])


def test_method_comparison_png_takes_per_seed_values_with_gaps(tmp_path):
    names = ["road", "pole", "mIoU"]
    per = {"stpg": [{"road": 90.0, "pole": 1.0, "mIoU": 45.5}, {"road": 88.0, "pole": None, "mIoU": 44.0}],
           "supervised": [[89.0, 0.5, 44.7], [87.0, 2.0, 44.5]]}
    path = plots.method_comparison_png(per, names, str(tmp_path / "cmp.png"), rare=["pole"], title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 400
    with pytest.raises(ValueError, match="2 values for 3 classes"):
        plots.method_comparison_png({"stpg": [[1.0, 2.0]]}, names, str(tmp_path / "bad.png"))


def test_without_matplotlib_a_png_fails_in_one_line_and_training_only_notes_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(plots, "_notified", set())
    result = {"iou": np.array([0.5, 0.1]), "miou": 0.3, "confusion": np.eye(2, dtype=int)}
    with pytest.raises(plots.PlotsUnavailable) as info:
        plots.eval_iou_png(result, ["a", "b"], str(tmp_path / "x.png"))
    assert "\n" not in str(info.value) and "pip install" in str(info.value)
    lines = []
    for _ in range(2):
        assert plots.save_eval_png(result, ["a", "b"], str(tmp_path / "x.png"), 1, lines.append) is None
    assert len(lines) == 1 and "matplotlib" in lines[0] and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("mode", ["mean_teacher", "supervised"])
def test_modes_without_some_networks_show_the_panels_they_have(run, mode):
    # The trained run's networks, handed to the panel function of a mode that has only some of them.
    from stpg_jax.recipe import model_from_config

    workdir, config, _, _ = run
    networks = trained_networks(workdir, mode)
    bundle = build_data(config.data)
    images, labels = visualize.fixed_images(bundle.val, COUNT, CROP, with_label=True)
    maps = visualize.make_panel_fn(model_from_config(config.model, 11), mode, 11)(networks, images,
                                                                                   np.zeros(2, np.uint32))
    columns = visualize.panel_columns(mode, with_label=True)
    assert set(maps) == set(columns) - {"image", "ground_truth"}
    expected = {"mean_teacher": ["image", "gen_teacher_labels", "gen_teacher_confidence", "gen_student_prediction",
                                 "ground_truth"],
                "supervised": ["image", "gen_student_prediction", "ground_truth"]}[mode]
    assert columns == expected
    strip = visualize.render_strip(columns, images[0], {k: np.asarray(v)[0] for k, v in maps.items()}, labels[0],
                                   bundle.info.palette)
    assert strip.shape == (CROP, len(columns) * CROP + (len(columns) - 1) * visualize.PANEL_GAP, 3)


def test_evaluate_command_draws_the_chart_of_several_networks(run, tmp_path):
    import os
    import subprocess

    workdir, _, _, _ = run
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(repo, ".jax_cache"))
    chart = tmp_path / "charts" / "eval.png"
    proc = subprocess.run([sys.executable, "-m", "stpg_jax.evaluate", f"--checkpoint={workdir}", "--max_images=1",
                           "--network=gen_student,pro_teacher", f"--plot={chart}"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"chart: {chart}" in proc.stdout
    with Image.open(chart) as im:
        assert im.format == "PNG" and im.width >= 600


def test_a_run_with_pictures_gets_the_same_jitted_step_as_one_without(tmp_path):
    # The pictures may not touch the training step: both runs' steps have one recipe, the static argument of the
    # one jitted step function, so they are one compiled program.
    def recipe_of(every):
        return train.Trainer(loop_config(log_images_every_steps=every), str(tmp_path / f"run{every}")).parts.recipe

    assert recipe_of(0) == recipe_of(2) and hash(recipe_of(0)) == hash(recipe_of(2))


def test_the_event_writer_leaves_pytorch_unimported_and_importable(tmp_path):
    # tensorboardX imports PyTorch (installed with the test extra) at its own import, only for type hints: every
    # launch.py start paid for it. train.summary_writer keeps it out; PyTorch itself still imports afterwards.
    import subprocess

    code = ("import sys\nfrom stpg_jax import train\nw = train.summary_writer(sys.argv[1])\n"
            "w.add_scalar('train/loss', 1.5, 3)\nw.close()\nprint('torch' in sys.modules)\n"
            "import torch\nprint(torch.ones(2).sum().item())\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "2.0"]
    assert summaries(read_events(tmp_path))["train/loss"][3].simple_value == 1.5
