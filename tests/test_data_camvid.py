"""The real CamVid train split from ../shared/data/camvid, prepared and read through the pipeline."""

import os
from pathlib import Path

import numpy as np
import pytest

from stpg_jax.config import base_config
from stpg_jax.data import build_data, make_train_loader

SHARED = Path(os.environ.get('STPG_SHARED', Path(__file__).resolve().parents[2] / 'shared'))
CAMVID = SHARED / 'data' / 'camvid'

# README.md of the CamVid folder: pixel share on train, void excluded, in percent.
README_SHARES = {
    'road': 32.96,
    'building': 24.21,
    'sky': 17.54,
    'tree': 10.12,
    'car': 6.11,
    'pavement': 4.67,
    'sign_symbol': 1.22,
    'fence': 1.17,
    'pole': 1.02,
    'pedestrian': 0.67,
    'bicyclist': 0.30,
}
README_VOID = 3.95

pytestmark = pytest.mark.skipif(not (CAMVID / 'train.txt').is_file(), reason=f'no CamVid data at {CAMVID}')


@pytest.fixture(scope='module')
def config(tmp_path_factory):
    cfg = base_config().data
    cfg.update(dataset='camvid', root=str(CAMVID), data_dir=str(tmp_path_factory.mktemp('tfds')), num_labeled=46,
               crop_size=96, scales=(0.5, 1.0), batch_labeled=2, batch_unlabeled=2, workers=0, prefetch=1)
    return cfg


@pytest.fixture(scope='module')
def bundle(config):
    return build_data(config)


def test_camvid_train_split_class_shares(bundle, config):
    full = build_data(dict(config, num_labeled=-1))
    assert len(full.labeled) == 367 and len(full.val) == 101
    # "full": every frame is labelled, and the unlabelled streams reuse all of them.
    assert len(full.unlabeled) == 367
    counts = np.zeros(256, np.int64)
    for i in range(len(full.labeled)):
        item = full.labeled[i]
        assert item['image'].shape == (360, 480, 3) and item['label'].shape == (360, 480)
        counts += np.bincount(item['label'].ravel(), minlength=256)
    assert counts[11:255].sum() == 0  # void (11) is stored as the ignore value
    shares = 100 * counts[:11] / counts[:11].sum()
    for name, share in zip(full.info.class_names, shares):
        assert abs(share - README_SHARES[name]) <= 0.05, (name, share, README_SHARES[name])
    assert abs(100 * counts[255] / counts.sum() - README_VOID) <= 0.05


def test_camvid_image_matches_the_file(bundle):
    from PIL import Image

    item = bundle.val[0]
    np.testing.assert_array_equal(item['image'], np.asarray(Image.open(CAMVID / 'val' / f'{item["id"]}.jpg')))
    raw = np.asarray(Image.open(CAMVID / 'valannot' / f'{item["id"]}.png'))
    np.testing.assert_array_equal(item['label'], np.where(raw == 11, 255, raw))


def test_camvid_semi_supervised_loader(bundle, config):
    assert len(bundle.labeled) == 46 and len(bundle.unlabeled) == 367 - 46
    batch = next(make_train_loader(bundle, config, seed=0))
    assert batch['image'].shape == (2, 96, 96, 3) and batch['unlabeled1'].shape == (2, 96, 96, 3)
    assert set(np.unique(batch['label'])) <= set(range(11)) | {255}
