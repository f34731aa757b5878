"""Export of a Gen-Student, loading it back, and the predict command's masks and overlays."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from stpg_jax import export, predict
from stpg_jax.config import base_config
from stpg_jax.data.palettes import palette_for
from stpg_jax.inference import WindowPredictor
from stpg_jax.recipe import model_from_config

NUM_CLASSES = 5
WINDOW = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model_config(width=8):
    c = base_config().model
    c.stage_blocks, c.width = (1, 1, 1, 1), width
    c.aspp_channels, c.decoder_channels, c.low_level_channels, c.proj_dim = 8, 8, 4, 4
    return c


def init_variables(config, seed=0):
    model = model_from_config(config, NUM_CLASSES)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(seed), x))(jnp.zeros((1, WINDOW, WINDOW, 3)))
    # Spread the classifier so that masks are not a single class.
    variables["params"]["classifier"]["kernel"] = variables["params"]["classifier"]["kernel"] * 20.0
    return model, variables


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = tiny_model_config()
    model, variables = init_variables(config)
    out = export.export_model(
        str(tmp_path_factory.mktemp("export") / "gen_student"), model_config=config, num_classes=NUM_CLASSES,
        dataset_name="camvid", class_names=[f"c{i}" for i in range(NUM_CLASSES)], variables=variables,
        eval_window=WINDOW,
    )
    return out, model, variables


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three images: smaller than the window, several windows wide, and a greyscale JPEG."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)

    def smooth(h, w, channels):  # blurry random images, so that the JPEG overlay stays close to the exact blend
        small = Image.fromarray(rng.integers(0, 256, (4, 5, channels), dtype=np.uint8).squeeze())
        return small.resize((w, h), Image.BILINEAR)

    smooth(20, 27, 3).save(d / "small.png")
    smooth(40, 75, 3).save(d / "wide.png")
    smooth(50, 33, 1).save(d / "grey.jpg")
    (d / "notes.txt").write_text("not an image")
    return d, {"small": (20, 27), "wide": (40, 75), "grey": (50, 33)}


def test_load_model_restores_the_export(exported):
    path, model, variables = exported
    loaded_model, loaded, meta = export.load_model(path)
    assert loaded_model == model
    assert set(loaded) == {"params", "batch_stats"}
    flat_want = jax.tree_util.tree_leaves_with_path({c: variables[c] for c in ("params", "batch_stats")})
    flat_got = jax.tree_util.tree_leaves_with_path(loaded)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (_, a), (_, b) in zip(flat_got, flat_want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["num_classes"] == NUM_CLASSES and meta["dataset_name"] == "camvid"
    assert meta["eval_window"] == WINDOW and meta["eval_stride_rate"] == pytest.approx(2 / 3)
    assert meta["model"]["stage_blocks"] == [1, 1, 1, 1] and meta["class_names"][4] == "c4"
    assert meta["eval_flip"] is False and predict.load_predictor(path).flip is False


def test_an_export_carries_the_flip_of_its_evaluation(exported, tmp_path):
    _, model, variables = exported
    out = export.export_model(str(tmp_path / "flipped"), model_config=tiny_model_config(), num_classes=NUM_CLASSES,
                              dataset_name="camvid", class_names=[], variables=variables, eval_window=WINDOW,
                              eval_flip=True)
    predictor = predict.load_predictor(out)
    assert predictor.flip is True
    image = np.random.default_rng(5).integers(0, 256, (20, 27, 3), dtype=np.uint8)
    run, placed = predictor.window_predictor()
    got = run(placed, image)
    np.testing.assert_allclose(got, WindowPredictor(model, WINDOW, 4, flip=True)(variables, image), atol=1e-3)
    assert np.abs(got - WindowPredictor(model, WINDOW, 4)(variables, image)).max() > 0.1


def test_export_refuses_to_overwrite_and_checks_structure(exported, tmp_path):
    path, model, variables = exported
    kwargs = dict(model_config=tiny_model_config(), num_classes=NUM_CLASSES, dataset_name="camvid",
                  class_names=(), variables=variables, eval_window=WINDOW)
    with pytest.raises(FileExistsError, match="not empty"):
        export.export_model(path, **kwargs)

    other = str(tmp_path / "other")
    with pytest.raises(ValueError, match=r"\['params'\]\['backbone'\]\['layer1_0'\]\['conv1'\]\['kernel'\]: model"):
        export.export_model(other, **dict(kwargs, model_config=tiny_model_config(width=16)))
    assert not os.path.exists(other)

    export.export_model(other, **kwargs)
    export.export_model(other, **dict(kwargs, eval_window=48), overwrite=True)
    assert export.read_meta(other)["eval_window"] == 48


def test_predict_writes_a_mask_and_an_overlay_per_image(exported, images, tmp_path):
    path, model, variables = exported
    image_dir, sizes = images
    predictor = predict.load_predictor(path)
    assert predictor.window == WINDOW and predictor.num_classes == NUM_CLASSES

    paths = predict.list_images(str(image_dir))
    assert [os.path.basename(p) for p in paths] == ["grey.jpg", "small.png", "wide.png"]
    written = predict.predict(predictor, paths, str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(p) for p in written)
    assert len(written) == 2 * len(sizes)

    palette = palette_for("camvid")
    reference = WindowPredictor(model, WINDOW, 4)
    seen = set()
    for name, (h, w) in sizes.items():
        mask_image = Image.open(tmp_path / "out" / f"{name}.png")
        assert mask_image.mode == "P" and mask_image.size == (w, h)
        np.testing.assert_array_equal(np.asarray(mask_image.getpalette()[: 3 * len(palette)]), palette.reshape(-1))
        mask = np.asarray(mask_image)
        assert mask.max() < NUM_CLASSES
        seen |= set(np.unique(mask).tolist())

        rgb = np.asarray(Image.open(image_dir / (name + (".jpg" if name == "grey" else ".png"))).convert("RGB"))
        np.testing.assert_array_equal(mask, reference(variables, rgb).argmax(-1))

        over = Image.open(tmp_path / "out" / f"{name}_overlay.jpg")
        assert over.format == "JPEG" and over.size == (w, h) and over.mode == "RGB"
        blend = 0.5 * rgb.astype(np.float32) + 0.5 * palette[mask].astype(np.float32)
        assert np.abs(np.asarray(over, np.float32) - blend).mean() < 12  # JPEG loss only
    assert len(seen) > 1


def test_unreadable_images_are_passed_over_named_and_the_others_written(exported, images, tmp_path):
    path, _, _ = exported
    image_dir, _ = images
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "noise.jpg").write_bytes(b"not a JPEG")
    (broken / "cut.png").write_bytes((image_dir / "wide.png").read_bytes()[:80])  # header only: truncated
    paths = [str(image_dir / "small.png"), str(broken / "noise.jpg"), str(broken / "cut.png"),
             str(image_dir / "wide.png")]
    with pytest.raises(predict.UnreadableImagesError, match="2 of the images could not be read") as info:
        predict.predict(predict.load_predictor(path), paths, str(tmp_path / "out"), progress=False)
    assert [p for p, _ in info.value.unreadable] == paths[1:3]
    assert sorted(os.listdir(tmp_path / "out")) == ["small.png", "small_overlay.jpg", "wide.png",
                                                    "wide_overlay.jpg"]
    assert sorted(info.value.written) == sorted(str(tmp_path / "out" / n) for n in os.listdir(tmp_path / "out"))


def test_list_images_accepts_globs_and_rejects_name_clashes(images, tmp_path):
    image_dir, _ = images
    assert [os.path.basename(p) for p in predict.list_images(str(image_dir / "*.png"))] == ["small.png", "wide.png"]
    with pytest.raises(FileNotFoundError, match="no images"):
        predict.list_images(str(tmp_path / "*.png"))
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match=r"\['a'\]"):
        predict.list_images(str(tmp_path))


def test_predict_command_with_config_override(exported, images, tmp_path):
    path, _, _ = exported
    image_dir, sizes = images
    config_file = tmp_path / "tiny.py"
    config_file.write_text(textwrap.dedent("""
        from stpg_jax.config import base_config

        def get_config():
            c = base_config()
            c.data.dataset = "cityscapes"
            c.eval.window = 24
            c.eval.windows_per_batch = 2
            return c
    """))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "stpg_jax.predict", f"--checkpoint={path}", f"--images={image_dir / 'wide.png'}",
         f"--out={tmp_path / 'out'}", f"--config={config_file}", "--flip"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "window 24" in result.stdout and "2 windows per batch" in result.stdout and "flipped too" in result.stdout
    mask_image = Image.open(tmp_path / "out" / "wide.png")
    assert mask_image.size == (75, 40)
    cityscapes = palette_for("cityscapes")
    np.testing.assert_array_equal(np.asarray(mask_image.getpalette()[:3 * len(cityscapes)]), cityscapes.reshape(-1))
    assert sorted(os.listdir(tmp_path / "out")) == ["wide.png", "wide_overlay.jpg"]
