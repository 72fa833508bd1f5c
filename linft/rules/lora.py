"""peft's LoRA ``Linear`` (over ``nn.Linear`` or ``Conv1D``): ``y = W x + s B (A x)`` for each
active adapter gives ``dB = s sum_t g_t (A x_t)^T`` and ``dA = s sum_t (B^T g_t) x_t^T``
from the layer's input and output gradient alone (papers.md, "LoRA structure"). Vanilla
LoRA only: DoRA, other variants and non-linear adapter layers are declined (generic path).
Pure torch: ``linft.ops.lora_jacobian``; Triton: ``linft.triton_kernels.lora_jacobian``."""

from __future__ import annotations

from torch import nn

from ..ops import lora_jacobian
from .base import GENERIC, Rule, qualified_name

LAYER = "peft.tuners.lora.layer.LoraLayer"  # every LoRA layer: the rule takes the plain ones
LINEAR = "peft.tuners.lora.layer.Linear"


class LoraRule(Rule):
    name = "lora"
    triton_op = "lora_jacobian"
    torch_op = staticmethod(lora_jacobian)

    def slot(self, module: nn.Module, path: str):
        parts = path.split(".")  # lora_A.<adapter>.weight
        if len(parts) != 3 or parts[0] not in ("lora_A", "lora_B") or parts[2] != "weight":
            return None
        container, adapter = parts[0], parts[1]
        if not _plain_lora_linear(module, adapter):
            return GENERIC  # not one hook on lora_A / lora_B sees every use of them
        return (adapter, container)

    def keep(self, unit, module, args, kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"{unit.name} was called with adapter_names (mixed-adapter batch); "
                "linft needs one set of active adapters: call model.set_adapter(...) instead"
            )
        if module.disable_adapters or module.merged:
            return None  # the adapters do not take part in this forward
        adapters = {adapter for adapter, _ in unit.cols}
        active = tuple(a for a in module.active_adapters if a in adapters)
        return active or None

    def rows(self, unit, x, g, mask, J, tags, op):
        layer = unit.module
        for adapter in _adapters(unit):
            if adapter not in tags:
                continue
            A = layer.lora_A[adapter].weight.detach()
            B = layer.lora_B[adapter].weight.detach()
            s = float(layer.scaling[adapter])
            col_A, col_B = unit.cols.get((adapter, "lora_A")), unit.cols.get((adapter, "lora_B"))
            op(x, g, A, B, s, mask, J, col_A, col_B)

    def unused(self, unit, tags, called):
        return [f"{unit.name} (adapter {a!r})" for a in _adapters(unit) if a not in tags]


def _adapters(unit) -> list[str]:
    return list(dict.fromkeys(adapter for adapter, _ in unit.cols))


def _plain_lora_linear(layer: nn.Module, adapter: str) -> bool:
    """Vanilla LoRA on a linear base: the formulas above hold exactly."""
    if qualified_name(type(layer)) != LINEAR:
        return False
    variants = getattr(layer, "lora_variant", {}) or {}
    use_dora = getattr(layer, "use_dora", {}) or {}
    return (
        adapter not in variants
        and not use_dora.get(adapter, False)
        and type(layer.lora_A[adapter]) is nn.Linear
        and type(layer.lora_B[adapter]) is nn.Linear
    )
