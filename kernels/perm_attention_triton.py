"""Triton kernels of permutation-order attention (the CUDA path; CPU under TRITON_INTERPRET=1).

The attention rule arrives as four int32 codes per token (see ``perm_attention.encode_rule``)::

    visible(i, j) = key_req[j] <= query_thr[i]  or  key_pid[j] == query_pid[i]

loaded per tile (O(L) mask memory), plus per-block summaries (min/max of req and of the pseudo ids)
that decide, before any load of K/V or Q, whether a (query block, key block) tile can contain a
visible pair at all; dead tiles are skipped.

Forward (one program per (query block, batch*head)), in base 2 with ``c = scale * log2(e)``::

    s_ij = c q_i.k_j (masked: -inf);  m_i, l_i, acc_i by online softmax over key blocks
    out_i = acc_i / l_i,  lse_i = ln 2 * (m_i + log2 l_i)      (rows that see nothing: out 0, lse 0)

Backward (FlashAttention-2 split, deterministic, no atomics): ``delta_i = sum_d dout_id out_id``,
``P_ij = exp(scale q_i.k_j - lse_i)`` (masked: 0), ``dS_ij = P_ij (dout_i.v_j - delta_i)``;
one kernel per key block accumulates ``dv_j = sum_i P_ij dout_i`` and ``dk_j = scale sum_i dS_ij q_i``
over the live query blocks, another per query block accumulates ``dq_i = scale sum_j dS_ij k_j``.

Matrix products take the input dtype (fp16/bf16 on tensor cores) with fp32 accumulation; fp32 inputs
use IEEE products (no TF32) so the fp32 path matches the reference closely. Those run on CUDA cores,
so fp32 gets its own, smaller tiles (``TILES``): every kernel compiles without register spills on sm_80
and sm_90 (tests/kernels/test_compile.py). Offsets of a batch/head slice are 64-bit (``pid_bh``);
offsets inside one slice (L * row stride) stay 32-bit.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import cuda_capability, launch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _visible(key_req, key_pid, query_thr, query_pid):
    """[M, N] visibility from the per-token codes of M query rows and N key columns."""
    return (key_req[None, :] <= query_thr[:, None]) | (key_pid[None, :] == query_pid[:, None])


@triton.jit
def _tile_live(k_lo, k_pid_lo, k_pid_hi, q_hi, q_pid_lo, q_pid_hi):
    """Whether a (query block, key block) tile may hold a visible pair (see summaries)."""
    return (k_lo <= q_hi) | ((k_pid_lo <= q_pid_hi) & (q_pid_lo <= k_pid_hi))


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_rows(base, offs, offs_d, stride_l, stride_d, rows_in, d_in):
    """[rows, BLOCK_D] of a [L, D] matrix at ``base``; rows or columns out of range read 0."""
    return tl.load(base + offs[:, None] * stride_l + offs_d[None, :] * stride_d,
                   mask=rows_in[:, None] & d_in[None, :], other=0.0)


@triton.jit
def _query_codes(QueryThr_ptr, QueryPid_ptr, offs_m, rows_in, PADDED_THR: tl.constexpr, NO_QUERY_PID: tl.constexpr):
    return (tl.load(QueryThr_ptr + offs_m, mask=rows_in, other=PADDED_THR),
            tl.load(QueryPid_ptr + offs_m, mask=rows_in, other=NO_QUERY_PID))


@triton.jit
def _query_summary(thr, qpid, NO_QUERY_PID: tl.constexpr, BIG: tl.constexpr):
    """A query block's summary from its own codes: the largest threshold and the pseudo-id range."""
    return tl.max(thr, axis=0), tl.min(tl.where(qpid != NO_QUERY_PID, qpid, BIG), axis=0), tl.max(qpid, axis=0)


@triton.jit
def _key_codes(KeyReq_ptr, KeyPid_ptr, offs_n, cols_in, HIDDEN_REQ: tl.constexpr, NO_KEY_PID: tl.constexpr):
    return (tl.load(KeyReq_ptr + offs_n, mask=cols_in, other=HIDDEN_REQ),
            tl.load(KeyPid_ptr + offs_n, mask=cols_in, other=NO_KEY_PID))


@triton.jit
def _key_block_live(KLo_ptr, KPidLo_ptr, KPidHi_ptr, index, q_hi, q_pid_lo, q_pid_hi):
    """``_tile_live`` for key block ``index`` of the precomputed key-block summaries."""
    return _tile_live(tl.load(KLo_ptr + index), tl.load(KPidLo_ptr + index), tl.load(KPidHi_ptr + index),
                      q_hi, q_pid_lo, q_pid_hi)


