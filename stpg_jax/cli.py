"""How every command ends: an expected failure as one ``error:`` line, and an exit status a script can test.

``launch.py`` and every ``python -m stpg_jax.<command>`` run their main function through `run_absl` or `run`, which
turn the project's expected failures (a bad config, flag, path or file; a damaged checkpoint; a diverged run) into

    error: <what>, <which file or field>, <what was expected>

on stderr. Anything else is a bug and keeps its traceback. Exit statuses (README, "Interruption, damage and bad
input"):

    0  done
    1  predict: some images could not be read; the others' masks were written
    2  bad input or an unreadable file (config, flag, path, weights, checkpoint); nothing was written over
    3  interrupted (SIGTERM, Ctrl-C): training wrote a checkpoint of its last step first; the same command resumes
    4  the training diverged (non-finite loss or parameters); no checkpoint of that state was written
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_DIVERGED = 0, 1, 2, 3, 4


from stpg_jax.errors import InputError, NonFiniteLossError  # noqa: F401  (InputError: cli.InputError for commands)


def _check_parent(path: str, flag: str) -> None:
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"the output lies under a file, {flag}={path} ({existing} is a file), expected a path "
                         "under directories")


def check_output_dir(path: str, flag: str) -> None:
    """Refuses, before any work, an output folder that is an existing file or lies under one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"the output folder is an existing file, {flag}={path}, expected a folder (new or existing)")
    _check_parent(path, flag)


def check_new_file(path: str, flag: str) -> None:
    """Refuses, before any work, an output file that exists (nothing is overwritten) or lies under a file."""
    if os.path.exists(path):
        kind = "folder" if os.path.isdir(path) else "file"
        raise InputError(f"the output {kind} exists, {flag}={path}, expected a new file name (nothing is overwritten)")
    _check_parent(path, flag)


def _diverged_errors() -> tuple:
    return (NonFiniteLossError,)


def expected_errors() -> tuple:
    """The exception types that mean bad input or a damaged file, not a bug."""
    # Imported when an error is caught, not with this module: the commands import it before JAX, to answer a
    # mistyped flag at once.
    from stpg_jax.checkpoint import CheckpointError
    from stpg_jax.config import ConfigError
    from stpg_jax.data.errors import DataError
    from stpg_jax.models.pretrained import WeightsMismatchError
    from stpg_jax.sharding import LaunchError

    # OSError: a path that is missing, not a directory, unwritable, or a full disk; each names its file.
    return (InputError, ConfigError, DataError, WeightsMismatchError, LaunchError, CheckpointError, OSError)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line: an OSError as its reason and file, other messages with their line
    breaks joined (a list of mismatched keys stays readable)."""
    if isinstance(error, OSError) and error.strerror and error.filename and len(error.args) >= 2:
        text = f"{error.strerror.lower()}, {error.filename}"
        if error.filename2:
            text += f" -> {error.filename2}"
        return text
    text = str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = lines[0] if lines else text
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def _closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def quiet_closed_event_loops() -> None:
    """Drops the "Event loop is closed" errors that Orbax's I/O callbacks raise in background threads after a
    failed read has closed its event loop (a damaged checkpoint): noise around the one error line. Any other
    thread or finaliser error still shows."""
    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

    def on_thread(args):
        if not _closed_loop(args.exc_value):
            thread_hook(args)

    def on_unraisable(args):
        if not _closed_loop(args.exc_value):
            unraisable_hook(args)

    threading.excepthook, sys.unraisablehook = on_thread, on_unraisable
    # The sibling reads of the same failed restore end as "Task exception was never retrieved", logged by asyncio's
    # default handler with each traceback; the first failure is the one the error line names.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def fail(message, status: int = EXIT_ERROR):
    """Prints ``error: message`` (one line) on stderr and exits with ``status``."""
    text = one_line(message) if isinstance(message, BaseException) else " ".join(str(message).split())
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(status)


def guarded(fn, *args):
    """``fn(*args)`` with the expected failures ending the process as one line and their exit status; returns what
    ``fn`` returns."""
    quiet_closed_event_loops()
    try:
        return fn(*args)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or the first in any other command
        fail("interrupted by Ctrl-C, in the middle of a step or an output, what was written before is kept "
             "(a training run resumes from its last checkpoint)", EXIT_INTERRUPTED)
    except _diverged_errors() as e:
        fail(e, EXIT_DIVERGED)
    except expected_errors() as e:
        fail(e)


class ArgumentParser(argparse.ArgumentParser):
    """argparse saying a mistake as one ``error:`` line, exit status 2, instead of its usage text."""

    def error(self, message):
        fail(f"{message}, on the command line, expected the arguments `{self.prog} --help` lists")


def run(main, argv=None) -> None:
    """Runs an argparse command's ``main(argv)`` (an integer it returns is the exit status) and exits."""
    code = guarded(main, argv)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def run_absl(main) -> None:
    """``absl.app.run(main)`` with flags parsed by `parse_flags` and ``main`` run through `guarded`."""
    from absl import app

    def checked_main(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}, on the command line, expected only --flag=value arguments")
        return guarded(main, argv)

    app.run(checked_main, flags_parser=parse_flags)


