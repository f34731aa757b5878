"""Trains and evaluates STPG: python launch.py --config=configs/voc_blender.py:1_4 --workdir=runs/voc_1_4

A run started again with the same --workdir resumes from its latest checkpoint.
"""

from stpg_jax.host import enable_compilation_cache, tune_malloc

tune_malloc()  # before JAX allocates anything

import importlib.util  # noqa: E402
import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from stpg_jax import config as stpg_config
from stpg_jax import sharding, train
from stpg_jax.data import DataError
from stpg_jax.models.pretrained import WeightsMismatchError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, with the split and overrides after ':'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, TensorBoard events, split record.")
flags.DEFINE_string("compilation_cache", "default",
                    "Persistent XLA compilation cache, so a restarted or resumed run skips its compiles: 'default' "
                    "(<workdir>/xla_cache), another folder, or '' for none. JAX_COMPILATION_CACHE_DIR, if set, wins.")
flags.mark_flags_as_required(["config", "workdir"])


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl's parsing, with one line per mistake instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        cause = e  # an error raised inside get_config() arrives wrapped, its traceback in the text
        while cause.__context__ is not None:
            cause = cause.__context__
        fail(cause.args[0] if "Traceback" in str(e) and cause.args else e)
    except (AttributeError, KeyError) as e:  # ml_collections refusing an unknown --config.<key>: name it
        file_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
        path, _, split = file_arg.partition(":")
        spec = importlib.util.spec_from_file_location("launched_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(split or None)
        for arg in argv[1:]:
            if arg.startswith("--config."):
                try:
                    stpg_config.parent_of(config, arg[len("--config."):].split("=", 1)[0])
                except stpg_config.ConfigError as unknown:
                    fail(unknown.args[0])
        fail(f"bad --config override: {e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our progress lines go to stdout; keep absl/Orbax/tfds INFO chatter off the console.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(
        lambda record: record.levelno >= py_logging.ERROR or "tensorflow_datasets" not in record.pathname)
    enable_compilation_cache(FLAGS.compilation_cache, FLAGS.workdir)
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (stpg_config.ConfigError, DataError, WeightsMismatchError, FileNotFoundError,
            train.NonFiniteLossError, sharding.LaunchError) as e:
        fail(e)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
