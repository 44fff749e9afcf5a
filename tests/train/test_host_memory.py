"""fastvl.train.host_memory: after ``keep_freed_host_memory`` a large block comes from malloc's heap (no
mmap) and stays in the process once freed (no trim), read from glibc's own counters (``mallinfo2``).
Run in a fresh interpreter: the setting lasts for the whole process."""
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, sys
from fastvl.train.host_memory import keep_freed_host_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 << 20

def probe():
    before = libc.mallinfo2()
    block = libc.malloc(SIZE)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    return {"mmapped": during.hblkhd - before.hblkhd, "free_held": after.fordblks}

default = probe()
took = keep_freed_host_memory()
print(json.dumps({"default": default, "took": took, "kept": probe()}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_freed_blocks_stay_in_the_heap():
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout)
    size = 64 << 20
    assert out["default"]["mmapped"] >= size and out["default"]["free_held"] < size  # glibc: mmap, then unmap
    assert out["took"]
    assert out["kept"]["mmapped"] == 0 and out["kept"]["free_held"] >= size  # from the heap, and kept once freed
