"""The official on-disk layouts: find the examples of each split, read and validate images and labels.

Every problem raises DataError naming the file or directory and what was expected. Labels come out as
(H, W) uint8 class ids in [0, C) or 255 (ignore).
"""

import dataclasses
import glob
import hashlib
import io
import os
import re
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from stpg_jax.data import palettes
from stpg_jax.data.errors import DataError
from stpg_jax.data.splits import check_known, read_id_list

IGNORE = 255
_IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    image_path: str
    label_path: Optional[str]  # None: an unlabelled image


def require_dir(path, what):
    if not os.path.isdir(path):
        raise DataError(f'directory {path} does not exist (expected {what})')
    return path


def read_image(path):
    """(bytes to store, (H, W)). RGB files are stored as they are; other modes are converted and stored as PNG."""
    if not os.path.isfile(path):
        raise DataError(f'image {path} does not exist')
    try:
        with open(path, 'rb') as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode != 'RGB':
                buf = io.BytesIO()
                im.convert('RGB').save(buf, format='PNG')
                data = buf.getvalue()
    except DataError:
        raise
    except Exception as e:  # PIL raises several types for truncated or foreign files.
        raise DataError(f'image {path} cannot be read ({type(e).__name__}: {e}); expected a readable RGB image file')
    return data, (size[1], size[0])


def open_label(path):
    """A label file as a PIL image (loaded)."""
    if not os.path.isfile(path):
        raise DataError(f'label {path} does not exist')
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as e:
        raise DataError(f'label {path} cannot be read ({type(e).__name__}: {e}); expected a PNG label image')


def single_channel(im, path):
    if im.mode not in ('L', 'P', 'I', 'I;16'):
        raise DataError(f'label {path} has mode {im.mode}; expected a single-channel PNG of class ids')
    return np.asarray(im)


def check_values(label, num_classes, path, allowed=''):
    bad = (label >= num_classes) & (label != IGNORE)
    if bad.any():
        values = sorted(set(np.unique(label[bad]).tolist()))
        raise DataError(
            f'label {path} has values {values[:10]} outside [0, {num_classes}) and not the ignore value '
            f'{IGNORE}{allowed}'
        )
    return label.astype(np.uint8)


def encode_label(label):
    buf = io.BytesIO()
    Image.fromarray(label.astype(np.uint8), mode='L').save(buf, format='PNG')
    return buf.getvalue()


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


class Layout:
    """Base: a dataset root and how to read it."""

    name: str
    class_names: tuple
    config_name = 'default'
    version_note = ''

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def palette(self):
        return palettes.palette_for(self.name, self.num_classes)

    def check(self):
        """Validate the top-level directories; cheap."""
        raise NotImplementedError

    def split_examples(self) -> Dict[str, List[Example]]:
        raise NotImplementedError

    def decode_label(self, example: Example) -> np.ndarray:
        raise NotImplementedError

    def split_source(self, split) -> str:
        """The list file or folder a split's examples come from, for messages."""
        return self.root

    def pools(self, protocol):
        """(labelled pool split, unlabelled pool split) in prepared split names."""
        return 'train', 'train'

    def read_example(self, example: Example):
        """Validated, encoded record: image bytes, label PNG bytes, has_label, id."""
        data, size = read_image(example.image_path)
        if example.label_path is None:
            label = np.full((1, 1), IGNORE, np.uint8)
        else:
            label = self.decode_label(example)
            if label.shape != size:
                raise DataError(
                    f'label {example.label_path} is {label.shape[1]}x{label.shape[0]} (WxH) but image '
                    f'{example.image_path} is {size[1]}x{size[0]}; expected the same size'
                )
        return {
            'image': data,
            'label': encode_label(label),
            'has_label': example.label_path is not None,
            'id': example.id,
        }


