"""Shared test set-up: four virtual CPU devices and JAX's persistent compilation cache."""

import os

import pytest

# Must happen before jax initialises its backends. The test programs are tiny: without LLVM's optimisations XLA
# compiles them in about half the time (a network initialiser 8 s -> 2 s), and they run in milliseconds either way.
# The benchmarks and training runs the tests start as subprocesses inherit this.
CPU_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {CPU_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from stpg_jax.host import tune_malloc  # noqa: E402

tune_malloc()

import jax  # noqa: E402

_CACHE = os.environ.get(
    "STPG_TEST_COMPILATION_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"),
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# pytest-xdist: each test file whole on one worker (its module fixtures built once), as --dist loadfile does, except
# that files which run the same training programs share a worker, and with it jit's in-process cache: the pictures'
# run is test_train.py's loop run with images on (the same compiled step). xdist's loadgroup marks would say this, but
# with pytest 9 they no longer reach its scheduler (it rewrites a node id attribute pytest 9 does not read); its
# scheduler hook, with the file scheduler's scope function mapped, does.
SAME_WORKER = {"tests/test_visualize.py": "tests/test_train.py"}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class FilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid):
            scope = super()._split_scope(nodeid)
            return SAME_WORKER.get(scope, scope)

    return FilesTogether(config, log)


@pytest.fixture(scope="module")
def one_device_runs():
    """Training runs built with the default mesh use one device (their sharded forms are tests/test_train_step.py's
    and the two-process test's): one compiled step, which the loop's tests share, and speculative matching as on a
    single GPU."""
    from stpg_jax import sharding

    make_mesh = sharding.make_mesh
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sharding, "make_mesh", lambda devices=None: make_mesh(jax.devices()[:1] if devices is None
                                                                            else devices))
        yield
