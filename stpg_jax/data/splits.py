"""Labelled/unlabelled splits: public list files, seeded splits, and the record written into the workdir.

List formats accepted (first whitespace-separated token of each non-empty line; '#' starts a comment):
  - one image id per line (U2PL's labeled.txt / unlabeled.txt): `2007_000032`
  - a path naming the image, optionally followed by the label path (CPS's train_aug_labeled_1-8.txt, SegNet's
    CamVid lists, Cityscapes lists): `JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png`,
    `leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png gtFine/...`
The id is the file name without directory and extension; for Cityscapes also without `_leftImg8bit`.
"""

import hashlib
import json
import os

import numpy as np

from stpg_jax.data.errors import DataError

# DESIGN.md §7: labelled counts per split name.
PUBLISHED_COUNTS = {
    ('voc', 'classic'): {'1_16': 92, '1_8': 183, '1_4': 366, '1_2': 732, 'full': 1464},
    ('voc', 'blender'): {'1_16': 662, '1_8': 1323, '1_4': 2646, '1_2': 5291, 'full': 10582},
    ('cityscapes', None): {'1_16': 186, '1_8': 372, '1_4': 744, '1_2': 1488, 'full': 2975},
}

_CITYSCAPES_SUFFIXES = (
    '_leftImg8bit',
    '_gtFine_labelIds',
    '_gtFine_labelTrainIds',
    '_gtFine_color',
    '_gtFine_instanceIds',
)


def num_labeled_for(dataset, split_name, protocol=None):
    """The published labelled count for a split name ('1_16' … 'full'); -1 for 'full' on other datasets."""
    key = (dataset, protocol if dataset == 'voc' else None)
    if key in PUBLISHED_COUNTS and split_name in PUBLISHED_COUNTS[key]:
        return PUBLISHED_COUNTS[key][split_name]
    if split_name == 'full':
        return -1
    raise ValueError(f'no published count for dataset={dataset!r} protocol={protocol!r} split={split_name!r}')


def id_from_entry(entry):
    """A list entry (id or path) → image id."""
    name = entry.replace('\\', '/').rstrip('/').rsplit('/', 1)[-1]
    stem = name.rsplit('.', 1)[0] if '.' in name else name
    for suffix in _CITYSCAPES_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_id_list(path):
    """Ids in a list file, in file order; DataError if it is missing, empty or repeats an id."""
    if not os.path.isfile(path):
        raise DataError(f'split list {path} does not exist (expected a text file with one image id or path per line)')
    ids, seen = [], set()
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            line = line.split('#', 1)[0].strip()
            if not line:
                continue
            image_id = id_from_entry(line.split()[0])
            if image_id in seen:
                raise DataError(f'split list {path} line {lineno}: id {image_id!r} appears twice')
            seen.add(image_id)
            ids.append(image_id)
    if not ids:
        raise DataError(f'split list {path} names no image (expected one image id or path per line)')
    return ids


def check_known(ids, known, path, what):
    """DataError naming the list file and the first id that is not in `known`."""
    known = set(known)
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise DataError(
            f'split list {path} names {len(unknown)} id(s) not in the {what}, first {unknown[0]!r} '
            f'(expected ids of the {what}, {len(known)} images)'
        )


def seeded_subset(pool, count, seed):
    """`count` ids drawn without replacement from `pool` (sorted first, so the result depends only on the set)."""
    pool = sorted(pool)
    if not 0 <= count <= len(pool):
        raise DataError(f'cannot draw {count} labelled images from a pool of {len(pool)}')
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), len(pool), count]))
    chosen = rng.choice(len(pool), size=count, replace=False)
    return [pool[i] for i in sorted(chosen)]


def choose_split(
    labeled_pool, unlabeled_pool, num_labeled=-1, seed=0, labeled_list='', unlabeled_list='', what='training set'
):
    """Labelled and unlabelled ids plus provenance.

    labeled_pool: ids that may be labelled (with label files); unlabeled_pool: ids usable as unlabelled (a superset
    of labeled_pool or disjoint from it). Unlabelled = unlabeled_pool minus the labelled ids, unless a list is given.
    """
    provenance = {'num_labeled_requested': int(num_labeled), 'seed': int(seed)}
    if labeled_list:
        labeled = read_id_list(labeled_list)
        check_known(labeled, labeled_pool, labeled_list, f'labelled pool of the {what}')
        if num_labeled >= 0 and num_labeled != len(labeled):
            raise DataError(
                f'split list {labeled_list} names {len(labeled)} labelled images but num_labeled is '
                f'{num_labeled} (set num_labeled to {len(labeled)} or -1)'
            )
        provenance.update(
            labeled_source='file', labeled_list=os.path.abspath(labeled_list), labeled_list_sha256=_sha256(labeled_list)
        )
    else:
        count = len(labeled_pool) if num_labeled < 0 else num_labeled
        labeled = seeded_subset(labeled_pool, count, seed)
        provenance.update(labeled_source='seeded', labeled_pool_size=len(labeled_pool))
    if unlabeled_list:
        unlabeled = read_id_list(unlabeled_list)
        check_known(unlabeled, unlabeled_pool, unlabeled_list, f'unlabelled pool of the {what}')
        provenance.update(
            unlabeled_source='file',
            unlabeled_list=os.path.abspath(unlabeled_list),
            unlabeled_list_sha256=_sha256(unlabeled_list),
        )
    else:
        chosen = set(labeled)
        unlabeled = [i for i in sorted(unlabeled_pool) if i not in chosen]
        provenance.update(unlabeled_source='rest of the unlabelled pool', unlabeled_pool_size=len(unlabeled_pool))
        if not unlabeled and unlabeled_pool:
            # 'full': every image is labelled; the unlabelled streams then reuse the whole pool without its labels.
            unlabeled = sorted(unlabeled_pool)
            provenance.update(unlabeled_source='whole pool (every image labelled)')
    provenance.update(num_labeled=len(labeled), num_unlabeled=len(unlabeled))
    return labeled, unlabeled, provenance


def _sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_split(workdir, labeled, unlabeled, provenance):
    """split_labeled.txt, split_unlabeled.txt and split.json in workdir.

    If the workdir already holds a different split (a resumed run whose config changed), raise instead of
    silently training on another split.
    """
    os.makedirs(workdir, exist_ok=True)
    files = {
        'split_labeled.txt': ''.join(i + '\n' for i in labeled),
        'split_unlabeled.txt': ''.join(i + '\n' for i in unlabeled),
    }
    for name, text in files.items():
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                if f.read() != text:
                    raise DataError(
                        f'{path} holds a different split than this config makes; use a new workdir, or '
                        f'pass that file as the split list to continue with it'
                    )
    for name, text in files.items():
        _atomic_write(os.path.join(workdir, name), text)
    _atomic_write(os.path.join(workdir, 'split.json'), json.dumps(provenance, indent=2, sort_keys=True) + '\n')


def _atomic_write(path, text):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)
