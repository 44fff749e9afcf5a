"""Span-mask sampling with a factorization order (C-Mask eq. 2) and the action's log-prob/entropy.

The process, per row ``b`` (positions ``j < lengths[b]`` are valid; ``n`` = the row's quota):

1. **Start.** Among valid, not-yet-masked positions ``A``, draw a start ``i`` with probability
   ``w_i / Z``, ``w_j = p_j`` if ``p_j`` is finite and > 0 else 0, ``Z = sum_{j in A} w_j`` (fp32).
   Guard: if ``Z`` is 0 or not finite (all remaining ``p`` are 0 / non-finite, or the sum
   overflows), the start is uniform over ``A`` (``log 1/|A|``). Mask ``i``; a new span begins.
2. **Extension.** For ``j = i+1, i+2, ...``: stop *deterministically* (no decision, no log-prob
   term) if ``j >= length``, ``j`` is already masked, or the quota is met. Otherwise extend with
   probability ``s[j]`` -- ``s[j]`` is the probability that token ``j`` joins the span that covers
   token ``j-1`` (the paper's ``s_i``, "conditioned on its previous token having been masked").
   Extending masks ``j`` (term ``log s[j]``); not extending ends the span (term ``log(1-s[j])``).
   ``s`` is clamped to [0, 1] (NaN counts as 0).
3. Repeat 1-2 until exactly ``n`` tokens are masked. Spans are numbered ``k = 1, 2, ...`` in the
   order they were sampled (``span_id``); a span's start is its leftmost token.
4. **Order** the ``K`` spans (``step``: 1 = predicted first):

   - ``"learned"``: Plackett-Luce over span scores ``g_k = order_scores[start_k]`` (logits): stage
     ``t`` picks span ``c`` among the remaining ``R_t`` with ``softmax_{R_t}(g)_c``; term
     ``g_c - logsumexp_{R_t} g``. ``order_scores`` must be finite.
   - ``"random"``: a uniform permutation. Its log-prob ``-log K!`` is *included* (and ``log K!`` in
     the entropy), so ``log_prob`` is the true log-probability of the composite action; it is
     constant in the parameters, so it cancels in PPO ratios and adds no gradient.
   - ``"left_to_right"``: steps by start position (deterministic, no term).
   - ``"single"``: every span gets step 1 (vanilla MLM; no term).

Quota: a float ``q`` in (0, 1] masks ``ceil(q * length)`` tokens (at least 1; computed in float64
with a 1e-9 slack so that e.g. 0.15 * 20 gives 3, not 4), an int masks ``min(q, length)`` tokens.
Rows of length 0 mask nothing. ``lengths`` larger than ``L`` are clamped to ``L``.

Outputs (:class:`SpanSample`): ``mask`` [B, L] bool, ``span_id`` [B, L] int64 (0 = unmasked),
``step`` [B, L] int64 (0 = unmasked), ``log_prob`` [B] and ``entropy`` [B] float32 where

    log_prob = sum over decisions d along the trajectory of log pi(a_d | history)
    entropy  = sum over decisions d of H(pi(. | history_d))

(start categoricals over ``A``, each Bernoulli ``H(s) = -s log s - (1-s) log(1-s)``, each PL stage
``H_t = logsumexp_{R_t} g - sum_{R_t} softmax(g) g``). By the chain rule of entropy the expectation
of ``entropy`` is the joint entropy of the composite action: the unbiased estimator of C-Mask's
appendix E (Zhang et al. 2018). :func:`span_action_log_prob` recomputes both differentiably.

Randomness: the kernels draw uniform ``u`` number ``d`` of row ``b`` from Philox4x32-10 with key =
``seed`` and counter ``(d, b, 0, 0)`` -- exactly ``tl.rand(seed, (b << 32) + d)`` -- so the C++
and Triton kernels produce the same sample for the same seed (up to fp32 summation-order ties).
Each decision (start, Bernoulli, PL stage) consumes one uniform, sampled by inverse CDF in
position order. The reference uses a ``torch.Generator`` seeded with ``seed`` (same law, other
stream).

Implementations: ``reference`` (PyTorch, vectorised over rows, a Python loop over decisions),
``cpp`` (csrc/span_sampling.cpp, one row per task with ``at::parallel_for``), ``triton`` (one
program per row, the sequential loop inside the kernel; the CUDA path). All are behind the custom op
``fastvl_kernels::sample_spans`` (fake impl for ``torch.compile``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._cpp import cpp_op
from ._dispatch import choose_impl
from ._triton import HAS_TRITON, launch

ORDERS = ("learned", "left_to_right", "random", "single")
# Compile-time codes of the order modes inside the kernels.
_ORDER_CODE = {"learned": 0, "left_to_right": 1, "random": 2, "single": 3}


class SpanSample(NamedTuple):
    """One sampled span-mask action per row (see the module docstring)."""

    mask: Tensor  # [B, L] bool, True = masked
    span_id: Tensor  # [B, L] int64, 0 unmasked, k for the k-th span sampled
    step: Tensor  # [B, L] int64, factorization step of the token's span (1 = first), 0 unmasked
    log_prob: Tensor  # [B] float32, log-probability of the composite action
    entropy: Tensor  # [B] float32, sum of the conditional entropies along the trajectory


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def quota_counts(lengths: Tensor, quota, n_cols: int) -> Tensor:
    """Tokens to mask per row, int64 [B]: ``ceil(q * length)`` (>= 1) for a float, ``min(q, length)``
    for an int; 0 for empty rows. ``lengths`` are clamped to [0, n_cols]."""
    lengths = lengths.to(torch.int64).clamp(0, n_cols)
    if isinstance(quota, bool) or not isinstance(quota, (int, float)):
        raise TypeError(f"quota must be a float fraction or an int count, got {quota!r}")
    if isinstance(quota, int):
        if quota < 0:
            raise ValueError(f"an int quota is a token count and must be >= 0, got {quota}")
        return lengths.clamp(max=quota)
    if not (0.0 < quota <= 1.0):
        raise ValueError(f"a float quota is a fraction in (0, 1], got {quota}")
    counts = torch.ceil(lengths.to(torch.float64) * quota - 1e-9).to(torch.int64).clamp(min=1)
    return torch.minimum(counts, lengths)


def clean_start_weights(start_probs: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """``w_j = p_j`` where finite, > 0 and valid, else 0 (differentiable where kept)."""
    p = start_probs.to(dtype)
    keep = valid & torch.isfinite(p) & (p > 0)
    return torch.where(keep, p, torch.zeros((), dtype=dtype, device=p.device))


def xlogx(x: Tensor) -> Tensor:
    """``x log x`` with ``0 log 0 = 0`` and a finite gradient at 0 (``log(tiny)``)."""
    return x * _safe_log(x)


def _safe_log(x: Tensor) -> Tensor:
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def bernoulli_entropy(s: Tensor) -> Tensor:
    return -(xlogx(s) + xlogx(1 - s))


def _check_inputs(start_probs, cont_probs, lengths, order_scores, order):
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if start_probs.dim() != 2:
        raise ValueError(f"start_probs must be [B, L], got shape {tuple(start_probs.shape)}")
    if cont_probs.shape != start_probs.shape:
        raise ValueError(f"cont_probs {tuple(cont_probs.shape)} != start_probs {tuple(start_probs.shape)}")
    if lengths.shape != start_probs.shape[:1]:
        raise ValueError(f"lengths must be [B]={start_probs.shape[0]}, got {tuple(lengths.shape)}")
    if not (start_probs.is_floating_point() and cont_probs.is_floating_point()):
        raise TypeError("start_probs and cont_probs must be floating point")
    if lengths.is_floating_point() or lengths.is_complex():
        raise TypeError("lengths must be an integer tensor")
    devices = {start_probs.device, cont_probs.device, lengths.device}
    if order == "learned":
        if order_scores is None:
            raise ValueError('order="learned" needs order_scores [B, L] (span score = logit at its start)')
        if order_scores.shape != start_probs.shape or not order_scores.is_floating_point():
            raise ValueError(f"order_scores must be a float [B, L] tensor, got {tuple(order_scores.shape)}")
        devices.add(order_scores.device)
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def _normalize_seed(seed: int) -> int:
    # Philox takes a 64-bit key; keep it non-negative so every backend reads the same bits.
    return int(seed) % (1 << 63)


# --------------------------------------------------------------------------------------------
# Reference (PyTorch): vectorised over rows, one decision per row per loop iteration
# --------------------------------------------------------------------------------------------


def _reference_impl(start_probs, cont_probs, lengths, counts, order_scores, seed, order) -> tuple:
    B, L = start_probs.shape
    dev = start_probs.device
    pos = torch.arange(L, device=dev)
    rows = torch.arange(B, device=dev)
    lengths = lengths.to(dev, torch.int64).clamp(0, L)
    counts = torch.minimum(counts.to(dev, torch.int64).clamp(min=0), lengths)
    valid = pos < lengths[:, None]
    w = clean_start_weights(start_probs, valid, torch.float32)
    xlogx_w = torch.special.xlogy(w, w)
    s = torch.nan_to_num(cont_probs.float(), nan=0.0).clamp(0.0, 1.0)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)

    span_id = torch.zeros(B, L, dtype=torch.int64, device=dev)
    n_masked = torch.zeros(B, dtype=torch.int64, device=dev)
    n_spans = torch.zeros(B, dtype=torch.int64, device=dev)
    cursor = torch.full((B,), -1, dtype=torch.int64, device=dev)  # next position to extend, -1 = none
    log_prob = torch.zeros(B, dtype=torch.float64, device=dev)
    entropy = torch.zeros(B, dtype=torch.float64, device=dev)

    while bool((n_masked < counts).any()):
        active = n_masked < counts
        u = torch.rand(B, generator=gen, device=dev)
        cur = cursor.clamp(0, L - 1)
        cur_free = span_id.gather(1, cur[:, None]).squeeze(1) == 0
        extending = active & (cursor >= 0) & (cursor < lengths) & cur_free
        starting = active & ~extending

        # Bernoulli decision at the cursor: does token `cursor` join the span of `cursor - 1`?
        s_cur = s.gather(1, cur[:, None]).squeeze(1)
        extend = extending & (u < s_cur)
        s64 = s_cur.double()
        log_prob += torch.where(extending, torch.where(extend, torch.log(s64), torch.log1p(-s64)), 0.0)
        entropy += torch.where(extending, bernoulli_entropy(s64), 0.0)

        # Start decision: inverse CDF of the renormalised weights over the available positions.
        avail = valid & (span_id == 0)
        wa = torch.where(avail, w, 0.0)
        cum = wa.cumsum(1)
        Z = cum[:, -1]
        uniform = ~((Z > 0) & torch.isfinite(Z))
        wa = torch.where(uniform[:, None], avail.float(), wa)
        cum = torch.where(uniform[:, None], wa.cumsum(1), cum)
        Z = cum[:, -1]
        idx = ((cum <= (u * Z)[:, None]) & (cum < Z[:, None])).sum(1).clamp(max=L - 1)
        w_idx = wa.gather(1, idx[:, None]).squeeze(1).double()
        Z64 = Z.double()
        sum_xlogx = torch.where(uniform, 0.0, torch.where(avail, xlogx_w, 0.0).sum(1).double())
        log_prob += torch.where(starting, torch.log(w_idx) - torch.log(Z64), 0.0)
        entropy += torch.where(starting, torch.log(Z64) - sum_xlogx / Z64, 0.0)

        n_spans += starting.long()
        write = starting | extend
        new_pos = torch.where(starting, idx, cur)
        old = span_id[rows, new_pos]
        span_id[rows, new_pos] = torch.where(write, n_spans, old)
        n_masked += write.long()
        cursor = torch.where(write, new_pos + 1, torch.full_like(cursor, -1))

    mask = span_id > 0
    prev = torch.nn.functional.pad(span_id, (1, 0))[:, :L]
    is_start = mask & (prev != span_id)
    step = _reference_order(span_id, mask, is_start, n_spans, order_scores, order, gen, log_prob, entropy)
    return mask, span_id, step, log_prob.float(), entropy.float()


def _reference_order(span_id, mask, is_start, n_spans, order_scores, order, gen, log_prob, entropy):
    """Steps per token; adds the order's terms to log_prob/entropy in place."""
    B, L = span_id.shape
    dev = span_id.device
    if order == "single":
        return mask.long()
    if order == "left_to_right":
        return torch.where(mask, is_start.long().cumsum(1), 0)
    g = order_scores.float() if order == "learned" else torch.zeros(B, L, device=dev)
    step_at_start = torch.zeros(B, L, dtype=torch.int64, device=dev)
    for t in range(1, int(n_spans.max()) + 1 if B else 1):
        u = torch.rand(B, generator=gen, device=dev)
        remaining = is_start & (step_at_start == 0)
        has = remaining.any(1)
        m = torch.where(remaining, g, -math.inf).amax(1)
        m = torch.where(has, m, 0.0)
        e = torch.where(remaining, torch.exp(g - m[:, None]), 0.0)
        cum = e.cumsum(1)
        Z = cum[:, -1]
        idx = ((cum <= (u * Z)[:, None]) & (cum < Z[:, None])).sum(1).clamp(max=L - 1)
        g_shift = torch.where(remaining, g - m[:, None], 0.0).double()
        Z64 = torch.where(has, Z, 1.0).double()
        log_prob += torch.where(has, g_shift.gather(1, idx[:, None]).squeeze(1) - torch.log(Z64), 0.0)
        entropy += torch.where(has, torch.log(Z64) - (e.double() * g_shift).sum(1) / Z64, 0.0)
        chosen = torch.zeros_like(remaining).scatter_(1, idx[:, None], True) & has[:, None]
        step_at_start = torch.where(chosen, t, step_at_start)
    step_of_span = torch.zeros(B, L + 1, dtype=torch.int64, device=dev)
    step_of_span.scatter_(1, torch.where(is_start, span_id, 0), torch.where(is_start, step_at_start, 0))
    step_of_span[:, 0] = 0
    return step_of_span.gather(1, span_id)


