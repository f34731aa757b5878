"""One process of a two-process CPU run of the trainer (tests/test_train.py starts two of these).

    python tests/multiprocess_worker.py WORKDIR [--sigterm_at_batch N] [--resume]

The multi-process set-up comes from the environment, as for launch.py (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); each process gets 2 virtual CPU devices. With --sigterm_at_batch N, process 1 alone sends itself
SIGTERM when it draws its N-th batch: both processes must still stop after the same step; with --resume both then
call train_and_evaluate again on the same work directory. Prints a line ``RESULT <json>`` for each call with what it
returned.
"""

import argparse
import json
import os
import signal
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from stpg_jax import train  # noqa: E402
from test_train import loop_config  # noqa: E402


class _SignalAt:
    """The trainer's loader, sending this process SIGTERM when batch ``at`` is drawn."""

    def __init__(self, loader, at):
        self.loader, self.at, self.drawn = loader, at, 0

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--sigterm_at_batch", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="after a stop, run train_and_evaluate again")
    args = p.parse_args()
    cache = os.environ.get("STPG_TEST_COMPILATION_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    make_loader = train.make_train_loader
    if args.sigterm_at_batch and os.environ.get("JAX_PROCESS_ID") == "1":
        train.make_train_loader = lambda *a, **k: _SignalAt(make_loader(*a, **k), args.sigterm_at_batch)
    while True:
        result = train.train_and_evaluate(loop_config(), args.workdir)
        summary = {k: float(result[k]) for k in ("miou", "stopped_at") if k in result}
        summary.update(process_index=jax.process_index(), process_count=jax.process_count())
        print("RESULT " + json.dumps(summary), flush=True)
        if "stopped_at" not in result or not args.resume:
            break
        train.make_train_loader = make_loader  # resume in the same processes (their compiled programs kept)

if __name__ == "__main__":
    main()
