"""Trains and evaluates STPG: python launch.py --config=configs/voc_blender.py:1_4 --workdir=runs/voc_1_4

A run started again with the same --workdir resumes from its latest checkpoint.
"""

from stpg_jax.host import enable_compilation_cache, tune_malloc

tune_malloc()  # before JAX allocates anything

import logging as py_logging  # noqa: E402
import sys

from absl import flags, logging
from ml_collections import config_flags

from stpg_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, with the split and overrides after ':'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, TensorBoard events, split record.")
flags.DEFINE_string("compilation_cache", "default",
                    "Persistent XLA compilation cache, so a restarted or resumed run skips its compiles: 'default' "
                    "(<workdir>/xla_cache), another folder, or '' for none. JAX_COMPILATION_CACHE_DIR, if set, wins.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if not FLAGS.workdir.strip():  # '' would be the current directory
        cli.fail("empty work directory, --workdir, expected a path")
    # Our progress lines go to stdout; keep absl/Orbax/tfds INFO chatter off the console.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(
        lambda record: record.levelno >= py_logging.ERROR or "tensorflow_datasets" not in record.pathname)
    enable_compilation_cache(FLAGS.compilation_cache, FLAGS.workdir)
    from stpg_jax import train  # here, not above: a mistyped flag or config string is answered before JAX loads

    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if result.get("signal"):  # stopped by SIGTERM or Ctrl-C, with a checkpoint: tell a scheduler it did not finish
        sys.exit(cli.EXIT_INTERRUPTED)


if __name__ == "__main__":
    cli.run_absl(main)  # one `error:` line and exit status 2 for bad input, 4 for a diverged run (stpg_jax.cli)
