"""A rule a user registers for their own layer (README's example: a learned per-channel
scale): linft uses it, self-checks it, names it in errors and checkpoints it."""

from __future__ import annotations

import warnings

import pytest
import torch
from case import D_IN, LENGTHS, Net, RuleCase, _batch
from checks import assert_rel_close
from torch import nn

import linft
from linft.kernel.checkpoint import CheckpointError


class ChannelScale(nn.Module):
    """``y = x * w``: a learned scale per channel."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.weight


class ChannelScaleRule(linft.Rule):
    """``d f_a / d w_j = sum_t g_taj x_tj``."""

    name = "channel scale"

    def slot(self, module, path):
        return "weight" if path == "weight" else None

    def rows(self, unit, x, g, mask, J, tags, op):
        x, g = linft.rules.masked(x, mask, 1), linft.rules.masked(g, mask, 2)
        col = unit.cols["weight"]
        J[:, :, col : col + x.shape[-1]] = torch.einsum("nctd,ntd->ncd", g, x)


class UnmaskedScaleRule(ChannelScaleRule):
    """A plausible bug: the padded tokens' features are left in."""

    def rows(self, unit, x, g, mask, J, tags, op):
        col = unit.cols["weight"]
        J[:, :, col : col + x.shape[-1]] = torch.einsum("nctd,ntd->ncd", g, x + 1.0)


@pytest.fixture
def registered():
    rule = ChannelScaleRule()
    linft.register_rule(ChannelScale, rule)
    yield rule
    linft.unregister_rule(ChannelScale, rule)


class TestChannelScale(RuleCase):
    rule = "channel scale"

    @pytest.fixture(autouse=True)
    def _registered(self, registered):
        yield

    def module(self):
        return ChannelScale(D_IN)

    def model(self):
        return Net(self.module(), d_out=D_IN)


def test_without_a_rule_the_layer_takes_the_generic_path():
    """Unregistered, the layer is exact on the generic path (and says so); registered, the
    rule gives the same kernel."""
    model = Net(ChannelScale(D_IN), d_out=D_IN)
    batch = _batch(LENGTHS)
    with pytest.warns(UserWarning, match=r"\['module'\] have no rule \(linft.register_rule\)"):
        generic = linft.ntk(model, batch)
    linft.register_rule(ChannelScale, ChannelScaleRule)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            K = linft.ntk(model, batch)
    finally:
        linft.unregister_rule(ChannelScale, ChannelScaleRule)
    assert_rel_close(K, generic, 1e-5, "rule vs generic")


def test_a_wrong_rule_is_caught_and_named():
    model = Net(ChannelScale(D_IN), d_out=D_IN)
    linft.register_rule(ChannelScale, UnmaskedScaleRule)
    try:
        with pytest.raises(linft.SelfCheckError, match=r"module module .*rule 'channel scale'"):
            linft.ntk(model, _batch(LENGTHS))
    finally:
        linft.unregister_rule(ChannelScale, UnmaskedScaleRule)


def test_a_checkpoint_records_the_rule(tmp_path, registered):
    model = Net(ChannelScale(D_IN), d_out=D_IN)
    batch = _batch(LENGTHS)
    linft.ntk(model, batch, checkpoint=tmp_path)
    newer = ChannelScaleRule()
    newer.version = 2  # its rows changed: the old checkpoint's are not this rule's
    linft.register_rule(ChannelScale, newer)
    try:
        with pytest.raises(CheckpointError, match="different computation"):
            linft.ntk(model, batch, checkpoint=tmp_path)
    finally:
        linft.unregister_rule(ChannelScale, newer)


def test_register_rule_takes_rules_and_module_classes_only():
    with pytest.raises(TypeError, match="takes a linft.Rule"):
        linft.register_rule(ChannelScale, object())
    with pytest.raises(TypeError, match="module class"):
        linft.register_rule(ChannelScale(3), ChannelScaleRule())
