"""Tiny datasets in each official layout: prepare, read back exactly, split lists, seeded splits, bad input."""

import io
import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from stpg_jax.config import base_config
from stpg_jax.data import DataError, build_data, builders, layouts, palettes, splits

RNG = np.random.default_rng(0)


def _image(path, h=12, w=16, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return np.asarray(Image.open(path).convert('RGB'))


def _label(path, values, h=12, w=16, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = RNG.choice(np.asarray(values, np.uint8), (h, w)).astype(np.uint8)
    im = Image.fromarray(arr, mode='L')
    if palette is not None:
        im = Image.fromarray(arr, mode='P')
        im.putpalette(palette.reshape(-1).tolist())
    im.save(path)
    return arr


def _cfg(dataset, root, data_dir, **kw):
    cfg = base_config().data
    cfg.update(dataset=dataset, root=str(root), data_dir=str(data_dir), crop_size=8, scales=(1.0,), batch_labeled=2,
               batch_unlabeled=2, workers=0, prefetch=1)
    cfg.update(kw)
    return cfg


def make_voc(root, sbd='png'):
    """VOC2012 with 3 train, 2 val ids; SBD adds 3 more (one overlaps val, so aug = 3 + 2)."""
    vd = os.path.join(root, 'VOCdevkit', 'VOC2012')
    train, val, extra = (
        ['2007_000001', '2007_000002', '2007_000003'],
        ['2007_000010', '2007_000011'],
        ['2008_000100', '2008_000101'],
    )
    truth = {}
    os.makedirs(os.path.join(vd, 'ImageSets', 'Segmentation'))
    for name, ids in (('train', train), ('val', val)):
        with open(os.path.join(vd, 'ImageSets', 'Segmentation', name + '.txt'), 'w') as f:
            f.write(''.join(i + '\n' for i in ids))
    for i in train + val + extra:
        image = _image(os.path.join(vd, 'JPEGImages', i + '.jpg'), fmt='JPEG')
        truth[i] = [image, None]
    for i in train + val:
        truth[i][1] = _label(
            os.path.join(vd, 'SegmentationClass', i + '.png'), [0, 1, 15, 20, 255], palette=palettes.VOC_PALETTE_256
        )
    sbd_root = os.path.join(root, 'sbd')
    for i in extra + [val[0]]:
        arr = RNG.choice(np.array([0, 3, 7], np.uint8), (12, 16)).astype(np.uint8)
        if sbd == 'png':
            os.makedirs(os.path.join(sbd_root, 'SegmentationClassAug'), exist_ok=True)
            Image.fromarray(arr, mode='L').save(os.path.join(sbd_root, 'SegmentationClassAug', i + '.png'))
        else:
            os.makedirs(os.path.join(sbd_root, 'dataset', 'cls'), exist_ok=True)
            scipy.io.savemat(
                os.path.join(sbd_root, 'dataset', 'cls', i + '.mat'),
                {'GTcls': {'Segmentation': arr, 'Boundaries': np.zeros((1, 20)), 'CategoriesPresent': [1]}},
            )
        if i in extra:
            truth[i][1] = arr
    return sbd_root, train, val, extra, truth


def _by_id(src):
    return {src[k]['id']: src[k] for k in range(len(src))}


@pytest.mark.parametrize('sbd', ['png', 'mat'])
def test_voc_round_trip_and_protocols(tmp_path, sbd):
    sbd_root, train, val, extra, truth = make_voc(tmp_path / 'voc', sbd)
    data_dir = tmp_path / 'tfds'
    bundle = build_data(
        _cfg('voc', tmp_path / 'voc', data_dir, sbd_root=sbd_root, protocol='blender'), workdir=str(tmp_path / 'wd')
    )
    assert bundle.info.num_classes == 21 and bundle.info.class_names[15] == 'person'
    assert sorted(bundle.labeled.ids) == sorted(train + extra) and sorted(bundle.unlabeled.ids) == sorted(train + extra)
    for i, item in {**_by_id(bundle.labeled), **_by_id(bundle.val)}.items():
        np.testing.assert_array_equal(item['image'], truth[i][0])
        np.testing.assert_array_equal(item['label'], truth[i][1])
        assert item['label'].dtype == np.uint8 and item['label'].shape == (12, 16)
    classic = build_data(
        _cfg('voc', tmp_path / 'voc', data_dir, sbd_root=sbd_root, protocol='classic', num_labeled=2, split_seed=1)
    )
    assert set(classic.labeled.ids) <= set(train) and len(classic.labeled) == 2
    assert sorted(classic.unlabeled.ids) == sorted(set(train + extra) - set(classic.labeled.ids))
    assert 'label' not in classic.unlabeled[0]
    assert (tmp_path / 'wd' / 'split_labeled.txt').read_text().split() == list(bundle.labeled.ids)


def test_voc_lists_in_public_formats(tmp_path):
    sbd_root, train, val, extra, _ = make_voc(tmp_path / 'voc')
    lab, unl = tmp_path / 'labeled.txt', tmp_path / 'train_aug_unlabeled_1-2.txt'
    lab.write_text(f'JPEGImages/{train[1]}.jpg SegmentationClassAug/{train[1]}.png\n{extra[0]}\n')  # CPS + U2PL
    unl.write_text(f'{extra[1]}\n# a comment\n\n{train[0]}\n')
    bundle = build_data(
        _cfg(
            'voc',
            tmp_path / 'voc',
            tmp_path / 'tfds',
            sbd_root=sbd_root,
            protocol='blender',
            labeled_list=str(lab),
            unlabeled_list=str(unl),
        ),
        workdir=str(tmp_path / 'wd'),
    )
    assert list(bundle.labeled.ids) == [train[1], extra[0]]
    assert list(bundle.unlabeled.ids) == [extra[1], train[0]]
    assert 'labeled_list_sha256' in (tmp_path / 'wd' / 'split.json').read_text()
    with pytest.raises(DataError, match='names 2 labelled images but num_labeled is 5'):
        build_data(
            _cfg('voc', tmp_path / 'voc', tmp_path / 'tfds', sbd_root=sbd_root, labeled_list=str(lab), num_labeled=5)
        )
    bad = tmp_path / 'bad.txt'
    bad.write_text('2007_000001\n2099_999999\n')
    with pytest.raises(DataError, match=r"bad.txt names 1 id\(s\) not in .*'2099_999999'"):
        build_data(_cfg('voc', tmp_path / 'voc', tmp_path / 'tfds', sbd_root=sbd_root, labeled_list=str(bad)))


def make_cityscapes(root, train_ids_for=()):
    truth = {}
    for split, names in (
        ('train', ['aachen_000000_000019', 'bremen_000001_000019', 'bremen_000002_000019']),
        ('val', ['lindau_000000_000019']),
    ):
        for n in names:
            city = n.split('_')[0]
            image = _image(os.path.join(root, 'leftImg8bit', split, city, n + '_leftImg8bit.png'))
            base = os.path.join(root, 'gtFine', split, city, n + '_gtFine_')
            if n in train_ids_for:
                train = _label(base + 'labelTrainIds.png', [0, 5, 18, 255])
                truth[n] = (image, train)
            else:
                ids = _label(base + 'labelIds.png', [0, 1, 7, 8, 11, 26, 33, 30, 4])
                truth[n] = (image, ids)
    return truth


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    truth = make_cityscapes(tmp_path / 'cs', train_ids_for=('bremen_000002_000019',))
    bundle = build_data(_cfg('cityscapes', tmp_path / 'cs', tmp_path / 'tfds', num_labeled=2, split_seed=3))
    assert bundle.info.num_classes == 19 and len(bundle.labeled) == 2 and len(bundle.unlabeled) == 1
    mapping = {0: 255, 1: 255, 4: 255, 7: 0, 8: 1, 11: 2, 26: 13, 30: 255, 33: 18}
    items = {**_by_id(bundle.labeled), **_by_id(bundle.val)}
    for n, item in items.items():
        image, raw = truth[n]
        np.testing.assert_array_equal(item['image'], image)
        expected = raw if n == 'bremen_000002_000019' else np.vectorize(mapping.get)(raw).astype(np.uint8)
        np.testing.assert_array_equal(item['label'], expected)
    assert set(items) | set(bundle.unlabeled.ids) == set(truth)
    lst = tmp_path / 'cs_labeled.txt'
    lst.write_text(
        'leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png '
        'gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png\n'
    )
    one = build_data(_cfg('cityscapes', tmp_path / 'cs', tmp_path / 'tfds', labeled_list=str(lst)))
    assert list(one.labeled.ids) == ['bremen_000001_000019']


def test_a_prepared_copy_from_another_root_is_used_and_named(tmp_path, capsys):
    import shutil

    make_cityscapes(tmp_path / 'cs')
    first = build_data(_cfg('cityscapes', tmp_path / 'cs', tmp_path / 'tfds', num_labeled=2))
    assert first.provenance['prepared_from'] == str(tmp_path / 'cs') and 'note:' not in capsys.readouterr().err
    shutil.move(tmp_path / 'cs', tmp_path / 'moved')
    again = build_data(_cfg('cityscapes', tmp_path / 'moved', tmp_path / 'tfds', num_labeled=2))
    assert list(again.labeled.ids) == list(first.labeled.ids)
    assert again.provenance['prepared_from'] == str(tmp_path / 'cs')
    assert again.provenance['root'] == str(tmp_path / 'moved')
    err = capsys.readouterr().err
    assert f"read from {tmp_path / 'cs'}; using that copy" in err and '--force' in err


def make_folder(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / 'classes.txt').write_text('ground 10 20 30\nwall 40 50 60\nlamp 70 80 90\n')
    truth = {}
    for i in ('a', 'b', 'c', 'v'):
        truth[i] = (
            _image(str(root / 'images' / f'{i}.png')),
            _label(str(root / 'labels' / f'{i}.png'), [0, 1, 2, 255]),
        )
    for i in ('u1', 'u2'):
        truth[i] = (_image(str(root / 'images' / f'{i}.jpg'), fmt='JPEG'), None)
    (root / 'val.txt').write_text('v\n')
    return truth


def test_folder_dataset(tmp_path):
    truth = make_folder(tmp_path / 'mine')
    bundle = build_data(_cfg('folder', tmp_path / 'mine', tmp_path / 'tfds', num_labeled=2, split_seed=0))
    assert bundle.info.class_names == ('ground', 'wall', 'lamp')
    np.testing.assert_array_equal(bundle.info.palette, [[10, 20, 30], [40, 50, 60], [70, 80, 90]])
    assert list(bundle.val.ids) == ['v'] and len(bundle.labeled) == 2
    assert sorted(_by_id(bundle.unlabeled)) == sorted({'a', 'b', 'c', 'u1', 'u2'} - set(bundle.labeled.ids))
    for n, item in {**_by_id(bundle.labeled), **_by_id(bundle.val)}.items():
        np.testing.assert_array_equal(item['image'], truth[n][0])
        np.testing.assert_array_equal(item['label'], truth[n][1])
    for n, item in _by_id(bundle.unlabeled).items():
        np.testing.assert_array_equal(item['image'], truth[n][0])
    from stpg_jax.data import make_train_loader

    batch = next(make_train_loader(bundle, _cfg('folder', '', ''), seed=0))
    assert batch['unlabeled0'].shape == (2, 8, 8, 3)


def test_preparing_leaves_no_temporary_directories(tmp_path, monkeypatch):
    import tempfile

    make_folder(tmp_path / 'mine')
    scratch = tmp_path / 'scratch'
    scratch.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
    builder = _prepare_folder(tmp_path / 'mine', tmp_path / 'tfds')
    assert builder.is_prepared() and builders.get_builder(builder._layout, str(tmp_path / 'tfds')).is_prepared()
    assert os.listdir(scratch) == []


def test_prepare_command(tmp_path, capsys):
    from stpg_jax import cli
    from stpg_jax.data import prepare

    make_folder(tmp_path / 'mine')
    assert (
        prepare.main(
            ['--dataset', 'folder', '--manual_dir', str(tmp_path / 'mine'), '--data_dir', str(tmp_path / 'tfds')]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert 'train: 3 examples' in out and 'unlabeled: 2 examples' in out
    with pytest.raises(SystemExit) as exited:
        cli.run(prepare.main, ['--dataset', 'camvid', '--manual_dir', str(tmp_path / 'nowhere'),
                               '--data_dir', str(tmp_path / 'tfds')])
    assert exited.value.code == cli.EXIT_ERROR
    assert 'nowhere does not exist' in capsys.readouterr().err


# ---- seeded splits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'dataset,protocol,pool', [('voc', 'classic', 1464), ('voc', 'blender', 10582), ('cityscapes', None, 2975)]
)
def test_seeded_splits_have_published_counts(dataset, protocol, pool):
    ids = [f'img_{k:05d}' for k in range(pool)]
    aug = ids + [f'aug_{k:05d}' for k in range(10582 - pool)] if protocol == 'classic' else ids
    expected = {
        'voc/classic': [92, 183, 366, 732, 1464],
        'voc/blender': [662, 1323, 2646, 5291, 10582],
        'cityscapes/None': [186, 372, 744, 1488, 2975],
    }[f'{dataset}/{protocol}']
    for name, count in zip(['1_16', '1_8', '1_4', '1_2', 'full'], expected):
        n = splits.num_labeled_for(dataset, name, protocol)
        assert n == count
        labeled, unlabeled, prov = splits.choose_split(ids, aug, num_labeled=n, seed=7)
        again, _, _ = splits.choose_split(ids, aug, num_labeled=n, seed=7)
        assert len(labeled) == count and labeled == again and len(set(labeled)) == count
        assert set(labeled) <= set(ids) and prov['labeled_source'] == 'seeded'
        if count < len(aug):
            assert not set(labeled) & set(unlabeled) and len(unlabeled) == len(aug) - count
        else:  # every image labelled: the unlabelled streams reuse the whole pool
            assert sorted(unlabeled) == sorted(aug)
    other, _, _ = splits.choose_split(ids, aug, num_labeled=expected[0], seed=8)
    assert other != splits.choose_split(ids, aug, num_labeled=expected[0], seed=7)[0]


def test_list_entries_parse_to_ids():
    assert splits.id_from_entry('2007_000032') == '2007_000032'
    assert splits.id_from_entry('/JPEGImages/2007_000032.jpg') == '2007_000032'
    assert splits.id_from_entry('leftImg8bit/train/jena/jena_000017_000019_leftImg8bit.png') == 'jena_000017_000019'
    assert splits.id_from_entry('/SegNet/CamVid/train/0001TP_006690.png') == '0001TP_006690'


# ---- bad input ---------------------------------------------------------------------------------------------


def _prepare_folder(root, data_dir):
    return builders.prepare(layouts.FolderLayout(str(root)), str(data_dir))


def _assert_nothing_prepared(data_dir, root):
    builder = builders.get_builder(layouts.FolderLayout(str(root)), str(data_dir))
    assert not builder.is_prepared()
    leftovers = [d for _, dirs, _ in os.walk(data_dir) for d in dirs if d[0].isdigit()]
    assert not leftovers, leftovers  # no version directory that could read as complete


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r'directory .*nope does not exist \(expected the SegNet CamVid folder'):
        build_data(_cfg('camvid', tmp_path / 'nope', tmp_path / 'tfds'))
    with pytest.raises(DataError, match=r'VOCdevkit.*does not exist'):
        (tmp_path / 'empty').mkdir()
        build_data(_cfg('voc', tmp_path / 'empty', tmp_path / 'tfds'))
    make_cityscapes(tmp_path / 'cs')
    with pytest.raises(
        DataError,
        match=r'cityscapes is not prepared in .*notprepared and data.prepare_if_missing is False; run `python -m',
    ):
        build_data(_cfg('cityscapes', tmp_path / 'cs', tmp_path / 'notprepared', prepare_if_missing=False))


def test_missing_and_corrupt_images(tmp_path):
    make_folder(tmp_path / 'mine')
    (tmp_path / 'mine' / 'images' / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    with pytest.raises(DataError, match=r'image .*b\.png cannot be read'):
        _prepare_folder(tmp_path / 'mine', tmp_path / 'tfds')
    _assert_nothing_prepared(tmp_path / 'tfds', tmp_path / 'mine')
    truncated = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(truncated, format='JPEG')
    (tmp_path / 'mine' / 'images' / 'b.png').write_bytes(truncated.getvalue()[:200])
    with pytest.raises(DataError, match=r'image .*b\.png cannot be read'):
        _prepare_folder(tmp_path / 'mine', tmp_path / 'tfds')
    _, train, _, _, _ = make_voc(tmp_path / 'voc')
    os.remove(tmp_path / 'voc' / 'VOCdevkit' / 'VOC2012' / 'JPEGImages' / f'{train[2]}.jpg')
    with pytest.raises(DataError, match=rf'image .*{train[2]}\.jpg does not exist'):
        build_data(_cfg('voc', tmp_path / 'voc', tmp_path / 'tfds2', sbd_root=str(tmp_path / 'voc' / 'sbd')))


def test_label_values_out_of_range(tmp_path):
    make_folder(tmp_path / 'mine')
    _label(str(tmp_path / 'mine' / 'labels' / 'c.png'), [0, 1, 7])
    with pytest.raises(DataError, match=r'label .*c\.png has values \[7\] outside \[0, 3\) and not the ignore'):
        _prepare_folder(tmp_path / 'mine', tmp_path / 'tfds')
    _assert_nothing_prepared(tmp_path / 'tfds', tmp_path / 'mine')
    make_cityscapes(tmp_path / 'cs')
    _label(str(tmp_path / 'cs' / 'gtFine' / 'val' / 'lindau' / 'lindau_000000_000019_gtFine_labelIds.png'), [7, 40])
    with pytest.raises(
        DataError,
        match=r'lindau_000000_000019_gtFine_labelIds\.png has values \[40\] outside the '
        r'Cityscapes labelIds',
    ):
        build_data(_cfg('cityscapes', tmp_path / 'cs', tmp_path / 'tfds'))


def test_image_label_size_mismatch(tmp_path):
    make_folder(tmp_path / 'mine')
    _label(str(tmp_path / 'mine' / 'labels' / 'a.png'), [0, 1], h=10, w=16)
    with pytest.raises(DataError, match=r'label .*a\.png is 16x10 \(WxH\) but image .*a\.png is 16x12'):
        _prepare_folder(tmp_path / 'mine', tmp_path / 'tfds')
    _assert_nothing_prepared(tmp_path / 'tfds', tmp_path / 'mine')


def test_split_list_with_unknown_id(tmp_path):
    make_folder(tmp_path / 'mine')
    (tmp_path / 'mine' / 'val.txt').write_text('v\nzz\n')
    with pytest.raises(DataError, match=r"val\.txt names 1 id\(s\) not in the labelled images .*'zz'"):
        _prepare_folder(tmp_path / 'mine', tmp_path / 'tfds')
    _assert_nothing_prepared(tmp_path / 'tfds', tmp_path / 'mine')


def test_folder_without_unlabelled_images(tmp_path):
    make_folder(tmp_path / 'mine')
    for i in ('u1', 'u2'):
        os.remove(tmp_path / 'mine' / 'images' / f'{i}.jpg')
    bundle = build_data(_cfg('folder', tmp_path / 'mine', tmp_path / 'tfds', num_labeled=1))
    assert len(bundle.labeled) == 1 and sorted(bundle.unlabeled.ids) == sorted(
        {'a', 'b', 'c'} - set(bundle.labeled.ids)
    )
    full = build_data(_cfg('folder', tmp_path / 'mine', tmp_path / 'tfds'))
    # Every image labelled: the unlabelled streams reuse all of them (without their labels).
    assert sorted(full.unlabeled.ids) == ['a', 'b', 'c']
    from stpg_jax.data import make_train_loader

    with pytest.raises(DataError, match='labelled split is empty'):
        make_train_loader(
            build_data(_cfg('folder', tmp_path / 'mine', tmp_path / 'tfds', num_labeled=0)),
            _cfg('folder', '', ''),
            seed=0,
        )
