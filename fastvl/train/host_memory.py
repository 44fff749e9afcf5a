"""Host-memory reuse for CPU training.

glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
returns it to the kernel on ``free``; it also trims the top of its heap when more than 128 KB are free.
A training step on the CPU allocates and frees the same GBs every step (activations, gradients, the
optimizer's temporaries), so every step pays for page-faulting them in again and for zeroing pages
the kernel hands out. Serving all blocks from the heap and never trimming it keeps freed memory in the
process, where the next step's allocations of the same sizes find it. The process keeps its peak
footprint (which a training process reaches every step anyway).

Results do not depend on where a buffer lands: with this on, every tiny recipe at 2 threads logs
the same bits in repeated and in resumed runs (measured). (An earlier measurement blamed this for
last-bit differences; they came from a gather with repeated rows whose backward added them in thread
order, now ``index_select``; see tests/methods/test_objectives.py.) On by default
(``train.keep_host_memory``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse: no mmap-served blocks, no trimming.
    Returns whether it took effect (False off Linux/glibc). Affects the whole process from now on."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