@triton.jit
def _recomputed_probs(q, keys, lse, req, kpid, thr, qpid, qk_scale_log2, IEEE_DOT: tl.constexpr):
    """The backward's P = exp(scale q.k - lse) of a tile, 0 where the rule hides the key."""
    s = _dot(q, tl.trans(keys), IEEE_DOT) * qk_scale_log2
    p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)
    return tl.where(_visible(req, kpid, thr, qpid), p, 0.0)


@triton.jit
def _perm_attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, Out_ptr, Lse_ptr,
    KeyReq_ptr, KeyPid_ptr, QueryThr_ptr, QueryPid_ptr,
    KLo_ptr, KPidLo_ptr, KPidHi_ptr,
    n_heads, seq_len, head_dim, n_key_blocks,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    qk_scale_log2,
    HIDDEN_REQ: tl.constexpr, PADDED_THR: tl.constexpr, NO_KEY_PID: tl.constexpr, NO_QUERY_PID: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # batch * heads on axis 0: CUDA caps axes 1 and 2 at 65535
    pid_m = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < seq_len
    d_in = offs_d < head_dim

    code_row = b * seq_len
    thr, qpid = _query_codes(QueryThr_ptr + code_row, QueryPid_ptr + code_row, offs_m, row_in, PADDED_THR,
                             NO_QUERY_PID)
    q_hi, q_pid_lo, q_pid_hi = _query_summary(thr, qpid, NO_QUERY_PID, BIG)
    q = _load_rows(Q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, stride_qd, row_in, d_in)
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for kb in range(0, n_key_blocks):
        if _key_block_live(KLo_ptr, KPidLo_ptr, KPidHi_ptr, b * n_key_blocks + kb, q_hi, q_pid_lo, q_pid_hi):
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_in = offs_n < seq_len
            keys = _load_rows(k_base, offs_n, offs_d, stride_kl, stride_kd, col_in, d_in)
            values = _load_rows(v_base, offs_n, offs_d, stride_vl, stride_vd, col_in, d_in)
            req, kpid = _key_codes(KeyReq_ptr + code_row, KeyPid_ptr + code_row, offs_n, col_in, HIDDEN_REQ,
                                   NO_KEY_PID)
            s = _dot(q, tl.trans(keys), IEEE_DOT) * qk_scale_log2
            s = tl.where(_visible(req, kpid, thr, qpid), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with nothing visible so far keeps max -inf: shift by 0, not (-inf) - (-inf).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - shift[:, None])
            alpha = tl.math.exp2(m_i - shift)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(values.dtype), values, IEEE_DOT)
            m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, 0.0)
    tl.store(Out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
             out.to(Out_ptr.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])
    tl.store(Lse_ptr + pid_bh * seq_len + offs_m, lse, mask=row_in)


