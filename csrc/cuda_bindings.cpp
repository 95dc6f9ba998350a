// pf_engine._C_cuda: the optional CUDA kernels, bound on raw device pointers.
#include <pybind11/pybind11.h>

#include <string>

#include "cuda_ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pf_engine CUDA kernels (built only where nvcc and a CUDA driver were found)";
  m.def(
      "copy_blocks",
      [](std::uintptr_t kv, std::uintptr_t pairs, int64_t num_pairs, int64_t num_layers, int64_t layer_stride_bytes,
         int64_t block_bytes, std::uintptr_t stream) {
        int code = pf_engine::cuda::copy_blocks(kv, pairs, num_pairs, num_layers, layer_stride_bytes, block_bytes,
                                                stream);
        if (code != 0) throw std::runtime_error(std::string("copy_blocks: ") + pf_engine::cuda::error_string(code));
      },
      py::kw_only(), py::arg("kv"), py::arg("pairs"), py::arg("num_pairs"), py::arg("num_layers"), py::arg("layer_stride_bytes"),
      py::arg("block_bytes"), py::arg("stream"),
      "kv[:, dst] = kv[:, src] for every (src, dst) int32 pair; pointers are device addresses.");
}
