"""fastvl_kernels: the three fused ops of fastvl, usable on their own (torch and triton only).

- ``value_weighted_topk_reward``: C-Mask's cross-modal reward (eq. 4) per query row, [B, H, T].
- ``sample_spans``: C-Mask's span-mask and factorization-order sampling (eq. 2) with log-probs.
- ``permutation_attention``: attention under the generalized-LM kind/step rule, mask built on the fly.

Each has a PyTorch reference (``*_reference``), a Triton kernel (CUDA) and a C++ kernel (CPU, from
csrc/), chosen by ``impl="auto"``.
"""
from ._cpp import HAS_CPP
from .perm_attention import (
    CONTEXT,
    ORIGINAL,
    PSEUDO,
    permutation_attention,
    permutation_attention_reference,
    permutation_mask,
)
from .reward import value_weighted_topk_reward, value_weighted_topk_reward_reference
from .span_sampling import SpanSample, sample_spans, sample_spans_reference, span_action_log_prob

__all__ = [
    "HAS_CPP",
    "CONTEXT",
    "ORIGINAL",
    "PSEUDO",
    "permutation_attention",
    "permutation_attention_reference",
    "permutation_mask",
    "value_weighted_topk_reward",
    "value_weighted_topk_reward_reference",
    "SpanSample",
    "sample_spans",
    "sample_spans_reference",
    "span_action_log_prob",
]
