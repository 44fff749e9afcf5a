// Permutation-order attention (generalized LM with UniLMv2 pseudo masks), CPU kernels.
//
// Every token carries a kind (0 = context, 1 = original of a masked token, 2 = pseudo mask) and a
// factorization step. Query i may attend key j when key j is a real (unpadded) token and
//   kind_j == context, or
//   kind_j == original and (kind_i == original and step_i >= step_j  or  kind_i == pseudo and step_i > step_j), or
//   kind_j == pseudo   and  kind_i == pseudo and step_i == step_j.
// Rows of padded tokens see nothing. The rule is encoded once per call into four int32 per token,
//   key_req[j], key_pid[j], query_thr[i], query_pid[i]:   visible(i, j) = key_req[j] <= query_thr[i]
//                                                                       || key_pid[j] == query_pid[i]
// (context key: req = -2^30; original key: req = step; pseudo or padded key: req = +2^30; context
// query: thr = -2^30; original query: thr = step; pseudo query: thr = step - 1; padded query:
// thr = -2^30 - 1; pid = step for real pseudo tokens and two distinct sentinels otherwise). So the
// mask costs O(L) memory and two integer compares per score. Per block of queries the kernels keep
// min/max of thr and of pid, per block of keys min/max of req and of pid; a (query block, key block)
// tile is
//   skipped when min req > max thr and the pid ranges do not intersect (no pair can be visible),
//   unmasked when max req <= min thr (every pair is visible).
//
// Forward (FlashAttention-style, one work item = (batch, head, block of query rows)):
//   s_ij = scale * q_i . k_j (masked: -inf; the scale rides on the sgemm's alpha),
//   m_i = max_j s_ij,  l_i = sum_j exp(s_ij - m_i),
//   out_i = sum_j exp(s_ij - m_i) v_j / l_i,  lse_i = m_i + log l_i,
// with m, l and out accumulated over key blocks by the online-softmax rescaling. A row that sees no
// key gets out = 0 and lse = 0.
// Backward (one work item = (batch, head); recomputes P from lse, no [L, L] buffer):
//   P_ij = exp(s_ij - lse_i) (masked: 0),  D_i = sum_d dout_id out_id,
//   dv_j = sum_i P_ij dout_i,  dP_ij = dout_i . v_j,  dS_ij = P_ij (dP_ij - D_i),
//   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i.
// The lse output carries no gradient.
//
// Matrix products of a tile go to the BLAS sgemm that libtorch exports (MKL here; called from inside
// at::parallel_for it runs single-threaded), with a plain loop as the fallback when the symbol is
// absent. Softmax work uses 8-lane vectors, cloned for x86-64-v3 (AVX2 + FMA). Inputs of any floating
// dtype are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <tuple>

