// Span-mask sampling (C-Mask eq. 2) with a factorization order, CPU kernel.
//
// torch.ops.fastvl_cpu.sample_spans(start_probs, cont_probs, lengths, counts, order_scores?, seed,
// order) -> (mask, span_id, step, log_prob, entropy). The process and its log-probability are
// documented in kernels/span_sampling.py; this file follows the Triton kernel there decision for
// decision: one uniform per decision from Philox4x32-10 with key = seed and counter
// (draw, row, 0, 0) -- bit-identical to tl.rand(seed, (row << 32) + draw) -- and inverse-CDF
// categorical draws in position order. Rows are independent: at::parallel_for over rows.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

enum class Order { kLearned, kLeftToRight, kRandom, kSingle };

inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox4x32 with 10 rounds and Triton's round/key constants; returns the uniform float in [0, 1)
// that tl.rand makes from the first output word (int32 bits, negatives folded by ~x, times
// 4.6566127342e-10 in fp32).
inline float philox_uniform(uint64_t seed, uint32_t draw, uint32_t row) {
  uint32_t c0 = draw, c1 = row, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Per-thread scratch, sized once per chunk of rows.
struct Scratch {
  std::vector<float> w, xlogx_w, e, span_score;
  std::vector<uint8_t> is_free, is_start;
  std::vector<int64_t> span_id, step_of_span, span_pos;
  explicit Scratch(int64_t L)
      : w(L), xlogx_w(L), e(L), span_score(L), is_free(L), is_start(L), span_id(L), step_of_span(L + 1),
        span_pos(L) {}
};

// Index chosen by inverse CDF over positions 0..n-1 with running sum `cum` of weight(j) >= 0 and
// total `total` (= the last running sum): the first j with weight(j) > 0 and
// (cum_j > target or cum_j >= total), target = u * total. The second clause catches u * total
// rounding up to total. Identical to the Triton kernel's #{j : cum_j <= target and cum_j < total}.
template <typename Weight>
inline int64_t inverse_cdf(int64_t n, float target, float total, Weight weight) {
  float cum = 0.f;
  int64_t last = -1;
  for (int64_t j = 0; j < n; ++j) {
    const float wj = weight(j);
    if (wj > 0.f) {
      cum += wj;
      last = j;
      if (cum > target || cum >= total) return j;
    }
  }
  return last;
}

void sample_row(const float* p, const float* s, const float* g, int64_t L, int64_t length,
                int64_t n_target, uint64_t seed, uint32_t row, Order order, bool* mask_out,
                int64_t* span_id_out, int64_t* step_out, float* log_prob_out, float* entropy_out,
                Scratch& sc) {
  int64_t* sid = sc.span_id.data();
  uint8_t* is_free = sc.is_free.data();  // valid and not masked yet
  std::fill(sid, sid + L, 0);
  std::fill(is_free, is_free + L, 0);
  std::fill(is_free, is_free + length, 1);
  std::fill(sc.is_start.begin(), sc.is_start.end(), 0);
  for (int64_t j = 0; j < length; ++j) {
    const float pj = p[j];
    const float wj = (pj > 0.f && std::isfinite(pj)) ? pj : 0.f;
    sc.w[j] = wj;
    sc.xlogx_w[j] = wj > 0.f ? wj * std::log(wj) : 0.f;
  }
  double log_prob = 0.0, entropy = 0.0;
  int64_t n_masked = 0, n_spans = 0, cursor = -1;
  uint32_t draw = 0;

  while (n_masked < n_target) {
    const float u = philox_uniform(seed, draw++, row);
    if (cursor >= 0 && cursor < length && is_free[cursor]) {
      // Bernoulli: token `cursor` joins the span covering `cursor - 1` with probability s[cursor].
      float sj = s[cursor];
      sj = std::isnan(sj) ? 0.f : std::min(std::max(sj, 0.f), 1.f);
      const float s_log = std::log(std::max(sj, 1e-37f));
      const float f_log = std::log(std::max(1.f - sj, 1e-37f));
      entropy -= static_cast<double>(sj * s_log + (1.f - sj) * f_log);
      if (u < sj) {
        sid[cursor] = n_spans;
        is_free[cursor] = 0;
        ++n_masked;
        ++cursor;
        log_prob += s_log;
      } else {
        cursor = -1;
        log_prob += f_log;
      }
      continue;
    }
    // Start: categorical over the free valid positions, renormalised weights (fp32).
    float Z = 0.f, X = 0.f;
    for (int64_t j = 0; j < length; ++j) {
      const float f = is_free[j];
      Z += f * sc.w[j];
      X += f * sc.xlogx_w[j];
    }
    int64_t idx;
    if (Z > 0.f && std::isfinite(Z)) {
      idx = inverse_cdf(length, u * Z, Z, [&](int64_t j) { return is_free[j] ? sc.w[j] : 0.f; });
      const double log_Z = std::log(static_cast<double>(Z));
      log_prob += std::log(static_cast<double>(sc.w[idx])) - log_Z;
      entropy += log_Z - static_cast<double>(X) / Z;
    } else {
      // Guard: every remaining weight is 0 or non-finite (or the sum overflows): uniform.
      int64_t n_free = 0;
      for (int64_t j = 0; j < length; ++j) n_free += is_free[j];
      const float n_f = static_cast<float>(n_free);
      idx = inverse_cdf(length, u * n_f, n_f, [&](int64_t j) { return is_free[j] ? 1.f : 0.f; });
      const double log_n = std::log(static_cast<double>(n_free));
      log_prob -= log_n;
      entropy += log_n;
    }
    sid[idx] = ++n_spans;
    is_free[idx] = 0;
    sc.is_start[idx] = 1;
    ++n_masked;
    cursor = idx + 1;
  }

  // Factorization order.
  int64_t* step_of_span = sc.step_of_span.data();
  std::fill(step_of_span, step_of_span + n_spans + 1, 0);
  if (order == Order::kSingle) {
    for (int64_t k = 1; k <= n_spans; ++k) step_of_span[k] = 1;
  } else if (order == Order::kLeftToRight) {
    int64_t rank = 0;
    for (int64_t j = 0; j < length; ++j)
      if (sc.is_start[j]) step_of_span[sid[j]] = ++rank;
  } else {
    // Plackett-Luce over the spans' start scores (all 0 for a random order). The remaining spans
    // are kept compacted in position order (the order of the Triton kernel's inverse CDF).
    const bool learned = order == Order::kLearned;
    int64_t n_rem = 0;
    for (int64_t j = 0; j < length; ++j) {
      if (sc.is_start[j]) {
        sc.span_pos[n_rem] = j;
        sc.span_score[n_rem++] = learned ? g[j] : 0.f;
      }
    }
    float* score = sc.span_score.data();
    float* e = sc.e.data();
    for (int64_t t = 1; t <= n_spans; ++t) {
      const float u = philox_uniform(seed, draw++, row);
      const float m = *std::max_element(score, score + n_rem);
      float Z = 0.f, T = 0.f;
      for (int64_t r = 0; r < n_rem; ++r) {
        const float shifted = score[r] - m;
        e[r] = std::exp(shifted);
        Z += e[r];
        T += e[r] * shifted;
      }
      const int64_t r = inverse_cdf(n_rem, u * Z, Z, [&](int64_t i) { return e[i]; });
      const double log_Z = std::log(static_cast<double>(Z));
      log_prob += static_cast<double>(score[r] - m) - log_Z;
      entropy += log_Z - static_cast<double>(T) / Z;
      step_of_span[sid[sc.span_pos[r]]] = t;
      std::copy(score + r + 1, score + n_rem, score + r);
      std::copy(sc.span_pos.begin() + r + 1, sc.span_pos.begin() + n_rem, sc.span_pos.begin() + r);
      --n_rem;
    }
  }

  for (int64_t j = 0; j < L; ++j) {
    mask_out[j] = sid[j] > 0;
    span_id_out[j] = sid[j];
    step_out[j] = step_of_span[sid[j]];
  }
  *log_prob_out = static_cast<float>(log_prob);
  *entropy_out = static_cast<float>(entropy);
}

Order parse_order(c10::string_view order) {
  const std::string o(order.data(), order.size());
  if (o == "learned") return Order::kLearned;
  if (o == "left_to_right") return Order::kLeftToRight;
  if (o == "random") return Order::kRandom;
  if (o == "single") return Order::kSingle;
  TORCH_CHECK(false, "sample_spans: unknown order '", o, "' (learned, left_to_right, random, single)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_spans_cpu(
    const at::Tensor& start_probs, const at::Tensor& cont_probs, const at::Tensor& lengths,
    const at::Tensor& counts, const c10::optional<at::Tensor>& order_scores, int64_t seed,
    c10::string_view order_name) {
  const Order order = parse_order(order_name);
  TORCH_CHECK(start_probs.dim() == 2, "sample_spans: start_probs must be [B, L]");
  TORCH_CHECK(cont_probs.sizes() == start_probs.sizes(), "sample_spans: cont_probs must match start_probs");
  const int64_t B = start_probs.size(0), L = start_probs.size(1);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, "sample_spans: lengths must be [B]");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == B, "sample_spans: counts must be [B]");
  TORCH_CHECK(start_probs.device().is_cpu() && cont_probs.device().is_cpu() && lengths.device().is_cpu() &&
                  counts.device().is_cpu(),
              "sample_spans: CPU tensors expected");
  TORCH_CHECK(at::isFloatingType(start_probs.scalar_type()) && at::isFloatingType(cont_probs.scalar_type()),
              "sample_spans: start_probs and cont_probs must be floating point");
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()) && !at::isFloatingType(counts.scalar_type()),
              "sample_spans: lengths and counts must be integer tensors");
  TORCH_CHECK(L < (int64_t(1) << 31) && B < (int64_t(1) << 32), "sample_spans: B or L too large for the RNG counter");
  at::Tensor g;
  if (order == Order::kLearned) {
    TORCH_CHECK(order_scores.has_value(), "sample_spans: order='learned' needs order_scores");
    TORCH_CHECK(order_scores->sizes() == start_probs.sizes() && order_scores->device().is_cpu() &&
                    at::isFloatingType(order_scores->scalar_type()),
                "sample_spans: order_scores must be a float CPU [B, L] tensor");
    g = order_scores->to(at::kFloat).contiguous();
  }
  const at::Tensor p = start_probs.to(at::kFloat).contiguous();
  const at::Tensor s = cont_probs.to(at::kFloat).contiguous();
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const at::Tensor cnt = counts.to(at::kLong).contiguous();

  auto mask = at::empty({B, L}, start_probs.options().dtype(at::kBool));
  auto span_id = at::empty({B, L}, start_probs.options().dtype(at::kLong));
  auto step = at::empty({B, L}, start_probs.options().dtype(at::kLong));
  auto log_prob = at::empty({B}, start_probs.options().dtype(at::kFloat));
  auto entropy = at::empty({B}, start_probs.options().dtype(at::kFloat));

  const float* p_ptr = p.data_ptr<float>();
  const float* s_ptr = s.data_ptr<float>();
  const float* g_ptr = g.defined() ? g.data_ptr<float>() : nullptr;
  const int64_t* len_ptr = len.data_ptr<int64_t>();
  const int64_t* cnt_ptr = cnt.data_ptr<int64_t>();
  bool* mask_ptr = mask.data_ptr<bool>();
  int64_t* sid_ptr = span_id.data_ptr<int64_t>();
  int64_t* step_ptr = step.data_ptr<int64_t>();
  float* lp_ptr = log_prob.data_ptr<float>();
  float* ent_ptr = entropy.data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);

  // A row costs O(n_spans * L); a grain of 16 rows keeps task overhead small at L ~ 40.
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    Scratch sc(L);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t length = std::min(std::max(len_ptr[b], int64_t(0)), L);
      const int64_t n_target = std::min(std::max(cnt_ptr[b], int64_t(0)), length);
      sample_row(p_ptr + b * L, s_ptr + b * L, g_ptr ? g_ptr + b * L : nullptr, L, length, n_target, key,
                 static_cast<uint32_t>(b), order, mask_ptr + b * L, sid_ptr + b * L, step_ptr + b * L,
                 lp_ptr + b, ent_ptr + b, sc);
    }
  });
  return {mask, span_id, step, log_prob, entropy};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvl_cpu, m) {
  m.def(
      "sample_spans(Tensor start_probs, Tensor cont_probs, Tensor lengths, Tensor counts, Tensor? order_scores, "
      "int seed, str order) -> (Tensor mask, Tensor span_id, Tensor step, Tensor log_prob, Tensor entropy)");
}

TORCH_LIBRARY_IMPL(fastvl_cpu, CPU, m) { m.impl("sample_spans", &sample_spans_cpu); }
