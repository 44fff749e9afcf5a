// Value-weighted attention top-k reward (C-Mask eq. 4), CPU kernel.
//
// For every query row t of head (b, h), with s_i = scale * q_t . k_i over the valid source keys i:
//   a[t,i] = softmax(s)[i] * ||v_i||,      R[t] = mean(top_k_i(a[t,i])) / mean_i(a[t,i])
// The softmax normaliser (over *all* keys the row sees, source and text alike) multiplies every a[t,i]
// of a row by the same constant, so it cancels in the ratio. With u_i = s_i + log ||v_i|| and
// m = max_i u_i this kernel computes
//   R[t] = (sum_{i in top-k} exp(u_i - m) / k) / (sum_i exp(u_i - m) / n_valid)
// where every exponent is <= 0 and the largest term is exactly 1: no overflow, no 0/0 unless every
// ||v_i|| is zero (then R = 0). Top-k on u equals top-k on a (exp is monotonic).
//
// Work is split into items (b, h, block of <= 64 query rows). An item packs its head's valid source
// keys (row-major, fp32; reused by the next item of the same head) with their log-norms, packs its
// valid query rows transposed, computes the [keys, rows] score tile with a register-blocked
// micro-kernel, then reduces eight rows at a time, one row per SIMD lane: a single pass over the keys
// keeps the running max and a branch-free running top-k per lane, a second pass sums exp(u - m).
// Nothing of size B*H*T*I is allocated: per-thread scratch is O(I * (D + 64)), the output is
// [B, H, T] float32. No gradient (the reward is a training signal).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>

namespace fastvl {
namespace {

using namespace simd8;

constexpr int64_t kKeyTile = 12;      // keys per micro-kernel tile (12 accumulators + 2 temporaries)
constexpr int64_t kMaxItemRows = 64;  // query rows per work item
constexpr int64_t kMaxLaneTopk = 32;  // widest branch-free running top-k; larger k sorts per row

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// scores_t[i, r] = sum_d keys[i, d] * q_t[d, r] for i < n_keys_padded (a multiple of kKeyTile; padded
// keys are zero) and r < n_rows_padded (a multiple of 8; padded rows are zero). Twelve accumulators
// of eight rows stay in registers; each step loads eight q values once and broadcasts one element of
// each of twelve keys against them.
FASTVL_MULTIVERSION
void score_tile(const float* __restrict q_t, int64_t n_rows_padded, const float* __restrict keys,
                int64_t head_dim, int64_t n_keys_padded, float* __restrict scores_t) {
  for (int64_t i0 = 0; i0 < n_keys_padded; i0 += kKeyTile) {
    const float* key_tile = keys + i0 * head_dim;
    for (int64_t r0 = 0; r0 < n_rows_padded; r0 += kLanes) {
      Float8 acc[kKeyTile] = {};
      for (int64_t d = 0; d < head_dim; ++d) {
        const Float8 q = load8(q_t + d * n_rows_padded + r0);
#pragma GCC unroll 12
        for (int64_t j = 0; j < kKeyTile; ++j) acc[j] += key_tile[j * head_dim + d] * q;
      }
#pragma GCC unroll 12
      for (int64_t j = 0; j < kKeyTile; ++j) store8(scores_t + (i0 + j) * n_rows_padded + r0, acc[j]);
    }
  }
}

// Rewards of one 8-row group (lane r = row r) from its scores column block. K is the width of the
// branch-free running top-k (k <= K; 0 means k >= n_keys: the top-k is every key). Overwrites the
// scores with u = s * scale + log ||v||.
template <int K>
FASTVL_VECTOR_INLINE void group_rewards(float* __restrict scores_t, int64_t stride, int64_t n_keys,
                                        const float* __restrict log_norm, float scale, int64_t k,
                                        float* __restrict out) {
  Float8 row_max = splat8(-kInf);
  Float8 best[K > 0 ? K : 1];
  for (int j = 0; j < K; ++j) best[j] = splat8(-kInf);
  for (int64_t i = 0; i < n_keys; ++i) {
    float* cell = scores_t + i * stride;
    Float8 x = load8(cell) * scale + log_norm[i];
    store8(cell, x);
    row_max = max8(row_max, x);
    // Insertion into the descending list best[0..K): x bubbles down, no data-dependent branch.
#pragma GCC unroll 32
    for (int j = 0; j < K; ++j) {
      const Float8 hi = max8(best[j], x);
      x = min8(best[j], x);
      best[j] = hi;
    }
  }
  // A lane whose every u is -inf (all value vectors zero) shifts by 0 and is zeroed below.
  const Float8 shift = row_max == -kInf ? Float8{} : row_max;
  Float8 total = {};
  for (int64_t i = 0; i < n_keys; ++i) total += exp8(load8(scores_t + i * stride) - shift);
  Float8 top = total;
  if (K > 0) {
    top = Float8{};
    for (int64_t j = 0; j < k; ++j) top += exp8(best[j] - shift);
  }
  const Float8 reward = (top / static_cast<float>(k)) / (total / static_cast<float>(n_keys));
  store8(out, row_max == -kInf ? Float8{} : reward);
}

// Same as group_rewards for k > kMaxLaneTopk: one row at a time with nth_element.
inline void group_rewards_sorted(float* __restrict scores_t, int64_t stride, int64_t n_keys,
                                  const float* __restrict log_norm, float scale, int64_t k,
                                  float* __restrict row_buffer, float* __restrict out) {
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    float row_max = -kInf;
    for (int64_t i = 0; i < n_keys; ++i) {
      row_buffer[i] = scores_t[i * stride + lane] * scale + log_norm[i];
      row_max = std::max(row_max, row_buffer[i]);
    }
    if (row_max == -kInf) {
      out[lane] = 0.0f;
      continue;
    }
    float total = 0.0f, top = 0.0f;
    for (int64_t i = 0; i < n_keys; ++i) total += std::exp(row_buffer[i] - row_max);
    std::nth_element(row_buffer, row_buffer + (k - 1), row_buffer + n_keys, std::greater<float>());
    for (int64_t j = 0; j < k; ++j) top += std::exp(row_buffer[j] - row_max);
    out[lane] = (top / static_cast<float>(k)) / (total / static_cast<float>(n_keys));
  }
}

// rewards[r] for r < n_rows from scores_t [n_keys (valid), n_rows_padded]; `row_buffer` holds n_keys.
FASTVL_MULTIVERSION
void rewards_from_scores(float* __restrict scores_t, int64_t n_rows, int64_t n_rows_padded, int64_t n_keys,
                         const float* __restrict log_norm, float scale, int64_t topk,
                         float* __restrict row_buffer, float* __restrict rewards) {
  const int64_t k = std::min(topk, n_keys);
  for (int64_t r0 = 0; r0 < n_rows; r0 += kLanes) {
    float* block = scores_t + r0;
    float lanes[kLanes];
    if (k == n_keys) group_rewards<0>(block, n_rows_padded, n_keys, log_norm, scale, k, lanes);
    else if (k <= 4) group_rewards<4>(block, n_rows_padded, n_keys, log_norm, scale, k, lanes);
    else if (k <= 8) group_rewards<8>(block, n_rows_padded, n_keys, log_norm, scale, k, lanes);
    else if (k <= 16) group_rewards<16>(block, n_rows_padded, n_keys, log_norm, scale, k, lanes);
    else if (k <= kMaxLaneTopk) group_rewards<kMaxLaneTopk>(block, n_rows_padded, n_keys, log_norm, scale, k, lanes);
    else group_rewards_sorted(block, n_rows_padded, n_keys, log_norm, scale, k, row_buffer, lanes);
    std::copy(lanes, lanes + std::min(kLanes, n_rows - r0), rewards + r0);
  }
}

// dst[d] = float(src[d * stride]) for d < n.
template <typename scalar_t>
inline void load_row(const scalar_t* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d * stride]);
  }
}