class VocLayout(Layout):
    """VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt} plus SBD.

    sbd_root: a folder with SegmentationClassAug/*.png (single-channel), or SBD's folder with cls/*.mat
    (also accepted: its parent holding dataset/cls). Splits: train (1464 fine), val (1449), and with SBD
    train_aug (10582 = train ∪ SBD − val; fine labels where VOC has them, SBD's elsewhere).
    """

    name = 'voc'
    class_names = palettes.VOC_CLASSES

    def __init__(self, root, sbd_root=''):
        self.root, self.sbd_root = root, sbd_root
        self.config_name = 'aug' if sbd_root else 'fine'

    def voc_dir(self):
        for cand in (os.path.join(self.root, 'VOCdevkit', 'VOC2012'), os.path.join(self.root, 'VOC2012'), self.root):
            if os.path.isdir(os.path.join(cand, 'JPEGImages')):
                return cand
        require_dir(self.root, 'the folder that holds VOCdevkit/')
        raise DataError(
            f'directory {os.path.join(self.root, "VOCdevkit", "VOC2012")} does not exist (expected '
            f'VOCdevkit/VOC2012/JPEGImages and SegmentationClass under {self.root})'
        )

    def sbd_labels(self):
        """id → label path (.png or .mat)."""
        root = self.sbd_root
        require_dir(root, 'SBD: a folder with SegmentationClassAug/ PNGs or cls/*.mat')
        for sub, ext in (('SegmentationClassAug', '.png'), ('cls', '.mat'), (os.path.join('dataset', 'cls'), '.mat')):
            d = os.path.join(root, sub)
            if os.path.isdir(d):
                files = sorted(glob.glob(os.path.join(d, '*' + ext)))
                if files:
                    return {_stem(p): p for p in files}
        raise DataError(
            f'directory {root} holds no SBD labels (expected {root}/SegmentationClassAug/*.png or {root}/cls/*.mat)'
        )

    def check(self):
        vd = self.voc_dir()
        require_dir(os.path.join(vd, 'SegmentationClass'), 'VOC2012 palette label PNGs')
        for s in ('train', 'val'):
            p = os.path.join(vd, 'ImageSets', 'Segmentation', s + '.txt')
            if not os.path.isfile(p):
                raise DataError(f'split list {p} does not exist (expected the VOC2012 segmentation {s} list)')
        if self.sbd_root:
            self.sbd_labels()

    def split_examples(self):
        vd = self.voc_dir()
        ids = {s: read_id_list(os.path.join(vd, 'ImageSets', 'Segmentation', s + '.txt')) for s in ('train', 'val')}

        def ex(i, label_path):
            return Example(i, os.path.join(vd, 'JPEGImages', i + '.jpg'), label_path)

        fine = lambda i: os.path.join(vd, 'SegmentationClass', i + '.png')
        out = {s: [ex(i, fine(i)) for i in sorted(ids[s])] for s in ('train', 'val')}
        if self.sbd_root:
            sbd = self.sbd_labels()
            train, val = set(ids['train']), set(ids['val'])
            aug = sorted((train | set(sbd)) - val)
            out['train_aug'] = [ex(i, fine(i) if i in train else sbd[i]) for i in aug]
        return out

    def pools(self, protocol):
        if not self.sbd_root:
            raise DataError(
                'VOC training needs the 10582-image aug set: set sbd_root to a folder with '
                'SegmentationClassAug/*.png or SBD\'s cls/*.mat'
            )
        if protocol == 'classic':
            return 'train', 'train_aug'
        if protocol == 'blender':
            return 'train_aug', 'train_aug'
        raise ValueError(f"VOC protocol must be 'classic' or 'blender', got {protocol!r}")

    def decode_label(self, example):
        path = example.label_path
        if path.endswith('.mat'):
            label = _read_sbd_mat(path)
        else:
            im = open_label(path)
            if im.mode == 'RGB':
                label = _rgb_to_index(np.asarray(im), palettes.VOC_PALETTE_256[:21], path)
            else:
                label = single_channel(im, path)
        return check_values(label, self.num_classes, path)


def _read_sbd_mat(path):
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
        seg = mat['GTcls']['Segmentation'][0, 0]
    except Exception as e:
        raise DataError(
            f'label {path} cannot be read as an SBD cls .mat ({type(e).__name__}: {e}); expected a '
            f'struct GTcls with a Segmentation field'
        )
    return np.asarray(seg)


def _rgb_to_index(rgb, palette, path):
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    table = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(palette)}
    table[(224 << 16) | (224 << 8) | 192] = IGNORE  # VOC's void colour
    out = np.full(keys.shape, 254, np.uint8)
    for k, v in table.items():
        out[keys == k] = v
    if (out == 254).any():
        raise DataError(f'label {path} is RGB with colours outside the VOC palette; expected palette colours')
    return out


# Cityscapes labelIds (0..33) → 19 train ids; everything else → ignore.
_CITYSCAPES_TRAIN_IDS = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
CITYSCAPES_LABEL_TO_TRAIN = np.full(256, 254, np.uint8)
CITYSCAPES_LABEL_TO_TRAIN[:34] = IGNORE
for _k, _v in _CITYSCAPES_TRAIN_IDS.items():
    CITYSCAPES_LABEL_TO_TRAIN[_k] = _v
CITYSCAPES_LABEL_TO_TRAIN[IGNORE] = IGNORE


