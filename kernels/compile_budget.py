"""Register and spill budget of every Triton kernel, per case, input dtype and GPU target.

Checked by tests/kernels/test_compile.py and printed by ``python -m fastvl_kernels.compile_report``,
which compile the kernels through their launch code (``_triton.compile_for``) and read the register
count and spill bytes that Triton's bundled ptxas (-v) reports. The tile choices that meet this budget
live in the launch code (``perm_attention_triton.TILES``, ``reward.REWARD_TILES``).

Rule: no spills anywhere, fp32 included (fp32 keeps IEEE dot products and gets smaller tiles and 8
warps instead, see ``TILES``). Register ceilings are the counts measured with Triton 3.8.0, rounded up
to 8: a kernel change that adds registers fails here and the ceiling is raised on purpose, with the
occupancy cost in mind (an SM holds 64K registers: 255 per thread at 4 warps allows 2 blocks).
"""
from typing import NamedTuple, Optional

import torch

TARGETS = (80, 90)  # compute capabilities: A100 (sm_80), H100 (sm_90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Budget(NamedTuple):
    max_registers: int
    max_spill_bytes: int = 0  # spill stores + spill loads


_PERM = ("_perm_attn_fwd_kernel", "_perm_attn_bwd_dkdv_kernel", "_perm_attn_bwd_dq_kernel")
_REWARD = ("_vw_topk_reward_kernel",)
_SPANS = ("_sample_spans_kernel",)

# (case, target, dtype) -> register ceilings of the case's kernels, in launch order.
_CEILINGS = {
    ("perm_attention_d128", 80, "bf16"): (208, 240, 168),  # measured (206, 236, 168)
    ("perm_attention_d128", 80, "fp16"): (208, 240, 168),  # measured (206, 236, 168)
    ("perm_attention_d128", 80, "fp32"): (80, 112, 80),  # measured (80, 110, 80)
    ("perm_attention_d128", 90, "bf16"): (208, 248, 168),  # measured (202, 244, 168)
    ("perm_attention_d128", 90, "fp16"): (208, 248, 168),  # measured (204, 244, 168)
    ("perm_attention_d128", 90, "fp32"): (88, 104, 96),  # measured (85, 102, 94)
    ("perm_attention_d64", 80, "bf16"): (240, 168, 168),  # measured (240, 168, 168)
    ("perm_attention_d64", 80, "fp16"): (240, 168, 168),  # measured (240, 168, 168)
    ("perm_attention_d64", 80, "fp32"): (128, 128, 128),  # measured (128, 128, 128)
    ("perm_attention_d64", 90, "bf16"): (152, 232, 168),  # measured (152, 225, 167)
    ("perm_attention_d64", 90, "fp16"): (152, 232, 168),  # measured (152, 225, 167)
    ("perm_attention_d64", 90, "fp32"): (176, 248, 112),  # measured (176, 244, 108)
    ("reward_d64_top8", 80, "bf16"): (104,),  # measured (101,)
    ("reward_d64_top8", 80, "fp16"): (104,),  # measured (101,)
    ("reward_d64_top8", 80, "fp32"): (80,),  # measured (80,)
    ("reward_d64_top8", 90, "bf16"): (104,),  # measured (99,)
    ("reward_d64_top8", 90, "fp16"): (104,),  # measured (103,)
    ("reward_d64_top8", 90, "fp32"): (112,),  # measured (108,)
    ("span_sampling_learned", 80, "bf16"): (96,),  # measured (93,)
    ("span_sampling_learned", 80, "fp16"): (96,),  # measured (93,)
    ("span_sampling_learned", 80, "fp32"): (96,),  # measured (93,)
    ("span_sampling_learned", 90, "bf16"): (80,),  # measured (80,)
    ("span_sampling_learned", 90, "fp16"): (96,),  # measured (96,)
    ("span_sampling_learned", 90, "fp32"): (96,),  # measured (96,)
}

BUDGET: dict[tuple[str, str, str, str], Budget] = {
    (case, kernel, dtype, f"sm_{target}"): Budget(ceiling)
    for (case, target, dtype), ceilings in _CEILINGS.items()
    for kernel, ceiling in zip({"reward_d64_top8": _REWARD, "span_sampling_learned": _SPANS}.get(case, _PERM),
                               ceilings)
}


def over_budget(key: tuple[str, str, str, str], report) -> Optional[str]:
    """Why ``report`` (a ``_triton.CompileReport``) breaks the budget of ``key``, or None."""
    budget = BUDGET.get(key)
    if budget is None:
        return f"{key}: no budget row (add one to compile_budget.py)"
    if report.spill_bytes > budget.max_spill_bytes:
        return (f"{key}: {report.spill_bytes} bytes of register spills (budget {budget.max_spill_bytes}); "
                f"choose smaller tiles / fewer stages in the launch code")
    if report.registers > budget.max_registers:
        return f"{key}: {report.registers} registers (budget {budget.max_registers})"
    return None
