"""One process of a two-process CPU run of the trainer (tests/test_train.py starts two of these).

    python tests/multiprocess_worker.py WORKDIR SIGTERM_AT_BATCH

The multi-process set-up comes from the environment, as for launch.py (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); each process gets 2 virtual CPU devices. The run is tests/test_train.py's loop config with an
evaluation every 2 steps; process 1 alone sends itself SIGTERM when it draws batch SIGTERM_AT_BATCH, and both
processes must still stop after the same step. Then process 0 alone exports the Gen-Student of the checkpoint, as
the trainer does at the end of a run, while process 1 exits. Prints ``RESULT <json>`` with what train_and_evaluate
returned.
"""

import json
import os
import signal
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"  # as conftest
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from stpg_jax import checkpoint, export, train  # noqa: E402
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
    workdir, at = sys.argv[1], int(sys.argv[2])
    cache = os.environ.get("STPG_TEST_COMPILATION_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if os.environ.get("JAX_PROCESS_ID") == "1":
        make_loader = train.make_train_loader
        train.make_train_loader = lambda *a, **k: _SignalAt(make_loader(*a, **k), at)
    config = loop_config(**{"eval.every_steps": 2})
    result = train.train_and_evaluate(config, workdir)
    summary = {k: float(result[k]) for k in ("miou", "stopped_at") if k in result}
    summary.update(process_index=jax.process_index(), process_count=jax.process_count())
    if jax.process_index() == 0:
        _, variables, num_classes = checkpoint.load_gen_student(workdir)
        export.export_model(os.path.join(workdir, "export_by_process_0"), model_config=config.model,
                            num_classes=num_classes, dataset_name="synthetic", class_names=(), variables=variables,
                            eval_window=config.eval.window)
    print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
