"""The flashinfer backend's calls, checked without a GPU: what it decides (tensor cores, dtypes),
and that every call it makes binds to the installed flashinfer's signatures."""

import inspect
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pf_engine import KVCache, _native
from pf_engine.attention import build_metadata, get_backend
from pf_engine.attention.flashinfer_backend import FlashInferBackend, decode_use_tensor_cores

DECODE, PREFILL = "BatchDecodeWithPagedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper"
GROUP_SIZES = [1, 3, 6, 7]  # CUDA-core decode has 1 and 3; Qwen2.5-Math-1.5B has 6, its 7B and PRM-7B 7
NUM_KV_HEADS = [1, 2]
# (query dtype, cache dtype): each differs, so a plan given the query's dtype for the cache is caught
DTYPE_PAIRS = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float16)]
INSTALL = ("flashinfer does not import here ({}); to run this check: pip install --no-deps "
           "'flashinfer-python==0.7.4' apache-tvm-ffi nvidia-ml-py (it imports on the CPU without torch's "
           "CUDA build; the full `pip install \".[cuda]\"` pulls CUDA packages)")


def recording_flashinfer(calls: list):
    """A stand-in for the flashinfer module whose two wrappers record (class, method, args, kwargs)."""

    def wrapper_class(name):
        class Wrapper:
            def __init__(self, *args, **kwargs):
                calls.append((name, "__init__", args, kwargs))

            def plan(self, *args, **kwargs):
                calls.append((name, "plan", args, kwargs))

            def run(self, q, kv, *args, **kwargs):
                calls.append((name, "run", (q, kv, *args), kwargs))
                return q

        return Wrapper

    return SimpleNamespace(**{name: wrapper_class(name) for name in (DECODE, PREFILL)})


def attend_twice(decode: bool, num_q_heads: int, num_kv_heads: int, q_dtype, kv_dtype, num_layers: int = 2):
    """Plans one batch (decode: one token per sequence, else a prefill) and attends it on every layer.

    Returns the recorded flashinfer calls, and how many there were before the first attend.
    """
    head_dim, seq_lens = 8, [5, 9, 1]
    cache = KVCache(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=16,
                    block_size=4, dtype=kv_dtype)
    bm = cache.manager
    if decode:
        seqs = [bm.allocate(n - 1) for n in seq_lens]
        counts = np.ones(len(seqs), dtype=np.int64)
    else:
        seqs = [bm.allocate(0) for _ in seq_lens]
        counts = np.array(seq_lens, dtype=np.int64)
    slots, _ = bm.append(seqs, counts)
    meta = build_metadata(bm, seqs, counts, slots, "cpu")
    assert meta.is_decode == decode
    calls = []
    backend = FlashInferBackend(torch.device("cpu"), lib=recording_flashinfer(calls))
    plan = backend.plan(meta, head_dim**-0.5, num_q_heads, num_kv_heads, head_dim, q_dtype)
    num_before = len(calls)
    num_tokens = int(counts.sum())
    q = torch.randn(num_tokens, num_q_heads, head_dim).to(q_dtype)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim).to(q_dtype) for _ in range(2))
    for kv_layer in cache.kv:
        plan.attend(q, k, v, kv_layer)
    return calls, num_before


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("num_kv_heads", NUM_KV_HEADS)
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_uses_tensor_cores_where_cuda_cores_lack_the_group(group_size, num_kv_heads, kv_dtype):
    # CUDA-core decode raises "Unsupported group_size" outside {1, 2, 3, 4, 8}, whatever the dtype
    expected = group_size in (6, 7)
    assert decode_use_tensor_cores(kv_dtype, group_size * num_kv_heads, num_kv_heads) is expected


