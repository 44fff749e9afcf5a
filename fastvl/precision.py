"""What the hardware computes fast: shared by the trainer's ``train.precision`` and the C-Mask agent's
``agent_precision``, so both read "auto" the same way."""
import functools

import torch


@functools.cache  # the hardware does not change; the C-Mask agent asks on every forward
def cpu_has_native_bf16() -> bool:
    """True when oneDNN has bf16 kernels for this CPU (AVX512-BF16 / AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
