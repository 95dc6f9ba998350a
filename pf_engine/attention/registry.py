"""The attention backends by name: one registry line each, and ``get_backend`` to build one.

Whether a backend can run on a device is asked of ``pf_engine._native`` (Triton, its interpreter,
flashinfer), never decided here. A backend's module is imported only when it is built.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pf_engine import _native
from pf_engine.attention.backend import AttentionBackend

# "auto" builds the first of these that can run on the device.
AUTO_ORDER = ("flashinfer", "torch")


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """``factory(device)`` builds the backend; ``why_unavailable(device)`` says why it cannot run
    on ``device``, or None where it can."""

    factory: Callable[[torch.device], AttentionBackend]
    why_unavailable: Callable[[torch.device], str | None]


_BACKENDS: dict[str, BackendEntry] = {}


def _always(device: torch.device) -> None:
    return None


def register_backend(name: str, factory: Callable[[torch.device], AttentionBackend],
                     why_unavailable: Callable[[torch.device], str | None] = _always) -> None:
    """Makes ``get_backend(name, device)`` return ``factory(device)`` wherever ``why_unavailable(device)``
    is None, and raise ValueError with its reason elsewhere."""
    if name == "auto" or name in _BACKENDS:
        raise ValueError(f"the attention backend name {name!r} is taken")
    _BACKENDS[name] = BackendEntry(factory=factory, why_unavailable=why_unavailable)


def backend_names() -> tuple[str, ...]:
    """The names ``get_backend`` takes, "auto" first."""
    return ("auto", *_BACKENDS)


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """The backend called ``name`` on ``device`` ("auto": flashinfer on CUDA where it imports, else torch).

    Raises ValueError for a name not registered (listing those that are) and for a backend that
    cannot run on ``device`` (saying why).
    """
    device = torch.device(device)
    if name == "auto":
        name = next(n for n in AUTO_ORDER if _BACKENDS[n].why_unavailable(device) is None)
    entry = _BACKENDS.get(name)
    if entry is None:
        *others, last = backend_names()
        raise ValueError(f"unknown attention backend {name!r}; choose {', '.join(others)} or {last}")
    reason = entry.why_unavailable(device)
    if reason is not None:
        raise ValueError(reason)
    backend = entry.factory(device)
    if not isinstance(backend, AttentionBackend):
        raise TypeError(f"the {name!r} attention backend's factory built {backend!r}, which lacks name or plan()")
    return backend


def _torch(device: torch.device) -> AttentionBackend:
    from pf_engine.attention.torch_backend import TorchBackend

    return TorchBackend()


def _triton(device: torch.device) -> AttentionBackend:
    from pf_engine.attention.triton_backend import TritonBackend

    return TritonBackend()


def _triton_unavailable(device: torch.device) -> str | None:
    if not _native.HAS_TRITON or not (device.type == "cuda" or _native.TRITON_INTERPRET):
        return "the triton backend needs a CUDA device, or TRITON_INTERPRET=1 on the CPU"
    return None


def _flashinfer(device: torch.device) -> AttentionBackend:
    from pf_engine.attention.flashinfer_backend import FlashInferBackend

    return FlashInferBackend(device)


def _flashinfer_unavailable(device: torch.device) -> str | None:
    # the device first: on the CPU, flashinfer is never imported to find out
    if device.type != "cuda":
        return "the flashinfer backend needs a CUDA device"
    if not _native.HAS_FLASHINFER:
        return f"the flashinfer backend needs flashinfer: {_native.flashinfer_import_error()}"
    return None


register_backend("torch", _torch)
register_backend("triton", _triton, _triton_unavailable)
register_backend("flashinfer", _flashinfer, _flashinfer_unavailable)
