"""Sign kernels: a module's rows that are rounding noise (exact zeros computed in float32)
count as zero, every sign float32 determines counts as float32 gives it, so the kernel
matches the float64 signs of the exact Jacobian and does not change with the batch size."""

from __future__ import annotations

import warnings

import pytest
import torch
from checks import SIGN_REL, assert_rel_close, gram
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import (
    VOCAB,
    gpt2,
    llama,
    roberta_base_classifier,
    roberta_classifier,
    token_batch,
    trainable_names,
)
from reference import reference_jacobian, relative_error

import linft
from linft.kernel import run, signs

CAUSAL = {"gpt2": gpt2, "llama": llama}
SIGN_KERNELS = ["signgd", "asym_signgd"]


def _one_token_batch():
    """One-token samples (softmax over one key: exact query/key rows are zero) among
    longer ones, right-padded."""
    lengths = [1, 6, 1, 4, 1, 7]
    return token_batch(lengths, pad_id=0)


def _roberta_head_and_query():
    """LoRA q,v and a trainable head: the query-LoRA rows are ~1e-5 of the head's."""
    return roberta_classifier(), linft.outputs.logits()


def _fp32_signs_of(J32: torch.Tensor, J64: torch.Tensor, kernel: str) -> float:
    """How far the plain signs of a float32 Jacobian lie from the float64 signs."""
    return relative_error(gram(J32.double(), J32.double(), kernel, 0.0), gram(J64, J64, kernel))


@pytest.mark.parametrize("arch", sorted(CAUSAL))
@pytest.mark.parametrize("kernel", SIGN_KERNELS)
def test_sign_kernels_match_float64_signs_for_every_batch_size(arch, kernel):
    model, output = CAUSAL[arch]()
    batch = _one_token_batch()
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    expected = gram(J64, J64, kernel)
    kernels = [linft.ntk(model, batch, output=output, kernel=kernel, batch_size=b) for b in (1, 6)]
    if kernel == "signgd":  # counts of sign agreements: exactly equal
        assert torch.equal(kernels[0], kernels[1]), "the batch size changed the kernel"
    else:  # sums of float32 entries: equal up to their rounding
        assert_rel_close(kernels[0], kernels[1], 1e-6, "batch size 1 vs 6")
    for K in kernels:
        assert_rel_close(K, expected, SIGN_REL, f"{kernel} against the float64 signs")


def test_the_one_token_batch_holds_noise_rows_the_test_can_see():
    """Without the decision the noise's signs would count: the tests above can tell."""
    model, output = llama()
    batch = _one_token_batch()
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    J32 = linft.jacobian(model, batch, output=output)
    assert _fp32_signs_of(J32, J64, "signgd") > 100 * SIGN_REL


@pytest.mark.parametrize("kernel", SIGN_KERNELS)
def test_small_modules_next_to_a_head_keep_their_signs(kernel):
    """A row-wide threshold zeroed most query-LoRA entries here (they are ~1e-5 of the
    head's): 14% off the float64 signs. Every one of them is determined by float32."""
    model, output = _roberta_head_and_query()
    batch = token_batch([9, 7, 8, 5, 9, 6], pad_id=1)
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    K = linft.ntk(model, batch, output=output, kernel=kernel, batch_size=4)
    assert_rel_close(K, gram(J64, J64, kernel), SIGN_REL, kernel)
    # the old rule's error, for scale: entries below 2^-17 of the row's largest are zeroed
    old = gram(J64, J64, kernel, 2.0**-17)
    assert relative_error(old, gram(J64, J64, kernel)) > 10 * SIGN_REL


@pytest.mark.parametrize("kernel", SIGN_KERNELS)
def test_one_token_samples_next_to_a_head(kernel):
    """Both at once: noise rows (one-token samples) and small real rows (query LoRA next
    to the head), and the same kernel for every batch size."""
    model, output = _roberta_head_and_query()
    batch = token_batch([1, 8, 1, 5, 3, 1], pad_id=1)
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    expected = gram(J64, J64, kernel)
    ks = [linft.ntk(model, batch, output=output, kernel=kernel, batch_size=b) for b in (1, 4)]
    for K in ks:
        assert_rel_close(K, expected, SIGN_REL, kernel)
    if kernel == "signgd":
        assert torch.equal(ks[0], ks[1])


