#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_ops.h"

namespace {

// grid: (num_pairs, num_layers); block: (kThreads,)
// kv:    [num_layers, layer_words] Word, block b of a layer at b * block_words
// pairs: [num_pairs, 2] int32 (src, dst)
template <typename Word>
__global__ void copy_blocks_kernel(Word* __restrict__ kv, const int32_t* __restrict__ pairs,
                                   int64_t layer_words, int64_t block_words) {
  const int64_t src = pairs[2 * blockIdx.x];
  const int64_t dst = pairs[2 * blockIdx.x + 1];
  Word* layer = kv + static_cast<int64_t>(blockIdx.y) * layer_words;
  const Word* from = layer + src * block_words;
  Word* to = layer + dst * block_words;
  for (int64_t i = threadIdx.x; i < block_words; i += blockDim.x) to[i] = from[i];
}

constexpr int kThreads = 256;

template <typename Word>
int launch(std::uintptr_t kv, std::uintptr_t pairs, int64_t num_pairs, int64_t num_layers,
           int64_t layer_stride_bytes, int64_t block_bytes, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(num_pairs), static_cast<unsigned>(num_layers));
  copy_blocks_kernel<Word><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<Word*>(kv), reinterpret_cast<const int32_t*>(pairs),
      layer_stride_bytes / static_cast<int64_t>(sizeof(Word)), block_bytes / static_cast<int64_t>(sizeof(Word)));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

namespace pf_engine {
namespace cuda {

int copy_blocks(std::uintptr_t kv, std::uintptr_t pairs, int64_t num_pairs, int64_t num_layers,
                int64_t layer_stride_bytes, int64_t block_bytes, std::uintptr_t stream) {
  if (num_pairs == 0 || num_layers == 0) return 0;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  // The widest word that divides the base address and both strides: 16-byte
  // vector copies for every usual head size.
  const std::uintptr_t alignment = kv | static_cast<std::uintptr_t>(layer_stride_bytes) |
                                   static_cast<std::uintptr_t>(block_bytes);
  if (alignment % 16 == 0) return launch<int4>(kv, pairs, num_pairs, num_layers, layer_stride_bytes, block_bytes, s);
  if (alignment % 8 == 0) return launch<int2>(kv, pairs, num_pairs, num_layers, layer_stride_bytes, block_bytes, s);
  if (alignment % 4 == 0) return launch<int>(kv, pairs, num_pairs, num_layers, layer_stride_bytes, block_bytes, s);
  return launch<char>(kv, pairs, num_pairs, num_layers, layer_stride_bytes, block_bytes, s);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace pf_engine
