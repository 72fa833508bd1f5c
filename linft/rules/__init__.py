"""The registry of per-parameter rules (``base.Rule``), keyed by module type.

``register_rule(MyLayer, MyRule())`` makes linft read the per-sample Jacobian rows of
``MyLayer``'s parameters with ``MyRule`` (and self-check it like any rule); a type may be
given by its qualified name (``"transformers.pytorch_utils.Conv1D"``) so that registering
imports nothing. Rules of a module are asked in the order of its class's MRO, the latest
registered first for one class; built-ins: ``lora.LoraRule`` (peft's LoRA ``Linear``),
``linear.LinearRule`` (``nn.Linear``, ``Conv1D``), ``embedding.EmbeddingRule``, and
``norm.NormRule`` (registered for every module: it takes the LayerNorm and RMSNorm layers whose
output it reproduces). A rule's ``slot`` may decline a
parameter (a rule of a module inside is asked next) or send it to the generic path
(``GENERIC``).
"""

from __future__ import annotations

from torch import nn

from .base import GENERIC, Rule, masked, qualified_name
from .embedding import EmbeddingRule
from .linear import CONV1D, LinearRule
from .lora import LAYER, LoraRule
from .norm import NormRule

_REGISTRY: dict[str, list[Rule]] = {}


def _key(module_type: type | str) -> str:
    if isinstance(module_type, str):
        return module_type
    if not isinstance(module_type, type):
        raise TypeError(
            f"register_rule takes a module class (or its qualified name), got {module_type!r}"
        )
    return qualified_name(module_type)


def register_rule(module_type: type | str, rule: Rule | type[Rule] | None = None):
    """Use ``rule`` for the parameters of modules of ``module_type`` (and its subclasses,
    unless the rule declines them). With ``rule`` omitted, a class decorator:

        @linft.register_rule(ChannelScale)
        class ChannelScaleRule(linft.Rule): ...
    """

    def add(rule):
        instance = rule() if isinstance(rule, type) else rule
        if not isinstance(instance, Rule):
            raise TypeError(f"register_rule takes a linft.Rule, got {type(instance).__name__}")
        _REGISTRY.setdefault(_key(module_type), []).insert(0, instance)
        return rule

    return add if rule is None else add(rule)


def unregister_rule(module_type: type | str, rule: Rule | type[Rule]) -> None:
    """Remove a rule registered for ``module_type`` (an instance, or every one of a class)."""
    rules = _REGISTRY.get(_key(module_type), [])
    keep = [r for r in rules if not (r is rule or (isinstance(rule, type) and type(r) is rule))]
    _REGISTRY[_key(module_type)] = keep


def registered_rules() -> list[Rule]:
    """Every registered rule, once each."""
    seen: dict[int, Rule] = {}
    for rules in _REGISTRY.values():
        for rule in rules:
            seen.setdefault(id(rule), rule)
    return list(seen.values())


def rules_for(module: nn.Module) -> list[Rule]:
    """The rules registered for ``module``'s class and its bases, most specific first."""
    found: list[Rule] = []
    for kind in type(module).__mro__:
        found += _REGISTRY.get(_key(kind), [])
    return found


register_rule(nn.Module, NormRule())  # any module: it takes the norms it can reproduce
register_rule(LAYER, LoraRule())
register_rule(nn.Linear, LinearRule())
register_rule(CONV1D, LinearRule())
register_rule(nn.Embedding, EmbeddingRule())

__all__ = [
    "GENERIC",
    "Rule",
    "masked",
    "register_rule",
    "registered_rules",
    "rules_for",
    "unregister_rule",
]