@pytest.mark.parametrize("kernel", SIGN_KERNELS)
def test_fused_attention_weights_and_biases(kernel):
    """GPT-2's c_attn trained in full: the query/key thirds of a one-token sample and the
    key bias of every sample (softmax ignores a shift of all scores) are exact zeros
    inside parts that are otherwise real; they are found as runs of output features."""
    model, output = _fuzz_model("gpt2_fused_full", 0.02)
    model.eval()
    batch = token_batch([2, 1, 5, 3], pad_id=0)
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    expected = gram(J64, J64, kernel)
    ks = [linft.ntk(model, batch, output=output, kernel=kernel, batch_size=b) for b in (1, 3)]
    for K in ks:
        assert_rel_close(K, expected, SIGN_REL, kernel)
    J32 = linft.jacobian(model, batch, output=output)
    assert _fp32_signs_of(J32, J64, kernel) > SIGN_REL  # the noise is there to decide


def test_padding_does_not_change_a_sign_kernel():
    model, output = llama()
    batch = _one_token_batch()
    together = linft.ntk(model, batch, output=output, kernel="signgd")
    for i in (0, 2):
        alone = {k: v[i : i + 1, :1] for k, v in batch.items()}
        K = linft.ntk(model, alone, output=output, kernel="signgd")
        assert torch.equal(K[0, :, 0, :], together[i, :, i, :])


def test_bf16_sign_kernel_is_the_same_for_every_batch_size():
    model, output = gpt2()
    batch = _one_token_batch()
    ks = [
        linft.ntk(model, batch, output=output, kernel="signgd", precision="bf16", batch_size=b)
        for b in (1, 4)
    ]
    assert torch.equal(ks[0], ks[1])


def _job_and_blocks(model, batch, output, precision="fp32"):
    job, batches, _, _, _ = run.prepare(
        model, batch, None, params="trainable", output=output, precision=precision,
        backend="torch", batch_size=None, device=None,
    )  # fmt: skip
    from linft.kernel.batches import blocks

    return job, blocks(batches, job.block_size)


def test_decisions_keep_what_float32_determines_and_zero_exact_zeros():
    """One-token samples are recomputed in float64 (their query rows are noise); their
    exact zeros come back 0, and every part not in doubt is float32's own value."""
    model, output = llama()
    batch = _one_token_batch()
    job, listed = _job_and_blocks(model, batch, output)
    J = run.jacobian(
        model, batch, output=output, params="trainable", precision="fp32", batch_size=None,
        backend="torch", device=None,
    )  # fmt: skip
    rows = signs.SignRows(job, listed)
    doubt = rows._doubtful(J)
    decided = rows.decided(0, J)
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    exact_zero = J64.abs() <= 2.0**-46 * J64.abs().amax(-1, keepdim=True)
    one_token = [0, 2, 4]
    assert bool(doubt[one_token].flatten(1).any(1).all())
    assert rows.recomputed == int(doubt.flatten(1).any(1).sum())  # only samples in doubt
    assert bool((decided[exact_zero] == 0).all())
    assert torch.equal(decided[~doubt], J[~doubt])
    # the parts in doubt hold float64's values: the float64 signs
    taken = doubt & ~exact_zero
    assert torch.equal(torch.sign(decided[taken]).double(), torch.sign(J64[taken]))


def test_a_float64_run_decides_without_recomputing():
    model, output = llama()
    model = model.double()
    batch = _one_token_batch()
    job, listed = _job_and_blocks(model, batch, output)
    J = linft.jacobian(model, batch, output=output)
    rows = signs.SignRows(job, listed)
    decided = rows.decided(0, J)
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    assert rows.recomputed == 0
    assert torch.equal(torch.sign(decided), torch.sign(
        J64.masked_fill(J64.abs() <= 2.0**-46 * J64.abs().amax(-1, keepdim=True), 0)
    ))  # fmt: skip


