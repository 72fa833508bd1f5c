"""Run the model in eval mode (no dropout) and give it back exactly as it was."""

from __future__ import annotations

import contextlib

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
