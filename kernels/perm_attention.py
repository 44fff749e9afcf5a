"""Permutation-order attention: the generalized LM of C-Mask with UniLMv2 pseudo masks.

Every token has a ``kind`` -- ``CONTEXT`` (image tokens, unmasked text), ``ORIGINAL`` (the original
token at a masked position) or ``PSEUDO`` (a pseudo mask standing in for it) -- and a factorization
``step`` (the step at which a masked token is predicted; ignored for context). Query i may attend key
j iff key j is a real token (``key_padding_mask[j]``), query i is a real token, and::

    kind_j == CONTEXT                                                       (everyone sees the context)
    kind_j == ORIGINAL and (kind_i == ORIGINAL and step_i >= step_j          (originals see earlier and
                            or kind_i == PSEUDO and step_i >  step_j)         same-step originals; pseudo
                                                                              masks see earlier steps)
    kind_j == PSEUDO   and  kind_i == PSEUDO and step_i == step_j            (pseudo masks of one step see
                                                                              each other)

So a pseudo mask of step s predicts its tokens from the context and from the originals of steps < s,
never from its own originals or later ones. Context queries see only the context. Special cases of
the same rule: all CONTEXT = bidirectional (and MLM with [MASK] ids in place); all ORIGINAL with
``step = position + 1`` = left-to-right causal LM; CONTEXT prefix + ORIGINAL suffix with increasing
steps = prefix LM. Example (``describe_mask``; rows = queries, columns = keys): two context tokens,
the originals of two one-token spans predicted at steps 2 and 1, and their pseudo masks::

        c  c  O2 O1 P2 P1
    c   #  #  .  .  .  .
    c   #  #  .  .  .  .
    O2  #  #  #  #  .  .
    O1  #  #  .  #  .  .
    P2  #  #  .  #  #  .
    P1  #  #  .  .  .  #

Attention, per batch b and head h, with ``s_ij = scale * q_i . k_j`` over the visible keys::

    out_i = sum_j softmax_j(s_i)_j v_j,        lse_i = log sum_j exp(s_ij)
    backward: P_ij = exp(s_ij - lse_i), D_i = dout_i . out_i, dS_ij = P_ij (dout_i . v_j - D_i),
              dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij dout_i

A row that sees no key (a padded query; a context query when every context key is padded) gets
``out = 0`` and ``lse = 0`` and passes no gradient. ``lse`` is returned detached (no gradient).

**The mask is never materialized by the kernels.** The rule becomes four int32 codes per token
(:func:`encode_rule`) with ``visible(i, j) = key_req[j] <= query_thr[i] or key_pid[j] == query_pid[i]``
(O(L) memory), and per-block min/max of those codes let a kernel skip every (query block, key block)
tile that holds no visible pair (:func:`tile_live_map`, :func:`permutation_tile_skip_fraction`).

Implementations (``impl``): ``"reference"`` (dense mask, fp32 math; the oracle), ``"triton"``
(FlashAttention-style forward and backward; CUDA, or CPU under TRITON_INTERPRET=1), ``"cpp"``
(csrc/perm_attention.cpp; CPU), ``"sdpa"`` (CPU: PyTorch's fused flash-attention CPU kernel with the
dense additive mask built from kind/step once per batch and reused by every layer, O(B L^2) mask
memory), ``"auto"`` (CUDA -> Triton; CPU -> C++ when built, measured faster than SDPA at every shape
tried, else SDPA -- see ``_cpu_auto_impl``; other devices -> reference).
All run behind the custom ops ``fastvl_kernels::permutation_attention_fwd`` / ``_bwd`` (fake
implementations + ``register_autograd``), so the op works under ``torch.compile``.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Optional

import torch
from torch import Tensor

from ._cpp import cpp_op
from ._dispatch import choose_impl

CONTEXT, ORIGINAL, PSEUDO = 0, 1, 2
IMPLS = ("auto", "reference", "triton", "cpp", "sdpa")
_OP = "permutation_attention"
_MAX_STEP = 1 << 29


# --------------------------------------------------------------------------------------------------
# The rule: dense (oracle, SDPA, visualising) and encoded per token (kernels).
# --------------------------------------------------------------------------------------------------
def permutation_mask(kind: Tensor, step: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """The rule as a dense [B, L, L] bool mask, True = query i may attend key j (module docstring).

    Written directly from the rule (not from the kernels' encoding) so it can serve as the oracle.
    Rows and columns of padded tokens are all False."""
    kind_q, kind_k = kind[:, :, None], kind[:, None, :]
    step_q, step_k = step[:, :, None], step[:, None, :]
    sees_original = ((kind_q == ORIGINAL) & (step_q >= step_k)) | ((kind_q == PSEUDO) & (step_q > step_k))
    mask = (
        (kind_k == CONTEXT)
        | ((kind_k == ORIGINAL) & sees_original)
        | ((kind_k == PSEUDO) & (kind_q == PSEUDO) & (step_q == step_k))
    )
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, :] & key_padding_mask[:, :, None]
    return mask


def describe_mask(kind: Tensor, step: Tensor, key_padding_mask: Optional[Tensor] = None) -> str:
    """A small text grid of the mask of one sequence ([L] or [1, L] inputs): ``#`` = visible.

    Rows are queries, columns keys; labels are ``c`` (context), ``O<step>``, ``P<step>``, ``-`` (pad)."""
    kind, step = kind.reshape(1, -1).cpu(), step.reshape(1, -1).cpu()
    pad = None if key_padding_mask is None else key_padding_mask.reshape(1, -1).cpu()
    mask = permutation_mask(kind, step, pad)[0]

    def label(i: int) -> str:
        if pad is not None and not bool(pad[0, i]):
            return "-"
        k, s = int(kind[0, i]), int(step[0, i])
        return "c" if k == CONTEXT else ("O" if k == ORIGINAL else "P") + str(s)

    labels = [label(i) for i in range(kind.shape[1])]
    width = max(2, *(len(x) for x in labels)) + 1
    lines = [" " * (width + 1) + "".join(x.ljust(width) for x in labels)]
    for i, row_label in enumerate(labels):
        cells = "".join(("#" if bool(mask[i, j]) else ".").ljust(width) for j in range(len(labels)))
        lines.append(row_label.ljust(width + 1) + cells)
    return "\n".join(line.rstrip() for line in lines)


@dataclasses.dataclass
class EncodedRule:
    """The rule as four int32 codes per token, [B, L] each (contiguous)::

        visible(i, j) = key_req[j] <= query_thr[i]  or  key_pid[j] == query_pid[i]

    key_req:   context -> -BIG (seen by every real query), original -> step, pseudo/padded -> +BIG
    query_thr: context -> -BIG, original -> step, pseudo -> step - 1, padded -> -BIG - 1
    key_pid / query_pid: step for real pseudo tokens, else NO_KEY_PID / NO_QUERY_PID (never equal)
    """

    key_req: Tensor
    key_pid: Tensor
    query_thr: Tensor
    query_pid: Tensor

    BIG = 1 << 30
    HIDDEN_REQ = BIG
    PADDED_THR = -BIG - 1
    NO_KEY_PID = -BIG - 2
    NO_QUERY_PID = -BIG - 3

    def visible(self, b: Tensor, i: Tensor, j: Tensor) -> Tensor:
        """Whether query ``i`` of sequence ``b`` may attend key ``j`` (index tensors, broadcasting).

        The one comparison of the codes written in PyTorch: the dense masks (:meth:`dense`, the SDPA
        path, fastvl's eager/sdpa/xformers backends) and fastvl's FlexAttention ``mask_mod`` call it;
        the Triton kernel makes the same comparison on the same codes. Indexing and comparisons only,
        so it is a valid ``mask_mod`` body (``visible(b, q_idx, kv_idx)``)."""
        return (self.key_req[b, j] <= self.query_thr[b, i]) | (self.key_pid[b, j] == self.query_pid[b, i])

    def dense(self) -> Tensor:
        """The rule as a dense [B, L, L] bool mask, True = visible (:meth:`visible` at every pair)."""
        batch, seq_len = self.key_req.shape
        device = self.key_req.device
        b = torch.arange(batch, device=device)[:, None, None]
        positions = torch.arange(seq_len, device=device)
        return self.visible(b, positions[None, :, None], positions[None, None, :])

    def block_summaries(self, block: int, keys: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per block of ``block`` tokens, [B, ceil(L / block)] int32 each: ``(lo, hi, pid_lo, pid_hi)``
        -- min/max of key_req (keys) or query_thr (queries), and min/max of the real pseudo ids
        (empty: pid_lo = +BIG > pid_hi). Tokens past L count as padding."""
        order, pid = (self.key_req, self.key_pid) if keys else (self.query_thr, self.query_pid)
        order_fill, none = (self.HIDDEN_REQ, self.NO_KEY_PID) if keys else (self.PADDED_THR, self.NO_QUERY_PID)
        batch, seq_len = order.shape
        n_blocks = -(-seq_len // block)
        extra = n_blocks * block - seq_len
        if extra:
            order = torch.nn.functional.pad(order, (0, extra), value=order_fill)
            pid = torch.nn.functional.pad(pid, (0, extra), value=none)
        order = order.reshape(batch, n_blocks, block)
        pid = pid.reshape(batch, n_blocks, block)
        pid_lo = torch.where(pid != none, pid, self.BIG).amin(-1)
        return (order.amin(-1).int().contiguous(), order.amax(-1).int().contiguous(),
                pid_lo.int().contiguous(), pid.amax(-1).int().contiguous())


def encode_rule(kind: Tensor, step: Tensor, key_padding_mask: Optional[Tensor] = None) -> EncodedRule:
    """Encode kind/step/padding ([B, L]) into the per-token codes of :class:`EncodedRule` (O(L))."""
    big = EncodedRule.BIG
    kind = kind.long()
    step = step.long().clamp(-1, _MAX_STEP).int()
    real = torch.ones_like(kind, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    is_ctx, is_orig, is_pseudo = kind == CONTEXT, kind == ORIGINAL, kind == PSEUDO

    def code(*pairs, default):
        out = torch.full_like(step, default)
        for cond, value in reversed(pairs):
            out = torch.where(cond, value, out)
        return out.contiguous()

    return EncodedRule(
        key_req=code((~real, EncodedRule.HIDDEN_REQ), (is_ctx, -big), (is_orig, step), default=EncodedRule.HIDDEN_REQ),
        key_pid=code((real & is_pseudo, step), default=EncodedRule.NO_KEY_PID),
        query_thr=code((~real, EncodedRule.PADDED_THR), (is_ctx, -big), (is_orig, step), (is_pseudo, step - 1),
                       default=EncodedRule.PADDED_THR),
        query_pid=code((real & is_pseudo, step), default=EncodedRule.NO_QUERY_PID),
    )


def tile_live_map(kind: Tensor, step: Tensor, key_padding_mask: Optional[Tensor] = None, *, block_m: int = 64,
                  block_n: int = 64) -> Tensor:
    """[B, ceil(L/block_m), ceil(L/block_n)] bool: tiles the kernels compute (False = skipped, holds
    no visible pair). A tile is live iff ``min key_req <= max query_thr`` or the pseudo-id ranges of
    its query and key blocks intersect."""
    rule = encode_rule(kind, step, key_padding_mask)
    _, q_hi, q_pid_lo, q_pid_hi = rule.block_summaries(block_m, keys=False)
    k_lo, _, k_pid_lo, k_pid_hi = rule.block_summaries(block_n, keys=True)
    by_order = k_lo[:, None, :] <= q_hi[:, :, None]
    by_pid = (k_pid_lo[:, None, :] <= q_pid_hi[:, :, None]) & (q_pid_lo[:, :, None] <= k_pid_hi[:, None, :])
    return by_order | by_pid


def permutation_tile_skip_fraction(kind: Tensor, step: Tensor, key_padding_mask: Optional[Tensor] = None, *,
                                   block_m: int = 64, block_n: int = 64) -> float:
    """Fraction of (batch, query block, key block) tiles the Triton forward skips for these inputs
    and block sizes (computable without a GPU). Left-to-right order at L = 1024 with 64 x 64 tiles:
    120/256 = 0.469 (the strict upper triangle of 16 x 16 blocks)."""
    live = tile_live_map(kind, step, key_padding_mask, block_m=block_m, block_n=block_n)
    return 1.0 - live.float().mean().item() if live.numel() else 0.0


# --------------------------------------------------------------------------------------------------
# Reference (the oracle): dense mask, fp32 math, autograd for the backward.
# --------------------------------------------------------------------------------------------------
def permutation_attention_reference(q: Tensor, k: Tensor, v: Tensor, kind: Tensor, step: Tensor,
                                    key_padding_mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
                                    return_lse: bool = False):
    """Dense-mask softmax attention in float32 (same arguments and outputs as
    :func:`permutation_attention`, differentiable by autograd, lse included)."""
    _check_inputs(q, k, v, kind, step, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = permutation_mask(kind, step, key_padding_mask)[:, None]  # [B, 1, L, L]
    empty = ~mask.any(-1, keepdim=True)  # rows that see nothing
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    # Empty rows get constant scores (finite lse, no gradient), then probabilities 0 through the mask.
    fill = torch.where(empty, 0.0, float("-inf"))
    scores = torch.where(mask, scores, fill)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse) * mask
    out = torch.matmul(probs, v.float()).to(q.dtype).contiguous()
    if not return_lse:
        return out
    return out, lse.masked_fill(empty, 0.0).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Per-implementation forward / backward (plain functions of tensors; no autograd here).
# --------------------------------------------------------------------------------------------------
class _DenseMaskCache:
    """The SDPA path's dense [B, 1, L, L] additive mask, built once per batch and reused by every layer
    (forward and backward) while kind/step/key_padding_mask are the same, unmodified tensors. One entry:
    a new batch replaces it. Keyed by weak references and version counters, so it never outlives its
    inputs nor serves a stale mask after an in-place change."""

    def __init__(self):
        self._key = None
        self._refs = ()
        self._mask = None

    def get(self, kind: Tensor, step: Tensor, key_padding_mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        inputs = (kind, step) if key_padding_mask is None else (kind, step, key_padding_mask)
        key = (tuple((id(t), t._version) for t in inputs), dtype)
        if self._key == key and all(ref() is t for ref, t in zip(self._refs, inputs)):
            return self._mask
        visible = encode_rule(kind, step, key_padding_mask).dense()
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
        self._key, self._refs, self._mask = key, tuple(weakref.ref(t) for t in inputs), mask[:, None]
        return self._mask


_dense_mask_cache = _DenseMaskCache()


def _additive_mask(kind, step, key_padding_mask, dtype) -> Tensor:
    """[B, 1, L, L] 0 / -inf in the attention dtype (what the fused SDPA CPU kernel takes)."""
    return _dense_mask_cache.get(kind, step, key_padding_mask, dtype)


def _sdpa_fwd(q, k, v, kind, step, key_padding_mask, scale):
    # The CPU flash kernel gives rows whose mask is all -inf out = 0 and lse = 0 (checked by tests).
    mask = _additive_mask(kind, step, key_padding_mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    return out.contiguous(), lse.float().contiguous()


def _sdpa_bwd(grad_out, q, k, v, out, lse, kind, step, key_padding_mask, scale):
    mask = _additive_mask(kind, step, key_padding_mask, q.dtype)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _reference_bwd(grad_out, q, k, v, out, lse, kind, step, key_padding_mask, scale):
    """The backward formulas (module docstring) on the dense mask in float32. Written out rather than
    autograd: custom-op implementations run below the autograd dispatch key. The tests' oracle is
    autograd through :func:`permutation_attention_reference` itself."""
    mask = permutation_mask(kind, step, key_padding_mask)[:, None]
    qf, kf, vf, gf = q.float(), k.float(), v.float(), grad_out.float()
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    probs = torch.where(mask, torch.exp(scores - lse[..., None]), 0.0)
    delta = (gf * out.float()).sum(-1, keepdim=True)
    dscores = probs * (torch.matmul(gf, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(dscores, kf) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), qf) * scale
    dv = torch.matmul(probs.transpose(-1, -2), gf)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def _triton_fwd(q, k, v, kind, step, key_padding_mask, scale):
    from .perm_attention_triton import perm_attention_fwd_triton

    return perm_attention_fwd_triton(q, k, v, encode_rule(kind, step, key_padding_mask), scale)


def _triton_bwd(grad_out, q, k, v, out, lse, kind, step, key_padding_mask, scale):
    from .perm_attention_triton import perm_attention_bwd_triton

    return perm_attention_bwd_triton(grad_out, q, k, v, out, lse, encode_rule(kind, step, key_padding_mask), scale)


# --------------------------------------------------------------------------------------------------
# Registered ops.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvl_kernels::permutation_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, kind: Tensor, step: Tensor, key_padding_mask: Optional[Tensor],
            scale: float, impl: str) -> tuple[Tensor, Tensor]:
    if impl == "triton":
        return _triton_fwd(q, k, v, kind, step, key_padding_mask, scale)
    if impl == "cpp":
        return cpp_op("permutation_attention_fwd")(q, k, v, kind, step, key_padding_mask, scale)
    if impl == "sdpa":
        return _sdpa_fwd(q, k, v, kind, step, key_padding_mask, scale)
    out, lse = permutation_attention_reference(q, k, v, kind, step, key_padding_mask, scale=scale, return_lse=True)
    return out, lse


@_fwd_op.register_fake
def _fwd_fake(q, k, v, kind, step, key_padding_mask, scale, impl):
    # Every implementation returns contiguous tensors, whatever the strides of q.
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastvl_kernels::permutation_attention_bwd", mutates_args=())
def _bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kind: Tensor, step: Tensor,
            key_padding_mask: Optional[Tensor], scale: float, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    if impl == "triton":
        return _triton_bwd(grad_out, q, k, v, out, lse, kind, step, key_padding_mask, scale)
    if impl == "cpp":
        return cpp_op("permutation_attention_bwd")(grad_out, q, k, v, out, lse, kind, step, key_padding_mask, scale)
    if impl == "sdpa":
        return _sdpa_bwd(grad_out, q, k, v, out, lse, kind, step, key_padding_mask, scale)
    return _reference_bwd(grad_out, q, k, v, out, lse, kind, step, key_padding_mask, scale)


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, kind, step, key_padding_mask, scale, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kind, step, key_padding_mask, scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kind, step, key_padding_mask)
    ctx.scale, ctx.impl = scale, impl


def _backward(ctx, grad_out, grad_lse):
    # grad_lse is ignored: lse is returned detached by the public function.
    q, k, v, out, lse, kind, step, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out.contiguous(), q, k, v, out, lse, kind, step, key_padding_mask, ctx.scale, ctx.impl)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public function.
# --------------------------------------------------------------------------------------------------
def permutation_attention(q: Tensor, k: Tensor, v: Tensor, kind: Tensor, step: Tensor,
                          key_padding_mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
                          return_lse: bool = False, impl: str = "auto"):
    """Softmax attention under the permutation-order rule, the mask computed on the fly from
    per-token kind/step (module docstring: rule, math, special cases, grid example).

    Args:
        q, k, v: [B, H, L, D] (self-attention over one sequence; fp32, fp16 or bf16).
        kind: [B, L] integer tensor of CONTEXT (0) / ORIGINAL (1) / PSEUDO (2).
        step: [B, L] integer factorization step in [0, 2^29) of original/pseudo tokens (ignored for
            context tokens).
        key_padding_mask: optional [B, L] bool, True = real token. Padded tokens are seen by no query
            and their own rows are empty.
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return ``lse`` [B, H, L] float32, the natural log-sum-exp of the scaled
            scores over each row's visible keys (0 for rows that see nothing), detached.
        impl: "auto" | "reference" | "triton" | "cpp" | "sdpa" (module docstring).

    Returns:
        out [B, H, L, D] in q's dtype (0 on rows that see nothing), or ``(out, lse)``.
    """
    _check_inputs(q, k, v, kind, step, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = _choose_impl(impl, q)
    out, lse = _fwd_op(q, k, v, kind, step, key_padding_mask, scale, chosen)
    return (out, lse.detach()) if return_lse else out


def _cpu_auto_impl(q: Tensor) -> str:
    """CPU choice for impl="auto": the C++ kernel when built, else the fused SDPA kernel with the dense
    mask. Measured here (bench/bench_perm_attention.py, 2 AVX2 cores, fwd+bwd, SDPA's mask built once
    and reused): the C++ kernel was at least as fast as SDPA at every shape tried -- B8 H12 D64 at
    L 256 / 1024, B32 H12 L 40 / 80 (fp32) and 5x faster in bf16 -- so no shape rule is needed."""
    return "cpp" if cpp_op("permutation_attention_fwd") is not None else "sdpa"


def _choose_impl(impl: str, q: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{_OP}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "sdpa":
        if q.device.type != "cpu":
            raise RuntimeError(f"{_OP}: impl='sdpa' uses the fused CPU SDPA kernel and needs CPU tensors "
                               f"(got {q.device})")
        return "sdpa"
    if impl == "auto" and q.device.type == "cpu":
        return _cpu_auto_impl(q)
    return choose_impl(_OP, impl, q.device, cpp_op("permutation_attention_fwd") is not None)


def _check_inputs(q, k, v, kind, step, key_padding_mask) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{_OP}: q, k, v must all be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"{_OP}: q, k, v must share a floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, _, seq_len, _ = q.shape
    for name, t in (("kind", kind), ("step", step)):
        if t.shape != (batch, seq_len) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{_OP}: {name} must be an integer [B, L] = {(batch, seq_len)} tensor; "
                             f"got {t.dtype} {tuple(t.shape)}")
    others = (k, v, kind, step) + (() if key_padding_mask is None else (key_padding_mask,))
    if any(t.device != q.device for t in others):
        raise ValueError(f"{_OP}: q, k, v, kind, step and key_padding_mask must be on one device; got "
                         f"{[str(t.device) for t in (q,) + others]}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (batch, seq_len)):
        raise ValueError(f"{_OP}: key_padding_mask must be bool [B, L] = {(batch, seq_len)}; "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    # Value checks cost a device sync: only for CPU tensors in eager mode.
    if kind.device.type == "cpu" and not torch.compiler.is_compiling() and kind.numel():
        bad_kind = (kind < CONTEXT) | (kind > PSEUDO)
        if bool(bad_kind.any()):
            raise ValueError(f"{_OP}: kind values must be CONTEXT (0), ORIGINAL (1) or PSEUDO (2)")
        bad_step = (kind != CONTEXT) & ((step < 0) | (step >= _MAX_STEP))
        if bool(bad_step.any()):
            raise ValueError(f"{_OP}: step of original/pseudo tokens must be in [0, 2^29)")


__all__ = [
    "CONTEXT", "ORIGINAL", "PSEUDO", "IMPLS", "EncodedRule", "describe_mask", "encode_rule", "permutation_attention",
    "permutation_attention_reference", "permutation_mask", "permutation_tile_skip_fraction", "tile_live_map",
]