def _config_file_error(flag: str, value: str) -> str | None:
    """A message for a --<flag>=FILE[:ARG] whose file cannot be a config file, else None."""
    path = value.split(":", 1)[0]
    if not path:
        return f"no config file given, --{flag}={value!r}, expected FILE.py[:ARG], e.g. configs/demo.py:1_8"
    if not os.path.isfile(path):
        reason = "is a directory" if os.path.isdir(path) else "no such config file"
        return f"{reason}, --{flag}={path}, expected a Python file with get_config(arg), e.g. configs/demo.py:1_8"
    return None


def _root_cause(error: BaseException) -> BaseException:
    """The first expected error in ``error``'s chain whose text is not a wrapped traceback: ml_collections and absl
    re-raise a config file's own error inside theirs, with its traceback in the text."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    from stpg_jax.config import ConfigError

    expected = (ConfigError, InputError, OSError)  # what flags can raise; light, so a typo is answered at once
    for candidate in chain:
        text = str(candidate)
        if isinstance(candidate, expected) and "Traceback" not in text and "Error whilst parsing" not in text:
            return candidate
    return chain[0]


def _unknown_override(flag: str, value: str, argv) -> str | None:
    """Which --<flag>.<key>=... of ``argv`` names no field of the config, as ConfigError's message."""
    import importlib.util

    from stpg_jax import config as stpg_config

    path, _, arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("stpg_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for item in argv[1:]:
        if item.startswith(f"--{flag}."):
            try:
                stpg_config.parent_of(config, item[len(flag) + 3:].split("=", 1)[0])
            except stpg_config.ConfigError as unknown:
                return str(unknown)
    return None


def parse_flags(argv):
    """absl's flag parsing with one line per mistake instead of a traceback or a usage page: unknown and malformed
    flags, a config file that does not exist (ml_collections defers that error to the first field access), a bad
    split or override inside the config string, an unknown --config.<key>."""
    from absl import flags

    FLAGS = flags.FLAGS
    config_flags = [name for name, flag in FLAGS._flags().items()
                    if type(flag).__name__ == "_ConfigFlag" and name == flag.name]
    given = {name: a.split("=", 1)[1] for a in argv[1:] for name in config_flags if a.startswith(f"--{name}=")}
    for name, value in given.items():
        message = _config_file_error(name, value)
        if message:
            fail(message)
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        fail(_root_cause(e))
    except (AttributeError, KeyError) as e:  # ml_collections refusing an unknown --config.<key>: name it
        for name, value in given.items():
            message = _unknown_override(name, value, argv)
            if message:
                fail(message)
        fail(f"bad config override {e}, on the command line, expected --config.<field>=<value> of a known field")
    for name in config_flags:
        if FLAGS[name].present:
            try:
                FLAGS[name].value.get("seed")  # a config that failed to load raises only when read
            except OSError as e:
                fail(_root_cause(e))
    return rest
