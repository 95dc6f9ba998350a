// pf_engine._C: declarations and argument conversion only; logic lives in block_manager.cpp,
// resample.cpp, attention.cpp and sampling.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention.h"
#include "block_manager.h"
#include "parallel.h"
#include "resample.h"
#include "sampling.h"

namespace py = pybind11;
using pf_engine::BlockManager;
using pf_engine::View;

namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Lists and integer arrays of any width become one contiguous int64 array;
// floats and other dtypes are refused rather than silently truncated.
Int64Array as_ids(const py::handle& obj, const char* name) {
  py::array arr = py::array::ensure(obj);
  if (!arr) throw py::type_error(std::string(name) + " must be a 1-D sequence of integers");
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions");
  }
  char kind = arr.dtype().kind();
  if (arr.size() > 0 && kind != 'i' && kind != 'u') {
    throw py::type_error(std::string(name) + " must hold integers, got dtype " +
                         py::str(arr.dtype()).cast<std::string>());
  }
  return Int64Array::ensure(arr);
}

View<int64_t> view(const Int64Array& arr) { return {arr.data(), static_cast<std::size_t>(arr.size())}; }

// Hands a vector to numpy without copying it.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values, std::vector<py::ssize_t> shape = {}) {
  auto* owned = new std::vector<T>(std::move(values));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  if (shape.empty()) shape = {static_cast<py::ssize_t>(owned->size())};
  return py::array_t<T>(shape, owned->data(), free_when_done);
}

template <typename T>
py::array_t<T> copy_to_numpy(const std::vector<T>& values) {
  return to_numpy(std::vector<T>(values));
}

