"""Property-based: random architectures, shapes, paddings, kernels, output modes and block
sizes, each kernel against the float64 per-sample reference."""

from __future__ import annotations

import warnings

import torch
from checks import SIGN_REL, assert_rel_close, gram
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import MASK_ID, VOCAB, architecture, trainable_names
from reference import reference_jacobian

import linft

# Where the model itself is invariant to left padding: RoBERTa counts positions over real
# tokens and Llama's rotary positions are relative, but RoBERTa's classifier reads token
# 0 (a pad when left-padded) and GPT-2's learned positions shift.
LEFT_PADDING_OK = {"roberta_cls": False, "roberta_mlm": True, "gpt2": False, "llama": True}
PAD_ID = {"roberta_cls": 1, "roberta_mlm": 1, "gpt2": 0, "llama": 0}


@st.composite
def batches(draw, arch: str, left: bool, max_samples: int):
    lengths = draw(st.lists(st.integers(1, 8), min_size=1, max_size=max_samples))
    n, t = len(lengths), max(lengths)
    ids = torch.full((n, t), PAD_ID[arch], dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        row = torch.tensor(
            draw(st.lists(st.integers(5, VOCAB - 1), min_size=length, max_size=length))
        )
        if arch == "roberta_mlm":
            row[draw(st.integers(0, length - 1))] = MASK_ID
        cols = slice(t - length, t) if left else slice(0, length)
        ids[i, cols], mask[i, cols] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


@st.composite
def cases(draw):
    arch = draw(st.sampled_from(sorted(LEFT_PADDING_OK)))
    left = LEFT_PADDING_OK[arch] and draw(st.booleans())
    a = draw(batches(arch, left, 4))
    b = draw(st.none() | batches(arch, left, 3))
    return dict(
        arch=arch,
        a=a,
        b=b,
        kernel=draw(st.sampled_from(["sgd", "signgd", "asym_signgd"])),
        outputs=draw(st.sampled_from(["full", "trace"])),
        batch_size=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_kernel_matches_reference(case):
    torch.manual_seed(case["seed"])
    model, output = architecture(case["arch"])
    a, b, kernel = case["a"], case["b"], case["kernel"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K = linft.ntk(
            model, a, b, output=output, kernel=kernel, outputs=case["outputs"],
            batch_size=case["batch_size"],
        )  # fmt: skip
    names = trainable_names(model)
    Ja = reference_jacobian(model, a, output, names)
    Jb = Ja if b is None else reference_jacobian(model, b, output, names)
    expected = gram(Ja, Jb, kernel)  # float64 signs of the exact Jacobian
    # The rounding of a float32 dot product scales with sum |J_i| |J_j|, not with the entry:
    # a cross-kernel entry that nearly cancels is judged on that scale.
    scale = gram(Ja.abs(), Jb.abs())
    C = expected.shape[1]
    if case["outputs"] == "trace":
        expected = torch.einsum("icjc->ij", expected)
        scale = torch.einsum("icjc->ij", scale)
    elif C == 1:
        expected = expected.reshape(Ja.shape[0], Jb.shape[0])
        scale = scale.reshape(Ja.shape[0], Jb.shape[0])
    what = str({k: v for k, v in case.items() if k not in "ab"})
    if kernel == "sgd":
        err = float((K.double() - expected).norm() / scale.norm().clamp_min(1e-300))
        assert err <= 1e-5, f"{what}: error {err:.3e} relative to sum |J_i| |J_j|"
        # and most entries do not cancel: against the entries themselves, as a whole
        assert_rel_close(K, expected, 1e-3, what)
    else:
        assert_rel_close(K, expected, SIGN_REL, what)
    if b is None and kernel != "asym_signgd":
        flat = K.reshape(K.shape[0] * (C if K.dim() == 4 else 1), -1)
        assert torch.equal(flat, flat.T)