class CityscapesLayout(Layout):
    """leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png + gtFine/{train,val}/<city>/<id>_gtFine_labelIds.png
    (or _gtFine_labelTrainIds.png); ids are `<city>_<seq>_<frame>`."""

    name = 'cityscapes'
    class_names = palettes.CITYSCAPES_CLASSES

    def __init__(self, root):
        self.root = root

    def check(self):
        require_dir(self.root, 'the Cityscapes folder with leftImg8bit/ and gtFine/')
        for s in ('train', 'val'):
            require_dir(os.path.join(self.root, 'leftImg8bit', s), f'Cityscapes {s} images in <city>/ folders')
            require_dir(os.path.join(self.root, 'gtFine', s), f'Cityscapes {s} fine labels in <city>/ folders')

    def split_examples(self):
        out = {}
        for s in ('train', 'val'):
            images = sorted(glob.glob(os.path.join(self.root, 'leftImg8bit', s, '*', '*_leftImg8bit.png')))
            if not images:
                raise DataError(
                    f'directory {os.path.join(self.root, "leftImg8bit", s)} holds no <city>/*_leftImg8bit.png images'
                )
            examples = []
            for p in images:
                image_id = os.path.basename(p)[: -len('_leftImg8bit.png')]
                city = os.path.basename(os.path.dirname(p))
                base = os.path.join(self.root, 'gtFine', s, city, image_id + '_gtFine_')
                label = base + 'labelIds.png'
                if not os.path.isfile(label) and os.path.isfile(base + 'labelTrainIds.png'):
                    label = base + 'labelTrainIds.png'
                examples.append(Example(image_id, p, label))
            out[s] = examples
        return out

    def decode_label(self, example):
        path = example.label_path
        label = single_channel(open_label(path), path)
        if path.endswith('_labelTrainIds.png'):
            return check_values(label, self.num_classes, path)
        label = label.astype(np.int64)
        bad = sorted(set(np.unique(label[(label > 33) & (label != IGNORE)]).tolist()))
        if bad:
            raise DataError(f'label {path} has values {bad[:10]} outside the Cityscapes labelIds [0, 33]')
        return CITYSCAPES_LABEL_TO_TRAIN[label]


class CamvidLayout(Layout):
    """SegNet CamVid: {train,val,test}.txt of `image label` pairs (relative to the folder or SegNet-absolute),
    else train/ + trainannot/ (same for val, test). Labels hold class ids 0..10 directly; 11 (void) → ignore."""

    name = 'camvid'
    class_names = palettes.CAMVID_CLASSES

    def __init__(self, root):
        self.root = root

    def check(self):
        require_dir(self.root, 'the SegNet CamVid folder with train/, trainannot/, val/, valannot/')
        for s in ('train', 'val'):
            if not os.path.isfile(os.path.join(self.root, s + '.txt')):
                require_dir(os.path.join(self.root, s), f'CamVid {s} images (or a {s}.txt list)')
                require_dir(os.path.join(self.root, s + 'annot'), f'CamVid {s} labels (or a {s}.txt list)')

    def _resolve(self, entry, sub):
        """A list entry → a path under root (SegNet lists hold /SegNet/CamVid/<sub>/<file>)."""
        if not os.path.isabs(entry):
            return os.path.join(self.root, entry)
        return os.path.join(self.root, sub, os.path.basename(entry))

    def split_examples(self):
        out = {}
        for s in ('train', 'val', 'test'):
            lst = os.path.join(self.root, s + '.txt')
            if os.path.isfile(lst):
                examples = []
                with open(lst, encoding='utf-8') as f:
                    for lineno, line in enumerate(f, 1):
                        parts = line.split()
                        if not parts:
                            continue
                        if len(parts) != 2:
                            raise DataError(
                                f'split list {lst} line {lineno}: expected `image label`, got {line.strip()!r}'
                            )
                        examples.append(
                            Example(_stem(parts[0]), self._resolve(parts[0], s), self._resolve(parts[1], s + 'annot'))
                        )
            elif os.path.isdir(os.path.join(self.root, s)):
                examples = [
                    Example(_stem(p), p, os.path.join(self.root, s + 'annot', _stem(p) + '.png'))
                    for p in _images_in(os.path.join(self.root, s))
                ]
            else:
                continue
            out[s] = sorted(examples, key=lambda e: e.id)
        return out

    def split_source(self, split):
        lst = os.path.join(self.root, split + '.txt')
        return f'split list {lst}' if os.path.isfile(lst) else f'folder {os.path.join(self.root, split)}'

    def decode_label(self, example):
        path = example.label_path
        label = single_channel(open_label(path), path).astype(np.int64)
        label = np.where(label == 11, IGNORE, label)
        return check_values(label, self.num_classes, path, ' (11 is void)')


