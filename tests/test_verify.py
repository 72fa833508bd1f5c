"""The self-check: a fast path that is wrong is caught on the first block, by name."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch
from checks import assert_rel_close, gram
from models import (
    ARCHITECTURES,
    architecture,
    architecture_batch,
    roberta_classifier,
    trainable_names,
)
from reference import reference_jacobian

import linft
from linft.backends import TORCH_OPS
from linft.kernel import run
from linft.kernel.verify import SelfCheckError
from linft.ops import jacobian as ref_ops


def _misscaled_lora(*args, **kwargs):
    """LoRA rows with the scaling applied twice: a plausible bug, off by the scaling."""
    x, g, A, B, s, *rest = args
    ref_ops.lora_jacobian(x, g, A, B, s * s, *rest, **kwargs)


def _rolled_lora(x, g, A, B, s, mask, out, col_A, col_B, sign=False):
    """Each sample's rows from the next sample's tokens: samples read off the wrong axis."""
    ref_ops.lora_jacobian(x.roll(1, 0), g.roll(1, 0), A, B, s, mask, out, col_A, col_B, sign)


def _noisy_gram(a, out, sign=False):
    TORCH_OPS.gram_symmetric(a, out, sign)
    out.add_(1e-2 * out.abs().max())


def _use_ops(monkeypatch, ops):
    monkeypatch.setattr(run, "resolve_ops", lambda backend, device: ops)


def _with_lora_op(op, name="torch"):
    """The torch ops with LoRA's Jacobian op replaced (as a backend's fused twin is)."""
    return dataclasses.replace(TORCH_OPS, name=name, jacobian={"lora": op})


def _lora_names(model) -> list[str]:
    return [n for n in trainable_names(model) if "lora_" in n]


def _reference_kernel(model, batch):
    J = reference_jacobian(model, batch, linft.outputs.logits(), _lora_names(model))
    return gram(J, J)


@pytest.mark.parametrize("broken", [_misscaled_lora, _rolled_lora])
def test_wrong_jacobian_rows_raise_naming_the_module(monkeypatch, broken):
    model = roberta_classifier()
    batch = architecture_batch("roberta_cls", 5)
    _use_ops(monkeypatch, _with_lora_op(broken))
    with pytest.raises(SelfCheckError, match=r"module .*\.(query|value) \(sample \d\)"):
        linft.ntk(model, batch, params="lora", backend="torch", batch_size=3)
    with pytest.raises(SelfCheckError, match="differs from plain autograd"):
        linft.jacobian(model, batch, params="lora", backend="torch")
    # the check is what catches it: without it the kernel comes back, and wrong (the
    # kernel of the LoRA weights alone: a trainable head's would swamp it)
    K = linft.ntk(model, batch, params="lora", backend="torch", batch_size=3, verify=False)
    expected = _reference_kernel(model, batch)
    assert float((K.double() - expected).norm() / expected.norm()) > 1e-2


def test_auto_backend_leaves_a_failing_fast_path_for_pure_torch(monkeypatch):
    model = roberta_classifier()
    batch = architecture_batch("roberta_cls", 5)
    broken = _with_lora_op(_rolled_lora, name="triton")
    _use_ops(monkeypatch, broken)
    with pytest.warns(UserWarning, match=r"self-check failed: on the triton path.*pure-torch"):
        K = linft.ntk(model, batch, params="lora", backend="auto", batch_size=2)
    assert_rel_close(K, _reference_kernel(model, batch), 1e-5, "after falling back")
    with pytest.raises(SelfCheckError, match="triton path"):
        linft.ntk(model, batch, params="lora", backend="triton", batch_size=2)


def test_wrong_gram_tile_is_caught(monkeypatch):
    model = roberta_classifier()
    batch = architecture_batch("roberta_cls", 4)
    _use_ops(monkeypatch, dataclasses.replace(TORCH_OPS, name="triton", gram_symmetric=_noisy_gram))
    with pytest.warns(UserWarning, match="the Gram tile differs"):
        K = linft.ntk(model, batch, params="lora", backend="auto")
    assert_rel_close(K, _reference_kernel(model, batch), 1e-5, "after falling back")
    with pytest.raises(SelfCheckError, match="Gram tile"):
        linft.ntk(model, batch, params="lora", backend="triton")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_correct_paths_pass_the_check(arch, precision):
    """No false alarm on the fused paths (fp32, and bf16 against float32 autograd), also
    for one-token samples whose exact query/key rows are zero."""
    model, output = architecture(arch)
    batch = architecture_batch(arch, 4)
    if arch in ("gpt2", "llama"):
        batch["attention_mask"][1:3] = 0
        batch["attention_mask"][1:3, 0] = 1  # one real token (right padding)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*self-check")
        linft.ntk(model, batch, output=output, precision=precision, batch_size=3)


def test_verified_sample_is_the_most_padded(monkeypatch):
    from linft.kernel import verify

    seen = []
    original = verify.autograd_rows

    def spy(job, sample):
        seen.append(int(sample["attention_mask"].sum()))
        return original(job, sample)

    monkeypatch.setattr(verify, "autograd_rows", spy)
    model = roberta_classifier()
    batch = architecture_batch("roberta_cls", 5)
    linft.ntk(model, batch, batch_size=5)
    assert seen == [int(batch["attention_mask"].sum(1).min())]
    seen.clear()
    linft.ntk(model, batch, batch_size=5, verify=False)
    assert seen == []


def test_autograd_rows_match_the_float64_reference():
    """The check's own reference is plain autograd: it agrees with torch.func.jacrev."""
    from linft.kernel import verify
    from linft.kernel.batches import slice_batch
    from linft.kernel.model_state import run_context

    model = roberta_classifier().double()
    batch = architecture_batch("roberta_cls", 3)
    names = trainable_names(model)
    J = reference_jacobian(model, batch, linft.outputs.logits(), names)
    with run_context(model, contextlib.nullcontext()):  # eval mode: no dropout
        job, *_ = run.prepare(
            model, batch, None, params="trainable", output=None, precision="fp32",
            backend="torch", batch_size=None, device=None,
        )  # fmt: skip
        for i in range(3):
            rows = verify.autograd_rows(job, slice_batch(batch, i, i + 1))
            assert_rel_close(rows, J[i], 1e-10, f"sample {i}")


@pytest.mark.parametrize("arch", ["roberta_cls", "llama"])
@pytest.mark.parametrize("bf16", ["model", "adapters"])
def test_bf16_weights_are_checked_against_a_reference_as_exact_as_the_run(arch, bf16):
    """bf16 weights (or bf16 LoRA weights in a float32 model) at the default precision: the
    run is float32 and right, so its self-check must not raise (a bf16 reference did)."""
    model, output = architecture(arch)
    if bf16 == "model":
        model = model.to(torch.bfloat16)
    else:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.bfloat16)
    batch = architecture_batch(arch, 5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*self-check")
        K = linft.ntk(model, batch, output=output, batch_size=3)
    J = reference_jacobian(model, batch, output, trainable_names(model))  # the same weights
    assert_rel_close(K, gram(J, J), 1e-5, f"{arch}, bf16 {bf16}")


def test_a_wrong_rule_is_still_caught_on_bf16_weights(monkeypatch):
    model = roberta_classifier().to(torch.bfloat16)
    batch = architecture_batch("roberta_cls", 5)
    _use_ops(monkeypatch, _with_lora_op(_misscaled_lora))
    with pytest.raises(SelfCheckError, match=r"module .*\.(query|value) \(sample \d\)"):
        linft.ntk(model, batch, params="lora", backend="torch")
