"""Prepare a dataset from its official layout into array_record files.

  python -m stpg_jax.data.prepare --dataset voc --manual_dir /data/voc --sbd_root /data/SegmentationClassAug \
      --data_dir ~/tensorflow_datasets
"""

import argparse

from absl import logging

from stpg_jax import cli
from stpg_jax.data import builders, layouts


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', required=True, choices=['voc', 'cityscapes', 'camvid', 'folder'])
    parser.add_argument('--manual_dir', required=True, help='the dataset root in its official layout (docs/data.md)')
    parser.add_argument('--data_dir', default='', help=f'where to write (default {builders.default_data_dir()})')
    parser.add_argument('--sbd_root', default='', help='VOC: SegmentationClassAug/ PNGs or SBD cls/*.mat folder')
    parser.add_argument('--class_names', default='', help='folder: comma-separated names (else classes.txt)')
    parser.add_argument('--force', action='store_true', help='prepare again even if already prepared')
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.ERROR)  # tfds' notes on a new local dataset are not for this console
    names = tuple(n for n in args.class_names.split(',') if n)
    layout = layouts.make_layout(args.dataset, args.manual_dir, args.sbd_root, names)
    builder = builders.prepare(layout, args.data_dir, force=args.force)
    for split, info in builder.info.splits.items():
        print(f'{split}: {info.num_examples} examples')
    print(f'prepared in {builder.data_dir}')
    return 0


if __name__ == '__main__':
    cli.run(main)  # a DataError naming the file: one `error:` line and exit status 2
