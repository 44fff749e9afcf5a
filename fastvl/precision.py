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


def auto_precision(device: torch.device) -> str:
    """What "auto" means on ``device``: bf16 where the hardware computes it natively (CUDA compute
    capability >= 8.0, i.e. Ampere and later; CPUs with AVX512-BF16 / AMX), else fp16 with loss scaling
    on older GPUs and fp32 on other CPUs. bf16 has fp32's range, so it needs no loss scale."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"
