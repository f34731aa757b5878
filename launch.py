"""Trains and evaluates STPG: python launch.py --config=configs/voc_blender.py:1_4 --workdir=runs/voc_1_4

A run started again with the same --workdir resumes from its latest checkpoint.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from stpg_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, with the split and overrides after ':'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, TensorBoard events, split record.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (FileNotFoundError, ValueError, KeyError, train.NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
