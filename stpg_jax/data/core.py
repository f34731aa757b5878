"""build_data: from config.data to labelled / unlabelled / val sources plus the dataset's description."""

import dataclasses
import os
import sys
from typing import Any, Tuple

import numpy as np

from stpg_jax.data import builders, layouts, palettes, splits, synthetic
from stpg_jax.data.errors import DataError
from stpg_jax.data.sources import ConcatSource, PreparedSource

DATASETS = ('synthetic', 'voc', 'cityscapes', 'camvid', 'folder')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: Tuple[str, ...]
    palette: Any  # (C, 3) uint8
    ignore_index: int = 255


@dataclasses.dataclass
class DataBundle:
    info: DatasetInfo
    labeled: Any
    unlabeled: Any
    val: Any
    provenance: dict

    def steps_per_epoch(self, batch_labeled, batch_unlabeled):
        """DESIGN.md §5: an epoch = max(#labelled // batch_labeled, #unlabelled // batch_unlabeled) steps."""
        return max(
            len(self.labeled) // batch_labeled, len(self.unlabeled) // batch_unlabeled if len(self.unlabeled) else 0, 1
        )


def config_field(cfg, name, default):
    """cfg[name] for a ConfigDict, dict or object; ``default`` when absent or None."""
    try:
        value = cfg[name] if name in cfg else default
    except TypeError:
        value = getattr(cfg, name, default)
    return default if value is None else value


def build_data(config, workdir=None):
    """config: config.data (ConfigDict or dict). See docs/data.md for the fields."""
    dataset = config_field(config, 'dataset', 'synthetic')
    if dataset not in DATASETS:
        raise ValueError(f'data.dataset must be one of {DATASETS}, got {dataset!r}')
    ignore_index = int(config_field(config, 'ignore_index', 255))
    if ignore_index != 255:
        raise ValueError(
            f'data.ignore_index must be 255 (labels are stored as uint8 with 255 = ignore), got {ignore_index}'
        )
    if dataset == 'synthetic':
        bundle = _build_synthetic(config)
    else:
        bundle = _build_prepared(dataset, config)
    if workdir:
        splits.write_split(workdir, _ids_of(bundle.labeled), _ids_of(bundle.unlabeled), bundle.provenance)
    return bundle


def _ids_of(source):
    if isinstance(source, PreparedSource):
        return list(source.ids)
    if isinstance(source, ConcatSource):
        return [i for s in source.sources for i in _ids_of(s)]
    if isinstance(source, synthetic.SyntheticSource):
        return [f'synthetic_{source.split}_{i:06d}' for i in range(len(source))]
    return [source[i]['id'] for i in range(len(source))]


def _build_synthetic(config):
    syn = config_field(config, 'synthetic', {})
    seed = int(config_field(syn, 'seed', 0))
    h, w = int(config_field(syn, 'height', 96)), int(config_field(syn, 'width', 128))
    num_labeled = int(config_field(config, 'num_labeled', -1))
    if num_labeled < 0:
        num_labeled = int(config_field(syn, 'num_labeled', 100))
    info = DatasetInfo(
        'synthetic', len(synthetic.CLASS_NAMES), tuple(synthetic.CLASS_NAMES), palettes.palette_for('synthetic'), 255
    )
    provenance = {
        'dataset': 'synthetic',
        'generator_seed': seed,
        'height': h,
        'width': w,
        'labeled_source': 'generated',
        'num_labeled': num_labeled,
        'num_unlabeled': int(config_field(syn, 'num_unlabeled', 400)),
        'num_val': int(config_field(syn, 'num_val', 100)),
    }
    return DataBundle(
        info=info,
        labeled=synthetic.SyntheticSource('labeled', num_labeled, h, w, seed),
        unlabeled=synthetic.SyntheticSource('unlabeled', provenance['num_unlabeled'], h, w, seed, with_label=False),
        val=synthetic.SyntheticSource('val', provenance['num_val'], h, w, seed),
        provenance=provenance,
    )


def _build_prepared(dataset, config):
    root = str(config_field(config, 'root', ''))
    if not root:
        raise DataError(f'data.root is empty; expected the {dataset} folder in its official layout (see docs/data.md)')
    layout = layouts.make_layout(
        dataset, root, str(config_field(config, 'sbd_root', '')), tuple(config_field(config, 'class_names', ()))
    )
    data_dir = str(config_field(config, 'data_dir', '')) or builders.default_data_dir()
    builder = builders.get_builder(layout, data_dir)
    if not builder.is_prepared():
        if not config_field(config, 'prepare_if_missing', True):
            raise DataError(
                f'{dataset} is not prepared in {data_dir} and data.prepare_if_missing is False; run '
                f'`python -m stpg_jax.data.prepare --dataset {dataset} --manual_dir {root} '
                f'--data_dir {data_dir}`'
            )
        builder = builders.prepare(layout, data_dir)
    meta = builder.info.metadata
    prepared_from = str(meta.get('manual_dir', ''))
    if prepared_from and prepared_from != os.path.abspath(root):
        # A prepared copy is used whatever data.root says (the original may have moved); say so when they differ.
        print(f'note: data.root is {os.path.abspath(root)}, but the {dataset} data prepared in {builder.data_dir} was '
              f'read from {prepared_from}; using that copy. To use {root} instead, run `python -m '
              f'stpg_jax.data.prepare --dataset {dataset} --manual_dir {root} --data_dir {data_dir} --force` or set '
              f'another data.data_dir.', file=sys.stderr, flush=True)
    ids = {s: list(v) for s, v in meta['ids'].items()}
    class_names = tuple(meta['class_names'])
    info = DatasetInfo(dataset, len(class_names), class_names, np.asarray(meta['palette'], np.uint8), 255)

    protocol = config_field(config, 'protocol', 'blender') if dataset == 'voc' else None
    labeled_split, unlabeled_splits = layout.pools(protocol)
    unlabeled_splits = [s for s in unlabeled_splits.split('+') if s in ids]
    unlabeled_pool = [i for s in unlabeled_splits for i in ids.get(s, [])]
    labeled, unlabeled, provenance = splits.choose_split(
        ids[labeled_split],
        unlabeled_pool,
        num_labeled=int(config_field(config, 'num_labeled', -1)),
        seed=int(config_field(config, 'split_seed', 0)),
        labeled_list=str(config_field(config, 'labeled_list', '')),
        unlabeled_list=str(config_field(config, 'unlabeled_list', '')),
        what=f'{dataset} {"+".join(unlabeled_splits)} set',
    )
    provenance.update(
        dataset=dataset,
        protocol=protocol,
        root=os.path.abspath(root),
        prepared_from=prepared_from,
        prepared_dir=str(builder.data_dir),
        labeled_split=labeled_split,
        unlabeled_splits=unlabeled_splits,
    )

    def view(split_ids, split, with_label):
        index = {i: k for k, i in enumerate(ids[split])}
        chosen = [i for i in split_ids if i in index]
        return PreparedSource(
            builder.data_dir, split, [index[i] for i in chosen], chosen, with_label, name=dataset
        ), set(chosen)

    labeled_src, _ = view(labeled, labeled_split, True)
    parts, remaining = [], list(unlabeled)
    for s in unlabeled_splits:
        src, taken = view(remaining, s, False)
        parts.append(src)
        remaining = [i for i in remaining if i not in taken]
    unlabeled_src = parts[0] if len(parts) == 1 else ConcatSource(parts)
    val_src = PreparedSource(builder.data_dir, 'val', range(len(ids['val'])), ids['val'], True, name=dataset)
    return DataBundle(info, labeled_src, unlabeled_src, val_src, provenance)
