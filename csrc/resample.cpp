#include "resample.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace pf_engine {

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Sums and maxima in kLanes independent partials: one running sum is a chain of
// dependent adds that the compiler may not reorder (nor vectorize).
constexpr int64_t kLanes = 8;

template <typename Acc, typename Term>
Acc lane_sum(int64_t n, Term term) {
  Acc partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) partial[k] += term(i + k);
  }
  for (; i < n; ++i) partial[0] += term(i);
  Acc total = 0;
  for (int64_t k = 0; k < kLanes; ++k) total += partial[k];
  return total;
}

// The largest of x[0..n), NaNs skipped; `floor` where all are NaN or below it.
float lane_max(const float* x, int64_t n, float floor) {
  float partial[kLanes];
  std::fill(partial, partial + kLanes, floor);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) partial[k] = x[i + k] > partial[k] ? x[i + k] : partial[k];
  }
  for (; i < n; ++i) partial[0] = x[i] > partial[0] ? x[i] : partial[0];
  float top = floor;
  for (int64_t k = 0; k < kLanes; ++k) top = partial[k] > top ? partial[k] : top;
  return top;
}

template <RewardKind K>
inline float step_reward(const float* prm, int64_t i) {
  if constexpr (K == RewardKind::kReward) {
    return prm[i];
  } else {
    float diff = K == RewardKind::kClassLogits ? prm[2 * i + 1] - prm[2 * i] : prm[2 * i] - prm[2 * i + 1];
    return 1.0f / (1.0f + vexp(-diff));
  }
}

// NaN, inf, or a reward outside [0, 1].
template <RewardKind K>
inline bool unusable(const float* prm, int64_t i) {
  if constexpr (K == RewardKind::kReward) {
    return !(prm[i] >= 0.0f) | !(prm[i] <= 1.0f);
  } else {
    return !(std::fabs(prm[2 * i]) < kInf) | !(std::fabs(prm[2 * i + 1]) < kInf);
  }
}

template <Aggregation A>
inline float aggregate(float prev, float r, int32_t steps) {
  if constexpr (A == Aggregation::kLast) return r;
  if constexpr (A == Aggregation::kMin) return steps == 0 ? r : (prev != prev ? prev : std::min(prev, r));
  if constexpr (A == Aggregation::kProduct) return steps == 0 ? r : prev * r;
  if constexpr (A == Aggregation::kMean) return prev + (r - prev) / static_cast<float>(steps + 1);
}

// Rewards, aggregates and step counts of particles [begin, end); returns how many
// live ones had unusable PRM output. Every particle's reward is computed (a
// finished one's is then dropped) in a loop of its own, which vectorizes; the
// bookkeeping loop after it mixes byte, int and float lanes and stays scalar.
template <RewardKind K, Aggregation A>
int32_t step_rewards(const ResampleInputs& in, const ResampleOutputs& out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) out.rewards[i] = step_reward<K>(in.prm, i);
  int32_t invalid = 0;
  for (int64_t i = begin; i < end; ++i) {
    const bool live = in.live[i] != 0;
    const float r = out.rewards[i], prev = in.aggregates[i];
    const int32_t steps = in.num_steps[i];
    invalid += live & unusable<K>(in.prm, i);
    out.aggregates[i] = live ? aggregate<A>(prev, r, steps) : prev;
    out.num_steps[i] = steps + live;
    out.rewards[i] = live ? r : kNaN;
  }
  return invalid;
}

using StepRewards = int32_t (*)(const ResampleInputs&, const ResampleOutputs&, int64_t, int64_t);

template <RewardKind K>
StepRewards step_rewards_for(Aggregation a) {
  switch (a) {
    case Aggregation::kLast: return step_rewards<K, Aggregation::kLast>;
    case Aggregation::kMin: return step_rewards<K, Aggregation::kMin>;
    case Aggregation::kProduct: return step_rewards<K, Aggregation::kProduct>;
    default: return step_rewards<K, Aggregation::kMean>;
  }
}

StepRewards step_rewards_for(RewardKind k, Aggregation a) {
  switch (k) {
    case RewardKind::kClassLogits: return step_rewards_for<RewardKind::kClassLogits>(a);
    case RewardKind::kTokenLogits: return step_rewards_for<RewardKind::kTokenLogits>(a);
    default: return step_rewards_for<RewardKind::kReward>(a);
  }
}

// Uniforms outside [0, 1) (or NaN) are refused before anything is written.
void check_uniforms(const float* u, int64_t n) {
  int64_t outside = 0;
  for (int64_t i = 0; i < n; ++i) outside += !(u[i] >= 0.0f) | !(u[i] < 1.0f);
  if (!outside) return;
  float lo = u[0], hi = u[0];
  for (int64_t i = 0; i < n; ++i) {
    lo = u[i] < lo || u[i] != u[i] ? u[i] : lo;
    hi = u[i] > hi || u[i] != u[i] ? u[i] : hi;
  }
  std::ostringstream msg;
  msg << "uniforms must lie in [0, 1), got " << outside << " outside, values from " << lo << " to " << hi;
  throw std::invalid_argument(msg.str());
}

