"""Value-weighted attention top-k reward (C-Mask eq. 4): how much of each query row's attention
lands, concentrated, on the source (image) tokens.

For one attention layer, query row ``t`` (a text token, or a pseudo-mask row of the generalized LM)
and source column ``i`` (an image token)::

    a[t, i] = softmax_j(q_t . k_j * scale)[i] * ||v_i||_2          (softmax over every key j the row sees)
    R[t]    = mean_{i in top-k of a[t, :]} ( a[t, i] / mean_i a[t, i] )
            = (sum of the k largest a[t, i] / k) / (sum_i a[t, i] / n_valid)

with ``k = min(topk, n_valid)`` and ``n_valid`` the number of real (unpadded) source tokens.

**The softmax normaliser cancels.** Every ``a[t, i]`` of a row carries the same factor
``exp(-lse[t])``, so ``R[t]`` depends only on the source scores and value norms. The kernels use this:
with ``u_i = q_t . k_i * scale + log ||v_i||`` and ``m = max_i u_i``::

    R[t] = (sum_{i in top-k(u)} exp(u_i - m) / k) / (sum_i exp(u_i - m) / n_valid)

where every exponent is <= 0 and the largest term is exactly 1, so nothing overflows or underflows to
0/0. ``lse`` and ``extra_k`` therefore never reach the kernels; they stay in the API because the
reference computes the formula literally (it is the oracle) and because callers naturally hold them.
Rows whose every ``a[t, i]`` is 0 (all value vectors zero) and rows with no valid source get 0.

No gradient: the reward is a training signal for the masking agent. Inputs are detached, so a
caller's autograd through q, k, v is untouched. Memory: the kernels never form [B, H, T, I]; Triton
streams source tiles per block of query rows keeping a running max, running sum and running top-k;
the C++ kernel works on (head, block of rows) items with O(I * D) scratch per thread.

Implementations behind ``impl``: "reference" (PyTorch, materializes the scores), "triton" (CUDA, or
CPU under TRITON_INTERPRET=1), "cpp" (csrc/reward.cpp), "auto" (CUDA -> Triton, CPU -> C++ when built,
else reference). All are one registered op, ``torch.ops.fastvl_kernels.value_weighted_topk_reward``,
with a fake implementation so it traces under ``torch.compile``.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._cpp import cpp_op
from ._dispatch import choose_impl
from ._triton import HAS_TRITON, cuda_capability, launch

if HAS_TRITON:
    import triton
    import triton.language as tl

OP_NAME = "fastvl_kernels::value_weighted_topk_reward"
_MAX_TRITON_TOPK = 64  # widest running top-k the Triton kernel keeps per row (registers)


# --------------------------------------------------------------------------------------------------
# Reference (the oracle): the formula as written, materializing the [B, H, T, I] scores.
# --------------------------------------------------------------------------------------------------
def value_weighted_topk_reward_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    lse: Optional[Tensor] = None,
    extra_k: Optional[Tensor] = None,
    source_mask: Optional[Tensor] = None,
    extra_mask: Optional[Tensor] = None,
    query_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    topk: int = 8,
) -> Tensor:
    """The reward computed literally (softmax over source + extra keys, or ``exp(s - lse)``), in the
    input dtype up to ``a``; the means and the ratio in float32. Same arguments as
    :func:`value_weighted_topk_reward`; returns [B, H, T] float32."""
    _check_inputs(q, k, v, lse, extra_k, source_mask, extra_mask, query_mask, topk)
    q, k, v = q.detach(), k.detach(), v.detach()
    batch, _, _, head_dim = q.shape
    n_src = k.shape[2]
    scale = head_dim**-0.5 if scale is None else float(scale)
    neg_inf = float("-inf")

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, T, I]
    if source_mask is not None:
        scores = scores.masked_fill(~source_mask[:, None, None, :], neg_inf)
    if lse is None:
        all_scores = scores
        if extra_k is not None:
            extra = torch.matmul(q, extra_k.detach().transpose(-1, -2)) * scale
            if extra_mask is not None:
                extra = extra.masked_fill(~extra_mask[:, None, None, :], neg_inf)
            all_scores = torch.cat([scores, extra], dim=-1)
        lse = torch.logsumexp(all_scores, dim=-1)
    attention = torch.exp(scores - lse.detach()[..., None])  # softmax, restricted to the source columns
    value_weighted = attention * torch.linalg.vector_norm(v, dim=-1)[:, :, None, :]
    value_weighted = value_weighted.float()

    if source_mask is not None:
        n_valid = source_mask.sum(-1).float()
    else:
        n_valid = torch.full((batch,), float(n_src), device=q.device)
    n_valid = n_valid[:, None, None]  # [B, 1, 1]
    mean = value_weighted.sum(-1) / n_valid.clamp(min=1)
    ok = (mean > 0) & (n_valid > 0)
    ratio = value_weighted / torch.where(ok, mean, 1.0)[..., None]
    # Padded columns have ratio exactly 0 and valid ones are >= 0, so the top min(topk, I) sum equals
    # the sum over the top min(topk, n_valid) valid columns.
    top_sum = ratio.topk(min(topk, n_src), dim=-1).values.sum(-1) if n_src > 0 else mean
    reward = top_sum / n_valid.clamp(min=1, max=topk)
    reward = torch.where(ok, reward, 0.0)
    if query_mask is not None:
        reward = reward.masked_fill(~query_mask[:, None, :], 0.0)
    return reward.float()


# --------------------------------------------------------------------------------------------------
# Triton kernel (CUDA path; CPU under TRITON_INTERPRET=1).
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _vw_topk_reward_kernel(
        Q_ptr, K_ptr, V_ptr, SourceMask_ptr, QueryMask_ptr, Out_ptr,
        n_heads, n_rows, n_src, head_dim, value_dim,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ki, stride_kd,
        stride_vb, stride_vh, stride_vi, stride_vd,
        stride_sb, stride_si, stride_mb, stride_mt,
        scale,
        HAS_SOURCE_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr, TOPK_ALL: tl.constexpr,
        TOPK: tl.constexpr, K_PAD: tl.constexpr, MERGE_ROUNDS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        IEEE_DOT: tl.constexpr,
    ):
        """One program = one (batch, head) and BLOCK_T query rows; streams BLOCK_I source keys at a
        time keeping, per row, the running max m of u = s + log||v||, the running sum of exp(u - m)
        (rescaled when m grows, as in online softmax) and the TOPK largest u seen so far.

        The running top-k ``best`` [BLOCK_T, K_PAD] is an unordered set: columns >= TOPK are parked
        at +inf so they are never replaced. Merging a tile takes MERGE_ROUNDS = min(TOPK, BLOCK_I) rounds of "the
        tile's largest remaining entry replaces the set's smallest if larger" — only max/min
        reductions and selects, exact with ties (one occurrence is removed per round)."""
        pid_bh = tl.program_id(0).to(tl.int64)
        pid_t = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_in = offs_t < n_rows

        q = tl.load(
            Q_ptr + b * stride_qb + h * stride_qh + offs_t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
            mask=row_in[:, None] & (offs_d[None, :] < head_dim), other=0.0,
        )
        if IEEE_DOT:
            q = q.to(tl.float32)

        row_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_T], tl.float32)
        cols = tl.arange(0, BLOCK_I)
        ranks = tl.arange(0, K_PAD)
        best = tl.where(ranks[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros([BLOCK_T, K_PAD], tl.float32)
        n_valid = tl.sum(tl.zeros([BLOCK_I], tl.int32), axis=0)

        k_base = K_ptr + b * stride_kb + h * stride_kh
        v_base = V_ptr + b * stride_vb + h * stride_vh
        for i0 in range(0, n_src, BLOCK_I):
            offs_i = i0 + cols
            col_in = offs_i < n_src
            valid = col_in
            if HAS_SOURCE_MASK:
                flags = tl.load(SourceMask_ptr + b * stride_sb + offs_i * stride_si, mask=col_in, other=0)
                valid = valid & (flags != 0)
            n_valid += tl.sum(valid.to(tl.int32), axis=0)

            keys = tl.load(
                k_base + offs_i[:, None] * stride_ki + offs_d[None, :] * stride_kd,
                mask=col_in[:, None] & (offs_d[None, :] < head_dim), other=0.0,
            )
            if IEEE_DOT:
                scores = tl.dot(q, tl.trans(keys.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(keys))
            values = tl.load(
                v_base + offs_i[:, None] * stride_vi + offs_dv[None, :] * stride_vd,
                mask=col_in[:, None] & (offs_dv[None, :] < value_dim), other=0.0,
            ).to(tl.float32)
            sq_norm = tl.sum(values * values, axis=1)
            # log ||v|| with -inf for a zero value vector (padding included), without evaluating log(0).
            log_norm = tl.where(sq_norm > 0, 0.5 * tl.log(tl.where(sq_norm > 0, sq_norm, 1.0)), float("-inf"))
            u = scores * scale + log_norm[None, :]
            u = tl.where(valid[None, :], u, float("-inf"))

            new_max = tl.maximum(row_max, tl.max(u, axis=1))
            # Rows that have seen no finite u yet keep max -inf; shift by 0 to avoid (-inf) - (-inf).
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(u - shift[:, None]), axis=1)
            row_max = new_max
            if not TOPK_ALL:
                for _ in tl.static_range(MERGE_ROUNDS):
                    tile_max = tl.max(u, axis=1)
                    kth = tl.min(best, axis=1)
                    first = tl.min(tl.where(u == tile_max[:, None], cols[None, :], BLOCK_I), axis=1)
                    slot = tl.min(tl.where(best == kth[:, None], ranks[None, :], K_PAD), axis=1)
                    replace = (tile_max > kth)[:, None] & (ranks[None, :] == slot[:, None])
                    best = tl.where(replace, tile_max[:, None], best)
                    u = tl.where(cols[None, :] == first[:, None], float("-inf"), u)

        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        if TOPK_ALL:
            top_sum = row_sum  # topk >= I: the top-k are all valid sources
        else:
            top_terms = tl.where(ranks[None, :] < TOPK, tl.exp(best - shift[:, None]), 0.0)
            top_sum = tl.sum(top_terms, axis=1)
        n_valid_f = n_valid.to(tl.float32)
        k_eff = tl.minimum(n_valid_f, TOPK * 1.0)
        ok = (row_sum > 0) & (n_valid > 0)
        reward = (top_sum / tl.maximum(k_eff, 1.0)) / tl.where(ok, row_sum / tl.maximum(n_valid_f, 1.0), 1.0)
        reward = tl.where(ok, reward, 0.0)
        if HAS_QUERY_MASK:
            qflags = tl.load(QueryMask_ptr + b * stride_mb + offs_t * stride_mt, mask=row_in, other=0)
            reward = tl.where(qflags != 0, reward, 0.0)
        tl.store(Out_ptr + pid_bh * n_rows + offs_t, reward, mask=row_in)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class RewardTiles(NamedTuple):
    block_rows: int  # query rows per program (fewer when the input has fewer)
    block_sources: int  # source keys streamed per step
    num_warps: int
    num_stages: int


# Per (input precision, GPU), chosen so that ptxas reports no register spills at head dim 64, topk 8
# on sm_80 and sm_90 (tests/kernels/test_compile.py checks compile_budget.py). "low" = fp16 / bf16.
REWARD_TILES = {
    # 4 warps: bf16 spilled a few bytes on sm_80 with both masks; 8 warps hold the same tiles in ~100.
    ("low", 80): RewardTiles(64, 64, 8, 3),
    ("low", 90): RewardTiles(64, 64, 8, 3),
    # fp32 takes IEEE products on CUDA cores (no TF32): half the source block and 8 warps keep it in
    # registers (64 x 64 with 4 warps: 255 registers and ~660 B of spills).
    ("fp32", 80): RewardTiles(64, 32, 8, 3),
    ("fp32", 90): RewardTiles(64, 32, 8, 3),
}


def reward_tiles(dtype: torch.dtype, capability: Optional[int]) -> RewardTiles:
    """Tiles for inputs of ``dtype`` on a GPU of compute capability ``capability`` (None: the
    interpreter, which takes the sm_80 row)."""
    arch = 90 if capability is not None and capability >= 90 else 80
    return REWARD_TILES[("fp32" if dtype == torch.float32 else "low", arch)]


def _reward_triton(q, k, v, source_mask, query_mask, scale: float, topk: int) -> Tensor:
    """Launcher: picks tile sizes and launches one program per (batch * head, block of rows)."""
    batch, heads, n_rows, head_dim = q.shape
    n_src, value_dim = k.shape[2], v.shape[3]
    out = torch.empty((batch, heads, n_rows), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    topk_all = topk >= n_src  # then the top-k is every valid source: no selection needed
    if not topk_all and topk > _MAX_TRITON_TOPK:
        raise ValueError(
            f"value_weighted_topk_reward (triton): topk={topk} < I={n_src} exceeds the running top-k "
            f"the kernel keeps in registers ({_MAX_TRITON_TOPK}); use impl='cpp' or 'reference'"
        )
    k_pad = 2 if topk_all else max(2, _next_pow2(topk))
    tiles = reward_tiles(q.dtype, cuda_capability(q.device))
    block_t = min(tiles.block_rows, max(16, _next_pow2(n_rows)))
    block_i = tiles.block_sources
    block_d = max(16, _next_pow2(head_dim))
    block_dv = max(16, _next_pow2(value_dim))
    # Masks are passed as byte views (no copy); absent ones get a placeholder pointer never read.
    src = source_mask.view(torch.uint8) if source_mask is not None else out
    qry = query_mask.view(torch.uint8) if query_mask is not None else out
    src_strides = source_mask.stride() if source_mask is not None else (0, 0)
    qry_strides = query_mask.stride() if query_mask is not None else (0, 0)
    grid = (batch * heads, triton.cdiv(n_rows, block_t))
    launch(_vw_topk_reward_kernel, grid,
        q, k, v, src, qry, out,
        heads, n_rows, n_src, head_dim, value_dim,
        *q.stride(), *k.stride(), *v.stride(), *src_strides, *qry_strides,
        scale,
        HAS_SOURCE_MASK=source_mask is not None, HAS_QUERY_MASK=query_mask is not None,
        TOPK_ALL=topk_all, TOPK=topk, K_PAD=k_pad, MERGE_ROUNDS=min(topk, block_i),
        BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_D=block_d, BLOCK_DV=block_dv,
        IEEE_DOT=q.dtype == torch.float32, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------------
# The registered op: one entry point, dispatch by device / impl, a fake for tracing.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op(OP_NAME, mutates_args=())
def _reward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Optional[Tensor],
    extra_k: Optional[Tensor],
    source_mask: Optional[Tensor],
    extra_mask: Optional[Tensor],
    query_mask: Optional[Tensor],
    scale: float,
    topk: int,
    impl: str,
) -> Tensor:
    cpp = cpp_op("value_weighted_topk_reward")
    chosen = choose_impl("value_weighted_topk_reward", impl, q.device, cpp is not None)
    if chosen == "triton" and impl == "auto" and _MAX_TRITON_TOPK < topk < k.shape[2]:
        chosen = "reference"  # a top-k too wide for the kernel's registers; an explicit "triton" raises
    if chosen == "triton":
        return _reward_triton(q, k, v, source_mask, query_mask, scale, topk)
    if chosen == "cpp":
        return cpp(q, k, v, source_mask, query_mask, scale, topk)
    return value_weighted_topk_reward_reference(
        q, k, v, lse=lse, extra_k=extra_k, source_mask=source_mask, extra_mask=extra_mask,
        query_mask=query_mask, scale=scale, topk=topk,
    )


@_reward_op.register_fake
def _reward_op_fake(q, k, v, lse, extra_k, source_mask, extra_mask, query_mask, scale, topk, impl):
    _check_inputs(q, k, v, lse, extra_k, source_mask, extra_mask, query_mask, topk)
    return q.new_empty(q.shape[:3], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Public function.
# --------------------------------------------------------------------------------------------------
def value_weighted_topk_reward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    lse: Optional[Tensor] = None,
    extra_k: Optional[Tensor] = None,
    source_mask: Optional[Tensor] = None,
    extra_mask: Optional[Tensor] = None,
    query_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    topk: int = 8,
    impl: str = "auto",
) -> Tensor:
    """C-Mask's cross-modal reward per query row: mean of the top-k value-weighted attention weights
    on the source tokens, relative to their mean (eq. 4). Returns [B, H, T] float32, no grad.

    Args:
        q: [B, H, T, D] query rows (text tokens, or pseudo-mask rows).
        k, v: [B, H, I, D] / [B, H, I, Dv] keys and values of the source (image) tokens.
        lse: optional [B, H, T] natural log-sum-exp of the scaled scores over all keys each row sees
            (as returned by an attention forward). Only the reference uses it: it cancels (see module
            docstring).
        extra_k: optional [B, H, J, D] the other keys the rows see (e.g. text keys); used, by the
            reference only, to form the softmax when ``lse`` is None. Cancels likewise.
        source_mask: optional [B, I] bool, True = real source token. Padded sources get no attention
            and do not count in the mean.
        extra_mask: optional [B, J] bool for ``extra_k``.
        query_mask: optional [B, T] bool; padded query rows return 0.
        scale: score scale, default ``1 / sqrt(D)``.
        topk: k of the top-k (the paper's 8); ``min(topk, #valid sources)`` is used per sample.
        impl: "auto" | "reference" | "triton" | "cpp".

    Example, one row over I=6 sources with source_mask = [1 1 1 1 0 0] and topk=2::

        a[t]   = [.30 .10 .05 .15 | 0 0]   (softmax * ||v||, padded columns excluded)
        mean   = .60 / 4 = .15
        R[t]   = mean(.30, .15) / .15 = 1.5

    A row attending uniformly gets R = 1; one attending a single source gets R = n_valid / k.
    """
    _check_inputs(q, k, v, lse, extra_k, source_mask, extra_mask, query_mask, topk)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    return _reward_op(
        q.detach(), k.detach(), v.detach(), detach(lse), detach(extra_k), source_mask, extra_mask,
        query_mask, scale, int(topk), impl,
    )


def _check_inputs(q, k, v, lse, extra_k, source_mask, extra_mask, query_mask, topk) -> None:
    name = "value_weighted_topk_reward"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, n_rows, head_dim = q.shape
    n_src = k.shape[2]
    if tuple(k.shape) != (batch, heads, n_src, head_dim) or tuple(v.shape[:3]) != (batch, heads, n_src):
        raise ValueError(f"{name}: k must be [B, H, I, D] and v [B, H, I, Dv] for q {tuple(q.shape)}; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"{name}: q, k, v must share a floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if topk < 1:
        raise ValueError(f"{name}: topk must be >= 1, got {topk}")
    if lse is not None and tuple(lse.shape) != (batch, heads, n_rows):
        raise ValueError(f"{name}: lse must be [B, H, T] = {(batch, heads, n_rows)}, got {tuple(lse.shape)}")
    if extra_k is not None and (extra_k.dim() != 4 or tuple(extra_k.shape[:2]) != (batch, heads)
                                or extra_k.shape[3] != head_dim):
        raise ValueError(f"{name}: extra_k must be [B, H, J, D]; got {tuple(extra_k.shape)}")
    n_extra = extra_k.shape[2] if extra_k is not None else None
    for mask, mask_name, size in ((source_mask, "source_mask", n_src), (query_mask, "query_mask", n_rows),
                                  (extra_mask, "extra_mask", n_extra)):
        if mask is None:
            continue
        if size is None:
            raise ValueError(f"{name}: extra_mask given without extra_k")
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, size):
            raise ValueError(f"{name}: {mask_name} must be bool [B, {size}] = {(batch, size)}; "
                             f"got {mask.dtype} {tuple(mask.shape)}")


__all__ = ["value_weighted_topk_reward", "value_weighted_topk_reward_reference"]
