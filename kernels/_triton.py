"""Whether Triton kernels can run: on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device) -> bool:
    return HAS_TRITON and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))