def test_tensor_cores_follow_sglang_inside_the_cuda_core_groups():
    assert decode_use_tensor_cores(torch.float8_e4m3fn, 1, 1)  # fp8 caches always
    assert decode_use_tensor_cores(torch.bfloat16, 8, 2) and decode_use_tensor_cores(torch.float16, 8, 1)
    assert not decode_use_tensor_cores(torch.float32, 8, 1) and not decode_use_tensor_cores(torch.bfloat16, 2, 1)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_the_decode_wrapper_is_built_with_the_decision_once_heads_are_known(group_size):
    calls, num_before = attend_twice(True, group_size * 2, 2, torch.bfloat16, torch.bfloat16)
    assert num_before == 0, f"flashinfer was called before the first layer's cache was seen: {calls[:num_before]}"
    inits = [c for c in calls if c[1] == "__init__"]
    assert [(name, kwargs) for name, _, _, kwargs in inits] == [
        (DECODE, {"use_tensor_cores": decode_use_tensor_cores(torch.bfloat16, group_size * 2, 2)})]
    assert [c[1] for c in calls[1:]] == ["plan", "run", "run"], "one plan per batch, one run per layer"


@pytest.mark.parametrize("q_dtype,kv_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("decode", [True, False])
def test_plan_is_given_the_cache_dtype(decode, q_dtype, kv_dtype):
    calls, _ = attend_twice(decode, 6, 1, q_dtype, kv_dtype)
    plans = [kwargs for _, method, _, kwargs in calls if method == "plan"]
    assert len(plans) == 1
    assert (plans[0]["q_data_type"], plans[0]["kv_data_type"]) == (q_dtype, kv_dtype)


def _signatures(cls, method: str) -> list[inspect.Signature]:
    """``method``'s signature, and where it forwards **kwargs (decode plan() from 0.6.18 on) its
    implementation's too, so that a misspelt keyword is caught rather than swallowed."""
    sigs = [inspect.signature(getattr(cls, method))]
    forwards = any(p.kind is p.VAR_KEYWORD for p in sigs[0].parameters.values())
    if forwards and hasattr(cls, f"_{method.strip('_')}_impl"):
        sigs.append(inspect.signature(getattr(cls, f"_{method.strip('_')}_impl")))
    return sigs


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("group_size", [1, 7])
def test_every_call_binds_to_the_installed_flashinfer(decode, group_size):
    error = _native.flashinfer_import_error()
    if error is not None:
        pytest.skip(INSTALL.format(error))
    import flashinfer

    calls, _ = attend_twice(decode, group_size, 1, torch.bfloat16, torch.bfloat16)
    assert calls
    for name, method, args, kwargs in calls:
        sigs = _signatures(getattr(flashinfer, name), method)
        for sig in sigs:
            try:
                sig.bind(None, *args, **kwargs)  # None: self
            except TypeError as exc:
                pytest.fail(f"flashinfer {flashinfer.__version__} {name}.{method}{sig}: {exc}")
        named = {p for sig in sigs for p, kind in sig.parameters.items() if kind.kind is not kind.VAR_KEYWORD}
        assert set(kwargs) <= named, f"{name}.{method} has no parameter {set(kwargs) - named}"


@pytest.fixture
def broken_flashinfer(tmp_path, monkeypatch):
    """An installed flashinfer whose import fails, as one built for another CUDA does."""
    package = tmp_path / "flashinfer"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("libcudart.so.12: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flashinfer" or m.startswith("flashinfer.")]:
        monkeypatch.delitem(sys.modules, name)
    _native.flashinfer_import_error.cache_clear()
    yield
    _native.flashinfer_import_error.cache_clear()


def test_a_flashinfer_that_fails_to_import_falls_back_to_torch_warning_once(broken_flashinfer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends = [get_backend("auto", "cuda").name for _ in range(3)]
        assert _native.HAS_FLASHINFER is False and _native.summary()["flashinfer"] is False
        with pytest.raises(ValueError, match="libcudart"):
            get_backend("flashinfer", "cuda")
    assert backends == ["torch"] * 3
    messages = [str(w.message) for w in caught if "flashinfer" in str(w.message)]
    assert len(messages) == 1 and "ImportError: libcudart.so.12" in messages[0], messages
