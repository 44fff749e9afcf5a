"""Loads the C++ CPU kernels built from csrc/ (``fastvl_kernels._C``), if they were built."""
import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.fastvl_cpu.*)

    HAS_CPP = True
except ImportError:
    HAS_CPP = False


def cpp_op(name: str):
    """The C++ op ``torch.ops.fastvl_cpu.<name>``, or None when csrc/ was not built."""
    if not HAS_CPP:
        return None
    return getattr(torch.ops.fastvl_cpu, name, None)
