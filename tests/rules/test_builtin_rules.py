"""The built-in rules, each one ``RuleCase`` subclass."""

from __future__ import annotations

from case import D_IN, D_OUT, Net, RuleCase
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D


class TestLinear(RuleCase):
    rule = "linear"

    def module(self):
        return nn.Linear(D_IN, D_OUT)


class TestLinearWithoutBias(RuleCase):
    rule = "linear"

    def module(self):
        return nn.Linear(D_IN, D_OUT, bias=False)


class TestConv1D(RuleCase):
    rule = "linear"

    def module(self):
        return Conv1D(D_OUT, D_IN)  # transformers' [d_in, d_out] weight


class TestLora(RuleCase):
    rule = "lora"

    def module(self):
        return nn.Linear(D_IN, D_OUT)

    def model(self):
        lora = LoraConfig(r=3, lora_alpha=6, target_modules=["module"], init_lora_weights=False)
        return get_peft_model(Net(self.module()), lora)


class TestLoraOnConv1D(TestLora):
    def module(self):
        return Conv1D(D_OUT, D_IN)

    def model(self):
        lora = LoraConfig(r=2, target_modules=["module"], init_lora_weights=False,
                          fan_in_fan_out=True)  # fmt: skip
        return get_peft_model(Net(self.module()), lora)
