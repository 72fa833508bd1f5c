"""linft gives the model back as it was: mode, weights, requires_grad flags, no hooks."""

from __future__ import annotations

import pytest
import torch
from models import random_lengths, roberta_classifier, token_batch

import linft


def _snapshot(model):
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "grad_flags": [p.requires_grad for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "grads": [p.grad for p in model.parameters()],
    }


def _assert_same(model, snap):
    now = _snapshot(model)
    assert now["training"] == snap["training"]
    assert now["grad_flags"] == snap["grad_flags"]
    assert now["hooks"] == snap["hooks"]
    assert all(g is None for g in now["grads"])
    for k, v in snap["weights"].items():
        assert torch.equal(now["weights"][k], v), k


def _model():
    model = roberta_classifier()
    model.train()
    model.base_model.model.roberta.encoder.layer[1].eval()  # mixed flags must survive too
    model.base_model.model.roberta.embeddings.word_embeddings.weight.requires_grad_(True)
    return model


def test_model_unchanged_after_ntk_layer_ntks_and_jacobian():
    model = _model()
    batch = token_batch(random_lengths(4), pad_id=1)
    snap = _snapshot(model)
    linft.ntk(model, batch, batch_size=3, precision="bf16")
    linft.layer_ntks(model, batch)
    linft.jacobian(model, batch)
    _assert_same(model, snap)


def test_model_unchanged_when_an_error_is_raised_halfway():
    model = _model()
    batch = token_batch(random_lengths(5), pad_id=1)
    snap = _snapshot(model)
    calls = []

    def output(out, b):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return out.logits

    with pytest.raises(RuntimeError, match="boom"):
        linft.ntk(model, batch, output=output, params="*lora*", batch_size=2)
    _assert_same(model, snap)


def test_dropout_is_off_during_the_computation():
    model = roberta_classifier()
    model.train()
    batch = token_batch(random_lengths(3), pad_id=1)
    assert torch.equal(linft.ntk(model, batch), linft.ntk(model, batch))
    assert model.training
