"""The caller's context does not change the kernel: a compiled model or submodule,
``torch.no_grad()``, ``torch.inference_mode()``."""

from __future__ import annotations

import pytest
import torch
from checks import assert_rel_close, gram
from models import architecture_batch, roberta_classifier, trainable_names
from reference import reference_jacobian

import linft

FP32_REL = 1e-5


@pytest.fixture
def case():
    model = roberta_classifier()
    batch = architecture_batch("roberta_cls", 5)
    J = reference_jacobian(model, batch, linft.outputs.logits(), trainable_names(model))
    return model, batch, gram(J, J)


def test_compiled_model(case):
    model, batch, expected = case
    compiled = torch.compile(model)
    K = linft.ntk(compiled, batch, batch_size=3)
    assert_rel_close(K, expected, FP32_REL, "torch.compile(model)")
    assert compiled.training == model.training


def test_compiled_submodule(case):
    model, batch, expected = case
    roberta = model.base_model.model.roberta
    roberta.encoder = torch.compile(roberta.encoder)
    K = linft.ntk(model, batch, batch_size=3)
    assert_rel_close(K, expected, FP32_REL, "compiled encoder")


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_grad_disabled_contexts(case, context):
    model, batch, expected = case
    with context():
        K = linft.ntk(model, batch, batch_size=3)
        J = linft.jacobian(model, batch)
    assert_rel_close(K, expected, FP32_REL, context.__name__)
    assert_rel_close(gram(J.double(), J.double()), expected, FP32_REL, "jacobian")


def test_inputs_made_in_inference_mode(case):
    """Inference tensors cannot be saved for backward; linft copies them."""
    model, batch, expected = case
    with torch.inference_mode():
        made = {k: v.clone() for k, v in batch.items()}
        embeds = model.get_input_embeddings()(made["input_ids"])
    assert made["input_ids"].is_inference()
    K = linft.ntk(model, made, batch_size=3)
    assert_rel_close(K, expected, FP32_REL, "inference-mode inputs")
    # float inputs too (embeddings instead of ids): the same as from ordinary tensors
    mask = batch["attention_mask"]
    K2 = linft.ntk(model, {"inputs_embeds": embeds, "attention_mask": mask}, batch_size=3)
    plain = {"inputs_embeds": embeds.clone(), "attention_mask": mask}
    assert not plain["inputs_embeds"].is_inference()
    assert torch.equal(K2, linft.ntk(model, plain, batch_size=3))
