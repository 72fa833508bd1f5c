"""What a per-parameter rule is: the unit of extension of linft's fast Jacobian path.

A rule covers one kind of module (registered by module type, ``linft.rules``). For every
selected parameter the plan asks the rules of the modules that hold it, outermost first,
which of the rule's *slots* the parameter fills (``slot``); a rule that declines leaves the
parameter to the next module's rule and, in the end, to the exact generic path (one
backward per sample and output). The modules a rule claims become *units*: during each
block's forward a hook keeps the unit's input ``x`` (``keep`` says whether a call counts
and tags it, e.g. with LoRA's active adapters), the engine's C backward passes give the
output gradients ``g``, and ``rows`` writes the unit's Jacobian columns from them:

    x: [n, T, d_in]        the module's input, samples first (``layouts`` finds where they
                           sit: [T, n, d], [n*T, d], ... are viewed so), tokens of all calls
    g: [n, C, T, d_out]    d f_a / d y at the module's output, per sample and output
    mask: [n, T] or None   the tokens to keep (real ones, and any with a non-zero gradient)
    J: [n, C, P]           the block's Jacobian, zeros until the rules write their columns
                           (the unit's at ``unit.cols[slot]``)

The run checks every rule on its first block against plain autograd (``verify``), so a
wrong rule is an error naming the module and the rule, never a wrong kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import nn


class _Generic:
    def __repr__(self) -> str:
        return "GENERIC"


# ``Rule.slot``'s answer for a parameter that must take the generic path even where a rule
# of a module inside this one would claim it (LoRA's A and B of a DoRA layer: the layer
# reads their weights outside their own forward, so no hook on them sees every use).
GENERIC = _Generic()


class Rule:
    """Per-sample Jacobian rows of one module kind from its input and output gradient.

    Subclasses set ``name`` and implement ``slot`` and ``rows``; ``torch_op`` (pure torch)
    with a fused twin ``triton_op`` (an attribute of ``linft.triton_kernels`` with the same
    signature) is how built-in rules share a kernel between backends: ``rows`` gets the
    backend's one as ``op``.
    """

    name: str = "rule"
    version: int = 1  # bump when the rows change: a checkpoint of the old rows is refused
    triton_op: str | None = None
    torch_op: Callable | None = None

    def slot(self, module: nn.Module, path: str) -> Hashable | None:
        """The slot the parameter at ``path`` (relative to ``module``, e.g. ``"weight"``)
        fills; None to decline it (a rule of a module inside may take it); ``GENERIC`` to
        send it to the generic path."""
        raise NotImplementedError

    def input(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """What the hook keeps as ``x``: the call's first tensor argument by default; its last
        dimension is the features, the ones before it follow the output's (an embedding
        keeps its ids as ``[..., 1]``)."""
        return args[0] if args else kwargs.get("x", kwargs.get("input"))

    def keep(self, unit, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Called by the forward hook of each call: the call's tags (``()`` by default), or
        None when the call does not count (e.g. disabled adapters)."""
        return ()

    def rows(
        self,
        unit,
        x: torch.Tensor,
        g: torch.Tensor,
        mask: torch.Tensor | None,
        J: torch.Tensor,
        tags: set,
        op: Callable | None,
    ) -> None:
        """Write the unit's columns of ``J`` (module docstring for the shapes); ``tags``: the
        tags of the block's kept calls; ``op``: the backend's ``torch_op`` or its twin."""
        raise NotImplementedError

    def unused(self, unit, tags: set, called: bool) -> list[str]:
        """What the unit selected that took no part in a forward (named in a warning)."""
        return [] if called else [unit.name]

    def identity(self) -> str:
        """What a checkpoint records of the rule: its rows are this rule's."""
        return f"{qualified_name(type(self))}:{self.name}:v{self.version}"


def qualified_name(kind: type) -> str:
    """``module.Class``: how the registry and the messages name a class without importing it."""
    return f"{kind.__module__}.{kind.__qualname__}"


def masked(t: torch.Tensor, mask: torch.Tensor | None, token_dim: int) -> torch.Tensor:
    """``t`` with the tokens ``mask`` drops set to zero (``token_dim``: 1 for ``x``, 2 for
    ``g``). ``masked_fill`` rather than a product: padded activations may hold NaN or inf
    (fully masked attention rows), and 0 * NaN is NaN."""
    if mask is None:
        return t
    shape = [1] * t.dim()
    shape[0], shape[token_dim] = mask.shape
    return t.masked_fill(~mask.view(shape), 0)
