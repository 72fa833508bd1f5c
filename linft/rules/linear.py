"""``nn.Linear`` and transformers' ``Conv1D`` (a head, full fine-tuning of a projection):
``y = W x + b`` gives ``dW = sum_t g_t x_t^T`` and ``db = sum_t g_t`` (papers.md, "LoRA
structure"); ``Conv1D`` stores ``W`` as ``[d_in, d_out]``. Pure torch:
``linft.ops.linear_jacobian``; Triton: ``linft.triton_kernels.linear_jacobian``."""

from __future__ import annotations

from torch import nn

from ..ops import linear_jacobian
from .base import Rule, qualified_name

CONV1D = "transformers.pytorch_utils.Conv1D"


class LinearRule(Rule):
    name = "linear"
    triton_op = "linear_jacobian"
    torch_op = staticmethod(linear_jacobian)

    def slot(self, module: nn.Module, path: str):
        # Exactly these classes: a subclass may change the forward (quantized, scaled).
        if type(module) is not nn.Linear and qualified_name(type(module)) != CONV1D:
            return None
        return path if path in ("weight", "bias") else None

    def rows(self, unit, x, g, mask, J, tags, op):
        transposed = qualified_name(type(unit.module)) == CONV1D
        op(x, g, mask, J, unit.cols.get("weight"), unit.cols.get("bias"), transposed)