// Fortran BLAS sgemm (LP64). Weak, so the extension still loads against a libtorch without it.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace fastvl {
namespace {

using namespace simd8;

constexpr int64_t kContext = 0, kOriginal = 1, kPseudo = 2;
constexpr int32_t kBig = 1 << 30;
constexpr int64_t kMaxStep = 1 << 29;
constexpr int32_t kContextReq = -kBig, kHiddenReq = kBig;
constexpr int32_t kContextThr = -kBig, kPaddedThr = -kBig - 1;
constexpr int32_t kNoKeyPid = -kBig - 2, kNoQueryPid = -kBig - 3;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row-major C[M, N] = alpha * op(A)[M, K] op(B)[K, N] + beta * C. A row-major matrix is the
// column-major transpose, so this is the column-major product C^T = op(B)^T op(A)^T.
void gemm_row_major(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                    int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (sgemm_ != nullptr) {
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  for (int64_t i = 0; i < M; ++i) {
    float* c_row = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c_row[j] = beta == 0.0f ? 0.0f : beta * c_row[j];
    for (int64_t kk = 0; kk < K; ++kk) {
      const float a = alpha * (trans_a ? A[kk * lda + i] : A[i * lda + kk]);
      if (trans_b) {
        for (int64_t j = 0; j < N; ++j) c_row[j] += a * B[j * ldb + kk];
      } else {
        const float* b_row = B + kk * ldb;
        for (int64_t j = 0; j < N; ++j) c_row[j] += a * b_row[j];
      }
    }
  }
}

// --------------------------------------------------------------------------------------------------
// The rule, encoded per token, and the per-block summaries used to skip or unmask tiles.
// --------------------------------------------------------------------------------------------------
struct BlockSummary {
  int32_t lo, hi;          // keys: min/max req; queries: min/max thr
  int32_t pid_lo, pid_hi;  // min/max pid over real pseudo tokens (empty range: lo > hi)
};

inline bool tile_live(const BlockSummary& qs, const BlockSummary& ks) {
  return ks.lo <= qs.hi || (ks.pid_lo <= qs.pid_hi && qs.pid_lo <= ks.pid_hi);
}
inline bool tile_full(const BlockSummary& qs, const BlockSummary& ks) { return ks.hi <= qs.lo; }

// Per-token codes, laid out per batch row with room for a whole last block (the padding codes are
// "hidden key" / "padded query", so partial tiles mask their tail through the rule itself).
struct EncodedRule {
  int64_t L, L_pad;
  at::Tensor storage;  // int32 [4, B, L_pad]: key_req, key_pid, query_thr, query_pid
  const int32_t *key_req, *key_pid, *query_thr, *query_pid;
};

EncodedRule encode_rule(const at::Tensor& kind, const at::Tensor& step, const std::optional<at::Tensor>& padding,
                        int64_t block) {
  const int64_t B = kind.size(0), L = kind.size(1);
  EncodedRule enc;
  enc.L = L;
  enc.L_pad = ceil_div(std::max<int64_t>(L, 1), block) * block;
  enc.storage = at::empty({4, B, enc.L_pad}, kind.options().dtype(at::kInt));
  int32_t* base = enc.storage.mutable_data_ptr<int32_t>();
  const int64_t plane = B * enc.L_pad;
  int32_t *key_req = base, *key_pid = base + plane, *query_thr = base + 2 * plane, *query_pid = base + 3 * plane;
  const at::Tensor kind64 = kind.to(at::kLong).contiguous(), step64 = step.to(at::kLong).contiguous();
  const int64_t* kind_ptr = kind64.const_data_ptr<int64_t>();
  const int64_t* step_ptr = step64.const_data_ptr<int64_t>();
  at::Tensor pad_bool;
  const bool* pad_ptr = nullptr;
  if (padding.has_value()) {
    pad_bool = padding->contiguous();
    pad_ptr = pad_bool.const_data_ptr<bool>();
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < enc.L_pad; ++i) {
      const int64_t o = b * enc.L_pad + i;
      int32_t req = kHiddenReq, kpid = kNoKeyPid, thr = kPaddedThr, qpid = kNoQueryPid;
      if (i < L && (pad_ptr == nullptr || pad_ptr[b * L + i])) {
        const int64_t kd = kind_ptr[b * L + i], st = step_ptr[b * L + i];
        TORCH_CHECK(kd == kContext || kd == kOriginal || kd == kPseudo,
                    "permutation_attention: kind must be 0 (context), 1 (original) or 2 (pseudo); got ", kd,
                    " at [", b, ", ", i, "]");
        TORCH_CHECK(kd == kContext || (st >= 0 && st < kMaxStep),
                    "permutation_attention: step of original/pseudo tokens must be in [0, 2^29); got ", st,
                    " at [", b, ", ", i, "]");
        const int32_t s = static_cast<int32_t>(st);
        if (kd == kContext) {
          req = kContextReq;
          thr = kContextThr;
        } else if (kd == kOriginal) {
          req = s;
          thr = s;
        } else {
          thr = s - 1;
          kpid = s;
          qpid = s;
        }
      }
      key_req[o] = req;
      key_pid[o] = kpid;
      query_thr[o] = thr;
      query_pid[o] = qpid;
    }
  }
  enc.key_req = key_req;
  enc.key_pid = key_pid;
  enc.query_thr = query_thr;
  enc.query_pid = query_pid;
  return enc;
}

// Summaries of every block of `block` tokens: [B, L_pad / block].
std::vector<BlockSummary> summarize(const EncodedRule& enc, int64_t B, int64_t block, bool keys) {
  const int64_t n_blocks = enc.L_pad / block;
  std::vector<BlockSummary> out(B * n_blocks);
  const int32_t* order = keys ? enc.key_req : enc.query_thr;
  const int32_t* pid = keys ? enc.key_pid : enc.query_pid;
  const int32_t none = keys ? kNoKeyPid : kNoQueryPid;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      BlockSummary s{std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min(),
                     std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min()};
      for (int64_t i = b * enc.L_pad + blk * block, e = i + block; i < e; ++i) {
        s.lo = std::min(s.lo, order[i]);
        s.hi = std::max(s.hi, order[i]);
        if (pid[i] != none) {
          s.pid_lo = std::min(s.pid_lo, pid[i]);
          s.pid_hi = std::max(s.pid_hi, pid[i]);
        }
      }
      out[b * n_blocks + blk] = s;
    }
  }
  return out;
}

