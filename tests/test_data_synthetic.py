"""Embedded road scenes, weak augmentation and the grain train loader."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stpg_jax.config import base_config
from stpg_jax.data import DataError, augment, build_data, make_train_loader, palettes, synthetic
from stpg_jax.models import inputs

REPO = Path(__file__).resolve().parents[1]


def data_config(**overrides):
    cfg = base_config().data
    cfg.update(dataset='synthetic', crop_size=48, batch_labeled=4, batch_unlabeled=4, workers=0, prefetch=2)
    cfg.synthetic.update(num_labeled=12, num_unlabeled=30, num_val=6, height=48, width=64, seed=0)
    cfg.update(overrides)
    return cfg


def test_scenes_are_deterministic_and_well_formed():
    a = synthetic.SyntheticSource('labeled', 5, 96, 128, seed=3)
    b = synthetic.SyntheticSource('labeled', 5, 96, 128, seed=3)
    other = synthetic.SyntheticSource('labeled', 5, 96, 128, seed=4)
    for i in range(5):
        x, y = a[i], b[i]
        assert x['image'].shape == (96, 128, 3) and x['image'].dtype == np.uint8
        assert x['label'].shape == (96, 128) and x['label'].dtype == np.uint8
        assert x['label'].max() < 11
        np.testing.assert_array_equal(x['image'], y['image'])
        np.testing.assert_array_equal(x['label'], y['label'])
    assert not np.array_equal(a[0]['image'], other[0]['image'])
    assert 'label' not in synthetic.SyntheticSource('unlabeled', 2, with_label=False)[0]


@pytest.fixture(scope='module')
def scene_labels():
    # The 500 images docs/data.md measures its shares on.
    src = synthetic.SyntheticSource('labeled', 500, 96, 128, seed=0)
    return src, np.stack([src[i]['label'] for i in range(len(src))])


RARE = ('pole', 'sign_symbol', 'fence', 'pedestrian', 'bicyclist')


def test_long_tailed_class_shares(scene_labels):
    src, _ = scene_labels
    names = dict(zip(synthetic.CLASS_NAMES, synthetic.class_shares(src)))
    for rare in RARE:  # rare, but each a few tenths of a percent: enough pixels to learn from
        assert 0.003 < names[rare] < 0.015, (rare, names[rare])
    for common in ('sky', 'building', 'road', 'pavement'):
        assert names[common] > 0.1, (common, names[common])


def test_docs_give_the_measured_shares(scene_labels):
    src, _ = scene_labels
    text = (REPO / 'docs' / 'data.md').read_text()
    table = text[text.index('Measured pixel shares (500 labelled images, 96×128, seed 0'):]
    table = table[:table.index('For comparison')]
    documented = {name: float(v) for name, v in re.findall(r'\| (\w+) \| (\d+\.\d\d) (?=\|)', table)}
    measured = dict(zip(synthetic.CLASS_NAMES, synthetic.class_shares(src)))
    assert set(documented) == set(measured)
    for name, share in measured.items():
        assert abs(documented[name] - 100 * share) < 0.006, (name, documented[name], 100 * share)


def test_rare_classes_survive_the_decoders_stride_4_grid(scene_labels):
    # DeepLabV3+ predicts on a stride-4 grid. Labels sampled at the centres of 4x4 cells and blown back up keep most
    # of each rare class (IoU with the full-resolution label > 0.5): its objects are a few cells wide, not sub-pixel.
    # The generator before issue 28 (1-3 pixel poles, 1-pixel fence slats, thin bicycle rims) scored 0.34-0.42 on
    # pole, fence and bicyclist.
    _, labels = scene_labels
    coarse = np.repeat(np.repeat(labels[:, 2::4, 2::4], 4, 1), 4, 2)
    for rare in RARE:
        cls = synthetic.CLASS_NAMES.index(rare)
        fine, blown_up = labels == cls, coarse == cls
        iou = (fine & blown_up).sum() / (fine | blown_up).sum()
        assert iou > 0.5, (rare, iou)


def test_rare_classes_are_told_by_colour_only_in_part(scene_labels):
    # Most rare objects wear their class's own hue, the rest (SHARED_SHARE) colours of large classes, so a per-colour
    # majority vote (4 bits per channel, over the 500 images) labels about half of each rare class's pixels right
    # (0.34-0.60): the colour is a cue a small network picks up from few labels, the shape and context carry the rest.
    # With a hue of its own for every object the vote got 0.87-0.96, and 50 labelled scenes came within a point of
    # the all-labels ceiling; with no own hue at all (and the earlier, thinner shapes) it got 0.00-0.10, and the
    # ceiling learnt pole, fence and pedestrian to under 3 % IoU.
    src, labels = scene_labels
    images = np.stack([src[i]['image'] for i in range(len(src))]) // 16
    keys = (images[..., 0].astype(np.int64) * 256 + images[..., 1] * 16 + images[..., 2]).ravel()
    joint = np.zeros((4096, 11), np.int64)
    np.add.at(joint, (keys, labels.ravel()), 1)
    vote = joint.argmax(1)[keys].reshape(labels.shape)
    for rare in RARE:
        cls = synthetic.CLASS_NAMES.index(rare)
        recall = (vote[labels == cls] == cls).mean()
        assert 0.25 < recall < 0.75, (rare, recall)


def test_colour_alone_does_not_give_the_class():
    # A per-colour majority vote (colours quantised to 4 bits per channel) labels well under all pixels right.
    src = synthetic.SyntheticSource('labeled', 40, 96, 128, seed=0)
    images = np.stack([src[i]['image'] for i in range(40)]) // 16
    labels = np.stack([src[i]['label'] for i in range(40)])
    keys = (images[..., 0].astype(np.int64) * 256 + images[..., 1] * 16 + images[..., 2]).ravel()
    joint = np.zeros((4096, 11), np.int64)
    np.add.at(joint, (keys, labels.ravel()), 1)
    accuracy = joint.max(1).sum() / joint.sum()
    assert accuracy < 0.9


def test_build_data_synthetic_and_split_record(tmp_path):
    bundle = build_data(data_config(), workdir=str(tmp_path))
    assert bundle.info.num_classes == 11 and bundle.info.name == 'synthetic'
    assert bundle.info.palette.shape == (11, 3) and bundle.info.palette.dtype == np.uint8
    assert (len(bundle.labeled), len(bundle.unlabeled), len(bundle.val)) == (12, 30, 6)
    assert (tmp_path / 'split_labeled.txt').read_text().split() == [f'synthetic_labeled_{i:06d}' for i in range(12)]
    assert json.loads((tmp_path / 'split.json').read_text())['generator_seed'] == 0
    with pytest.raises(DataError, match='different split'):
        build_data(data_config(num_labeled=5), workdir=str(tmp_path))


def test_palettes():
    np.testing.assert_array_equal(palettes.palette_for('camvid')[3], (128, 64, 128))
    np.testing.assert_array_equal(palettes.palette_for('voc')[1], (128, 0, 0))
    np.testing.assert_array_equal(palettes.palette_for('voc')[15], (192, 128, 128))
    assert palettes.palette_for('cityscapes').shape == (19, 3)
    assert len({tuple(c) for c in palettes.palette_for('mine', 40)}) == 40


def test_normalize_and_mean_padding():
    pad = np.broadcast_to(np.array(augment.MEAN_RGB_UINT8, np.uint8), (2, 2, 3))
    assert np.abs(np.asarray(inputs.normalize(pad))).max() < 0.01
    white = np.asarray(inputs.normalize(np.full((1, 1, 3), 255, np.uint8)))[0, 0]
    np.testing.assert_allclose(white, (1 - np.array(inputs.IMAGENET_MEAN)) / np.array(inputs.IMAGENET_STD), rtol=1e-6)
    assert inputs.normalize(pad).dtype == np.float32


def test_weak_augment_pads_and_keeps_labels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (10, 12), dtype=np.uint8)
    seen_pad = False
    for seed in range(20):
        out, lab, _ = augment.weak_augment(np.random.default_rng(seed), image, label, 16, (0.5, 1.0, 2.0))
        assert out.shape == (16, 16, 3) and lab.shape == (16, 16)
        assert set(np.unique(lab)) <= set(range(5)) | {255}  # nearest resize: no new class ids
        pad = lab == 255
        if pad.any():
            seen_pad = True
            assert (out[pad] == augment.MEAN_RGB_UINT8).all()
    assert seen_pad
    # Scale 1, a crop as large as the image: the output is the image or its mirror.
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    lbl = rng.integers(0, 5, (8, 8), dtype=np.uint8)
    for seed in range(6):
        out, lab, _ = augment.weak_augment(np.random.default_rng(seed), img, lbl, 8, (1.0,))
        assert np.array_equal(out, img) or np.array_equal(out, img[:, ::-1])
        assert np.array_equal(lab, lbl) == np.array_equal(out, img)


@pytest.fixture(scope='module')
def bundle():
    return build_data(data_config())


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_shapes_and_dtypes(bundle):
    batch = next(make_train_loader(bundle, data_config(), seed=0))
    assert batch['image'].shape == (4, 48, 48, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (4, 48, 48) and batch['label'].dtype == np.int32
    assert batch['unlabeled0'].shape == batch['unlabeled1'].shape == (4, 48, 48, 3)
    assert not np.array_equal(batch['unlabeled0'], batch['unlabeled1'])
    assert set(np.unique(batch['label'])) <= set(range(11)) | {255}
    only = next(make_train_loader(bundle, data_config(), seed=0, with_unlabeled=False))
    assert set(only) == {'image', 'label', 'image_box'}
    # Each view's box: the image's own pixels in the crop (release augmentation), within the crop.
    boxes = batch['unlabeled0_box']
    assert boxes.shape == (4, 4) and boxes.dtype == np.int32
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 48).all() and (boxes[:, 2:] > 0).all()
    np.testing.assert_array_equal(only['image'], batch['image'])


def test_loader_state_round_trip_and_seed(bundle):
    cfg = data_config()
    loader = make_train_loader(bundle, cfg, seed=5)
    _take(loader, 3)
    state = json.loads(json.dumps(loader.get_state()))
    expected = _take(loader, 4)
    resumed = make_train_loader(bundle, cfg, seed=5)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 4)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = next(make_train_loader(bundle, cfg, seed=6))
    assert not np.array_equal(other['image'], _take(make_train_loader(bundle, cfg, seed=5), 1)[0]['image'])


def test_loader_is_the_same_with_worker_processes(bundle):
    base = _take(make_train_loader(bundle, data_config(), seed=2), 3)
    loader = make_train_loader(bundle, data_config(workers=1), seed=2)
    try:
        with_workers = _take(loader, 3)
    finally:
        loader.close()
    for a, b in zip(base, with_workers):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    loader.close()  # twice is harmless
    with pytest.raises(RuntimeError, match='closed'):
        next(loader)


def test_closed_worker_loader_exits_quietly(tmp_path):
    # Collected only at interpreter exit, grain's worker iterator would close itself again after its modules are
    # gone and print an ignored AttributeError; close() drops it while the interpreter is whole.
    script = tmp_path / 'close_loader.py'
    script.write_text(
        'from stpg_jax.config import base_config\n'
        'from stpg_jax.data import build_data, make_train_loader\n'
        'if __name__ == "__main__":\n'
        '    c = base_config().data\n'
        '    c.update(dataset="synthetic", crop_size=32, batch_labeled=2, batch_unlabeled=2, workers=1)\n'
        '    c.synthetic.update(num_labeled=4, num_unlabeled=4, num_val=2, height=32, width=48)\n'
        '    loader = make_train_loader(build_data(c), c, 0)\n'
        '    next(loader)\n'
        '    loader.close()\n'
        '    print("closed")\n'
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith('closed'), proc.stderr[-2000:]
    assert 'Exception ignored' not in proc.stderr, proc.stderr[-2000:]


def test_process_shards_make_up_the_global_batch(bundle):
    cfg = data_config()
    whole = next(make_train_loader(bundle, cfg, seed=1))
    parts = [next(make_train_loader(bundle, cfg, seed=1, process_index=p, process_count=2)) for p in range(2)]
    for key in whole:
        assert parts[0][key].shape[0] == 2
        np.testing.assert_array_equal(whole[key], np.concatenate([parts[0][key], parts[1][key]]))
    with pytest.raises(ValueError, match='not divisible by the process count 3'):
        make_train_loader(bundle, cfg, seed=1, process_index=0, process_count=3)


def test_every_pass_reshuffles():
    from stpg_jax.data.pipeline import _Stream

    src = synthetic.SyntheticSource('labeled', 8, 16, 16, seed=0)
    stream = _Stream(src, seed=0, stream_index=0, crop_size=16, scales=(1.0,), with_label=True)
    ids = [stream.order[j]['id'] for j in range(24)]
    passes = [ids[0:8], ids[8:16], ids[16:24]]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)  # each pass visits every item once
    assert passes[0] != passes[1] and passes[1] != passes[2]


def test_steps_per_epoch(bundle):
    assert bundle.steps_per_epoch(4, 4) == max(12 // 4, 30 // 4)
