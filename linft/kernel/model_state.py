"""Run the model in eval mode (no dropout), with autograd on, and give it back exactly as it was."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def evaluation_mode(model: nn.Module):
    """Every submodule in eval mode inside; each module's own ``training`` flag restored after,
    also when an error is raised halfway."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def differentiable():
    """Autograd on, whatever the caller's context: ``torch.no_grad()``,
    ``torch.inference_mode()``, a ``torch.compile``d model or submodule. Compiled code
    runs eagerly inside, so that linft's hooks see every module call as it happens (a
    compiled graph may skip or fuse them)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            stack.enter_context(set_stance("force_eager"))
        yield


@contextlib.contextmanager
def run_context(model: nn.Module, precision_context):
    """Everything a run needs around the model: eval mode, autograd, the precision."""
    with evaluation_mode(model), differentiable(), precision_context:
        yield


# A deterministic forward repeats bit for bit on the CPU; GPU kernels with atomics move the
# last float32 bits. A module whose state changes its output moves it by far more.
_REPEAT_RTOL = 1e-5


def changing_module(model: nn.Module, call) -> str | None:
    """The first module (in the order modules finish) whose output differs between two
    calls ``call()`` of the same forward: state kept between calls or randomness in eval
    mode. None when both calls agree. Costs two forwards; it runs only after a discrepancy."""
    names = {m: n for n, m in model.named_modules()}
    runs: list[list[tuple[str, torch.Tensor]]] = []
    for _ in range(2):
        seen: list[tuple[str, torch.Tensor]] = []

        def record(module, args, out, seen=seen):
            t = _first_tensor(out)
            if t is not None and module in names:
                seen.append((names[module], t.detach().double().clone()))

        handles = [m.register_forward_hook(record) for m in names]
        try:
            with torch.no_grad():
                call()
        finally:
            for h in handles:
                h.remove()
        runs.append(seen)
    for (name, a), (name2, b) in zip(*runs, strict=False):
        if name != name2:
            return name  # another module ran: control flow depends on state
        if a.shape != b.shape or not torch.equal(a.isfinite(), b.isfinite()):
            return name
        diff = (a - b).nan_to_num(0).norm()
        if diff > _REPEAT_RTOL * a.nan_to_num(0).norm():
            return name
    return None


def changing_message(name: str) -> str:
    shown = name or "the model"
    return (
        f"the model's module {shown!r} gives another output for the same input on a second "
        "call (state kept between calls, e.g. a counter or a cache, or randomness left on in "
        "eval mode), so its Jacobian is no function of the inputs and no kernel is defined; "
        "make its forward depend only on its inputs and parameters"
    )


def _first_tensor(out) -> torch.Tensor | None:
    """The first floating-point tensor of a module's output (a tensor, a tuple, a
    ``ModelOutput``, which is a dict)."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None