// --------------------------------------------------------------------------------------------------
// Tile kernels (8 lanes = 8 keys of one query row).
// --------------------------------------------------------------------------------------------------

// Forward, one tile of scaled scores (rows x cols_pad, row stride ld; cols_pad a multiple of 8, columns
// past the sequence are hidden by the key codes): mask in place, fold the tile into the running
// max / sum of each row, rescale the running output rows, and leave P = exp(s - m_new) in `scores`.
FASTVL_MULTIVERSION
void forward_softmax_tile(float* __restrict scores, int64_t ld, int64_t rows, int64_t cols_pad, bool apply_mask,
                          const int32_t* __restrict key_req, const int32_t* __restrict key_pid,
                          const int32_t* __restrict query_thr, const int32_t* __restrict query_pid,
                          float* __restrict row_max, float* __restrict row_sum, float* __restrict acc,
                          int64_t head_dim) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * ld;
    const Int8 thr = splat8i(query_thr[r]), pid = splat8i(query_pid[r]);
    Float8 tile_max = splat8(-kInf);
    for (int64_t j = 0; j < cols_pad; j += kLanes) {
      Float8 x = load8(s + j);
      if (apply_mask) {
        const Int8 visible = (load8i(key_req + j) <= thr) | (load8i(key_pid + j) == pid);
        x = visible ? x : splat8(-kInf);
      }
      store8(s + j, x);
      tile_max = max8(tile_max, x);
    }
    const float old_max = row_max[r];
    const float new_max = std::max(old_max, hmax8(tile_max));
    if (new_max == -kInf) {  // nothing visible yet in this row
      std::fill(s, s + cols_pad, 0.0f);
      continue;
    }
    const Float8 shift = splat8(new_max);
    Float8 total = {};
    for (int64_t j = 0; j < cols_pad; j += kLanes) {
      const Float8 p = exp8(load8(s + j) - shift);
      store8(s + j, p);
      total += p;
    }
    const float alpha = std::exp(old_max - new_max);  // 0 when old_max = -inf
    row_sum[r] = row_sum[r] * alpha + hsum8(total);
    row_max[r] = new_max;
    if (alpha != 1.0f) {
      float* a = acc + r * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) a[d] *= alpha;
    }
  }
}

// Backward: P = exp(s - lse) from the scaled scores, with the mask applied (masked: 0), in place.
FASTVL_MULTIVERSION
void backward_probs_tile(float* __restrict scores, int64_t ld, int64_t rows, int64_t cols_pad, bool apply_mask,
                         const int32_t* __restrict key_req, const int32_t* __restrict key_pid,
                         const int32_t* __restrict query_thr, const int32_t* __restrict query_pid,
                         const float* __restrict lse) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * ld;
    const Int8 thr = splat8i(query_thr[r]), pid = splat8i(query_pid[r]);
    const Float8 shift = splat8(lse[r]);
    for (int64_t j = 0; j < cols_pad; j += kLanes) {
      Float8 p = exp8(load8(s + j) - shift);
      if (apply_mask) {
        const Int8 visible = (load8i(key_req + j) <= thr) | (load8i(key_pid + j) == pid);
        p = visible ? p : Float8{};
      }
      store8(s + j, p);
    }
  }
}

// Backward: dS = scale * P * (dP - D_row), in place in dP.
FASTVL_MULTIVERSION
void backward_dscores_tile(const float* __restrict probs, float* __restrict dprobs, int64_t ld, int64_t rows,
                           int64_t cols_pad, float scale, const float* __restrict delta) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = probs + r * ld;
    float* dp = dprobs + r * ld;
    const Float8 dr = splat8(delta[r]);
    for (int64_t j = 0; j < cols_pad; j += kLanes) store8(dp + j, load8(p + j) * (load8(dp + j) - dr) * scale);
  }
}

