"""Host-process tuning that must happen before JAX allocates anything."""

import ctypes
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
