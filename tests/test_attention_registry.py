"""The attention backend protocol and its registry: every built-in backend and plan keeps the
protocol's signatures, a newly registered backend is found by name, and get_backend refuses an
unknown name or a device a backend cannot run on with the reasons it gave before the registry."""

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pf_engine import KVCache, _native
from pf_engine.attention import (
    AttentionBackend,
    AttentionPlan,
    backend_names,
    build_metadata,
    get_backend,
    register_backend,
    registry,
)
from pf_engine.attention.flashinfer_backend import FlashInferBackend
from pf_engine.attention.torch_backend import TorchBackend
from pf_engine.attention.triton_backend import TritonBackend

# Each registered backend, built here without its device (flashinfer with a stand-in module).
BUILT_HERE = {
    "torch": TorchBackend,
    "triton": TritonBackend,
    "flashinfer": lambda: FlashInferBackend(torch.device("cpu"), lib=SimpleNamespace()),
}
QUERY_DTYPES = [torch.float32, torch.bfloat16]  # float32 on the CPU takes the native pass, bfloat16 the others
# (tokens already cached, new tokens) per sequence: a decode batch, a prefill beside a chunk
BATCHES = [[(4, 1), (0, 1), (9, 1)], [(0, 7), (5, 3)]]
UNKNOWN = "unknown attention backend 'nope'; choose auto, torch, triton or flashinfer"


def _parameters(function) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def _batch(counts_cached_new):
    cache = KVCache(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=16, block_size=4, dtype=torch.float32)
    seqs = [cache.manager.allocate(cached) for cached, _ in counts_cached_new]
    counts = np.array([new for _, new in counts_cached_new], dtype=np.int64)
    slots, _ = cache.manager.append(seqs, counts)
    return build_metadata(cache.manager, seqs, counts, slots, "cpu")


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test (which may register backends of its own)."""
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))


def test_every_registered_backend_is_checked_here():
    assert set(backend_names()) - {"auto"} == set(BUILT_HERE), "a backend registered without a check below"


@pytest.mark.parametrize("name", sorted(BUILT_HERE))
def test_each_backend_keeps_the_protocol(name):
    backend = BUILT_HERE[name]()
    assert isinstance(backend, AttentionBackend)
    assert backend.name == name
    assert _parameters(type(backend).plan) == _parameters(AttentionBackend.plan)


@pytest.mark.parametrize("name", sorted(BUILT_HERE))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
def test_each_backend_plans_a_plan_that_keeps_the_protocol(name, batch, dtype):
    if name == "triton" and not _native.HAS_TRITON:
        pytest.skip("triton is not installed (pf_engine's Linux install pulls it: pip install 'triton>=3.2'); "
                    "the triton backend's plan is checked where it imports")
    plan = BUILT_HERE[name]().plan(_batch(batch), 8**-0.5, 4, 2, 8, dtype)
    assert isinstance(plan, AttentionPlan), f"{name} planned {type(plan).__name__}, which lacks attend()"
    assert _parameters(type(plan).attend) == _parameters(AttentionPlan.attend)


def test_a_registered_backend_is_built_by_name(scratch_registry):
    built_on = []

    class Mine:
        name = "mine"

        def plan(self, meta, scale, num_q_heads, num_kv_heads, head_dim, dtype):
            return SimpleNamespace(attend=lambda q, k, v, kv_layer: q)

    def factory(device):
        built_on.append(device)
        return Mine()

    register_backend("mine", factory)
    backend = get_backend("mine", "cpu")
    assert isinstance(backend, Mine) and built_on == [torch.device("cpu")]
    assert backend_names() == ("auto", "torch", "triton", "flashinfer", "mine")
    with pytest.raises(ValueError, match=r"^unknown attention backend 'nope'; choose auto, torch, triton, "
                                         r"flashinfer or mine$"):
        get_backend("nope", "cpu")


def test_a_registered_backend_says_why_it_cannot_run(scratch_registry):
    register_backend("gpu_only", lambda device: TorchBackend(),
                     lambda device: None if device.type == "cuda" else "gpu_only needs a GPU")
    with pytest.raises(ValueError, match="^gpu_only needs a GPU$"):
        get_backend("gpu_only", "cpu")
    assert get_backend("gpu_only", "cuda").name == "torch"


def test_a_name_is_registered_once_and_auto_is_never_one(scratch_registry):
    for name in ("torch", "auto"):
        with pytest.raises(ValueError, match=f"the attention backend name '{name}' is taken"):
            register_backend(name, lambda device: TorchBackend())


def test_a_factory_that_builds_no_backend_is_refused(scratch_registry):
    register_backend("broken", lambda device: object())
    with pytest.raises(TypeError, match="lacks name or plan"):
        get_backend("broken", "cpu")


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=f"^{UNKNOWN}$"):
        get_backend("nope", "cpu")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    message = "^the triton backend needs a CUDA device, or TRITON_INTERPRET=1 on the CPU$"
    monkeypatch.setattr(_native, "TRITON_INTERPRET", False)
    with pytest.raises(ValueError, match=message):
        get_backend("triton", "cpu")
    monkeypatch.setattr(_native, "HAS_TRITON", False)
    with pytest.raises(ValueError, match=message):
        get_backend("triton", "cuda")


def test_flashinfer_needs_cuda_and_is_never_imported_to_refuse_the_cpu(monkeypatch):
    def asked():
        raise AssertionError("flashinfer's availability was asked for a CPU device")

    monkeypatch.setattr(_native, "flashinfer_import_error", asked)
    with pytest.raises(ValueError, match="^the flashinfer backend needs a CUDA device$"):
        get_backend("flashinfer", "cpu")
    assert get_backend("auto", "cpu").name == "torch"


@pytest.mark.parametrize("import_error,expected", [(None, "flashinfer"), ("no libcudart", "torch")])
def test_auto_takes_flashinfer_on_cuda_where_it_imports(scratch_registry, monkeypatch, import_error, expected):
    stand_in = SimpleNamespace(name="flashinfer", plan=lambda *args: None)
    real = registry._BACKENDS["flashinfer"]
    registry._BACKENDS["flashinfer"] = registry.BackendEntry(factory=lambda device: stand_in,
                                                             why_unavailable=real.why_unavailable)
    monkeypatch.setattr(_native, "flashinfer_import_error", lambda: import_error)
    assert get_backend("auto", "cuda").name == expected
    assert get_backend("auto", "cpu").name == "torch"
    if import_error is not None:
        with pytest.raises(ValueError, match="^the flashinfer backend needs flashinfer: no libcudart$"):
            get_backend("flashinfer", "cuda")
