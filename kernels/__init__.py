"""fastvl_kernels: the three fused ops of fastvl, usable on their own (torch and triton only).

- ``value_weighted_topk_reward``: C-Mask's cross-modal reward (eq. 4) per query row, [B, H, T].
- ``sample_spans``: C-Mask's span-mask and factorization-order sampling (eq. 2) with log-probs.
- ``permutation_attention``: attention under the generalized-LM kind/step rule, mask built on the fly.
  ``encode_rule`` turns kind/step into the per-token codes every implementation reads (the one
  definition of the rule; ``EncodedRule.visible`` / ``.dense``); ``permutation_mask`` is the rule
  written out directly, the oracle the tests compare against.

Each has a PyTorch reference (``*_reference``), a Triton kernel (CUDA) and a C++ kernel (CPU, from
csrc/), chosen by ``impl="auto"``.
"""
import sys

if __name__ != "fastvl_kernels":
    # Run from the repository root, this folder is also importable as plain `kernels`, and transformers
    # imports whatever `kernels` it finds while probing for Hugging Face's package of that name.
    # Executing these modules a second time would define the torch ops again and free the first
    # registration under its live callers (a segfault later), so hand out the one real package.
    import importlib

    sys.modules[__name__] = importlib.import_module("fastvl_kernels")
else:
    from ._cpp import HAS_CPP
    from .perm_attention import (
        CONTEXT,
        ORIGINAL,
        PSEUDO,
        EncodedRule,
        encode_rule,
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
        "EncodedRule",
        "encode_rule",
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
