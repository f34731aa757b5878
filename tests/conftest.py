"""Shared test set-up: four virtual CPU devices and JAX's persistent compilation cache."""

import os

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