struct Strides4 {
  int64_t b, h, n, d;
  explicit Strides4(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), n(t.stride(2)), d(t.stride(3)) {}
};

template <typename scalar_t>
void reward_cpu_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const bool* source_valid, const bool* query_valid, float scale, int64_t topk,
                     at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t I = k.size(2), Dv = v.size(3);
  const Strides4 sq(q), sk(k), sv(v);
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
  float* out_ptr = out.mutable_data_ptr<float>();

  // Enough items to keep every thread busy, rows per item large enough to amortise key packing.
  const int64_t n_threads = at::get_num_threads();
  int64_t item_rows = std::min<int64_t>(T, kMaxItemRows);
  while (item_rows > kLanes && B * H * ceil_div(T, item_rows) < 4 * n_threads) item_rows = ceil_div(item_rows, 2);
  item_rows = round_up(item_rows, kLanes);
  const int64_t row_blocks = ceil_div(T, item_rows);
  const int64_t I_pad = round_up(std::max<int64_t>(I, 1), kKeyTile);

  // One thread's scratch, in floats: keys, log_norm, q_t, scores_t, a row buffer, one value row.
  const int64_t scratch_floats = I_pad * D + I_pad + D * item_rows + I_pad * item_rows + I_pad + Dv;

  at::parallel_for(0, B * H * row_blocks, 1, [&](int64_t begin, int64_t end) {
    // Allocated through ATen (not std::vector) so memory profilers see it.
    at::Tensor scratch = at::empty({scratch_floats}, q.options().dtype(at::kFloat));
    float* keys = scratch.mutable_data_ptr<float>();
    float* log_norm = keys + I_pad * D;
    float* q_t = log_norm + I_pad;
    float* scores_t = q_t + D * item_rows;
    float* row_buffer = scores_t + I_pad * item_rows;
    float* value_row = row_buffer + I_pad;
    int64_t rows[kMaxItemRows + kLanes];
    float rewards[kMaxItemRows + kLanes];
    int64_t packed_head = -1, n_valid = 0;

    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / row_blocks, block = item % row_blocks;
      const int64_t b = head / H, h = head % H;
      if (head != packed_head) {  // pack this head's valid source keys and their log ||v||
        packed_head = head;
        n_valid = 0;
        const scalar_t* k_bh = k_ptr + b * sk.b + h * sk.h;
        const scalar_t* v_bh = v_ptr + b * sv.b + h * sv.h;
        for (int64_t i = 0; i < I; ++i) {
          if (source_valid && !source_valid[b * I + i]) continue;
          load_row(k_bh + i * sk.n, sk.d, D, keys + n_valid * D);
          load_row(v_bh + i * sv.n, sv.d, Dv, value_row);
          float sq_norm = 0.0f;
          for (int64_t d = 0; d < Dv; ++d) sq_norm += value_row[d] * value_row[d];
          log_norm[n_valid] = 0.5f * std::log(sq_norm);  // -inf for a zero value vector
          ++n_valid;
        }
        // Zero key padding: the micro-kernel reads whole tiles.
        std::fill(keys + n_valid * D, keys + round_up(std::max<int64_t>(n_valid, 1), kKeyTile) * D, 0.0f);
      }
      if (n_valid == 0) continue;  // no source token: rewards stay 0

      // Pack this block's valid query rows, transposed: q_t[d, r].
      const int64_t t0 = block * item_rows, t1 = std::min(T, t0 + item_rows);
      const scalar_t* q_bh = q_ptr + b * sq.b + h * sq.h;
      int64_t n_rows = 0;
      for (int64_t t = t0; t < t1; ++t)
        if (!query_valid || query_valid[b * T + t]) rows[n_rows++] = t;
      if (n_rows == 0) continue;
      const int64_t n_rows_pad = round_up(n_rows, kLanes);
      for (int64_t r = 0; r < n_rows_pad; ++r) {
        if (r < n_rows) {
          const scalar_t* q_row = q_bh + rows[r] * sq.n;
          for (int64_t d = 0; d < D; ++d) q_t[d * n_rows_pad + r] = static_cast<float>(q_row[d * sq.d]);
        } else {
          for (int64_t d = 0; d < D; ++d) q_t[d * n_rows_pad + r] = 0.0f;
        }
      }

      score_tile(q_t, n_rows_pad, keys, D, round_up(n_valid, kKeyTile), scores_t);
      rewards_from_scores(scores_t, n_rows, n_rows_pad, n_valid, log_norm, scale, topk, row_buffer, rewards);
      float* out_bh = out_ptr + (b * H + h) * T;
      for (int64_t r = 0; r < n_rows; ++r) out_bh[rows[r]] = rewards[r];
    }
  });
}