def _images_in(d):
    return sorted(p for p in glob.glob(os.path.join(d, '*')) if os.path.splitext(p)[1].lower() in _IMAGE_EXTS)


class FolderLayout(Layout):
    """A user's own dataset:

      root/classes.txt   one class name per line, in class-id order (optionally `name R G B` for its colour)
      root/images/       <id>.jpg / .png … (RGB)
      root/labels/       <id>.png single-channel class ids, 255 = ignore; images without one are unlabelled
      root/val.txt       ids (one per line) held out for evaluation; they need labels
    Splits: train (labelled, not in val), val, unlabeled (images without a label file).
    """

    name = 'folder'

    def __init__(self, root, class_names=()):
        self.root = root
        self._class_names = tuple(class_names)
        digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:8]
        self.config_name = re.sub(r'[^a-z0-9_]', '_', os.path.basename(os.path.abspath(root)).lower()) + '_' + digest
        self._colours = None

    @property
    def class_names(self):
        if self._class_names:
            return self._class_names
        self._read_classes()
        return self._class_names

    @property
    def palette(self):
        if self._colours is None and not self._class_names:
            self._read_classes()
        if self._colours is not None and len(self._colours) == self.num_classes:
            return np.asarray(self._colours, np.uint8)
        return palettes.generic_palette(self.num_classes)

    def _read_classes(self):
        path = os.path.join(self.root, 'classes.txt')
        if not os.path.isfile(path):
            raise DataError(f'class list {path} does not exist (expected one class name per line, or set class_names)')
        names, colours = [], []
        with open(path, encoding='utf-8') as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if len(parts) >= 4 and all(p.isdigit() for p in parts[-3:]):
                    names.append(' '.join(parts[:-3]))
                    colours.append(tuple(int(p) for p in parts[-3:]))
                else:
                    names.append(line.strip())
        if not names:
            raise DataError(f'class list {path} is empty (expected one class name per line)')
        if not self._class_names:
            self._class_names = tuple(names)
        self._colours = colours if len(colours) == len(names) else None

    def check(self):
        require_dir(self.root, 'a dataset folder with images/, labels/, classes.txt and val.txt')
        require_dir(os.path.join(self.root, 'images'), 'the RGB images <id>.jpg/.png')
        require_dir(os.path.join(self.root, 'labels'), 'single-channel label PNGs <id>.png')
        if not self._class_names:
            self._read_classes()

    def split_examples(self):
        images = {_stem(p): p for p in _images_in(os.path.join(self.root, 'images'))}
        if not images:
            raise DataError(f'directory {os.path.join(self.root, "images")} holds no images')
        labels = {_stem(p): p for p in glob.glob(os.path.join(self.root, 'labels', '*.png'))}
        orphans = sorted(set(labels) - set(images))
        if orphans:
            raise DataError(f'label {labels[orphans[0]]} has no image {orphans[0]}.* in {self.root}/images')
        val_list = os.path.join(self.root, 'val.txt')
        val = set(read_id_list(val_list))
        check_known(val, labels, val_list, 'labelled images of ' + self.root)
        ex = lambda i: Example(i, images[i], labels.get(i))
        out = {'train': [ex(i) for i in sorted(labels) if i not in val], 'val': [ex(i) for i in sorted(val)]}
        unlabeled = [ex(i) for i in sorted(images) if i not in labels]
        if unlabeled:
            out['unlabeled'] = unlabeled
        return out

    def pools(self, protocol):
        return 'train', 'train+unlabeled'

    def split_source(self, split):
        if split == 'val':
            return f'split list {os.path.join(self.root, "val.txt")}'
        return f'labelled images of {self.root}/labels not listed in {os.path.join(self.root, "val.txt")}'

    def decode_label(self, example):
        path = example.label_path
        return check_values(single_channel(open_label(path), path).astype(np.int64), self.num_classes, path)


def make_layout(dataset, root, sbd_root='', class_names=()):
    if dataset == 'voc':
        return VocLayout(root, sbd_root)
    if dataset == 'cityscapes':
        return CityscapesLayout(root)
    if dataset == 'camvid':
        return CamvidLayout(root)
    if dataset == 'folder':
        return FolderLayout(root, class_names)
    raise ValueError(f"unknown dataset {dataset!r}; expected 'synthetic', 'voc', 'cityscapes', 'camvid' or 'folder'")
