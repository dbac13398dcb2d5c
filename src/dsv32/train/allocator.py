"""Keep freed memory in the process for reuse: a training step frees and reallocates the same large
tensors every step, and on Linux each fresh large allocation costs one page fault per 4 KB page.

glibc serves every allocation above its mmap threshold (128 KB, rising with use to 32 MB) with a fresh
`mmap`, unmaps it when freed and trims the heap, so the large activations and gradients of every step
are faulted in (and zeroed by the kernel) again. On the bench's 73M-parameter shape (`bench/train.py`,
batch 8 x 256, fp32) that is 110,000-175,000 minor page faults and 0.25-0.43 s of system CPU time per
step; with `retain_freed_memory()`, 0-3,000 faults and under 0.05 s. This is what
PyTorch's CPU tuning guide gets from jemalloc or tcmalloc, done with the allocator the process already has.

The cost: memory freed by the process is not returned to the operating system, so the resident size
stays at the run's peak. That suits a training run, whose peak repeats every step; a server is left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


def retain_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and the trimming of the heap, for this whole process.

    Returns True when the setting is in effect (now or from an earlier call); False where the C library
    is not glibc (macOS, musl), which leaves the process unchanged.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success; both must hold, or large blocks would still be unmapped when freed
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _applied
