"""What this installation can run. The one place that decides; everything else asks it.

- ``_C``: the C++ block manager. Always built; without it pf_engine cannot work.
- ``HAS_CUDA_EXT``: ``pf_engine._C_cuda`` (CUDA copy kernels) was built here.
- ``HAS_TRITON`` / ``TRITON_INTERPRET``: Triton importable; kernels run under
  its CPU interpreter when ``TRITON_INTERPRET=1`` was set before import.
- ``HAS_FLASHINFER``: flashinfer imports here (every call of it needs CUDA). Asked on first
  use, not at import, since importing flashinfer is heavy; an installed flashinfer that fails to
  import warns once, naming the error, and counts as absent (``flashinfer_import_error``).
- ``NATIVE_THREADS``: where the native CPU passes (attention, draws) run their threads:
  on torch's own OpenMP runtime where it can be found, else on threads of their own.
- ``block_copy_impl`` / ``resample_impl`` / ``linear_impl``: which code copies KV
  blocks, runs the fused resampling step and the models' linear layers on a device. (The attention backend is chosen by
  ``pf_engine.attention.get_backend``, which asks this module.)
"""

import ctypes
import functools
import importlib.util
import os
import warnings

import torch

try:
    from pf_engine import _C as _C  # re-exported: the rest of the package imports _C from here
except ImportError as exc:  # pragma: no cover - only a broken install gets here
    raise ImportError(
        "pf_engine._C (the native block manager) is missing or failed to load: install "
        "pf_engine with `pip install .` (or `pip install -e .` to work on it); if Python runs "
        "from the source folder, its unbuilt pf_engine/ shadows the installed package"
    ) from exc

try:
    from pf_engine import _C_cuda
except ImportError:
    _C_cuda = None

HAS_CUDA_EXT = _C_cuda is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def flashinfer_import_error() -> str | None:
    """Why flashinfer cannot be used here, or None when it imports. Decided once per process.

    Not installed is quiet; installed but failing to import (a missing CUDA library, a
    mismatched torch) warns once with the error, and the "auto" backend falls back to torch.
    """
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer is not installed (pip install \".[cuda]\")"
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # a broken install raises OSError or RuntimeError as well as ImportError
        error = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"flashinfer is installed but failed to import ({error}); "
                      "attention falls back to the torch backend", stacklevel=2)
        return error
    return None


def __getattr__(name: str):
    # HAS_FLASHINFER is computed on first access, so `import pf_engine` never imports flashinfer
    if name == "HAS_FLASHINFER":
        return flashinfer_import_error() is None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _torch_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's CPU ops run on, already loaded by torch, or None.

    Found by the sonames of GNU, Intel and LLVM OpenMP with RTLD_NOLOAD, so nothing new is
    loaded; all three export GOMP_parallel.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info() or not hasattr(os, "RTLD_NOLOAD"):
        return None
    for soname in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        try:
            lib = ctypes.CDLL(soname, mode=os.RTLD_NOLOAD)
        except OSError:
            continue
        if all(hasattr(lib, name) for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")):
            return lib
    return None


def use_torch_openmp(enable: bool = True) -> bool:
    """Runs the native CPU passes on torch's OpenMP threads (``enable``) or on threads of their own.

    torch's OpenMP threads spin a while after each op waiting for more; threads of the passes'
    own would share the cores with them. Returns whether the passes now run on OpenMP.
    """
    lib = _torch_openmp() if enable else None
    address = (lambda name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value) if lib else (lambda name: 0)
    _C.set_openmp(parallel=address("GOMP_parallel"), thread_num=address("omp_get_thread_num"),
                  num_threads=address("omp_get_num_threads"))
    return _C.uses_openmp()


NATIVE_THREADS = "torch's OpenMP threads" if use_torch_openmp() else "threads of their own"

if torch.cuda.is_available() and not HAS_CUDA_EXT:
    warnings.warn(
        "pf_engine was built without its CUDA extension; block copies on the GPU use "
        "the Triton kernel instead (rebuild with PF_ENGINE_CUDA=1 to build it)",
        stacklevel=2,
    )


# What the self-check prints for each implementation.
IMPL_NAMES = {"cuda_ext": "CUDA extension", "triton": "Triton kernel", "torch": "torch indexing",
              "native": "native CPU pass", "onednn": "oneDNN, prepacked weights", "torch_linear": "torch linear"}

# oneDNN's linear over a prepacked weight: torch's own CPU ops (what its compiler uses when freezing).
HAS_ONEDNN_LINEAR = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                     and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def block_copy_impl(device: torch.device | str) -> str:
    """What copies KV blocks on ``device``: "cuda_ext", else "triton" on CUDA, "torch" elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return "torch"
    return "cuda_ext" if HAS_CUDA_EXT else "triton"


def resample_impl(device: torch.device | str) -> str:
    """What runs the fused resampling step on ``device``: "triton" on CUDA, the "native" pass on the CPU."""
    return "triton" if torch.device(device).type == "cuda" else "native"


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacks a linear weight of ``dtype`` on this CPU: its bfloat16 path needs
    AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and refuses other CPUs at the first pack. Asked of
    oneDNN itself, once, on a small weight."""
    if not HAS_ONEDNN_LINEAR:
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


def linear_impl(device: torch.device | str, dtype: torch.dtype) -> str:
    """What runs a model's linear layers: "onednn" (prepacked) for float32, and bfloat16 where the CPU
    has oneDNN's bf16 path, else "torch_linear"."""
    cpu = torch.device(device).type == "cpu"
    return "onednn" if cpu and dtype in (torch.float32, torch.bfloat16) and onednn_packs(dtype) else "torch_linear"


def kernels(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """The implementations above for ``device`` (and a model of ``dtype``), in words, for the self-check."""
    uses = {"block copies": IMPL_NAMES[block_copy_impl(device)],
            "resampling step": IMPL_NAMES[resample_impl(device)],
            "linear layers": IMPL_NAMES[linear_impl(device, dtype)]}
    return uses | ({"native CPU threads": NATIVE_THREADS} if torch.device(device).type == "cpu" else {})


def summary() -> dict:
    """The decisions above, for logs and the self-check."""
    return {
        "native block manager": True,
        "CUDA extension": HAS_CUDA_EXT,
        "CUDA device": torch.cuda.is_available(),
        "Triton": HAS_TRITON,
        "Triton interpreter": TRITON_INTERPRET,
        "flashinfer": flashinfer_import_error() is None,
    }
