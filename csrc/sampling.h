// Token draws by inverse CDF on the CPU: the sequential float64 running sum of a row of
// float32 probabilities, searched for the row's uniform. Knows nothing of torch.
#pragma once

#include <cstdint>

namespace pf_engine {

// out[r] = the first i with cdf_r[i] > u_r * cdf_r[vocab - 1], at most vocab - 1, where
// cdf_r[i] = probs[r][0] + ... + probs[r][i] summed left to right in float64: what
// torch.searchsorted(probs.double().cumsum(-1), u * total, right=True) gives, bit for bit.
// probs: [num_rows, vocab] float32; uniforms: [num_rows] float32; out: [num_rows] int64.
void inverse_cdf_sample(const float* probs, const float* uniforms, int64_t num_rows, int64_t vocab, int64_t* out,
                        int num_threads);

}  // namespace pf_engine
