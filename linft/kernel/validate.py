"""Checks of the model and the inputs before any work, each failure one sentence that
names the problem and the fix."""

from __future__ import annotations

from torch import nn

from .batches import Batch


def check_model(model: nn.Module, selected: list) -> None:
    """The model can be differentiated as it is (to be filled in: finite weights, no
    meta tensors)."""


def check_batches(model: nn.Module, batches: list[Batch], name: str) -> None:
    """The batches can be fed to the model (to be filled in: id ranges, lengths, padding)."""