at::Tensor value_weighted_topk_reward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& source_mask,
                                          const std::optional<at::Tensor>& query_mask, double scale,
                                          int64_t topk) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "value_weighted_topk_reward: q, k, v must be [B, H, N, D], got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "value_weighted_topk_reward (C++): tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "value_weighted_topk_reward: q, k, v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), I = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "value_weighted_topk_reward: k must be [B, H, I, D] matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == I,
              "value_weighted_topk_reward: v must be [B, H, I, Dv] matching k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(topk >= 1, "value_weighted_topk_reward: topk must be >= 1, got ", topk);

  at::Tensor source_valid, query_valid;
  if (source_mask.has_value()) {
    TORCH_CHECK(source_mask->scalar_type() == at::kBool && source_mask->sizes() == at::IntArrayRef({B, I}),
                "value_weighted_topk_reward: source_mask must be bool [B, I] = [", B, ", ", I, "], got ",
                source_mask->scalar_type(), " ", source_mask->sizes());
    source_valid = source_mask->contiguous();
  }
  if (query_mask.has_value()) {
    TORCH_CHECK(query_mask->scalar_type() == at::kBool && query_mask->sizes() == at::IntArrayRef({B, T}),
                "value_weighted_topk_reward: query_mask must be bool [B, T] = [", B, ", ", T, "], got ",
                query_mask->scalar_type(), " ", query_mask->sizes());
    query_valid = query_mask->contiguous();
  }

  at::Tensor out = at::zeros({B, H, T}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || I == 0) return out;
  const bool* source_ptr = source_valid.defined() ? source_valid.const_data_ptr<bool>() : nullptr;
  const bool* query_ptr = query_valid.defined() ? query_valid.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "value_weighted_topk_reward", [&] {
    reward_cpu_impl<scalar_t>(q, k, v, source_ptr, query_ptr, static_cast<float>(scale), topk, out);
  });
  return out;
}

}  // namespace
}  // namespace fastvl

TORCH_LIBRARY_FRAGMENT(fastvl_cpu, m) {
  m.def(
      "value_weighted_topk_reward(Tensor q, Tensor k, Tensor v, Tensor? source_mask, Tensor? query_mask, "
      "float scale, int topk) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvl_cpu, CPU, m) {
  m.impl("value_weighted_topk_reward", &fastvl::value_weighted_topk_reward_cpu);
}
