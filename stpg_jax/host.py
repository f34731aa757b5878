"""Host-process tuning that must happen before JAX allocates anything."""

import ctypes
import os
import sys

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8


def tune_malloc() -> bool:
    """Keeps freed buffers in the process instead of returning them to the kernel after every step.

    XLA's CPU runtime allocates and frees its large temporaries every step; with glibc's defaults each one is a
    fresh mmap whose pages fault in again, which on small machines costs more system time than the step computes
    (measured here: a CPU training step 1.5x faster). No effect outside glibc/Linux. Returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_ARENA_MAX, 2)
    ok &= libc.mallopt(_M_TOP_PAD, 1 << 30)
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    ok &= libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(ok)


def compilation_cache_dir(setting: str, workdir: str, environ=None):
    """Where compiled XLA programs persist, or None: ``setting`` is 'default' (``<workdir>/xla_cache``), a folder,
    or '' (no cache). ``JAX_COMPILATION_CACHE_DIR`` in the environment wins over all three: JAX reads it itself."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    if not setting:
        return None
    return os.path.join(workdir, "xla_cache") if setting == "default" else setting


def enable_compilation_cache(setting: str, workdir: str):
    """Turns JAX's persistent compilation cache on (see `compilation_cache_dir`), so that a run started again,
    e.g. resumed after preemption, loads its train and eval steps instead of compiling them. Returns the folder."""
    path = compilation_cache_dir(setting, workdir)
    if path is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
    return path
