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
