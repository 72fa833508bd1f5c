"""One forward and C backward passes per block, with hooks on the selected modules.

A *plan* assigns every selected parameter to the cheapest exact way of getting
its per-sample Jacobian columns:

- a *unit*: a module whose rule (``linft.rules``: registered by module type, LoRA
  and linear built in) claims the parameter; a hook keeps the module's input ``x``
  and output, the backward passes give its output gradient ``g``, and the rule
  writes the unit's rows from them;
- generic: anything no rule claims (norms, embeddings, tied or DoRA weights), and
  any unit whose activations hold no sample dimension that a rule can read
  (``layouts.probe``), gets exact per-sample gradients from one backward per
  sample and output.

Each unit carries the ``Layout`` of its activations: where the samples are
(``[n, T, d]``, ``[T, n, d]``, ``[n*T, d]``, ...), learned by ``layouts.probe``
from how the shapes follow the number of samples; ``samples_first`` views a
captured activation as ``[n, tokens, d]`` by that layout and raises, naming the
module, when a shape contradicts it.

The backward passes ask autograd only for the gradients at the captured module
outputs, so they stop at the earliest selected module and never form weight
gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..rules import GENERIC, Rule, rules_for


@dataclass(frozen=True)
class Layout:
    """Where the samples sit in a hooked module's input ``x`` (its output ``y`` has the same
    layout, only the last dimension differs).

    Dimension ``dim`` holds them: ``n`` entries (``order`` None: ``[n, T, d]`` at ``dim`` 0,
    sequence-first ``[T, n, d]`` at 1), or ``n`` blocks of ``tokens`` rows merged into one
    dimension (``order="sample"``: sample-major ``[n*T, d]``; ``"token"``: token-major
    ``[T*n, d]``), ``tokens`` None meaning the batch's sequence length ``T``. ``rank`` is
    ``x.dim()`` on every call (None: any). ``shared``: one ``[1, ...]`` activation serves every
    sample (position ids broadcast from ``[1, T]``); the hook expands the module's input and
    output to ``[n, ...]``, so that the backward gives each sample its own output gradient.
    """

    dim: int = 0
    rank: int | None = None
    order: str | None = None
    tokens: int | None = None
    shared: bool = False

    def describe(self) -> str:
        if self.shared:
            return "shared by all samples, [1, ...] expanded to [n, ...]"
        if self.order is None and self.dim == 0:
            return "samples leading, [n, ...]"
        rank = self.rank or self.dim + 2
        names = ["."] * rank
        names[-1] = "d"
        if self.order is None:
            names[self.dim] = "n"
        else:
            k = "T" if self.tokens is None else str(self.tokens)
            names[self.dim] = f"n*{k}" if self.order == "sample" else f"{k}*n"
        return f"[{', '.join(names)}]"


LEADING = Layout()


@dataclass
class Unit:
    """A module whose rule claims some of the selected parameters: ``cols`` maps each of the
    rule's slots to the first column of its parameter."""

    rule: Rule
    name: str
    module: nn.Module
    cols: dict[Hashable, int] = field(default_factory=dict)
    layout: Layout = LEADING

    def columns(self) -> list[int]:
        return list(self.cols.values())


@dataclass
class Plan:
    units: list[Unit]
    generic: list[tuple[str, int, int]]  # (parameter name, first column, numel)
    num_columns: int
    # modules moved from units to generic because no fused rule reads their layout: reason
    fallback: dict[str, str] = field(default_factory=dict)

    def generic_modules(self) -> list[str]:
        """Owners of the parameters that are generic by kind (not moved by ``fallback``)."""
        moved = tuple(f"{m}." for m in self.fallback)
        return sorted({n.rsplit(".", 1)[0] for n, _, _ in self.generic if not n.startswith(moved)})


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every (module name, module, attribute) holding each parameter, shared ones included."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod_name, module, attr))
    return owners


