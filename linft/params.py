"""Which parameters the kernel differentiates: selection, grouping, peft discovery."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

ParamSpec = str | Sequence[str] | Callable[[str, nn.Parameter], bool]

_LORA_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
# peft wrapper segments dropped from group names: "<container>.<adapter>" pairs,
# and the base layer a LoRA module wraps.
_WRAPPER_PAIR = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|modules_to_save)\.[^.]+"
)
_BLOCK = re.compile(r"^(.*?\.(?:layers?|h|blocks?)\.\d+)(?:\.|$)")


def lora_layer_class() -> type | None:
    """peft's LoRA layer base class, or None when peft is not installed."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def active_lora_names(model: nn.Module) -> set[str]:
    """Names of the LoRA A/B parameters of the adapters each LoRA layer has active."""
    layer_cls = lora_layer_class()
    names: set[str] = set()
    if layer_cls is None:
        return names
    for mod_name, module in model.named_modules():
        if not isinstance(module, layer_cls):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for adapter in module.active_adapters:
            for container in _LORA_CONTAINERS:
                holder = getattr(module, container, None)
                if holder is None or adapter not in holder:
                    continue
                entry = holder[adapter]
                if isinstance(entry, nn.Parameter):
                    names.add(f"{prefix}{container}.{adapter}")
                else:
                    names.update(
                        f"{prefix}{container}.{adapter}.{n}" for n, _ in entry.named_parameters()
                    )
    return names


def select_params(model: nn.Module, params: ParamSpec) -> list[tuple[str, nn.Parameter]]:
    """The selected ``(name, parameter)`` pairs, in ``model.named_parameters()`` order.

    ``params``: ``"trainable"`` (requires_grad), ``"lora"`` (LoRA A/B weights of the
    active peft adapters), a name or glob, a list of names/globs, or a predicate
    ``(name, param) -> bool``.
    """
    named = list(model.named_parameters())
    if callable(params) and not isinstance(params, str):
        chosen = [(n, p) for n, p in named if params(n, p)]
        what = "the predicate"
    elif params == "trainable":
        chosen = [(n, p) for n, p in named if p.requires_grad]
        what = 'params="trainable" (no parameter has requires_grad=True)'
    elif params == "lora":
        lora = active_lora_names(model)
        chosen = [(n, p) for n, p in named if n in lora]
        what = 'params="lora" (no active peft LoRA adapter found)'
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(
                'params must be "trainable", "lora", a list of names/globs or a predicate, '
                f"got {params!r}"
            )
        unmatched = [pat for pat in patterns if not any(_matches(n, pat) for n, _ in named)]
        if unmatched:
            raise ValueError(
                f"params pattern(s) {unmatched} match no parameter of the model; "
                f"names look like {[n for n, _ in named[:3]]}"
            )
        chosen = [(n, p) for n, p in named if any(_matches(n, pat) for pat in patterns)]
        what = f"params={patterns!r}"
    if not chosen:
        raise ValueError(
            f"{what} selects no parameter; pass params=... naming the parameters to "
            'differentiate (e.g. params="lora" or a list of glob patterns)'
        )
    return chosen


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def module_group(name: str) -> str:
    """The adapted module a parameter belongs to, peft wrapper segments removed.

    ``...layer.3.attention.self.query.lora_A.default.weight`` -> ``...layer.3.attention.self.query``
    (``classifier.modules_to_save.default.dense`` -> ``classifier.dense``).
    """
    owner = name.rsplit(".", 1)[0] if "." in name else name
    owner = _WRAPPER_PAIR.sub("", owner)
    return owner.replace(".base_layer", "")


def layer_group(name: str) -> str:
    """The transformer block (``...layer.3``, ``...h.3``, ``...layers.3``), else the module."""
    owner = module_group(name)
    match = _BLOCK.match(owner)
    return match.group(1) if match else owner


def group_columns(
    selected: Sequence[tuple[str, nn.Parameter]],
    groups: str | Callable[[str], str],
) -> dict[str, list[slice]]:
    """Column slices of each parameter group, in first-appearance order."""
    if groups == "module":
        key = module_group
    elif groups == "layer":
        key = layer_group
    elif callable(groups):
        key = groups
    else:
        raise ValueError(
            f'groups must be "module", "layer" or a callable name -> group, got {groups!r}'
        )
    out: dict[str, list[slice]] = {}
    col = 0
    for name, p in selected:
        g = str(key(name))
        spans = out.setdefault(g, [])
        if spans and spans[-1].stop == col:  # merge adjacent spans into one GEMM
            spans[-1] = slice(spans[-1].start, col + p.numel())
        else:
            spans.append(slice(col, col + p.numel()))
        col += p.numel()
    return out


def column_offsets(selected: Sequence[tuple[str, nn.Parameter]]) -> tuple[dict[str, int], int]:
    """First Jacobian column of each selected parameter and the total count P."""
    offsets, col = {}, 0
    for name, p in selected:
        offsets[name] = col
        col += p.numel()
    return offsets, col


def parameter_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
