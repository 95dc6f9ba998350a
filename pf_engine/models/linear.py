"""Linear layers: torch's, or on the CPU oneDNN's GEMM over a weight prepacked once.

On AVX-512 CPUs torch's default fp32 GEMM (MKL) reaches 100-180 GFLOPS at decode
batch sizes; oneDNN over a prepacked weight reaches 300-480 (bench/README.md).
The packed copy is made after the weights are loaded (``pack_linears``) and
lives beside the plain weight, which checkpoints, tied embeddings and
``token_logits`` keep reading.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pf_engine._native import linear_impl


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint names) that can run over a packed weight."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        """Prepack the weight for oneDNN; a later change to the weight needs another ``pack``."""
        self.packed = _pack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _runs_packed(x, self.packed):
            return _packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def _runs_packed(x: torch.Tensor, packed: torch.Tensor | None) -> bool:
    """Whether oneDNN's GEMM over ``packed`` takes ``x`` (on the CPU, of the packed dtype)."""
    return packed is not None and x.device.type == "cpu" and x.dtype == packed.dtype


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedGroup:
    """Packed :class:`Linear` layers that read the same input, run as one GEMM over their weights
    packed side by side, the output split back: at decode batch sizes one wider GEMM beats
    several narrow ones (q/k/v and gate/up of SmolLM2's layers, 37 rows: 1.2x). Their own
    packed copies are dropped."""

    def __init__(self, linears: list[Linear]):
        self.packed = _pack(torch.cat([m.weight for m in linears]))
        with torch.no_grad():
            biased = any(m.bias is not None for m in linears)
            self.bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                                   for m in linears]) if biased else None
        self.sizes = [m.out_features for m in linears]
        for m in linears:
            m.packed = None

    @staticmethod
    def of(linears: list[Linear]) -> "PackedGroup | None":
        """The group of ``linears`` where every one of them is packed, else None."""
        return PackedGroup(linears) if all(m.packed is not None for m in linears) else None

    def runs(self, x: torch.Tensor) -> bool:
        return _runs_packed(x, self.packed)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _packed_linear(x, self.packed, self.bias).split(self.sizes, dim=-1)


def pack_linears(model: nn.Module) -> str:
    """Pack every :class:`Linear` of ``model`` where :func:`linear_impl` says oneDNN runs them, then
    let modules with a ``group_packed`` method join theirs into a :class:`PackedGroup`; returns the
    implementation's name."""
    param = next(model.parameters())
    impl = linear_impl(param.device, param.dtype)
    for module in model.modules():
        if isinstance(module, Linear):
            if impl == "onednn":
                module.pack()
            else:
                module.packed = None
    for module in model.modules():
        if hasattr(module, "group_packed"):
            module.group_packed()
    return impl