@triton.jit
def _perm_attn_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, DOut_ptr, Lse_ptr, Delta_ptr, DK_ptr, DV_ptr,
    KeyReq_ptr, KeyPid_ptr, QueryThr_ptr, QueryPid_ptr,
    QHi_ptr, QPidLo_ptr, QPidHi_ptr,
    n_heads, seq_len, head_dim, n_query_blocks,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gh, stride_gl, stride_gd,
    scale, qk_scale_log2,
    HIDDEN_REQ: tl.constexpr, PADDED_THR: tl.constexpr, NO_KEY_PID: tl.constexpr, NO_QUERY_PID: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """dk, dv of one key block (dk/dv written as [B, H, L, D] contiguous, dtype of the inputs)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_in = offs_n < seq_len
    d_in = offs_d < head_dim

    code_row = b * seq_len
    req, kpid = _key_codes(KeyReq_ptr + code_row, KeyPid_ptr + code_row, offs_n, col_in, HIDDEN_REQ, NO_KEY_PID)
    k_lo = tl.min(req, axis=0)
    k_pid_lo = tl.min(tl.where(kpid != NO_KEY_PID, kpid, BIG), axis=0)
    k_pid_hi = tl.max(kpid, axis=0)

    keys = _load_rows(K_ptr + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kl, stride_kd, col_in, d_in)
    values = _load_rows(V_ptr + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vl, stride_vd, col_in, d_in)
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    g_base = DOut_ptr + b * stride_gb + h * stride_gh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    summary_row = b * n_query_blocks
    for qb in range(0, n_query_blocks):
        q_hi = tl.load(QHi_ptr + summary_row + qb)
        q_pid_lo = tl.load(QPidLo_ptr + summary_row + qb)
        q_pid_hi = tl.load(QPidHi_ptr + summary_row + qb)
        if _tile_live(k_lo, k_pid_lo, k_pid_hi, q_hi, q_pid_lo, q_pid_hi):
            offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_in = offs_m < seq_len
            q = _load_rows(q_base, offs_m, offs_d, stride_ql, stride_qd, row_in, d_in)
            dout = _load_rows(g_base, offs_m, offs_d, stride_gl, stride_gd, row_in, d_in)
            thr, qpid = _query_codes(QueryThr_ptr + code_row, QueryPid_ptr + code_row, offs_m, row_in,
                                     PADDED_THR, NO_QUERY_PID)
            lse = tl.load(Lse_ptr + pid_bh * seq_len + offs_m, mask=row_in, other=0.0)
            delta = tl.load(Delta_ptr + pid_bh * seq_len + offs_m, mask=row_in, other=0.0)
            p = _recomputed_probs(q, keys, lse, req, kpid, thr, qpid, qk_scale_log2, IEEE_DOT)
            dv += _dot(tl.trans(p.to(dout.dtype)), dout, IEEE_DOT)
            dp = _dot(dout, tl.trans(values), IEEE_DOT)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE_DOT)
    out_offs = pid_bh * seq_len * head_dim + offs_n[:, None] * head_dim + offs_d[None, :]
    tl.store(DK_ptr + out_offs, (dk * scale).to(DK_ptr.dtype.element_ty), mask=col_in[:, None] & d_in[None, :])
    tl.store(DV_ptr + out_offs, dv.to(DV_ptr.dtype.element_ty), mask=col_in[:, None] & d_in[None, :])


@triton.jit
def _perm_attn_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DOut_ptr, Lse_ptr, Delta_ptr, DQ_ptr,
    KeyReq_ptr, KeyPid_ptr, QueryThr_ptr, QueryPid_ptr,
    KLo_ptr, KPidLo_ptr, KPidHi_ptr,
    n_heads, seq_len, head_dim, n_key_blocks,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gh, stride_gl, stride_gd,
    scale, qk_scale_log2,
    HIDDEN_REQ: tl.constexpr, PADDED_THR: tl.constexpr, NO_KEY_PID: tl.constexpr, NO_QUERY_PID: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """dq of one query block (written as [B, H, L, D] contiguous, dtype of the inputs)."""
    pid_bh = tl.program_id(0).to(tl.int64)  # batch * heads on axis 0: CUDA caps axes 1 and 2 at 65535
    pid_m = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < seq_len
    d_in = offs_d < head_dim

    code_row = b * seq_len
    thr, qpid = _query_codes(QueryThr_ptr + code_row, QueryPid_ptr + code_row, offs_m, row_in, PADDED_THR,
                             NO_QUERY_PID)
    q_hi, q_pid_lo, q_pid_hi = _query_summary(thr, qpid, NO_QUERY_PID, BIG)
    q = _load_rows(Q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, stride_qd, row_in, d_in)
    dout = _load_rows(DOut_ptr + b * stride_gb + h * stride_gh, offs_m, offs_d, stride_gl, stride_gd, row_in, d_in)
    lse = tl.load(Lse_ptr + pid_bh * seq_len + offs_m, mask=row_in, other=0.0)
    delta = tl.load(Delta_ptr + pid_bh * seq_len + offs_m, mask=row_in, other=0.0)
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for kb in range(0, n_key_blocks):
        if _key_block_live(KLo_ptr, KPidLo_ptr, KPidHi_ptr, b * n_key_blocks + kb, q_hi, q_pid_lo, q_pid_hi):
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_in = offs_n < seq_len
            keys = _load_rows(k_base, offs_n, offs_d, stride_kl, stride_kd, col_in, d_in)
            values = _load_rows(v_base, offs_n, offs_d, stride_vl, stride_vd, col_in, d_in)
            req, kpid = _key_codes(KeyReq_ptr + code_row, KeyPid_ptr + code_row, offs_n, col_in, HIDDEN_REQ,
                                   NO_KEY_PID)
            p = _recomputed_probs(q, keys, lse, req, kpid, thr, qpid, qk_scale_log2, IEEE_DOT)
            dp = _dot(dout, tl.trans(values), IEEE_DOT)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(keys.dtype), keys, IEEE_DOT)
    out_offs = pid_bh * seq_len * head_dim + offs_m[:, None] * head_dim + offs_d[None, :]
    tl.store(DQ_ptr + out_offs, (dq * scale).to(DQ_ptr.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------------------
class Tiles(NamedTuple):
    """A launch configuration: rows of the kernel's own block, rows of the streamed block, warps, stages."""

    block_own: int  # the block a program owns: queries (fwd, dq) or keys (dk/dv)
    block_streamed: int  # the block it loops over: keys (fwd, dq) or queries (dk/dv)
    num_warps: int
    num_stages: int


