"""linft.ntk / layer_ntks / jacobian against the float64 torch.func.jacrev reference."""

from __future__ import annotations

import pytest
import torch
from checks import TAU_FP64, assert_rel_close, gram
from models import (
    ARCHITECTURES,
    LABEL_WORDS,
    architecture,
    architecture_batch,
    roberta_classifier,
    token_batch,
    trainable_names,
)
from reference import reference_jacobian

import linft

FP32_REL = 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_kernel_matches_reference_on_paddedarchitecture_batch(arch):
    model, output = architecture(arch)
    batch = architecture_batch(arch, 5)
    K = linft.ntk(model, batch, output=output, batch_size=2)
    J = reference_jacobian(model, batch, output, trainable_names(model))
    assert K.dtype == torch.float32
    assert_rel_close(K, gram(J, J), FP32_REL, arch)
    flat = K.reshape(K.shape[0] * K.shape[1], -1)
    assert torch.equal(flat, flat.T), "the symmetric kernel must be exactly symmetric"


def test_left_padded_causal_lm_matches_reference():
    model, output = architecture("llama")
    batch = architecture_batch("llama", 4, left=True)
    K = linft.ntk(model, batch, output=output, batch_size=3)
    J = reference_jacobian(model, batch, output, trainable_names(model))
    assert_rel_close(K, gram(J, J), FP32_REL, "llama left padding")


def test_padding_does_not_change_a_row():
    """A sample's kernel row is the same alone as inside a padded batch."""
    model, output = architecture("gpt2")
    batch = token_batch([3, 8, 5], pad_id=0)
    together = linft.ntk(model, batch, output=output)
    short = {k: v[:1, :3] for k, v in batch.items()}
    alone = linft.ntk(model, short, output=output)
    assert_rel_close(together[0, :, 0, :], alone[0, :, 0, :], FP32_REL, "padded vs alone")


@pytest.mark.parametrize("kernel", ["sgd", "signgd", "asym_signgd"])
@pytest.mark.parametrize("outputs", ["full", "trace"])
def test_kernels_and_output_modes_in_float64(kernel, outputs):
    """float64 models compute in float64, so sign patterns are exact."""
    model = roberta_classifier().double()
    batch = architecture_batch("roberta_cls", 4)
    K = linft.ntk(model, batch, kernel=kernel, outputs=outputs, batch_size=3)
    J = reference_jacobian(model, batch, linft.outputs.logits(), trainable_names(model))
    expected = gram(J, J, kernel, TAU_FP64)
    if outputs == "trace":
        expected = torch.einsum("icjc->ij", expected)
    assert K.dtype == torch.float64
    assert_rel_close(K, expected, 1e-10, f"{kernel}/{outputs}")
    if kernel != "asym_signgd":
        flat = K.reshape(-1, K.shape[-2] * K.shape[-1]) if outputs == "full" else K
        assert torch.equal(flat, flat.T)


@pytest.mark.parametrize("kernel", ["signgd", "asym_signgd"])
def test_sign_kernels_in_fp32_match_signs_of_the_jacobian(kernel):
    model = roberta_classifier()
    batch = architecture_batch("roberta_cls", 5)
    K = linft.ntk(model, batch, kernel=kernel, batch_size=2)
    J = linft.jacobian(model, batch).double()
    assert_rel_close(K, gram(J, J, kernel), 1e-6, kernel)


def test_cross_kernel_matches_reference():
    model, output = architecture("gpt2")
    a, b = architecture_batch("gpt2", 3), architecture_batch("gpt2", 4)
    K = linft.ntk(model, a, b, output=output, batch_size=2)
    names = trainable_names(model)
    Ja = reference_jacobian(model, a, output, names)
    Jb = reference_jacobian(model, b, output, names)
    assert K.shape == (3, len(LABEL_WORDS), 4, len(LABEL_WORDS))
    assert_rel_close(K, gram(Ja, Jb), FP32_REL, "cross")


def test_cross_trace_with_asymmetric_kernel():
    model = roberta_classifier().double()
    a, b = architecture_batch("roberta_cls", 3), architecture_batch("roberta_cls", 2)
    K = linft.ntk(model, a, b, kernel="asym_signgd", outputs="trace")
    names = trainable_names(model)
    out = linft.outputs.logits()
    expected = torch.einsum(
        "icjc->ij",
        gram(
            reference_jacobian(model, a, out, names),
            reference_jacobian(model, b, out, names),
            "asym_signgd",
            TAU_FP64,
        ),
    )
    assert_rel_close(K, expected, 1e-10, "cross asym trace")


def test_single_output_gives_a_matrix():
    model = roberta_classifier(num_labels=1)
    batch = architecture_batch("roberta_cls", 4)
    K = linft.ntk(model, batch, outputs="full")
    assert K.shape == (4, 4)
    J = reference_jacobian(model, batch, linft.outputs.logits(), trainable_names(model))
    assert_rel_close(K, gram(J, J)[:, 0, :, 0], FP32_REL, "C=1")


@pytest.mark.parametrize("groups", ["module", "layer"])
def test_layer_ntks_sum_to_ntk_and_match_column_blocks(groups):
    model = roberta_classifier()
    batch = architecture_batch("roberta_cls", 4)
    parts = linft.layer_ntks(model, batch, groups=groups, batch_size=3)
    full = linft.ntk(model, batch, batch_size=3)
    assert_rel_close(sum(parts.values()), full, 1e-6, "sum of groups")
    names = trainable_names(model)
    J = reference_jacobian(model, batch, linft.outputs.logits(), names)
    sizes = [p.numel() for n, p in model.named_parameters() if p.requires_grad]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    expected_groups = {
        "module": {
            "encoder.layer.0.attention.self.query",
            "encoder.layer.1.attention.self.value",
            "classifier.dense",
            "classifier.out_proj",
        },
        "layer": {"encoder.layer.0", "encoder.layer.1", "classifier.dense"},
    }[groups]
    for suffix in expected_groups:
        assert any(g.endswith(suffix) for g in parts), f"no group ending in {suffix}: {list(parts)}"
    for group, K in parts.items():
        cols = [
            torch.arange(s, s + size)
            for n, s, size in zip(names, starts, sizes, strict=True)
            if linft.params.module_group(n) == group
            or (groups == "layer" and linft.params.layer_group(n) == group)
        ]
        Jg = J[:, :, torch.cat(cols)]
        assert_rel_close(K, gram(Jg, Jg), FP32_REL, group)


def test_jacobian_matches_reference_in_parameter_order():
    model, output = architecture("llama")
    batch = architecture_batch("llama", 3)
    J = linft.jacobian(model, batch, output=output, batch_size=2)
    expected = reference_jacobian(model, batch, output, trainable_names(model))
    assert J.shape == expected.shape
    assert_rel_close(J, expected, FP32_REL, "jacobian")


def test_iterable_of_batches_equals_one_mapping():
    model = roberta_classifier()
    a, b = architecture_batch("roberta_cls", 3), architecture_batch("roberta_cls", 2)
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(batch):
        extra = width - batch["input_ids"].shape[1]
        return {
            k: torch.nn.functional.pad(v, (0, extra), value=1 if k == "input_ids" else 0)
            for k, v in batch.items()
        }

    joined = {k: torch.cat([pad(a)[k], pad(b)[k]]) for k in a}
    assert_rel_close(linft.ntk(model, [a, b]), linft.ntk(model, joined), FP32_REL, "iterable")
