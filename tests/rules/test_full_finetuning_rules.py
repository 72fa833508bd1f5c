"""Rules of full fine-tuning: embeddings and norms, each one ``RuleCase`` subclass."""

from __future__ import annotations

import torch
from case import D_IN, D_OUT, Net, RuleCase
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

VOCAB = 11


def _trained(module: nn.Module) -> nn.Module:
    """Weights away from their init (ones, zeros), so that a formula error shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


class NormCase(RuleCase):
    rule = "norm"

    def model(self):
        return Net(_trained(self.module()), d_out=D_IN)


class TestLayerNorm(NormCase):
    def module(self):
        return nn.LayerNorm(D_IN)


class TestLayerNormWithoutBias(NormCase):
    def module(self):
        return nn.LayerNorm(D_IN, bias=False, eps=1e-3)


class TestRMSNorm(NormCase):
    def module(self):
        return nn.RMSNorm(D_IN)  # eps None: the dtype's own


class TestLlamaRMSNorm(NormCase):
    def module(self):
        return LlamaRMSNorm(D_IN, eps=1e-5)


class TestGemmaRMSNorm(NormCase):
    def module(self):
        return GemmaRMSNorm(D_IN, eps=1e-6)  # (1 + w)


class TestT5LayerNorm(NormCase):
    def module(self):
        return T5LayerNorm(D_IN)


class TestEmbedding(RuleCase):
    rule = "embedding"

    def module(self):
        return nn.Embedding(VOCAB, D_OUT, padding_idx=0)

    def model(self):
        return Net(_trained(self.module()))

    def batch(self, lengths):
        n, T = len(lengths), max(lengths)
        mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
        ids = torch.randint(1, VOCAB, (n, T))
        ids[0, 1] = ids[0, 0]  # one token twice in a sample: its rows add
        ids[1, 0] = 0  # the padding row, inside a sample: no gradient
        return {"x": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def test_a_norm_that_computes_something_else_is_declined():
    from linft.rules.norm import NormRule

    class ScaledNorm(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    assert NormRule().variant(ScaledNorm(D_IN)) is None
    assert NormRule().variant(nn.LayerNorm(D_IN)) == "layer"
    assert NormRule().variant(GemmaRMSNorm(D_IN)) == "rms_1p"