# Tiles per (kernel, precision, head-dim bucket, GPU), "low" = fp16 / bf16, picked from a sweep of block
# sizes, warps and stages as the largest blocks for which ptxas reports no register spills at the
# bucket's head dim (checked against compile_budget.py by tests/kernels/test_compile.py; print them with
# `python -m fastvl_kernels.compile_report`). fp32 keeps IEEE products (no TF32), which Triton computes
# with FMAs on CUDA cores: 64 x 64 blocks with 4 warps spilled 2-22 KB there, smaller blocks and 8 warps
# do not. GPUs below sm_90 take the sm_80 rows, newer ones the sm_90 rows; head dims above 128 the 128
# rows. Only sm_80 and sm_90 are checked.
_T = Tiles
TILES: dict[tuple[str, str, int, int], Tiles] = {
    ("fwd", "low", 64, 80): _T(64, 64, 4, 3), ("dkdv", "low", 64, 80): _T(32, 64, 4, 3),
    ("dq", "low", 64, 80): _T(64, 32, 4, 3),
    ("fwd", "low", 64, 90): _T(64, 64, 4, 3), ("dkdv", "low", 64, 90): _T(64, 64, 4, 3),
    ("dq", "low", 64, 90): _T(64, 64, 4, 3),
    ("fwd", "fp32", 64, 80): _T(64, 32, 8, 2), ("dkdv", "fp32", 64, 80): _T(64, 32, 8, 2),
    ("dq", "fp32", 64, 80): _T(64, 32, 8, 2),
    ("fwd", "fp32", 64, 90): _T(64, 32, 8, 2), ("dkdv", "fp32", 64, 90): _T(64, 32, 8, 2),
    ("dq", "fp32", 64, 90): _T(64, 32, 8, 2),
    ("fwd", "low", 128, 80): _T(32, 64, 4, 3), ("dkdv", "low", 128, 80): _T(32, 64, 4, 3),
    ("dq", "low", 128, 80): _T(32, 64, 4, 3),
    ("fwd", "low", 128, 90): _T(64, 64, 4, 3), ("dkdv", "low", 128, 90): _T(32, 64, 4, 3),
    ("dq", "low", 128, 90): _T(32, 64, 4, 3),
    ("fwd", "fp32", 128, 80): _T(32, 32, 8, 2), ("dkdv", "fp32", 128, 80): _T(32, 32, 8, 2),
    ("dq", "fp32", 128, 80): _T(32, 32, 8, 2),
    ("fwd", "fp32", 128, 90): _T(32, 16, 8, 2), ("dkdv", "fp32", 128, 90): _T(32, 32, 8, 2),
    ("dq", "fp32", 128, 90): _T(32, 32, 8, 2),
}
HEAD_DIM_BUCKETS = (64, 128)
DEFAULT_CAPABILITY = 80  # the interpreter (no GPU) and GPUs without a tuned row use the sm_80 tiles


def tile_config(kernel: str, dtype: torch.dtype, head_dim: int, capability: Optional[int]) -> Tiles:
    """The tiles of ``kernel`` ("fwd", "dkdv", "dq") for inputs of ``dtype`` and ``head_dim`` on a GPU of
    compute capability ``capability`` (None: interpreter)."""
    precision = "fp32" if dtype == torch.float32 else "low"
    bucket = next((b for b in HEAD_DIM_BUCKETS if head_dim <= b), HEAD_DIM_BUCKETS[-1])
    arch = 90 if capability is not None and capability >= 90 else DEFAULT_CAPABILITY
    return TILES[(kernel, precision, bucket, arch)]


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _check_block(block: int, name: str) -> int:
    # tl.dot needs every dimension >= 16; tl.arange needs powers of two.
    if block < 16 or block & (block - 1):
        raise ValueError(f"permutation_attention (triton): {name}={block} must be a power of two >= 16")
    return block


