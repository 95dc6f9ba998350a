// Host entry points of the CUDA kernels in csrc/cuda/. They take raw device
// pointers and a stream (no torch types), so they build with plain nvcc.
#pragma once

#include <cstdint>

namespace pf_engine {
namespace cuda {

// kv[:, dst] = kv[:, src] for every (src, dst) row of pairs, all layers, on `stream`.
//   kv:    device pointer to [num_layers, num_blocks, block_bytes] bytes, layers
//          layer_stride_bytes apart
//   pairs: device pointer to [num_pairs, 2] int32
// Returns a cudaError_t value; 0 is success.
int copy_blocks(std::uintptr_t kv, std::uintptr_t pairs, int64_t num_pairs, int64_t num_layers,
                int64_t layer_stride_bytes, int64_t block_bytes, std::uintptr_t stream);

const char* error_string(int code);

}  // namespace cuda
}  // namespace pf_engine
