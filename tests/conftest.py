import os
import sys
import zlib

# `python -m pytest` from the repository puts it on sys.path, where kernels/ (the Triton kernels,
# installed as pf_engine.kernels) hides Hugging Face's kernels package that transformers imports.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

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


def varying_reward(question: str, steps: list[str]) -> float:
    """A rule PRM whose reward follows the text: crc32 of the question and the steps so far, mapped
    into [0.05, 0.95]. The tiny random models never write the claims arithmetic_verifier checks, so
    with that verifier every step scores 0.5, the weights are uniform and resampling is the identity;
    with this one, tests that compare two paths of the engine also compare their scoring, weights,
    resampling and n-best order. Subprocesses take it as ``--verifier conftest:varying_reward`` with
    this folder on PYTHONPATH (``TESTS_PYTHONPATH``)."""
    digest = zlib.crc32("\x1f".join([question, *steps]).encode())
    return 0.05 + 0.9 * (digest % 1001) / 1000


VARYING_VERIFIER = "conftest:varying_reward"
TESTS_PYTHONPATH = os.path.dirname(os.path.abspath(__file__))


def copied_a_live_step(result) -> bool:
    """Whether resampling copied an unfinished step into more than one child somewhere in ``result``'s
    tree (a finished particle's last step is carried into every later round, so its count of children
    is no sign)."""
    return any(node.num_children > 1 and not node.finished for node in result.tree)


def assert_resampled(results) -> None:
    """The rewards made the weights and moved the resampling, so a comparison of two paths of the
    engine compares their scoring, weights and resampling too."""
    results = list(results)
    assert any(len({node.weight for node in r.tree}) > 1 for r in results), "the weights never differed"
    assert any(map(copied_a_live_step, results)), "resampling never changed an ancestor: the comparison is weak"
