"""Prepare a dataset from its official layout into array_record files.

  python -m stpg_jax.data.prepare --dataset voc --manual_dir /data/voc --sbd_root /data/SegmentationClassAug \
      --data_dir ~/tensorflow_datasets
"""

import argparse
import sys

from stpg_jax.data import builders, layouts
from stpg_jax.data.errors import DataError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', required=True, choices=['voc', 'cityscapes', 'camvid', 'folder'])
    parser.add_argument('--manual_dir', required=True, help='the dataset root in its official layout (docs/data.md)')
    parser.add_argument('--data_dir', default='', help=f'where to write (default {builders.default_data_dir()})')
    parser.add_argument('--sbd_root', default='', help='VOC: SegmentationClassAug/ PNGs or SBD cls/*.mat folder')
    parser.add_argument('--class_names', default='', help='folder: comma-separated names (else classes.txt)')
    parser.add_argument('--force', action='store_true', help='prepare again even if already prepared')
    args = parser.parse_args(argv)
    names = tuple(n for n in args.class_names.split(',') if n)
    layout = layouts.make_layout(args.dataset, args.manual_dir, args.sbd_root, names)
    try:
        builder = builders.prepare(layout, args.data_dir, force=args.force)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    for split, info in builder.info.splits.items():
        print(f'{split}: {info.num_examples} examples')
    print(f'prepared in {builder.data_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
