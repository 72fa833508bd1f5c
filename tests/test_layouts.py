"""Where the samples are: sequence-first, flattened and shared activations (layouts.py).

Every kernel is checked against the float64 per-sample reference, which removes the
padding of each sample. XLNet is padding-invariant only with left padding (its
tokenizer's default: the classifier reads the last position), DeBERTa-v2 only with right
padding (absolute positions, no position_ids), OPT with both (positions from the mask);
each is compared on the padding it is invariant to.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from checks import assert_rel_close, gram
from models import (
    ARCHITECTURES,
    LABEL_WORDS,
    VOCAB,
    architecture,
    architecture_batch,
    token_batch,
    trainable_names,
)
from peft import LoraConfig, get_peft_model
from reference import reference_jacobian
from torch import nn
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
    OPTForSequenceClassification,
    XLNetConfig,
    XLNetForSequenceClassification,
)

import linft
from linft.kernel.capture import LEADING, Layout, samples_first
from linft.kernel.run import prepare

FP32_REL = 1e-5
FALLBACK = "no exact fused Jacobian rule"


def xlnet():
    config = XLNetConfig(
        vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, d_inner=21, num_labels=3,
        pad_token_id=0, initializer_range=0.1,
    )  # fmt: skip
    lora = LoraConfig(
        r=2, lora_alpha=5, target_modules=["layer_1", "layer_2", "summary"],
        modules_to_save=["logits_proj"], init_lora_weights=False,
    )  # fmt: skip
    return get_peft_model(XLNetForSequenceClassification(config), lora)


def _opt_config(**kw):
    return OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=21,
        num_attention_heads=2, max_position_embeddings=40, word_embed_proj_dim=16,
        pad_token_id=0, init_std=0.1, **kw,
    )  # fmt: skip


_OPT_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def opt_causal():
    lora = LoraConfig(r=2, lora_alpha=3, target_modules=_OPT_LINEAR, init_lora_weights=False)
    model = get_peft_model(OPTForCausalLM(_opt_config()), lora)
    return model, linft.outputs.last_token(LABEL_WORDS)


def opt_classifier():
    lora = LoraConfig(
        r=2, lora_alpha=3, target_modules=_OPT_LINEAR, modules_to_save=["score"],
        init_lora_weights=False,
    )  # fmt: skip
    model = get_peft_model(OPTForSequenceClassification(_opt_config(num_labels=3)), lora)
    return model, linft.outputs.logits()


def deberta_v3():
    """DeBERTa-v3's attention: shared keys, relative positions through the projections."""
    config = DebertaV2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=21, max_position_embeddings=40, pad_token_id=0, num_labels=3,
        share_att_key=True, relative_attention=True, pos_att_type=["p2c", "c2p"],
        position_buckets=4, max_relative_positions=8, norm_rel_ebd="layer_norm",
        position_biased_input=False, initializer_range=0.1,
    )  # fmt: skip
    lora = LoraConfig(  # peft's default targets for deberta-v2
        r=2, lora_alpha=3, target_modules=["query_proj", "value_proj"], init_lora_weights=False
    )
    return get_peft_model(DebertaV2ForSequenceClassification(config), lora)