def test_the_cli_sign_kernel_reads_the_same_signs_as_ntk():
    from linft.cli.analysis import Task, _kernels_from_jacobian

    model, output = _roberta_head_and_query()
    batch = token_batch([1, 8, 1, 5], pad_id=1)
    task = Task(model, batch)
    _, K_sign = _kernels_from_jacobian(task, True, output=output, params="trainable")
    K = linft.ntk(model, batch, output=output, kernel="signgd")
    assert torch.equal(K_sign, K.float())


# --- a fuzz against float64 signs: random models (random, head and LoRA scales), lengths
# with one-token samples, kernels and block sizes


@st.composite
def sign_cases(draw):
    lengths = draw(st.lists(st.integers(1, 8), min_size=1, max_size=5))
    return dict(
        arch=draw(
            st.sampled_from(
                ["llama", "gpt2", "gpt2_fused_full", "roberta_cls", "roberta_cls_frozen_head"]
            )
        ),  # fmt: skip
        lengths=lengths,
        kernel=draw(st.sampled_from(SIGN_KERNELS)),
        batch_size=draw(st.integers(1, 5)),
        init=draw(st.sampled_from([0.02, 0.1, 0.5])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _fuzz_model(arch: str, init: float):
    if arch in CAUSAL:
        return CAUSAL[arch]()
    if arch == "gpt2_fused_full":  # fused q|k|v weights and biases trained, no adapter
        from models import gpt2_base

        base = gpt2_base()
        for name, p in base.named_parameters():
            p.requires_grad_(".c_attn." in name)
        return base, linft.outputs.last_token([11, 23, 42])
    base = roberta_base_classifier()
    base.config.initializer_range = init
    base.apply(base._init_weights)
    if arch == "roberta_cls":
        return roberta_classifier(base=base), linft.outputs.logits()
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key", "value"],
                     init_lora_weights=False)  # fmt: skip
    return get_peft_model(base, cfg), linft.outputs.logits()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sign_cases())
def test_fuzz_sign_kernels_against_float64_signs(case):
    torch.manual_seed(case["seed"])
    model, output = _fuzz_model(case["arch"], case["init"])
    pad = 1 if case["arch"].startswith("roberta") else 0
    batch = token_batch(case["lengths"], pad_id=pad)
    batch["input_ids"].clamp_(max=VOCAB - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K = linft.ntk(model, batch, output=output, kernel=case["kernel"],
                      batch_size=case["batch_size"])  # fmt: skip
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    assert_rel_close(K, gram(J64, J64, case["kernel"]), SIGN_REL, str(case))


def test_blocks_after_one_mostly_in_doubt_are_computed_in_float64(monkeypatch):
    """SignGD: the first block (float32, then its doubtful samples in float64) switches the
    run to float64 blocks; the kernel is the same as with blocks of one (never switched) and
    the float64 signs'."""
    kernel = "signgd"
    model, output = _roberta_head_and_query()
    batch = token_batch([5, 7, 3, 6, 2, 7, 4, 5], pad_id=1)
    direct = []
    real = signs._Float64WhenInDoubt.block

    def block(self, b, start):
        direct.append(self._rows.direct)
        return real(self, b, start)

    monkeypatch.setattr(signs._Float64WhenInDoubt, "block", block)
    K = linft.ntk(model, batch, output=output, kernel=kernel, batch_size=3)
    assert direct[0] is False and any(direct[1:]), direct
    one = linft.ntk(model, batch, output=output, kernel=kernel, batch_size=1)
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    assert_rel_close(K, gram(J64, J64, kernel), SIGN_REL, f"{kernel}: switched to float64")
    assert torch.equal(K, one), "blocks of 3 (switched) vs 1"
