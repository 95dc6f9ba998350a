import os

import pytest
import torch

# Triton kernels run under the CPU interpreter where there is no GPU; the
# variable must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def policy(tmp_path_factory):
    """A tiny random Llama over the character tokenizer (tests/tiny.py), saved once per run."""
    from tiny import save_tiny_policy

    folder = tmp_path_factory.mktemp("policy")
    save_tiny_policy(folder)
    return folder


@pytest.fixture(params=["torch's OpenMP threads", "threads of their own"])
def native_threads(request):
    """Runs the test with the native CPU passes on torch's OpenMP threads, then on threads of their own."""
    from pf_engine import _native

    on_openmp = _native.use_torch_openmp(request.param == "torch's OpenMP threads")
    if request.param == "torch's OpenMP threads" and not on_openmp:
        pytest.skip("this torch runs its CPU ops without OpenMP (torch.__config__.parallel_info()), so the passes "
                    "have only threads of their own; a torch with OpenMP (PyPI's Linux wheels) runs this variant")
    yield request.param
    _native.use_torch_openmp(_native.NATIVE_THREADS == "torch's OpenMP threads")