def _plan(model, batch, output=None):
    """The probed plan, and the probe's fallback warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = prepare(
            model, batch, None, params="trainable", output=output, precision="fp32",
            backend="torch", batch_size=None, device=None,
        )[0]  # fmt: skip
    return job.plan, [str(w.message) for w in caught if FALLBACK in str(w.message)]


def _layouts(plan) -> dict[str, Layout]:
    return {u.name.rsplit(".", 1)[-1]: u.layout for u in plan.units}


def _check_kernel(model, batch, output, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = linft.ntk(model, batch, output=output, **kw)
    J = reference_jacobian(model, batch, output, trainable_names(model))
    assert_rel_close(K, gram(J, J), FP32_REL, str(kw))
    return [str(w.message) for w in caught if FALLBACK in str(w.message)]


# N == T (the case a fixed rule reads as samples), N != T with an odd length, T == 2 with
# a 1-token sample, T == 1.
SHAPES = {"n_eq_t": [4, 2, 3, 4], "odd": [7, 3, 5], "t2": [2, 1], "t1": [1, 1, 1]}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_xlnet_sequence_first_matches_reference(shape):
    model, output = xlnet(), linft.outputs.logits()
    batch = token_batch(SHAPES[shape], pad_id=0, left=True)
    plan, fallback = _plan(model, batch)
    assert not fallback
    layouts = _layouts(plan)
    assert layouts["layer_1"] == layouts["layer_2"] == Layout(dim=1, rank=3)  # [T, n, d]
    assert layouts["summary"] == LEADING
    assert not _check_kernel(model, batch, output, batch_size=3)


@pytest.mark.parametrize("make, left", [(opt_causal, False), (opt_classifier, True)])
def test_opt_flattened_feed_forward_matches_reference(make, left):
    model, output = make()
    batch = token_batch([5, 2, 4, 5, 3], pad_id=0, left=left)  # N == T
    plan, fallback = _plan(model, batch, output)
    assert not fallback
    layouts = _layouts(plan)
    assert layouts["fc1"] == layouts["fc2"] == Layout(dim=0, rank=2, order="sample")
    assert layouts["q_proj"] == LEADING
    assert not _check_kernel(model, batch, output, batch_size=2)


def test_opt_layer_ntks_and_jacobian():
    model, output = opt_causal()
    batch = token_batch([6, 3, 5], pad_id=0)
    names = trainable_names(model)
    J = reference_jacobian(model, batch, output, names)
    assert_rel_close(linft.jacobian(model, batch, output=output), J, FP32_REL, "jacobian")
    parts = linft.layer_ntks(model, batch, output=output, groups="module", batch_size=2)
    sizes = [p.numel() for n, p in model.named_parameters() if p.requires_grad]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert any(g.endswith("layers.1.fc2") for g in parts)
    for group, K in parts.items():
        cols = [
            torch.arange(s, s + size)
            for n, s, size in zip(names, starts, sizes, strict=True)
            if linft.params.module_group(n) == group
        ]
        Jg = J[:, :, torch.cat(cols)]
        assert_rel_close(K, gram(Jg, Jg), FP32_REL, group)


def test_deberta_v3_shared_positions_take_the_exact_path_with_a_warning():
    """With share_att_key, query_proj also runs on the relative-position tensor [1, 2k, d]
    that every sample shares: no fused rule is exact there; value_proj stays fused."""
    model, output = deberta_v3(), linft.outputs.logits()
    batch = token_batch([4, 2, 4, 3], pad_id=0)  # N == T
    plan, fallback = _plan(model, batch)
    assert len(fallback) == 1 and "query_proj" in fallback[0] and "shared" in fallback[0]
    assert len(plan.fallback) == 2 and all(m.endswith("query_proj") for m in plan.fallback)
    assert _layouts(plan) == {"value_proj": LEADING}
    assert _check_kernel(model, batch, output, batch_size=3)


class Toy(nn.Module):
    """Embedding -> ``proj`` -> masked sum -> head, with ``proj``'s input laid out by ``mode``."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.embed = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, 8)
        self.bank = nn.Parameter(torch.randn(3, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        n, T, d = h.shape
        if self.mode == "token_major":  # [T*n, d]
            y = self.proj(h.transpose(0, 1).reshape(T * n, d)).reshape(T, n, d).transpose(0, 1)
        elif self.mode == "flipped_tokens":  # tokens that do not line up with the mask
            y = self.proj(h.flip(1)).flip(1)
        elif self.mode == "reversed":  # samples in the opposite order
            y = self.proj(h.flip(0)).flip(0)
        elif self.mode == "mixed":  # [n, T, d] and [n*T, d] calls
            y = self.proj(h) + self.proj(h.reshape(n * T, d)).reshape(n, T, d)
        elif self.mode == "shared":  # a per-sample call and a call on a shared tensor
            y = self.proj(h) + self.proj(self.bank).mean(0)
        elif self.mode == "even_flat":  # [n*T, d] for even T, [n, T, d] otherwise
            y = self.proj(h.reshape(n * T, d)).reshape(n, T, d) if T % 2 == 0 else self.proj(h)
        else:
            raise KeyError(self.mode)
        keep = torch.ones(n, T) if attention_mask is None else attention_mask.to(y.dtype)
        return self.head((torch.tanh(y) * keep[..., None]).sum(1))


def toy(mode: str):
    lora = LoraConfig(
        r=2, target_modules=["proj"], modules_to_save=["head"], init_lora_weights=False
    )
    return get_peft_model(Toy(mode), lora)


def _raw(out, batch):
    return out


@pytest.mark.parametrize(
    "mode, layout",
    [("token_major", Layout(dim=0, rank=2, order="token")), ("flipped_tokens", LEADING)],
)
def test_exact_rules_for_token_major_rows_and_tokens_off_the_mask(mode, layout):
    """Token-major [T*n, d] rows are told from sample-major ones; where a module's tokens do
    not line up with the attention mask, no real token is masked out."""
    model = toy(mode)
    batch = token_batch([4, 2, 3, 4], pad_id=0)
    plan, fallback = _plan(model, batch, _raw)
    assert not fallback
    assert _layouts(plan)["proj"] == layout
    assert not _check_kernel(model, batch, _raw, batch_size=3)


@pytest.mark.parametrize(
    "mode, why", [("reversed", "reordered"), ("shared", "shared"), ("mixed", "different layouts")]
)
def test_module_without_an_exact_rule_falls_back_with_a_warning(mode, why):
    model = toy(mode)
    batch = token_batch([5, 2, 4], pad_id=0)
    plan, fallback = _plan(model, batch, _raw)
    assert len(fallback) == 1 and "base_model.model.proj" in fallback[0] and why in fallback[0]
    assert [".head." in u.name for u in plan.units] == [True]  # the head stays fused
    assert _check_kernel(model, batch, _raw, batch_size=2)


def test_a_shape_that_contradicts_the_learned_layout_is_an_error_naming_the_module():
    model = toy("even_flat")
    learned = token_batch([4, 2], pad_id=0)  # T = 4: [n*T, d], probed on the longest batch
    other = token_batch([3, 1, 2], pad_id=0)  # T = 3: [n, T, d]
    with pytest.raises(ValueError, match=r"base_model\.model\.proj: .*\[n\*T, d\]"):
        linft.ntk(model, [other, learned], output=_raw)


@pytest.mark.parametrize(
    "layout, shape, wrong",
    [  # n = 3 samples of length T = 5; "wrong" shapes contradict the layout, n == T included
        (LEADING, (3, 5, 7), [(5, 3, 7), (5, 5, 7), (7,)]),
        (Layout(1, 3), (5, 3, 7), [(3, 5, 7), (5, 5, 7), (5, 3, 1, 7)]),
        (Layout(0, 2, "sample"), (15, 7), [(3, 5, 7), (9, 7), (3, 7)]),
        (Layout(0, 2, "token"), (15, 7), [(5, 3, 7), (25, 7)]),
        (Layout(0, 2, "sample", tokens=2), (6, 7), [(15, 7), (3, 7)]),
    ],
)
def test_samples_first_views_and_contradictions(layout, shape, wrong):
    n, T = 3, 5
    t = torch.randn(shape)
    got, one_axis = samples_first(t, layout, n, T, "m")
    if layout.order == "token":
        want = t.reshape(T, n, 7).transpose(0, 1)
    elif layout.order == "sample":
        want = t.reshape(n, -1, 7)
    else:
        want = t.movedim(layout.dim, 0)
    assert torch.equal(got, want) and one_axis
    for bad in wrong:
        with pytest.raises(ValueError, match=r"^m: activation of shape .* does not have"):
            samples_first(torch.randn(bad), layout, n, T, "m")
    if layout.order is None:  # n == T: the samples are still found at their own dimension
        sq = torch.randn(tuple(T if s == n else s for s in shape))
        assert torch.equal(samples_first(sq, layout, T, T, "m")[0], sq.movedim(layout.dim, 0))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tested_architectures_keep_the_fused_path(arch):
    model, output = architecture(arch)
    plan, fallback = _plan(model, architecture_batch(arch, 3), output)
    assert not fallback and not plan.fallback
    assert plan.units and all(u.layout == LEADING for u in plan.units)


def test_triton_backend_reads_sequence_first_activations():
    """The Triton ops get the [T, n, d] activations as strided [n, T, d] views."""
    pytest.importorskip("triton", reason="the Triton backend needs Triton installed")
    model, output = xlnet(), linft.outputs.logits()
    batch = token_batch([3, 2, 3], pad_id=0, left=True)
    J = reference_jacobian(model, batch, output, trainable_names(model))
    K = linft.ntk(model, batch, output=output, backend="triton", batch_size=2)
    assert_rel_close(K, gram(J, J), FP32_REL, "triton")