def _claim(
    modules: dict[str, nn.Module], mod_name: str, attr: str
) -> tuple[Rule, str, nn.Module, Hashable] | None:
    """The first rule of the parameter's enclosing modules, outermost first, that claims
    it: (rule, unit module name, unit module, slot). Outermost first: a LoRA layer's rule
    sees ``lora_A.default.weight`` before ``nn.Linear``'s rule sees its ``weight``."""
    parts = mod_name.split(".") if mod_name else []
    for depth in range(len(parts) + 1):
        name = ".".join(parts[:depth])
        module = modules[name]
        rules = rules_for(module)
        if not rules:
            continue
        path = ".".join([*parts[depth:], attr])
        for rule in rules:
            slot = rule.slot(module, path)
            if slot is GENERIC:
                return None
            if slot is not None:
                return rule, name, module, slot
    return None


def build_plan(
    model: nn.Module, selected: list[tuple[str, nn.Parameter]], offsets: dict[str, int]
) -> Plan:
    owners = _owners(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    units: dict[str, Unit] = {}
    generic: list[tuple[str, int, int]] = []
    for name, p in selected:
        col = offsets[name]
        holders = owners.get(id(p), [])
        claim = None
        if len(holders) == 1:  # tied or unowned: only the leaf itself sees every use
            mod_name, _, attr = holders[0]
            claim = _claim(modules, mod_name, attr)
        if claim is None:
            generic.append((name, col, p.numel()))
            continue
        rule, unit_name, module, slot = claim
        unit = units.setdefault(unit_name, Unit(rule, unit_name, module))
        if unit.rule is not rule:  # two rules on one module: the first one's unit keeps it
            generic.append((name, col, p.numel()))
            continue
        unit.cols[slot] = col
    num_columns = sum(p.numel() for _, p in selected)
    return Plan(list(units.values()), generic, num_columns)


@dataclass
class _Call:
    x: torch.Tensor  # [n, T, d_in], detached
    y: torch.Tensor  # the module output, still in the graph
    tags: tuple = ()  # what ``Rule.keep`` said of the call: LoRA's active adapters


class Capture:
    """Forward hooks recording each unit's input and output while enabled; ``keep`` turns
    each call into what is stored (the call itself by default), as it happens."""

    def __init__(
        self,
        plan: Plan,
        keep: Callable[[_Call], object] | None = None,
        samples: int | None = None,
    ):
        self.plan = plan
        self.keep = keep or (lambda call: call)
        self.calls: list[list[_Call]] = [[] for _ in plan.units]
        self.enabled = True
        self.samples = samples  # the block's n: what a shared activation expands to
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Capture:
        for i, unit in enumerate(self.plan.units):
            self._handles.append(unit.module.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.calls = [[] for _ in self.plan.units]

    def _hook(self, i: int):
        unit = self.plan.units[i]

        def hook(module, args, kwargs, output):
            if not self.enabled:
                return
            tags = unit.rule.keep(unit, module, args, kwargs)
            if tags is not None:
                x = unit.rule.input(module, args, kwargs)
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"{unit.name} was called without a tensor input")
                expand = unit.layout.shared and self.samples is not None and x.shape[0] == 1
                if expand:  # a view per sample: the backward keeps their gradients apart
                    x = x.expand(self.samples, *x.shape[1:])
                    output = output.expand(self.samples, *output.shape[1:])
                call = _Call(x.detach(), output, tuple(tags))
                self.calls[i].append(self.keep(call))
                if expand:
                    return output

        return hook


def sequence_length(batch) -> int | None:
    """The padded sequence length ``T`` of a batch: what a merged ``[n*T, d]`` layout
    follows and what the attention mask's tokens are."""
    for key in ("attention_mask", "input_ids", "inputs_embeds"):
        t = batch.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return t.shape[1]
    return None


def _fits(t: torch.Tensor, layout: Layout, n: int, T: int | None) -> bool:
    rank = t.dim()
    if rank < 2 or layout.dim >= rank - 1 or layout.rank not in (None, rank):
        return False
    size = t.shape[layout.dim]
    if layout.order is None:
        return size == n
    k = T if layout.tokens is None else layout.tokens
    return k is not None and size == n * k


def samples_first(
    t: torch.Tensor, layout: Layout, n: int, T: int | None, where: str
) -> tuple[torch.Tensor, bool]:
    """View an activation as ``[n, tokens, d]`` by ``layout``; also whether its tokens come
    from one dimension (so that they can line up with the attention mask's)."""
    if not _fits(t, layout, n, T):
        length = "" if T is None else f" of length {T}"
        raise ValueError(
            f"{where}: activation of shape {tuple(t.shape)} does not have the layout "
            f"{layout.describe()} that probing the inputs found, for a block of {n} samples"
            f"{length}, so its samples cannot be told apart; feed batches that the model "
            "treats alike (one mapping), or leave this module out with params=..."
        )
    s = layout.dim
    if layout.order is None:
        t = t.movedim(s, 0)
    else:
        k = T if layout.tokens is None else layout.tokens
        sample_major = layout.order == "sample"
        t = t.unflatten(s, (n, k) if sample_major else (k, n))
        t = t.movedim(s if sample_major else s + 1, 0)
    if t.dim() == 2:
        return t.unsqueeze(1), False
    return t.reshape(n, -1, t.shape[-1]), t.dim() == 3


def _token_mask(
    mask: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor, one_axis: bool
) -> torch.Tensor | None:
    """The tokens to keep: real ones, and any padded one whose output gradient is not zero.

    Masking a token whose gradient is zero changes no number (every Jacobian term is
    bilinear in ``g``); it only drops non-finite activations at padded positions. A token
    with a non-zero gradient is kept even where the mask says padding: the mask does not
    line up with these tokens (e.g. a decoder's), or the padding changes the output, and
    either way dropping it would change the Jacobian of the input as given.
    """
    if mask is None or not one_axis or x.shape[1] != mask.shape[1]:
        return None
    return mask.bool() | g.ne(0).any(dim=3).any(dim=1)


def unit_tensors(
    calls: list[_Call],
    grads: list[list[torch.Tensor | None]],
    n: int,
    attention_mask: torch.Tensor | None,
    where: str,
    layout: Layout = LEADING,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Concatenate a unit's calls along the token axis: x [n, T, d_in], g [n, C, T, d_out], mask.

    Each call is read by the unit's ``layout`` (``seq_len``: the block's sequence length).
    A module called several times in one forward contributes the sum over its calls,
    which is the sum over the concatenated tokens.
    """
    xs, gs, masks = [], [], []
    for call, g_call in zip(calls, grads, strict=True):
        x, one_axis = samples_first(call.x, layout, n, seq_len, where)
        g = torch.stack(
            [
                samples_first(
                    torch.zeros_like(call.y) if g is None else g, layout, n, seq_len, where
                )[0]
                for g in g_call
            ],
            dim=1,
        )  # [n, C, tokens, d_out]
        xs.append(x)
        gs.append(g)
        masks.append(_token_mask(attention_mask, x, g, one_axis))
    if all(m is None for m in masks):
        mask = None
    else:
        mask = torch.cat(
            [
                torch.ones(n, x.shape[1], dtype=torch.bool, device=x.device) if m is None else m
                for m, x in zip(masks, xs, strict=True)
            ],
            dim=1,
        )
        if bool(mask.all()):
            mask = None
    if len(xs) == 1:
        return xs[0], gs[0], mask
    return torch.cat(xs, dim=1), torch.cat(gs, dim=2), mask


def warn_unused(plan: Plan, capture: Capture) -> None:
    unused = []
    for unit, calls in zip(plan.units, capture.calls, strict=True):
        tags = {t for call in calls for t in call.tags}
        unused += unit.rule.unused(unit, tags, bool(calls))
    if unused:
        warnings.warn(
            f"selected parameters of {unused} took no part in the forward pass (inactive, "
            "disabled or merged adapter?); their Jacobian columns are zero",
            stacklevel=3,
        )