// Softmax of logit(clip(a)) / T over one problem, written to w; returns the ESS.
// Worked in odds a / (1 - a), so that T = 1 costs no exp or log:
// exp((logit(a_i) - max logit) / T) = (odds_i / max odds) ^ (1 / T).
// Loops are branch-free so that the compiler vectorizes them.
float weigh(const float* agg, int64_t n, float inv_t, float clip, float* w) {
  if (n == 0) return 0.0f;
  const float lo = clip, hi = 1.0f - clip;
  for (int64_t i = 0; i < n; ++i) {
    float a = std::min(std::max(agg[i], lo), hi);  // NaN stays NaN
    w[i] = (a >= 0.0f) & (a <= 1.0f) ? a / (1.0f - a) : kNaN;  // logit is NaN outside [0, 1]
  }
  const float top = lane_max(w, n, -1.0f);  // odds are >= 0; NaN odds spread NaN below
  if (top == kInf) {  // infinite log-weights share the mass
    for (int64_t i = 0; i < n; ++i) w[i] = w[i] == kInf ? 1.0f : 0.0f;
  } else if (top == 0.0f) {  // every weight is zero: uniform
    for (int64_t i = 0; i < n; ++i) w[i] = 1.0f;
  } else if (inv_t == 1.0f) {
    const float scale = 1.0f / top;
    for (int64_t i = 0; i < n; ++i) w[i] *= scale;
  } else {
    for (int64_t i = 0; i < n; ++i) w[i] = std::pow(w[i] / top, inv_t);
  }
  const float norm = static_cast<float>(1.0 / lane_sum<double>(n, [w](int64_t i) { return w[i]; }));
  for (int64_t i = 0; i < n; ++i) w[i] *= norm;
  return static_cast<float>(1.0 / lane_sum<double>(n, [w](int64_t i) { return double(w[i]) * w[i]; }));
}

// How many of the n non-decreasing cdf values are <= p, at most n - 1.
inline int64_t count_le(const double* cdf, int64_t n, double p) {
  int64_t k = std::upper_bound(cdf, cdf + n, p) - cdf;
  return std::min(k, n - 1);
}

// Ancestors (0-based within the problem) of one problem's n slots.
void draw(const ResampleInputs& in, int64_t start, int64_t n, const float* w, double* cdf, int32_t* chosen) {
  auto uniform = [&](int64_t i) -> double {
    return in.uniforms ? in.uniforms[i] : philox_uniform(in.seed, (in.counter << 32) + static_cast<uint64_t>(i));
  };
  if (in.scheme == Scheme::kResidual) {
    // floor(n w) deterministic copies, in particle order, then multinomial draws
    // from the remainders n w - floor(n w).
    const float nf = static_cast<float>(n);
    int64_t first_random = 0;
    double total = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      float nw = w[k] * nf;
      float copies = std::floor(nw);
      for (int64_t c = 0; c < static_cast<int64_t>(copies) && first_random < n; ++c) chosen[first_random++] = k;
      total += static_cast<double>(nw - copies);
      cdf[k] = total;
    }
    for (int64_t i = first_random; i < n; ++i) chosen[i] = count_le(cdf, n, uniform(start + i) * total);
    return;
  }
  double total = 0.0;
  for (int64_t k = 0; k < n; ++k) cdf[k] = total += static_cast<double>(w[k]);
  const double spacing = total / static_cast<double>(n);
  if (in.scheme == Scheme::kMultinomial) {
    for (int64_t i = 0; i < n; ++i) chosen[i] = count_le(cdf, n, uniform(start + i) * total);
    return;
  }
  // Systematic and stratified points rise with i: one merge walk finds them all.
  const double u0 = uniform(start);
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    double u = in.scheme == Scheme::kSystematic ? u0 : uniform(start + i);
    double p = (static_cast<double>(i) + u) * spacing;
    while (k < n && cdf[k] <= p) ++k;
    chosen[i] = static_cast<int32_t>(std::min(k, n - 1));
  }
}

}  // namespace

float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t pa = 0xD2511F53ull * c0, pb = 0xCD9E8D57ull * c2;
    uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0, n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

void philox_uniforms(uint64_t seed, const int64_t* offsets, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = philox_uniform(seed, static_cast<uint64_t>(offsets[i]));
}

int64_t fused_resample(const ResampleInputs& in, const ResampleOutputs& out) {
  const int64_t num_particles = in.seg[in.num_problems];
  if (in.uniforms) check_uniforms(in.uniforms, num_particles);
  // Rewards and aggregates first, so that unusable PRM output stops the step
  // before any weight or ancestor is formed.
  const StepRewards step = step_rewards_for(in.reward, in.aggregation);
  int64_t num_invalid = 0, width = 0;
  for (int64_t b = 0; b < in.num_problems; ++b) {
    out.invalid[b] = step(in, out, in.seg[b], in.seg[b + 1]);
    num_invalid += out.invalid[b];
    width = std::max(width, in.seg[b + 1] - in.seg[b]);
  }
  if (num_invalid) return num_invalid;

  std::vector<double> cdf(width);
  std::vector<int32_t> chosen(width);
  for (int64_t b = 0; b < in.num_problems; ++b) {
    const int64_t start = in.seg[b], n = in.seg[b + 1] - start;
    float* w = out.weights + start;
    const float inv_t = in.temperatures ? in.inv_temperature / in.temperatures[b] : in.inv_temperature;
    float ess = weigh(out.aggregates + start, n, inv_t, in.clip, w);
    bool resample = std::isinf(in.ess_threshold) || ess < static_cast<float>(in.ess_threshold * static_cast<double>(n));
    out.ess[b] = ess;
    out.resampled[b] = resample;
    if (n == 0) continue;
    if (resample) {
      draw(in, start, n, w, cdf.data(), chosen.data());
    } else {
      for (int64_t i = 0; i < n; ++i) chosen[i] = static_cast<int32_t>(i);
    }
    for (int64_t i = 0; i < n; ++i) {
      int64_t src = start + chosen[i];
      out.ancestors[start + i] = static_cast<int32_t>(src);
      out.next_aggregates[start + i] = out.aggregates[src];
      out.next_num_steps[start + i] = out.num_steps[src];
      out.next_live[start + i] = in.live[src];
    }
  }
  return 0;
}

}  // namespace pf_engine
