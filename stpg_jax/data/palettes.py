"""Class names and colour palettes (C, 3) uint8 of the supported datasets."""

import numpy as np

VOC_CLASSES = (
    'background',
    'aeroplane',
    'bicycle',
    'bird',
    'boat',
    'bottle',
    'bus',
    'car',
    'cat',
    'chair',
    'cow',
    'diningtable',
    'dog',
    'horse',
    'motorbike',
    'person',
    'pottedplant',
    'sheep',
    'sofa',
    'train',
    'tvmonitor',
)

CITYSCAPES_CLASSES = (
    'road',
    'sidewalk',
    'building',
    'wall',
    'fence',
    'pole',
    'traffic light',
    'traffic sign',
    'vegetation',
    'terrain',
    'sky',
    'person',
    'rider',
    'car',
    'truck',
    'bus',
    'train',
    'motorcycle',
    'bicycle',
)

# SegNet's 11-class CamVid; its void class (id 11) maps to the ignore index.
CAMVID_CLASSES = (
    'sky',
    'building',
    'pole',
    'road',
    'pavement',
    'tree',
    'sign_symbol',
    'fence',
    'car',
    'pedestrian',
    'bicyclist',
)

# The embedded road scenes use CamVid's classes, so one palette serves both.
SYNTHETIC_CLASSES = CAMVID_CLASSES


def _voc_palette(n=256):
    """The PASCAL VOC bit-interleaved colour map (the colours in VOC's palette PNGs)."""
    palette = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


VOC_PALETTE_256 = _voc_palette()
VOC_PALETTE = VOC_PALETTE_256[:21]

CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    np.uint8,
)

# Read from camvid11.png of the SegNet CamVid folder (one pixel per class id).
CAMVID_PALETTE = np.array(
    [
        (128, 128, 128),
        (128, 0, 0),
        (192, 192, 128),
        (128, 64, 128),
        (60, 40, 222),
        (128, 128, 0),
        (192, 128, 128),
        (64, 64, 128),
        (64, 0, 128),
        (64, 64, 0),
        (0, 128, 192),
    ],
    np.uint8,
)

SYNTHETIC_PALETTE = CAMVID_PALETTE

# Share of the labelled pixels per class, percent: CamVid train from the dataset folder's README.md (void excluded;
# tests/test_data_camvid.py checks it against the prepared data), the embedded scenes as measured in docs/data.md.
PIXEL_SHARES = {
    'camvid': {'sky': 17.54, 'building': 24.21, 'pole': 1.02, 'road': 32.96, 'pavement': 4.67, 'tree': 10.12,
               'sign_symbol': 1.22, 'fence': 1.17, 'car': 6.11, 'pedestrian': 0.67, 'bicyclist': 0.30},
    'synthetic': {'sky': 15.10, 'building': 18.00, 'pole': 1.00, 'road': 29.48, 'pavement': 16.34, 'tree': 10.71,
                  'sign_symbol': 0.83, 'fence': 0.98, 'car': 5.98, 'pedestrian': 0.75, 'bicyclist': 0.84},
}


def rare_classes(name, threshold=0.02):
    """Classes of dataset ``name`` with less than ``threshold`` of its labelled pixels (PIXEL_SHARES); () when the
    shares of ``name`` are not known."""
    return tuple(c for c, share in PIXEL_SHARES.get(name, {}).items() if share / 100 < threshold)


_BY_NAME = {
    'voc': VOC_PALETTE,
    'cityscapes': CITYSCAPES_PALETTE,
    'camvid': CAMVID_PALETTE,
    'synthetic': SYNTHETIC_PALETTE,
}


def generic_palette(num_classes):
    """Distinct colours for a user's own classes (VOC's colour map, which has 256 distinct entries)."""
    if num_classes > 255:
        raise ValueError(f'at most 255 classes are supported, got {num_classes}')
    return VOC_PALETTE_256[:num_classes].copy()


def palette_for(name, num_classes=None):
    """The (C, 3) uint8 palette of a dataset by name; other names get a generic palette of num_classes."""
    if name in _BY_NAME:
        return _BY_NAME[name].copy()
    if num_classes is None:
        raise ValueError(f'unknown dataset {name!r}: pass num_classes for a generic palette')
    return generic_palette(num_classes)


def colorize(label, palette, ignore_index=255, ignore_color=(0, 0, 0)):
    """(H, W) class ids → (H, W, 3) uint8 colours; the ignore value gets ignore_color."""
    label = np.asarray(label)
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = palette
    table[ignore_index] = ignore_color
    return table[label]