# --------------------------------------------------------------------------------------------
# Triton kernel (CUDA path; runs on CPU under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _last_nonzero(a, b):
        # Associative: the scan carries the latest non-zero value to the right.
        return tl.where(b != 0, b, a)

    @triton.jit
    def _sample_spans_kernel(
        p_ptr, s_ptr, g_ptr, lengths_ptr, counts_ptr,
        mask_ptr, span_id_ptr, step_ptr, log_prob_ptr, entropy_ptr,
        seed, n_cols, stride_p, stride_s, stride_g, stride_out,
        ORDER: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program samples one row. State lives in registers as [BLOCK_L] vectors (span id per
        position, start flags); each loop iteration makes one decision with uniform number ``draw``
        of the row, ``tl.rand(seed, (row << 32) + draw)``, all drawn up front as one [BLOCK_D]
        vector (a row makes at most 3 * L decisions). Categorical draws are inverse CDFs over
        positions: with ``cum`` the inclusive running sum and ``Z`` its last value, the chosen index
        is ``#{j : cum_j <= u Z and cum_j < Z}`` (the second clause absorbs rounding when u Z
        rounds up to Z)."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_L)
        length = tl.minimum(tl.maximum(tl.load(lengths_ptr + row), 0), n_cols).to(tl.int32)
        # Clamped so that inconsistent counts can never make the loop below spin.
        n_target = tl.minimum(tl.maximum(tl.load(counts_ptr + row), 0), length).to(tl.int32)
        valid = offs < length
        p_row = p_ptr + row * stride_p
        p = tl.load(p_row + offs, mask=valid, other=0.0).to(tl.float32)
        w = tl.where((p > 0.0) & (p < float("inf")), p, 0.0)
        xlogx_w = tl.where(w > 0.0, w * tl.log(tl.where(w > 0.0, w, 1.0)), 0.0)
        draw_offs = tl.arange(0, BLOCK_D)
        uniforms = tl.rand(seed, (row << 32) + draw_offs.to(tl.int64))

        span_id = tl.zeros([BLOCK_L], dtype=tl.int32)
        is_start = tl.zeros([BLOCK_L], dtype=tl.int32)
        n_masked = tl.full([], 0, tl.int32)
        n_spans = tl.full([], 0, tl.int32)
        cursor = tl.full([], -1, tl.int32)
        draw = tl.full([], 0, tl.int32)
        log_prob = tl.full([], 0.0, tl.float32)
        entropy = tl.full([], 0.0, tl.float32)

        while n_masked < n_target:
            u = tl.sum(tl.where(draw_offs == draw, uniforms, 0.0), axis=0)
            draw += 1
            in_seq = (cursor >= 0) & (cursor < length)
            cur_taken = tl.max(tl.where(offs == cursor, span_id, 0), axis=0)
            if in_seq & (cur_taken == 0):
                # Bernoulli: token `cursor` joins the current span with probability s[cursor].
                s_cur = tl.load(s_ptr + row * stride_s + cursor).to(tl.float32)
                s_cur = tl.minimum(tl.maximum(s_cur, 0.0), 1.0)  # NaN -> 0 via maximum
                s_log = tl.log(tl.maximum(s_cur, 1e-37))
                f_log = tl.log(tl.maximum(1.0 - s_cur, 1e-37))
                entropy -= s_cur * s_log + (1.0 - s_cur) * f_log
                if u < s_cur:
                    span_id = tl.where(offs == cursor, n_spans, span_id)
                    n_masked += 1
                    cursor += 1
                    log_prob += s_log
                else:
                    cursor = tl.full([], -1, tl.int32)
                    log_prob += f_log
            else:
                avail = valid & (span_id == 0)
                cum = tl.cumsum(tl.where(avail, w, 0.0), axis=0)
                Z = tl.max(cum, axis=0)
                if (Z > 0.0) & (Z < float("inf")):
                    idx = tl.sum(tl.where((cum <= u * Z) & (cum < Z), 1, 0), axis=0)
                    log_Z = tl.log(Z)
                    p_idx = tl.load(p_row + idx).to(tl.float32)  # > 0 and finite: it was drawn
                    log_prob += tl.log(p_idx) - log_Z
                    entropy += log_Z - tl.sum(tl.where(avail, xlogx_w, 0.0), axis=0) / Z
                else:
                    # Guard: no usable weight left -> uniform over the available positions.
                    cum = tl.cumsum(tl.where(avail, 1.0, 0.0), axis=0)
                    Z = tl.max(cum, axis=0)
                    idx = tl.sum(tl.where((cum <= u * Z) & (cum < Z), 1, 0), axis=0)
                    log_Z = tl.log(Z)
                    log_prob -= log_Z
                    entropy += log_Z
                n_spans += 1
                span_id = tl.where(offs == idx, n_spans, span_id)
                is_start = tl.where(offs == idx, 1, is_start)
                n_masked += 1
                cursor = idx + 1

        if ORDER == 3:  # single
            step = tl.where(span_id > 0, 1, 0)
        elif ORDER == 1:  # left_to_right: rank of the span's start = starts at positions <= j
            step = tl.where(span_id > 0, tl.cumsum(is_start, axis=0), 0)
        else:  # learned (Plackett-Luce on the start scores) or random (all scores 0)
            if ORDER == 0:
                g = tl.load(g_ptr + row * stride_g + offs, mask=valid, other=0.0).to(tl.float32)
            else:
                g = tl.zeros([BLOCK_L], dtype=tl.float32)
            step_at_start = tl.zeros([BLOCK_L], dtype=tl.int32)
            for t in range(1, n_spans + 1):
                u = tl.sum(tl.where(draw_offs == draw, uniforms, 0.0), axis=0)
                draw += 1
                remaining = (is_start != 0) & (step_at_start == 0)
                m = tl.max(tl.where(remaining, g, float("-inf")), axis=0)
                g_shift = tl.where(remaining, g - m, 0.0)
                e = tl.where(remaining, tl.exp(g_shift), 0.0)
                cum = tl.cumsum(e, axis=0)
                Z = tl.max(cum, axis=0)
                idx = tl.sum(tl.where((cum <= u * Z) & (cum < Z), 1, 0), axis=0)
                log_Z = tl.log(Z)
                if ORDER == 0:
                    log_prob += tl.load(g_ptr + row * stride_g + idx).to(tl.float32) - m - log_Z
                else:
                    log_prob -= log_Z
                entropy += log_Z - tl.sum(e * g_shift, axis=0) / Z
                step_at_start = tl.where(offs == idx, t, step_at_start)
            # A token's span starts at the last start at or before it (spans are contiguous runs).
            step = tl.where(span_id > 0, tl.associative_scan(step_at_start, 0, _last_nonzero), 0)

        out = row * stride_out + offs
        in_row = offs < n_cols
        tl.store(mask_ptr + out, span_id > 0, mask=in_row)
        tl.store(span_id_ptr + out, span_id.to(tl.int64), mask=in_row)
        tl.store(step_ptr + out, step.to(tl.int64), mask=in_row)
        tl.store(log_prob_ptr + row, log_prob)
        tl.store(entropy_ptr + row, entropy)