// --------------------------------------------------------------------------------------------------
// Forward and backward drivers (float32 contiguous [B, H, L, D]).
// --------------------------------------------------------------------------------------------------
void forward_impl(const float* q, const float* k, const float* v, const EncodedRule& enc, int64_t B, int64_t H,
                  int64_t L, int64_t D, float scale, int64_t BQ, int64_t BK, float* out, float* lse,
                  const at::TensorOptions& opts) {
  const int64_t n_qb = ceil_div(L, BQ), n_kb = ceil_div(L, BK);
  const std::vector<BlockSummary> q_sum = summarize(enc, B, BQ, false);
  const std::vector<BlockSummary> k_sum = summarize(enc, B, BK, true);
  const int64_t q_stride_blocks = enc.L_pad / BQ, k_stride_blocks = enc.L_pad / BK;

  at::parallel_for(0, B * H * n_qb, 1, [&](int64_t begin, int64_t end) {
    // Scratch through ATen so memory profilers see it: scores tile, output accumulator, row stats.
    at::Tensor scratch = at::empty({BQ * BK + BQ * D + 2 * BQ}, opts);
    float* scores = scratch.mutable_data_ptr<float>();
    float* acc = scores + BQ * BK;
    float* row_max = acc + BQ * D;
    float* row_sum = row_max + BQ;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % n_qb, head = item / n_qb, b = head / H;
      const int64_t q0 = qb * BQ, rows = std::min(BQ, L - q0);
      const float* q_blk = q + (head * L + q0) * D;
      const float* k_head = k + head * L * D;
      const float* v_head = v + head * L * D;
      const int32_t* thr = enc.query_thr + b * enc.L_pad + q0;
      const int32_t* qpid = enc.query_pid + b * enc.L_pad + q0;
      const BlockSummary& qs = q_sum[b * q_stride_blocks + qb];
      std::fill(acc, acc + rows * D, 0.0f);
      std::fill(row_max, row_max + rows, -kInf);
      std::fill(row_sum, row_sum + rows, 0.0f);
      for (int64_t kb = 0; kb < n_kb; ++kb) {
        const BlockSummary& ks = k_sum[b * k_stride_blocks + kb];
        if (!tile_live(qs, ks)) continue;
        const int64_t k0 = kb * BK, cols = std::min(BK, L - k0);
        const int64_t cols_pad = ceil_div(cols, kLanes) * kLanes;
        gemm_row_major(false, true, rows, cols, D, scale, q_blk, D, k_head + k0 * D, D, 0.0f, scores, BK);
        forward_softmax_tile(scores, BK, rows, cols_pad, !tile_full(qs, ks),
                             enc.key_req + b * enc.L_pad + k0, enc.key_pid + b * enc.L_pad + k0, thr, qpid,
                             row_max, row_sum, acc, D);
        gemm_row_major(false, false, rows, D, cols, 1.0f, scores, BK, v_head + k0 * D, D, 1.0f, acc, D);
      }
      float* out_blk = out + (head * L + q0) * D;
      float* lse_blk = lse + head * L + q0;
      for (int64_t r = 0; r < rows; ++r) {
        const bool seen = row_sum[r] > 0.0f;
        const float inv = seen ? 1.0f / row_sum[r] : 0.0f;
        for (int64_t d = 0; d < D; ++d) out_blk[r * D + d] = acc[r * D + d] * inv;
        lse_blk[r] = seen ? row_max[r] + std::log(row_sum[r]) : 0.0f;
      }
    }
  });
}

