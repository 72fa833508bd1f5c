"""Normalization layers with a per-feature affine: ``y = x_hat * w (+ b)``, or Gemma's
``x_hat * (1 + w)``, where ``x_hat`` is ``(x - mean) / sqrt(var + eps)`` (LayerNorm) or
``x / sqrt(mean(x^2) + eps)`` (RMSNorm: ``nn.RMSNorm``, Llama's and its copies, T5's). Either
way ``dw = sum_t g_t * x_hat_t`` and ``db = sum_t g_t``: per-sample rows from the layer's
input and output gradient alone.

Which formula a layer computes is not read off its class name: on first sight the rule runs
the layer on a random input and keeps the formula that reproduces its output (in float64,
to 1e-5: some layers normalize in float32 whatever the input), declining a layer none matches
(the generic path, exact, takes it then). So ``nn.LayerNorm``, ``nn.RMSNorm`` and the many
per-model RMSNorm classes of transformers need no list, and a norm that computes something
else is never misread.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from .base import Rule, masked

_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")
# The formulas: (centred, one plus weight).
_VARIANTS = {"layer": (True, False), "rms": (False, False), "rms_1p": (False, True)}


class NormRule(Rule):
    name = "norm"

    def __init__(self):
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def slot(self, module: nn.Module, path: str):
        if path not in ("weight", "bias") or self.variant(module) is None:
            return None
        return path

    def rows(self, unit, x, g, mask, J, tags, op):
        centred, _ = _VARIANTS[self.variant(unit.module)]
        acc = torch.promote_types(x.dtype, torch.float32)
        x_hat = _normalized(x.to(acc), _eps(unit.module, acc), centred).to(g.dtype)
        x_hat, g = masked(x_hat, mask, 1), masked(g, mask, 2)
        if "weight" in unit.cols:
            col = unit.cols["weight"]
            J[:, :, col : col + x.shape[-1]] = torch.einsum("nctd,ntd->ncd", g, x_hat)
        if "bias" in unit.cols:
            col = unit.cols["bias"]
            J[:, :, col : col + g.shape[-1]] = g.sum(dim=2)

    def variant(self, module: nn.Module) -> str | None:
        """The formula ``module`` computes (``_VARIANTS``), or None."""
        if module not in self._seen:
            self._seen[module] = _match(module)
        return self._seen[module]


def _eps(module: nn.Module, dtype: torch.dtype) -> float:
    for name in _EPS_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return float(torch.finfo(dtype).eps)  # nn.RMSNorm(eps=None)


def _normalized(x: torch.Tensor, eps: float, centred: bool) -> torch.Tensor:
    if centred:
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _match(module: nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or weight.numel() < 2:
        return None
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape):
        return None
    if any(True for _ in module.children()):
        return None
    try:
        probe = copy.deepcopy(module).double()
        gen = torch.Generator().manual_seed(0)
        d = weight.numel()
        x = 3 * torch.randn(2, 3, d, generator=gen, dtype=torch.float64) + 0.5
        with torch.no_grad():
            # A weight and bias far from their init, so that no two formulas coincide.
            probe.weight.copy_(torch.rand(d, generator=gen, dtype=torch.float64) + 0.5)
            if isinstance(getattr(probe, "bias", None), torch.Tensor):
                probe.bias.copy_(torch.randn(d, generator=gen, dtype=torch.float64))
            y = probe(x.to(probe.weight.device))
    except Exception:  # not callable on one tensor of features: not a norm this rule knows
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    y = y.double().cpu()
    w = probe.weight.detach().double().cpu()
    bias = getattr(probe, "bias", None)
    b = bias.detach().double().cpu() if isinstance(bias, torch.Tensor) else 0.0
    for name, (centred, one_plus) in _VARIANTS.items():
        x_hat = _normalized(x, _eps(module, torch.float64), centred)
        expected = x_hat * ((1 + w) if one_plus else w) + b
        # 1e-5: layers that normalize in float32 whatever the input (Llama's) round there;
        # two formulas differ by O(1) on this input.
        if float((y - expected).norm()) <= 1e-5 * float(expected.norm()):
            return name
    return None
