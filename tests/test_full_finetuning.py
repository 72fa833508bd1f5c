"""Every parameter trainable (full fine-tuning, Malladi et al.'s main setting): Hugging Face
BERT, RoBERTa, GPT-2 and Llama classifiers take no generic path (embeddings and norms
have rules; position ids shared by all samples are expanded per sample) and are exact
against float64 autograd on each sample alone."""

from __future__ import annotations

import warnings

import pytest
import torch
from checks import assert_rel_close, gram
from models import gpt2_base, llama_base, random_lengths, roberta_base_classifier, token_batch
from reference import reference_jacobian
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2ForSequenceClassification,
    LlamaForSequenceClassification,
)

import linft


def bert():
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=40, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(cfg)


def gpt2():
    model = GPT2ForSequenceClassification(gpt2_base().config)
    model.config.pad_token_id = 0
    return model


def llama():
    cfg = llama_base().config
    cfg.num_labels, cfg.pad_token_id = 2, 0
    return LlamaForSequenceClassification(cfg)


MODELS = {"bert": (bert, 0), "roberta": (roberta_base_classifier, 1), "gpt2": (gpt2, 0),
          "llama": (llama, 0)}  # fmt: skip


def _slow(caught) -> list[str]:
    return [str(w.message) for w in caught if "slow per-sample" in str(w.message)]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_takes_a_rule_and_is_exact(name):
    build, pad = MODELS[name]
    model = build().eval()
    batch = token_batch(random_lengths(4), pad_id=pad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = linft.ntk(model, batch, batch_size=3)
    assert not _slow(caught), _slow(caught)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    J = reference_jacobian(model, batch, linft.outputs.logits(), names)
    assert_rel_close(K, gram(J, J), 1e-5, name)


class _ReadsTheFirstRow(nn.Module):
    """Position embeddings from shared ids ``[1, T]``, read as ``pos[0]``: expanding them per
    sample would send every sample's gradient to slot 0."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(13, 8)
        self.positions = nn.Embedding(6, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        pos = self.positions(torch.arange(ids.shape[1])[None])  # [1, T, 8]
        h = torch.tanh(self.tokens(ids) + pos[0])
        return self.head(h.mean(1))


def test_a_shared_output_that_the_model_mixes_takes_the_generic_path():
    model = _ReadsTheFirstRow()
    ids = torch.randint(0, 13, (3, 5))
    with pytest.warns(UserWarning, match=r"positions.*shared by all samples and the model mixes"):
        K = linft.ntk(model, ids)
    names = [n for n, _ in model.named_parameters()]
    J = reference_jacobian(model, {"ids": ids}, linft.outputs.logits(), names)
    assert_rel_close(K, gram(J, J), 1e-5, "mixed shared output")