void backward_impl(const float* dout, const float* q, const float* k, const float* v, const float* out,
                   const float* lse, const EncodedRule& enc, int64_t B, int64_t H, int64_t L, int64_t D, float scale,
                   int64_t BQ, int64_t BK, float* dq, float* dk, float* dv, const at::TensorOptions& opts) {
  const int64_t n_qb = ceil_div(L, BQ), n_kb = ceil_div(L, BK);
  const std::vector<BlockSummary> q_sum = summarize(enc, B, BQ, false);
  const std::vector<BlockSummary> k_sum = summarize(enc, B, BK, true);
  const int64_t q_stride_blocks = enc.L_pad / BQ, k_stride_blocks = enc.L_pad / BK;

  // One item per (batch, head): it owns dq, dk, dv of that head, so no reduction across threads.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({2 * BQ * BK + L}, opts);
    float* probs = scratch.mutable_data_ptr<float>();
    float* dprobs = probs + BQ * BK;
    float* delta = dprobs + BQ * BK;
    for (int64_t head = begin; head < end; ++head) {
      const int64_t b = head / H, off = head * L * D;
      // Gradients accumulate tile by tile; zeroed here, by the thread that owns the head (cache-hot).
      std::fill(dq + off, dq + off + L * D, 0.0f);
      std::fill(dk + off, dk + off + L * D, 0.0f);
      std::fill(dv + off, dv + off + L * D, 0.0f);
      for (int64_t i = 0; i < L; ++i) {
        float s = 0.0f;
        for (int64_t d = 0; d < D; ++d) s += dout[off + i * D + d] * out[off + i * D + d];
        delta[i] = s;
      }
      for (int64_t kb = 0; kb < n_kb; ++kb) {
        const BlockSummary& ks = k_sum[b * k_stride_blocks + kb];
        const int64_t k0 = kb * BK, cols = std::min(BK, L - k0);
        const int64_t cols_pad = ceil_div(cols, kLanes) * kLanes;
        const float* k_blk = k + off + k0 * D;
        const float* v_blk = v + off + k0 * D;
        float* dk_blk = dk + off + k0 * D;
        float* dv_blk = dv + off + k0 * D;
        for (int64_t qb = 0; qb < n_qb; ++qb) {
          const BlockSummary& qs = q_sum[b * q_stride_blocks + qb];
          if (!tile_live(qs, ks)) continue;
          const int64_t q0 = qb * BQ, rows = std::min(BQ, L - q0);
          const float* q_blk = q + off + q0 * D;
          const float* do_blk = dout + off + q0 * D;
          gemm_row_major(false, true, rows, cols, D, scale, q_blk, D, k_blk, D, 0.0f, probs, BK);
          backward_probs_tile(probs, BK, rows, cols_pad, !tile_full(qs, ks),
                              enc.key_req + b * enc.L_pad + k0, enc.key_pid + b * enc.L_pad + k0,
                              enc.query_thr + b * enc.L_pad + q0, enc.query_pid + b * enc.L_pad + q0,
                              lse + head * L + q0);
          gemm_row_major(true, false, cols, D, rows, 1.0f, probs, BK, do_blk, D, 1.0f, dv_blk, D);
          gemm_row_major(false, true, rows, cols, D, 1.0f, do_blk, D, v_blk, D, 0.0f, dprobs, BK);
          backward_dscores_tile(probs, dprobs, BK, rows, cols_pad, scale, delta + q0);
          gemm_row_major(false, false, rows, D, cols, 1.0f, dprobs, BK, k_blk, D, 1.0f, dq + off + q0 * D, D);
          gemm_row_major(true, false, cols, D, rows, 1.0f, dprobs, BK, q_blk, D, 1.0f, dk_blk, D);
        }
      }
    }
  });
}

// --------------------------------------------------------------------------------------------------
// Op entry points: all input checks here.
// --------------------------------------------------------------------------------------------------
void check_inputs(const char* name, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& kind, const at::Tensor& step, const std::optional<at::Tensor>& padding) {
  TORCH_CHECK(q.dim() == 4, name, ": q must be [B, H, L, D], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), name, ": q, k, v must have one shape, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  at::isFloatingType(q.scalar_type()),
              name, ": q, k, v must share a floating dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && kind.device().is_cpu() &&
                  step.device().is_cpu(),
              name, " (C++): tensors must be on the CPU");
  const int64_t B = q.size(0), L = q.size(2);
  TORCH_CHECK(!at::isFloatingType(kind.scalar_type()) && kind.scalar_type() != at::kBool &&
                  kind.sizes() == at::IntArrayRef({B, L}),
              name, ": kind must be an integer [B, L] = [", B, ", ", L, "] tensor, got ", kind.scalar_type(), " ",
              kind.sizes());
  TORCH_CHECK(!at::isFloatingType(step.scalar_type()) && step.scalar_type() != at::kBool &&
                  step.sizes() == at::IntArrayRef({B, L}),
              name, ": step must be an integer [B, L] = [", B, ", ", L, "] tensor, got ", step.scalar_type(), " ",
              step.sizes());
  if (padding.has_value()) {
    TORCH_CHECK(padding->scalar_type() == at::kBool && padding->sizes() == at::IntArrayRef({B, L}) &&
                    padding->device().is_cpu(),
                name, ": key_padding_mask must be a CPU bool [B, L] = [", B, ", ", L, "] tensor, got ",
                padding->scalar_type(), " ", padding->sizes());
  }
}

