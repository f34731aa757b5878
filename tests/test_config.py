"""configs/*.py: every file × split builds, docstrings, split/override errors, typed overrides, paper values."""

import importlib.util
import pathlib

import pytest

from stpg_jax.config import SPLITS, ConfigError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))


def load(name):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get(name, arg=None):
    return load(name).get_config(arg)


def test_the_expected_config_files_exist():
    assert {"voc_blender", "voc_classic", "cityscapes", "camvid", "demo"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("split", SPLITS)
def test_every_config_and_split_builds(name, split):
    c = get(name, split)
    assert c.split == split
    assert c.data.batch_labeled > 0 and c.optim.lr > 0 and c.schedule.epochs > 0


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_docstring_gives_the_command_and_what_it_reproduces(name):
    doc = load(name).__doc__
    assert doc, f"configs/{name}.py has no module docstring"
    assert f"python launch.py --config=configs/{name}.py" in doc
    if name == "demo":
        assert "reproduces nothing from the paper" in doc.lower()
    elif name == "camvid":
        assert "no paper figure" in doc.lower()
    else:
        assert "mIoU" in doc


def test_paper_figures_in_docstrings():
    assert all(f in load("voc_blender").__doc__ for f in ("73.88", "75.49", "76.97", "77.39"))
    assert all(f in load("voc_classic").__doc__ for f in ("72.29", "77.69", "79.08", "80.45"))
    assert all(f in load("cityscapes").__doc__ for f in ("68.46", "75.14", "77.01"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_unknown_split_names_the_allowed_ones(name):
    with pytest.raises(ValueError) as info:
        get(name, "1_5")
    assert "1_5" in str(info.value) and all(s in str(info.value) for s in SPLITS)


@pytest.mark.parametrize("arg,key", [("1_4,no_such_key=1", "no_such_key"), ("1_4,model.no_such=1", "model.no_such")])
def test_unknown_override_key_names_the_key(arg, key):
    with pytest.raises(ConfigError) as info:
        get("voc_blender", arg)
    assert key in str(info.value) and "allowed" in str(info.value)


def test_overrides_are_typed():
    c = get("voc_blender", "1_4,optim.lr=0.01,model.stage_blocks=(1,1,1,1),optim.momentum=1,model.stem=standard")
    assert c.optim.lr == 0.01 and type(c.optim.lr) is float
    assert c.model.stage_blocks == (1, 1, 1, 1) and type(c.model.stage_blocks) is tuple
    assert type(c.optim.momentum) is float and c.optim.momentum == 1.0
    assert c.model.stem == "standard"
    assert get("voc_blender", "1_4,stpg.contrastive=False").stpg.contrastive is False
    for bad in ("stpg.contrastive=3", "stpg.contrastive=1", "model.width=0.5", "optim.lr=True", "optim.lr=abc"):
        with pytest.raises(ValueError, match=bad.split("=")[0].replace(".", r"\.")):
            get("voc_blender", f"1_4,{bad}")


def test_evaluated_networks_take_names_and_are_checked_against_the_mode():
    c = get("camvid", "1_8,eval.networks=(gen_student,gen_teacher)")
    assert c.eval.networks == ("gen_student", "gen_teacher")
    assert get("camvid", "1_8,eval.networks=('gen_student','pro_teacher')").eval.networks == ("gen_student",
                                                                                               "pro_teacher")
    for arg, why in (("eval.networks=(gen_teacher)", "must list 'gen_student'"),
                     ("mode=mean_teacher,eval.networks=(gen_student,pro_teacher)", "'mean_teacher' mode's networks"),
                     ("eval.networks=(gen_student,gen_student)", "each once")):
        with pytest.raises(ConfigError, match=why):
            get("camvid", f"1_8,{arg}")


def test_override_wins_over_the_split_and_split_defaults():
    assert get("voc_blender", "1_16,schedule.epochs=3").schedule.epochs == 3
    assert get("voc_blender").split == "1_4"
    assert get("voc_blender", "mode=supervised").split == "1_4"


def test_invalid_values_are_refused():
    for arg in ("1_4,mode=fixmatch", "1_4,stpg.selection=some", "1_4,data.batch_labeled=0"):
        with pytest.raises(ValueError):
            get("voc_blender", arg)
    with pytest.raises(ConfigError, match=r"model\.proj_dropout must be in \[0, 1\), got 1\.0"):
        get("voc_blender", "1_4,model.proj_dropout=1.0")


@pytest.mark.parametrize("name", ["voc_blender", "voc_classic"])
def test_voc_values(name):
    for split, epochs, bank_k in zip(("1_16", "1_8", "1_4", "1_2"), (32, 34, 40, 60), (21, 7, 7, 1)):
        c = get(name, split)
        assert (c.schedule.epochs, c.stpg.bank_k) == (epochs, bank_k), split
        assert c.optim.lr == 0.005 and c.data.crop_size == 512 and c.eval.window == 512
        assert (c.data.batch_labeled, c.data.batch_unlabeled) == (8, 8)
        assert c.loss.supervised == "ce" and c.data.dataset == "voc" and c.data.protocol == name[4:]
        assert c.stpg.matching_freeze_epoch == 20 and c.stpg.proximity_start_epoch == 16
    assert get(name).model.depth == (101 if name == "voc_classic" else 50)


def test_cityscapes_values():
    for split, epochs in zip(("1_16", "1_8", "1_4", "1_2"), (128, 137, 160, 240)):
        c = get("cityscapes", split)
        assert c.schedule.epochs == epochs, split
        assert c.optim.lr == 0.01 and c.data.crop_size == 800 and c.eval.window == 800
        assert (c.data.batch_labeled, c.data.batch_unlabeled) == (3, 3)
        assert c.loss.supervised == "ohem" and c.loss.ohem_threshold == 0.7 and c.loss.ohem_min_kept == 50000
        assert len(c.loss.ohem_class_weights) == 19
        assert c.stpg.matching_freeze_epoch == -1 and c.stpg.proximity_start_epoch == 11


@pytest.mark.parametrize("name,counts", [
    ("voc_blender", (662, 1323, 2646, 5291)),
    ("voc_classic", (92, 183, 366, 732, 1464)),
    ("cityscapes", (186, 372, 744, 1488)),
])
def test_labelled_counts(name, counts):
    assert tuple(get(name, s).data.num_labeled for s in SPLITS[:len(counts)]) == counts


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_paper_defaults(name):
    c = get(name)
    assert c.stpg.prototype_momentum == 0.99 and c.stpg.bank_source == "gen_teacher"
    assert c.stpg.train_projection_head is True and c.stpg.ema_decay == 0.99
    assert c.loss.unsup_weight == 1.0 and c.loss.contrastive_weight == 0.1
    assert c.stpg.contrastive_temperature == 0.5 and c.stpg.anchor_temperature == 0.07
    assert c.stpg.bank_capacity == 256 and c.stpg.bank_confidence == 0.95
    assert c.optim.momentum == 0.9 and c.optim.weight_decay == 1e-4 and c.optim.poly_power == 0.9
    assert c.eval.stride_rate == pytest.approx(2 / 3)
    assert c.mode == "stpg" and isinstance(c.seed, int) and isinstance(c.model.pretrained, str)


def test_paper_configs_use_the_paper_network():
    for name in ("voc_blender", "voc_classic", "cityscapes"):
        m = get(name).model
        assert (m.stem, m.output_stride, m.aspp_channels, m.decoder_channels) == ("deep", 16, 256, 256)
        assert (m.low_level_channels, m.proj_dim, m.stage_blocks, m.width) == (48, 256, (), 64)
        assert m.proj_dropout == 0.1
        assert m.pretrained


def test_remat_is_a_checked_switch_that_a_resume_accepts(tmp_path):
    import json

    from stpg_jax.checkpoint import check_config, write_config
    from stpg_jax.config import validate

    assert get("voc_blender").model.remat is False
    with pytest.raises(ConfigError, match=r"model\.remat"):
        get("voc_blender", "1_4,model.remat=1")
    c = get("voc_blender")
    c.model.remat = None
    with pytest.raises(ConfigError, match=r"model\.remat"):
        validate(c)

    # Compute only (same variables, same values): a run resumes with it switched, or from a config.json without it.
    write_config(str(tmp_path), get("voc_blender"))
    check_config(str(tmp_path), get("voc_blender", "1_4,model.remat=True"))
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["remat"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_config(str(tmp_path), get("voc_blender", "1_4,model.remat=True"))
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        check_config(str(tmp_path), get("voc_blender", "1_4,model.dtype=bfloat16"))


def test_a_run_written_before_proj_dropout_existed_resumes_with_its_value(tmp_path):
    import json

    from stpg_jax.checkpoint import check_config, write_config

    write_config(str(tmp_path), get("voc_blender"))
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["proj_dropout"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_config(str(tmp_path), get("voc_blender"))  # 0.1, as the network had it before the field
    with pytest.raises(ConfigError, match=r"model\.proj_dropout: 0\.1 in the checkpoint, 0\.0 now"):
        check_config(str(tmp_path), get("voc_blender", "1_4,model.proj_dropout=0.0"))


def test_bn_backward_is_a_checked_choice_that_a_resume_accepts(tmp_path):
    from stpg_jax.checkpoint import check_config, write_config

    assert get("voc_blender").model.bn_backward == "autodiff"
    with pytest.raises(ConfigError, match=r"model\.bn_backward must be 'autodiff' or 'closed_form', got 'fused'"):
        get("voc_blender", "1_4,model.bn_backward=fused")
    write_config(str(tmp_path), get("voc_blender"))
    check_config(str(tmp_path), get("voc_blender", "1_4,model.bn_backward=closed_form"))
