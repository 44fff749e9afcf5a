"""Picks an implementation of a fused op for a device.

Every op accepts ``impl="auto" | "reference" | "triton" | "cpp"``. ``auto`` takes Triton on CUDA,
the C++ kernel on CPU when csrc/ was built, and the PyTorch reference otherwise. Naming an
implementation that cannot run on the given tensors is an error, never a silent fallback.
"""
import torch

from ._cpp import HAS_CPP
from ._triton import HAS_TRITON, triton_runs_on

IMPLS = ("auto", "reference", "triton", "cpp")


def choose_impl(op: str, impl: str, device: torch.device, has_cpp_op: bool) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and HAS_TRITON:
            return "triton"
        if device.type == "cpu" and has_cpp_op:
            return "cpp"
        return "reference"
    if impl == "triton" and not triton_runs_on(device):
        raise RuntimeError(
            f"{op}: the Triton kernel needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
            f"(got device {device}, triton installed: {HAS_TRITON})"
        )
    if impl == "cpp" and (device.type != "cpu" or not has_cpp_op):
        raise RuntimeError(
            f"{op}: the C++ kernel needs CPU tensors and a built extension "
            f"(device {device}, extension built: {HAS_CPP}); run `make setup` or `pip install --no-build-isolation -e .`"
        )
    return impl