def _triton_impl(start_probs, cont_probs, lengths, counts, order_scores, seed, order) -> tuple:
    B, L = start_probs.shape
    dev = start_probs.device
    p = start_probs.contiguous()
    s = cont_probs.contiguous()
    g = order_scores.contiguous() if order == "learned" else p  # unread unless learned
    lengths = lengths.to(dev, torch.int64).contiguous()
    counts = counts.to(dev, torch.int64).contiguous()
    mask = torch.empty(B, L, dtype=torch.bool, device=dev)
    span_id = torch.empty(B, L, dtype=torch.int64, device=dev)
    step = torch.empty(B, L, dtype=torch.int64, device=dev)
    log_prob = torch.empty(B, dtype=torch.float32, device=dev)
    entropy = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0 or L == 0:
        return mask, span_id, step, log_prob.zero_(), entropy.zero_()
    block = triton.next_power_of_2(L)
    launch(_sample_spans_kernel, (B,),
        p, s, g, lengths, counts, mask, span_id, step, log_prob, entropy,
        seed, L, p.stride(0), s.stride(0), g.stride(0), L,
        ORDER=_ORDER_CODE[order], BLOCK_L=block, BLOCK_D=triton.next_power_of_2(3 * L),
        num_warps=1 if block <= 256 else 4,
    )
    return mask, span_id, step, log_prob, entropy


