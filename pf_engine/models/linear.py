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
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.device.type == "cpu" and x.dtype == self.packed.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def pack_linears(model: nn.Module) -> str:
    """Pack every :class:`Linear` of ``model`` where :func:`linear_impl` says oneDNN runs them;
    returns that implementation's name."""
    param = next(model.parameters())
    impl = linear_impl(param.device, param.dtype)
    for module in model.modules():
        if isinstance(module, Linear):
            if impl == "onednn":
                module.pack()
            else:
                module.packed = None
    return impl
