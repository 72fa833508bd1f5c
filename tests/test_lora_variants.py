"""LoRA scaling variants, several adapters, generic parameters, precisions."""

from __future__ import annotations

import fnmatch
import warnings

import pytest
import torch
from checks import assert_rel_close, gram
from models import gpt2, random_lengths, roberta_classifier, token_batch, trainable_names
from peft import LoraConfig
from reference import reference_jacobian

import linft

LOGITS = linft.outputs.logits()


def _batch(n):
    return token_batch(random_lengths(n), pad_id=1)


def _check(model, batch, output=LOGITS, names=None, rel=1e-5, **kw):
    K = linft.ntk(model, batch, output=output, batch_size=2, **kw)
    J = reference_jacobian(model, batch, output, names or trainable_names(model))
    assert_rel_close(K, gram(J, J), rel, str(kw))
    return K


def test_rslora_scaling():
    model = roberta_classifier(use_rslora=True)
    layer = model.base_model.model.roberta.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == pytest.approx(6 / 3**0.5)
    _check(model, _batch(4))


def test_gpt2_conv1d_with_rslora_and_lora_params():
    model, output = gpt2(use_rslora=True)
    batch = token_batch(random_lengths(4), pad_id=0)
    lora = [n for n, _ in model.named_parameters() if ".lora_" in n]
    _check(model, batch, output, names=lora, params="lora")


def _two_adapters():
    model = roberta_classifier()
    model.add_adapter(
        "other", LoraConfig(r=2, lora_alpha=3, target_modules=["query"], init_lora_weights=False)
    )
    return model


def test_only_the_active_adapter_counts():
    model = _two_adapters()  # "default" stays active, "other" exists but is inactive
    batch = _batch(4)
    names = [n for n, _ in model.named_parameters() if ".lora_" in n and ".default." in n]
    _check(model, batch, names=names, params="lora")


def test_several_active_adapters():
    model = _two_adapters()
    model.base_model.set_adapter(["default", "other"])
    names = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert any(".other." in n for n in names)
    _check(model, _batch(4), names=names, params="lora")


def test_inactive_adapter_selected_by_name_gives_zero_columns_and_a_warning():
    model = _two_adapters()
    batch = _batch(3)
    with pytest.warns(UserWarning, match="took no part"):
        J = linft.jacobian(model, batch, params=["*lora_*.other.weight", "*lora_*.default.weight"])
    assert J.shape[-1] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    cols, start = [], 0
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            continue
        if ".other." in n:
            cols.append(J[..., start : start + p.numel()])
        start += p.numel()
    assert cols and all(bool((c == 0).all()) for c in cols)
    assert J.abs().sum() > 0


def test_norms_and_embeddings_beside_lora_take_their_rules():
    """LoRA with a trainable norm and the word embeddings: each kind its own rule, none on
    the generic path (so no warning), exact."""
    model = roberta_classifier()
    batch = _batch(3)
    patterns = ["*query.lora_B*", "*layer.1.output.LayerNorm.weight", "*word_embeddings.weight"]
    names = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check(model, batch, names=names, params=patterns)
    slow = [str(w.message) for w in caught if "slow per-sample" in str(w.message)]
    assert not slow, slow


def test_plain_linear_weights_and_biases_of_full_layers():
    model = roberta_classifier()
    patterns = [
        "*layer.0.attention.self.key.weight",
        "*layer.0.attention.self.key.bias",
        "*intermediate.dense.*",
    ]
    names = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    _check(model, _batch(4), names=names, params=patterns)


def test_predicate_selection():
    model = roberta_classifier()
    names = [n for n, _ in model.named_parameters() if "lora_B" in n]
    _check(model, _batch(3), names=names, params=lambda n, p: "lora_B" in n)


def test_bf16_within_one_percent():
    model = roberta_classifier()
    batch = _batch(5)
    K = linft.ntk(model, batch, precision="bf16")
    J = reference_jacobian(model, batch, LOGITS, trainable_names(model))
    assert K.dtype == torch.float32
    assert_rel_close(K, gram(J, J), 1e-2, "bf16")
    flat = K.reshape(15, 15)
    assert torch.equal(flat, flat.T)


def test_tf32_precision_runs_and_matches_on_cpu():
    model = roberta_classifier()
    _check(model, _batch(3), precision="tf32")


def test_gpt2_conv1d_full_weights_and_biases():
    """Full fine-tuning of chosen GPT-2 layers: Conv1D stores W as [d_in, d_out]."""
    model, output = gpt2()
    batch = token_batch(random_lengths(4), pad_id=0)
    patterns = ["*h.0.mlp.c_fc.weight", "*h.0.mlp.c_fc.bias", "*h.1.attn.c_attn.base_layer.weight"]
    names = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    assert len(names) == 3
    from linft.kernel.capture import build_plan
    from linft.params import column_offsets, select_params

    selected = select_params(model, patterns)
    plan = build_plan(model, selected, column_offsets(selected)[0])
    assert not plan.generic
    assert all(u.rule.name == "linear" and type(u.module).__name__ == "Conv1D" for u in plan.units)
    _check(model, batch, output, names=names, params=patterns)