# --------------------------------------------------------------------------------------------
# C++ kernel (CPU path)
# --------------------------------------------------------------------------------------------


def _cpp_impl(start_probs, cont_probs, lengths, counts, order_scores, seed, order) -> tuple:
    op = cpp_op("sample_spans")
    return tuple(op(start_probs, cont_probs, lengths, counts, order_scores if order == "learned" else None,
                    seed, order))


_IMPLS = {"reference": _reference_impl, "triton": _triton_impl, "cpp": _cpp_impl}


# --------------------------------------------------------------------------------------------
# Custom op: one entry point, device dispatch inside, a fake for torch.compile
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvl_kernels::sample_spans", mutates_args=())
def _sample_spans_op(
    start_probs: Tensor, cont_probs: Tensor, lengths: Tensor, counts: Tensor,
    order_scores: Optional[Tensor], seed: int, order: str, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    chosen = choose_impl("sample_spans", impl, start_probs.device, cpp_op("sample_spans") is not None)
    return _IMPLS[chosen](start_probs, cont_probs, lengths, counts, order_scores, seed, order)


@_sample_spans_op.register_fake
def _(start_probs, cont_probs, lengths, counts, order_scores, seed, order, impl):
    B, L = start_probs.shape
    return (
        start_probs.new_empty((B, L), dtype=torch.bool),
        start_probs.new_empty((B, L), dtype=torch.int64),
        start_probs.new_empty((B, L), dtype=torch.int64),
        start_probs.new_empty((B,), dtype=torch.float32),
        start_probs.new_empty((B,), dtype=torch.float32),
    )


def sample_spans(
    start_probs: Tensor, cont_probs: Tensor, lengths: Tensor, quota, seed: int, *,
    order_scores: Optional[Tensor] = None, order: str = "learned", impl: str = "auto",
) -> SpanSample:
    """Sample span masks and a factorization order per row (C-Mask eq. 2); see the module docstring.

    Args:
        start_probs: ``p`` [B, L], start probabilities (any float dtype; may be unnormalised; zeros
            allowed; renormalised in fp32 over the available positions at every start).
        cont_probs: ``s`` [B, L] in [0, 1]; ``s[j]`` = probability that token ``j`` extends the span
            covering token ``j-1``.
        lengths: [B] int, valid tokens are positions ``< length``.
        quota: float in (0, 1] = fraction of each row's length (ceil, at least 1) or int = count
            (clamped to the length).
        seed: int; the same seed gives the same sample on a device for a given ``impl``.
        order_scores: [B, L] logits for ``order="learned"`` (span score = logit at its start).
        order: ``"learned" | "left_to_right" | "random" | "single"``.
        impl: ``"auto" | "reference" | "cpp" | "triton"`` (auto: CUDA -> Triton, CPU -> C++ if built,
            else the reference).

    Example (one row, L = 8, length 7, quota 3)::

        position   0 1 2 3 4 5 6 | 7
        mask       . X X . . . X | .      two spans: {1, 2} sampled first, {6} second
        span_id    0 1 1 0 0 0 2 | 0
        step       0 2 2 0 0 0 1 | 0      learned order predicted span 2 first
    """
    _check_inputs(start_probs, cont_probs, lengths, order_scores, order)
    L = start_probs.shape[1]
    counts = quota_counts(lengths.to(start_probs.device), quota, L)
    out = _sample_spans_op(start_probs, cont_probs, lengths.to(start_probs.device), counts,
                           order_scores if order == "learned" else None, _normalize_seed(seed), order, impl)
    return SpanSample(*out)


def sample_spans_reference(
    start_probs: Tensor, cont_probs: Tensor, lengths: Tensor, quota, seed: int, *,
    order_scores: Optional[Tensor] = None, order: str = "learned",
) -> SpanSample:
    """The PyTorch reference of :func:`sample_spans` (``torch.Generator`` seeded with ``seed``)."""
    _check_inputs(start_probs, cont_probs, lengths, order_scores, order)
    L = start_probs.shape[1]
    counts = quota_counts(lengths.to(start_probs.device), quota, L)
    return SpanSample(*_reference_impl(start_probs, cont_probs, lengths, counts,
                                       order_scores if order == "learned" else None,
                                       _normalize_seed(seed), order))


# --------------------------------------------------------------------------------------------
# Differentiable log-probability and entropy of a given sample (the PPO ratio and bonus)
# --------------------------------------------------------------------------------------------


def span_action_log_prob(
    start_probs: Tensor, cont_probs: Tensor, lengths: Tensor, quota, sample: SpanSample, *,
    order_scores: Optional[Tensor] = None, order: str = "learned",
) -> tuple[Tensor, Tensor]:
    """``(log_prob [B], entropy [B])`` of ``sample`` under ``(p, s, order_scores)``, differentiable.

    Computed in float64 for float64 inputs, else float32; vectorised, no loop and no host sync.
    With ``sid`` = span ids, ``K`` = spans in the row, positions read from the sample:

    - start of span ``k`` at ``i_k``: available set ``A_k = valid & (sid == 0 | sid >= k)``,
      ``Z_k = sum_{A_k} w = Z_free + sum_{k' >= k} W_{k'}`` (``W`` = the mass of each span, a
      suffix sum, so no cancellation); term ``log w_{i_k} - log Z_k``, entropy
      ``log Z_k - sum_{A_k} w log w / Z_k`` (uniform ``log 1/|A_k|`` where the guard applies).
      Gradients: ``d/dw_j = [j = i_k]/w_j - [j in A_k]/Z_k`` for the log-prob.
    - a taken extension at ``j`` (``sid[j] == sid[j-1] > 0``): ``log s[j]``; a refused one at the
      first position ``j`` after span ``k < K`` when ``j < length`` and ``j`` was still free
      (``sid[j] == 0`` or ``sid[j] > k``): ``log(1 - s[j])``; each adds ``H(s[j])``. The last span
      always ends because the quota was met (no term).
    - learned order: spans sorted by step, suffix log-sum-exps of their start scores (float64);
      random order: ``-log K!`` / ``+log K!``; left_to_right and single: nothing.

    ``quota`` is accepted for symmetry with :func:`sample_spans`; the trajectory is fully determined
    by ``sample``.
    """
    _check_inputs(start_probs, cont_probs, lengths, order_scores, order)
    dtype = torch.float64 if start_probs.dtype == torch.float64 else torch.float32
    B, L = start_probs.shape
    dev = start_probs.device
    if L == 0:
        return torch.zeros(B, dtype=dtype, device=dev), torch.zeros(B, dtype=dtype, device=dev)
    pos = torch.arange(L, device=dev)
    lengths = lengths.to(dev, torch.int64).clamp(0, L)
    valid = pos < lengths[:, None]
    sid = sample.span_id.to(dev)
    n_spans = sid.amax(1)
    prev = torch.nn.functional.pad(sid, (1, 0))[:, :L]
    is_start = (sid > 0) & (prev != sid)
    zero = torch.zeros((), dtype=dtype, device=dev)

    # Extension decisions.
    s = torch.nan_to_num(cont_probs.to(dtype), nan=0.0).clamp(0.0, 1.0)
    taken = (sid > 0) & (prev == sid)
    refused = valid & (prev > 0) & (prev != sid) & (prev != n_spans[:, None]) & ((sid == 0) | (sid > prev))
    log_prob = torch.where(taken, _safe_log(s), zero).sum(1) + torch.where(refused, _safe_log(1 - s), zero).sum(1)
    entropy = torch.where(taken | refused, bernoulli_entropy(s), zero).sum(1)

    # Start decisions: per-span sums by scatter_add over span ids (column 0 = never-masked tokens).
    w = clean_start_weights(start_probs, valid, dtype)
    per_span = torch.zeros(B, L + 1, dtype=dtype, device=dev)
    mass = per_span.scatter_add(1, sid, w)
    xlx = per_span.scatter_add(1, sid, torch.where(valid, xlogx(w), zero))
    count = per_span.scatter_add(1, sid, valid.to(dtype))
    start_w = per_span.scatter_add(1, torch.where(is_start, sid, 0), torch.where(is_start, w, zero))[:, 1:]

    def avail_sum(x):  # x[:, 0] + sum_{k' >= k} x[:, k'] for k = 1..L
        return x[:, :1] + x[:, 1:].flip(1).cumsum(1).flip(1)

    Z, X, N = avail_sum(mass), avail_sum(xlx), avail_sum(count)
    has = torch.arange(1, L + 1, device=dev) <= n_spans[:, None]
    weighted = has & (Z > 0) & torch.isfinite(Z)
    uniform = has & ~weighted
    Z_safe = torch.where(weighted, Z, 1.0)
    N_safe = torch.where(uniform, N, 1.0)
    log_prob = log_prob + torch.where(weighted, _safe_log(start_w) - torch.log(Z_safe), zero).sum(1)
    log_prob = log_prob - torch.where(uniform, torch.log(N_safe), zero).sum(1)
    entropy = entropy + torch.where(weighted, torch.log(Z_safe) - X / Z_safe, zero).sum(1)
    entropy = entropy + torch.where(uniform, torch.log(N_safe), zero).sum(1)

    if order == "learned":
        lp, ent = _plackett_luce_terms(order_scores, sample.step.to(dev), is_start, n_spans)
        log_prob = log_prob + lp.to(dtype)
        entropy = entropy + ent.to(dtype)
    elif order == "random":
        log_fact = torch.lgamma(n_spans.to(dtype) + 1)
        log_prob = log_prob - log_fact
        entropy = entropy + log_fact
    return log_prob, entropy


def _plackett_luce_terms(order_scores: Tensor, step: Tensor, is_start: Tensor, n_spans: Tensor):
    """Log-prob and entropy of the PL order, float64: stage ``t`` picks the span with step ``t``
    among those with step >= t. With ``g`` sorted by step and a per-row shift ``m`` (any constant
    keeps the value and gradient exact), ``S_t = sum_{r >= t} exp(g_r - m)``;
    ``log pi_t = g_t - m - log S_t``, ``H_t = log S_t - sum_{r >= t} exp(g_r - m)(g_r - m) / S_t``."""
    B, L = step.shape
    g = order_scores.to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=g.device)
    g_by_step = torch.zeros(B, L + 1, dtype=torch.float64, device=g.device).scatter_add(
        1, torch.where(is_start, step, 0), torch.where(is_start, g, zero))[:, 1:]
    stage = torch.arange(1, L + 1, device=g.device) <= n_spans[:, None]
    m = torch.where(stage, g_by_step, -math.inf).amax(1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, zero)
    shifted = torch.where(stage, g_by_step - m, zero)
    e = torch.where(stage, torch.exp(shifted), zero)
    S = e.flip(1).cumsum(1).flip(1)
    T = (e * shifted).flip(1).cumsum(1).flip(1)
    S_safe = torch.where(stage, S, 1.0)
    log_S = torch.log(S_safe)
    log_prob = torch.where(stage, shifted - log_S, zero).sum(1)
    entropy = torch.where(stage, log_S - T / S_safe, zero).sum(1)
    return log_prob, entropy
