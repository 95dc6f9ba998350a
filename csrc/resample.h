// The fused particle-filter step on the CPU: PRM outputs -> step rewards ->
// aggregates -> weights -> resampling decision -> ancestors, for every problem
// of a batch in one pass. The math is kernels/resample.py's (its module
// docstring spells it out); this is the CPU path, checked against the torch
// reference there. Knows nothing of torch or Python: it reads and writes the
// caller's contiguous arrays.
#pragma once

#include <cstdint>

namespace pf_engine {

enum class RewardKind : int { kClassLogits = 0, kTokenLogits = 1, kReward = 2 };
enum class Aggregation : int { kLast = 0, kMin = 1, kProduct = 2, kMean = 3 };
enum class Scheme : int { kSystematic = 0, kStratified = 1, kMultinomial = 2, kResidual = 3 };

// Problem b owns particles seg[b] .. seg[b + 1] - 1 (at most 4,096 of them).
struct ResampleInputs {
  const int64_t* seg;         // [num_problems + 1]
  int64_t num_problems;
  const float* prm;           // [num_particles, 2] logits, or [num_particles] rewards
  const uint8_t* live;        // [num_particles] 0 / 1
  const float* aggregates;    // [num_particles]
  const int32_t* num_steps;   // [num_particles]
  const float* uniforms;      // [num_particles] in [0, 1), or nullptr: Philox draws
  const float* temperatures;  // [num_problems] each problem's own weight temperature (> 0), or nullptr: all 1
  uint64_t seed;              // Philox key
  uint64_t counter;           // call number: draw of particle i is at offset (counter << 32) + i
  RewardKind reward;
  Aggregation aggregation;
  Scheme scheme;
  float inv_temperature;      // 1 / the weight temperature every problem shares
  float clip;
  double ess_threshold;       // +inf: always resample
};

struct ResampleOutputs {
  float* rewards;             // [num_particles] NaN where not live
  float* aggregates;          // [num_particles]
  int32_t* num_steps;         // [num_particles]
  float* weights;             // [num_particles]
  float* ess;                 // [num_problems]
  uint8_t* resampled;         // [num_problems] 0 / 1
  int32_t* ancestors;         // [num_particles] global indices
  float* next_aggregates;     // [num_particles] aggregates[ancestors]
  int32_t* next_num_steps;    // [num_particles]
  uint8_t* next_live;         // [num_particles]
  int32_t* invalid;           // [num_problems] live particles whose PRM output is NaN / inf / outside [0, 1]
};

// Returns how many live particles had unusable PRM output. When that is not 0,
// only `invalid` is meaningful: the step stops before any weight is formed.
int64_t fused_resample(const ResampleInputs& in, const ResampleOutputs& out);

// Triton's tl.rand(seed, offset): Philox4x32-10, first word, as a float in [0, 1).
float philox_uniform(uint64_t seed, uint64_t offset);

// out[i] = philox_uniform(seed, offsets[i]) for i < n (offsets' int64 bits read as uint64).
void philox_uniforms(uint64_t seed, const int64_t* offsets, int64_t n, float* out);

}  // namespace pf_engine