py::tuple append_result(pf_engine::AppendResult&& r) {
  auto num_copies = static_cast<py::ssize_t>(r.copies.size() / 2);
  return py::make_tuple(to_numpy(std::move(r.slot_mapping)), to_numpy(std::move(r.copies), {num_copies, 2}));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pf_engine native core: the paged KV-cache block manager and the fused resampling step on the CPU";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pf_engine::OutOfBlocks& e) {
      py::object cls = py::module_::import("pf_engine.errors").attr("OutOfBlocksError");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const pf_engine::UnknownSequence& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });

  py::class_<BlockManager>(m, "BlockManager", R"doc(
Fixed pool of KV-cache blocks shared by reference count between sequences.

Parameters
----------
num_blocks : int
    Blocks in the pool.
block_size : int
    Token slots per block. Token ``t`` of a sequence lives in slot
    ``block_table[t // block_size] * block_size + t % block_size``.

Every mutating call either succeeds or raises with nothing changed:
``OutOfBlocksError`` when the pool is too small, ``KeyError`` for an unknown
or freed sequence id, ``ValueError``/``TypeError`` for malformed arguments.
)doc")
      .def(py::init<int32_t, int32_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_seqs", &BlockManager::num_seqs)
      .def("can_allocate", &BlockManager::can_allocate, py::arg("num_tokens"),
           "Whether allocate(num_tokens) would find enough free blocks.")
      .def("allocate", &BlockManager::allocate, py::arg("num_tokens"),
           "New sequence holding num_tokens token slots; returns its id.")
      .def("free", &BlockManager::free, py::arg("seq_id"),
           "Drop a sequence; blocks no other sequence references return to the pool.")
      .def("fork", &BlockManager::fork, py::arg("seq_id"),
           "New sequence sharing every block of seq_id (no copy, no new block); returns its id.")
      .def(
          "can_append",
          [](const BlockManager& self, int64_t seq_id, int64_t num_new_tokens) {
            return self.can_append({&seq_id, 1}, {&num_new_tokens, 1});
          },
          py::arg("seq_id"), py::arg("num_new_tokens"))
      .def(
          "can_append",
          [](const BlockManager& self, const py::object& seq_ids, const py::object& num_new_tokens) {
            auto ids = as_ids(seq_ids, "seq_ids");
            auto counts = as_ids(num_new_tokens, "num_new_tokens");
            return self.can_append(view(ids), view(counts));
          },
          py::arg("seq_ids"), py::arg("num_new_tokens"),
          "Whether append(seq_ids, num_new_tokens) would find enough free blocks.")
      .def(
          "num_blocks_to_append",
          [](const BlockManager& self, const py::object& seq_ids, const py::object& num_new_tokens) {
            auto ids = as_ids(seq_ids, "seq_ids");
            auto counts = as_ids(num_new_tokens, "num_new_tokens");
            return self.num_blocks_to_append(view(ids), view(counts));
          },
          py::arg("seq_ids"), py::arg("num_new_tokens"),
          "Free blocks append(seq_ids, num_new_tokens) would take, copy-on-write copies included.")
      .def(
          "truncate",
          [](BlockManager& self, const py::object& seq_ids, const py::object& num_tokens) {
            auto ids = as_ids(seq_ids, "seq_ids");
            auto counts = as_ids(num_tokens, "num_tokens");
            self.truncate(view(ids), view(counts));
          },
          py::arg("seq_ids"), py::arg("num_tokens"),
          "Shorten each sequence to its first num_tokens[i] tokens (at most its length), giving back blocks it no "
          "longer needs: the undo of an append whose tokens were never written. Nothing changes on an error.")
      .def(
          "append",
          [](BlockManager& self, int64_t seq_id, int64_t num_new_tokens) {
            return append_result(self.append({&seq_id, 1}, {&num_new_tokens, 1}));
          },
          py::arg("seq_id"), py::arg("num_new_tokens"))
      .def(
          "append",
          [](BlockManager& self, const py::object& seq_ids, const py::object& num_new_tokens) {
            auto ids = as_ids(seq_ids, "seq_ids");
            auto counts = as_ids(num_new_tokens, "num_new_tokens");
            return append_result(self.append(view(ids), view(counts)));
          },
          py::arg("seq_ids"), py::arg("num_new_tokens"), R"doc(
Grow sequences by num_new_tokens slots each (one id, or 1-D arrays of ids and counts).

Returns
-------
slot_mapping : int32 ndarray [sum(num_new_tokens)]
    Slot of every new token, sequence by sequence.
copies : int32 ndarray [num_copies, 2]
    (src, dst) block copies to apply before writing: a sequence whose partly
    filled last block is shared gets a private copy of it (copy-on-write).
    No block is both a src and a dst within one call.
)doc")
      .def(
          "resample",
          [](BlockManager& self, const py::object& seq_ids, const py::object& ancestors) {
            auto ids = as_ids(seq_ids, "seq_ids");
            auto anc = as_ids(ancestors, "ancestors");
            return to_numpy(self.resample(view(ids), view(anc)));
          },
          py::arg("seq_ids"), py::arg("ancestors"), R"doc(
Replace a generation of sequences by the chosen ancestors, in one call.

seq_ids [N] is the generation; ancestors [M] indexes into it. Returns int64
new_seq_ids [M] where new_seq_ids[j] holds the tokens of seq_ids[ancestors[j]].
An ancestor chosen k times keeps its id at its first position and is forked
k-1 times; sequences never chosen are freed. No block is copied or taken.
)doc")
      .def(
          "page_table",
          [](const BlockManager& self, const py::object& seq_ids) {
            auto ids = as_ids(seq_ids, "seq_ids");
            pf_engine::PageTable t = self.page_table(view(ids));
            return py::make_tuple(to_numpy(std::move(t.indptr)), to_numpy(std::move(t.indices)),
                                  to_numpy(std::move(t.last_page_len)));
          },
          py::arg("seq_ids"), R"doc(
CSR page table of a batch, as flashinfer's paged-KV wrappers take it.

Returns int32 arrays ``indptr`` [N + 1], ``indices`` [indptr[N]] and
``last_page_len`` [N]: the blocks of seq_ids[i] are
``indices[indptr[i]:indptr[i + 1]]``, its last block holding
``last_page_len[i]`` tokens.
)doc")
      .def(
          "slot_mapping",
          [](const BlockManager& self, const py::object& seq_ids, const py::object& num_new_tokens) {
            auto ids = as_ids(seq_ids, "seq_ids");
            auto counts = as_ids(num_new_tokens, "num_new_tokens");
            return to_numpy(self.slot_mapping(view(ids), view(counts)));
          },
          py::arg("seq_ids"), py::arg("num_new_tokens"),
          "int32 slots of the last num_new_tokens[i] tokens of each sequence, concatenated.")
      .def(
          "block_table", [](const BlockManager& self, int64_t seq_id) { return copy_to_numpy(self.block_table(seq_id)); },
          py::arg("seq_id"), "int32 block ids of one sequence.")
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def(
          "num_unshared_blocks",
          [](const BlockManager& self, const py::handle& seq_ids) {
            auto ids = as_ids(seq_ids, "seq_ids");
            return self.num_unshared_blocks(view(ids));
          },
          py::arg("seq_ids"), "Blocks the sequences would hold if none shared any (their own block counts, summed).")
      .def(
          "ref_counts", [](const BlockManager& self) { return copy_to_numpy(self.ref_counts()); },
          "int32 [num_blocks] sequences referencing each block.")
      .def("seq_ids", [](const BlockManager& self) { return to_numpy(self.seq_ids()); },
           "int64 ids of the live sequences, ascending.")
      .def("__repr__", [](const BlockManager& self) {
        return "BlockManager(num_blocks=" + std::to_string(self.num_blocks()) +
               ", block_size=" + std::to_string(self.block_size()) +
               ", num_free_blocks=" + std::to_string(self.num_free_blocks()) +
               ", num_seqs=" + std::to_string(self.num_seqs()) + ")";
      });

  // The step's modes, named as kernels/resample.py and pf_engine/resample.py name them.
  py::enum_<pf_engine::RewardKind>(m, "RewardKind")
      .value("class_logits", pf_engine::RewardKind::kClassLogits)
      .value("token_logits", pf_engine::RewardKind::kTokenLogits)
      .value("reward", pf_engine::RewardKind::kReward);
  py::enum_<pf_engine::Aggregation>(m, "Aggregation")
      .value("last", pf_engine::Aggregation::kLast)
      .value("min", pf_engine::Aggregation::kMin)
      .value("product", pf_engine::Aggregation::kProduct)
      .value("mean", pf_engine::Aggregation::kMean);
  py::enum_<pf_engine::Scheme>(m, "Scheme")
      .value("systematic", pf_engine::Scheme::kSystematic)
      .value("stratified", pf_engine::Scheme::kStratified)
      .value("multinomial", pf_engine::Scheme::kMultinomial)
      .value("residual", pf_engine::Scheme::kResidual);

  // Raw addresses of contiguous CPU arrays, as pf_engine/resample.py passes them; every
  // argument by keyword, so that no caller depends on their order.
  m.def(
      "fused_resample",
      [](std::uintptr_t seg, int64_t num_problems, std::uintptr_t prm, std::uintptr_t live, std::uintptr_t aggregates,
         std::uintptr_t num_steps, std::uintptr_t uniforms, std::uintptr_t temperatures, uint64_t seed,
         uint64_t counter, pf_engine::RewardKind reward, pf_engine::Aggregation aggregation, pf_engine::Scheme scheme,
         float inv_temperature, float clip, double ess_threshold, std::uintptr_t rewards_out,
         std::uintptr_t aggregates_out, std::uintptr_t num_steps_out, std::uintptr_t weights_out,
         std::uintptr_t ess_out, std::uintptr_t resampled_out, std::uintptr_t ancestors_out,
         std::uintptr_t next_aggregates_out, std::uintptr_t next_num_steps_out, std::uintptr_t next_live_out,
         std::uintptr_t invalid_out) {
        pf_engine::ResampleInputs in{
            reinterpret_cast<const int64_t*>(seg), num_problems, reinterpret_cast<const float*>(prm),
            reinterpret_cast<const uint8_t*>(live), reinterpret_cast<const float*>(aggregates),
            reinterpret_cast<const int32_t*>(num_steps), reinterpret_cast<const float*>(uniforms),
            reinterpret_cast<const float*>(temperatures), seed, counter,
            reward, aggregation, scheme, inv_temperature, clip, ess_threshold};
        pf_engine::ResampleOutputs out{
            reinterpret_cast<float*>(rewards_out), reinterpret_cast<float*>(aggregates_out),
            reinterpret_cast<int32_t*>(num_steps_out), reinterpret_cast<float*>(weights_out),
            reinterpret_cast<float*>(ess_out), reinterpret_cast<uint8_t*>(resampled_out),
            reinterpret_cast<int32_t*>(ancestors_out), reinterpret_cast<float*>(next_aggregates_out),
            reinterpret_cast<int32_t*>(next_num_steps_out), reinterpret_cast<uint8_t*>(next_live_out),
            reinterpret_cast<int32_t*>(invalid_out)};
        py::gil_scoped_release release;
        return pf_engine::fused_resample(in, out);
      },
      py::kw_only(), py::arg("seg"), py::arg("num_problems"), py::arg("prm"), py::arg("live"), py::arg("aggregates"),
      py::arg("num_steps"), py::arg("uniforms"), py::arg("temperatures"), py::arg("seed"), py::arg("counter"),
      py::arg("reward"), py::arg("aggregation"), py::arg("scheme"), py::arg("inv_temperature"), py::arg("clip"),
      py::arg("ess_threshold"), py::arg("rewards_out"), py::arg("aggregates_out"), py::arg("num_steps_out"),
      py::arg("weights_out"), py::arg("ess_out"), py::arg("resampled_out"), py::arg("ancestors_out"),
      py::arg("next_aggregates_out"), py::arg("next_num_steps_out"), py::arg("next_live_out"),
      py::arg("invalid_out"),
      "One particle-filter step for all problems on the CPU (see pf_engine/resample.py); returns the number of "
      "live particles with unusable PRM output. uniforms may be 0: Philox draws; temperatures may be 0: all 1.");
  m.def(
      "paged_decode_attention",
      [](std::uintptr_t q, std::uintptr_t kv, std::uintptr_t block_tables, std::uintptr_t seq_lens,
         std::uintptr_t out, int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t block_size, int64_t max_blocks, float scale, int num_threads) {
        pf_engine::DecodeAttention a{reinterpret_cast<const float*>(q),       reinterpret_cast<const float*>(kv),
                                     reinterpret_cast<const int32_t*>(block_tables),
                                     reinterpret_cast<const int32_t*>(seq_lens), reinterpret_cast<float*>(out),
                                     num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, max_blocks, scale};
        py::gil_scoped_release release;
        pf_engine::paged_decode_attention(a, num_threads);
      },
      py::kw_only(), py::arg("q"), py::arg("kv"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("out"),
      py::arg("num_seqs"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
      py::arg("block_size"), py::arg("max_blocks"), py::arg("scale"), py::arg("num_threads"),
      "Decode attention over a paged float32 KV cache on the CPU (see pf_engine/attention/torch_backend.py); raw "
      "addresses of contiguous arrays.");
  m.def(
      "set_openmp",
      [](std::uintptr_t parallel, std::uintptr_t thread_num, std::uintptr_t num_threads) {
        if ((parallel == 0) != (thread_num == 0) || (parallel == 0) != (num_threads == 0)) {
          throw py::value_error("set_openmp takes three entry points or none (all 0)");
        }
        pf_engine::openmp = {reinterpret_cast<void (*)(void (*)(void*), void*, unsigned, unsigned)>(parallel),
                             reinterpret_cast<int (*)()>(thread_num), reinterpret_cast<int (*)()>(num_threads)};
      },
      py::kw_only(), py::arg("parallel"), py::arg("thread_num"), py::arg("num_threads"),
      "Run the native CPU passes on an OpenMP runtime: the addresses of its GOMP_parallel, omp_get_thread_num and "
      "omp_get_num_threads (see pf_engine/_native.py), or all 0 for threads of their own.");
  m.def("uses_openmp", [] { return pf_engine::openmp.parallel != nullptr; },
        "Whether the native CPU passes run on the OpenMP runtime set by set_openmp.");
  m.def("decode_attention_pass", &pf_engine::decode_attention_pass, py::kw_only(), py::arg("head_dim"),
        "The pass paged_decode_attention runs for head_dim on this CPU: \"avx512\" or \"portable\".");
  m.def(
      "inverse_cdf_sample",
      [](std::uintptr_t probs, std::uintptr_t uniforms, int64_t num_rows, int64_t vocab, std::uintptr_t out,
         int num_threads) {
        py::gil_scoped_release release;
        pf_engine::inverse_cdf_sample(reinterpret_cast<const float*>(probs), reinterpret_cast<const float*>(uniforms),
                                      num_rows, vocab, reinterpret_cast<int64_t*>(out), num_threads);
      },
      py::kw_only(), py::arg("probs"), py::arg("uniforms"), py::arg("num_rows"), py::arg("vocab"), py::arg("out"),
      py::arg("num_threads"),
      "out[r] = searchsorted(cumsum(float64(probs[r])), uniforms[r] * total, right=True), at most vocab - 1 (see "
      "pf_engine/sampling.py); raw addresses of contiguous CPU arrays: probs float32, uniforms float32, out int64.");
  m.def(
      "philox_uniforms",
      [](uint64_t seed, std::uintptr_t offsets, int64_t n, std::uintptr_t out) {
        py::gil_scoped_release release;
        pf_engine::philox_uniforms(seed, reinterpret_cast<const int64_t*>(offsets), n, reinterpret_cast<float*>(out));
      },
      py::kw_only(), py::arg("seed"), py::arg("offsets"), py::arg("n"), py::arg("out"),
      "out[i] = Triton's tl.rand(seed, offsets[i]) for n int64 offsets; raw addresses of contiguous CPU arrays.");
}