def _constants(codes) -> dict:
    return dict(HIDDEN_REQ=codes.HIDDEN_REQ, PADDED_THR=codes.PADDED_THR, NO_KEY_PID=codes.NO_KEY_PID,
                NO_QUERY_PID=codes.NO_QUERY_PID, BIG=codes.BIG)


def _launch_tiles(kernel: str, q: Tensor, block_m: Optional[int], block_n: Optional[int]) -> tuple[int, int, dict]:
    """(block_m, block_n, launch options) for ``kernel``; explicit block sizes override the table."""
    tiles = tile_config(kernel, q.dtype, q.shape[-1], cuda_capability(q.device))
    own_is_query = kernel != "dkdv"
    table_m, table_n = ((tiles.block_own, tiles.block_streamed) if own_is_query
                        else (tiles.block_streamed, tiles.block_own))
    block_m = _check_block(block_m or table_m, "block_m")
    block_n = _check_block(block_n or table_n, "block_n")
    return block_m, block_n, dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def grid(batch: int, heads: int, seq_len: int, block: int) -> tuple[int, int]:
    """Programs per launch: batch * heads on axis 0 (CUDA allows 2^31 - 1 there, 65535 on axes 1 and 2),
    blocks of the sequence on axis 1."""
    return batch * heads, triton.cdiv(seq_len, block)


def perm_attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, rule, scale: float,
                              block_m: Optional[int] = None, block_n: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Launch the forward. ``rule`` is an ``EncodedRule`` (codes [B, L] int32 contiguous) and
    ``rule.block_summaries(block_n, keys=True)`` supplies the key-block summaries. Block sizes default
    to ``tile_config``; q, k, v may have any strides."""
    batch, heads, seq_len, head_dim = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.zero_()
    block_m, block_n, options = _launch_tiles("fwd", q, block_m, block_n)
    k_lo, _, k_pid_lo, k_pid_hi = rule.block_summaries(block_n, keys=True)
    n_key_blocks = k_lo.shape[1]
    launch(_perm_attn_fwd_kernel, grid(batch, heads, seq_len, block_m),
        q, k, v, out, lse,
        rule.key_req, rule.key_pid, rule.query_thr, rule.query_pid,
        k_lo, k_pid_lo, k_pid_hi,
        heads, seq_len, head_dim, n_key_blocks,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        scale * LOG2E,
        **_constants(rule),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim), IEEE_DOT=q.dtype == torch.float32,
        **options,
    )
    return out, lse


def perm_attention_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, rule,
                              scale: float, block_m: Optional[int] = None,
                              block_n: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the two backward kernels; returns dq, dk, dv (contiguous, dtype of q). Inputs may have
    any strides."""
    batch, heads, seq_len, head_dim = q.shape
    dq = torch.empty((batch, heads, seq_len, head_dim), device=q.device, dtype=q.dtype)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    if dq.numel() == 0:
        return dq, dk, dv
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # [B, H, L]
    lse = lse.contiguous()
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    codes = (rule.key_req, rule.key_pid, rule.query_thr, rule.query_pid)
    common = dict(**_constants(rule), BLOCK_D=_block_d(head_dim), IEEE_DOT=q.dtype == torch.float32)

    dkdv_m, dkdv_n, dkdv_options = _launch_tiles("dkdv", q, block_m, block_n)
    q_sum = rule.block_summaries(dkdv_m, keys=False)
    launch(_perm_attn_bwd_dkdv_kernel, grid(batch, heads, seq_len, dkdv_n),
        q, k, v, grad_out, lse, delta, dk, dv, *codes,
        q_sum[1], q_sum[2], q_sum[3],
        heads, seq_len, head_dim, q_sum[0].shape[1], *strides, scale, scale * LOG2E, **common,
        BLOCK_M=dkdv_m, BLOCK_N=dkdv_n, **dkdv_options,
    )
    dq_m, dq_n, dq_options = _launch_tiles("dq", q, block_m, block_n)
    k_sum = rule.block_summaries(dq_n, keys=True)
    launch(_perm_attn_bwd_dq_kernel, grid(batch, heads, seq_len, dq_m),
        q, k, v, grad_out, lse, delta, dq, *codes,
        k_sum[0], k_sum[2], k_sum[3],
        heads, seq_len, head_dim, k_sum[0].shape[1], *strides, scale, scale * LOG2E, **common,
        BLOCK_M=dq_m, BLOCK_N=dq_n, **dq_options,
    )
    return dq, dk, dv