// Block sizes: 0 picks the defaults, measured on this machine (2 AVX2 cores, MKL sgemm) at the bench
// shapes B8 H12 D64, L 256 and 1024: the sgemm calls want wide tiles; the forward takes 128 query rows
// x 256 keys (64 rows when that leaves fewer than 4 work items per thread), the backward 128 x 128.
// Explicit sizes (multiples of 8) exist for tests, which use small tiles so that short inputs span
// several tiles and exercise the skipping.
std::pair<int64_t, int64_t> block_sizes(const char* name, bool forward, int64_t B, int64_t H, int64_t L,
                                        int64_t block_q, int64_t block_k) {
  TORCH_CHECK(block_q >= 0 && block_k >= 0 && block_q % kLanes == 0 && block_k % kLanes == 0, name,
              ": block sizes must be multiples of ", kLanes, " (0 = default), got ", block_q, ", ", block_k);
  int64_t default_q = 128, default_k = forward ? 256 : 128;
  if (forward && B * H * ceil_div(L, default_q) < 4 * at::get_num_threads()) default_q = 64;
  return {block_q > 0 ? block_q : default_q, block_k > 0 ? block_k : default_k};
}

std::tuple<at::Tensor, at::Tensor> permutation_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kind, const at::Tensor& step,
    const std::optional<at::Tensor>& key_padding_mask, double scale, int64_t block_q, int64_t block_k) {
  const char* name = "permutation_attention_fwd";
  check_inputs(name, q, k, v, kind, step, key_padding_mask);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const auto [BQ, BK] = block_sizes(name, true, B, H, L, block_q, block_k);
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  // float32 inputs are used in place; other dtypes are converted once (the kernel computes in fp32).
  const at::Tensor qf = q.to(at::kFloat).contiguous(), kf = k.to(at::kFloat).contiguous(),
                   vf = v.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, L, D}, f32);
  at::Tensor lse = at::zeros({B, H, L}, f32);
  if (out.numel() > 0) {
    const EncodedRule enc = encode_rule(kind, step, key_padding_mask, std::lcm(BQ, BK));
    forward_impl(qf.const_data_ptr<float>(), kf.const_data_ptr<float>(), vf.const_data_ptr<float>(), enc, B, H, L,
                 D, static_cast<float>(scale), BQ, BK, out.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
                 f32);
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permutation_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& kind, const at::Tensor& step,
    const std::optional<at::Tensor>& key_padding_mask, double scale, int64_t block_q, int64_t block_k) {
  const char* name = "permutation_attention_bwd";
  check_inputs(name, q, k, v, kind, step, key_padding_mask);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), name, ": grad_out and out must be ",
              q.sizes(), ", got ", grad_out.sizes(), ", ", out.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, L}), name, ": lse must be [B, H, L], got ", lse.sizes());
  const auto [BQ, BK] = block_sizes(name, false, B, H, L, block_q, block_k);
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  const auto as_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor gf = as_f32(grad_out), qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), of = as_f32(out),
                   lf = as_f32(lse);
  at::Tensor dq = at::empty({B, H, L, D}, f32), dk = at::empty({B, H, L, D}, f32), dv = at::empty({B, H, L, D}, f32);
  if (dq.numel() > 0) {
    const EncodedRule enc = encode_rule(kind, step, key_padding_mask, std::lcm(BQ, BK));
    backward_impl(gf.const_data_ptr<float>(), qf.const_data_ptr<float>(), kf.const_data_ptr<float>(),
                  vf.const_data_ptr<float>(), of.const_data_ptr<float>(), lf.const_data_ptr<float>(), enc, B, H, L, D,
                  static_cast<float>(scale), BQ, BK, dq.mutable_data_ptr<float>(), dk.mutable_data_ptr<float>(),
                  dv.mutable_data_ptr<float>(), f32);
  }
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

}  // namespace
}  // namespace fastvl

TORCH_LIBRARY_FRAGMENT(fastvl_cpu, m) {
  m.def(
      "permutation_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor kind, Tensor step, Tensor? key_padding_mask, "
      "float scale, int block_q=0, int block_k=0) -> (Tensor, Tensor)");
  m.def(
      "permutation_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kind, "
      "Tensor step, Tensor? key_padding_mask, float scale, int block_q=0, int block_k=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvl_cpu, CPU, m) {
  m.impl("permutation_attention_fwd", &fastvl::permutation_attention_fwd_cpu);
  m.impl("permutation_attention_bwd", &fastvl::permutation_attention_bwd_cpu);
}
