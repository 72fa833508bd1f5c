"""Sign kernels: rounding noise where the exact Jacobian entry is zero counts as zero, so the
kernel does not change with the batch size or the padding, and matches the signs of the
float64 reference."""

from __future__ import annotations

import pytest
import torch
from checks import TAU_FP32, assert_rel_close, gram, sign_slack, thresholded, within_slack
from models import gpt2, llama, token_batch, trainable_names
from reference import reference_jacobian

import linft
from linft.kernel.signs import sign_threshold, zero_below_threshold

CAUSAL = {"gpt2": gpt2, "llama": llama}


def _one_token_batch():
    """One-token samples (softmax over one key: exact query/key rows are zero) among
    longer ones, right-padded."""
    lengths = [1, 6, 1, 4, 1, 7]
    return token_batch(lengths, pad_id=0)


@pytest.mark.parametrize("arch", sorted(CAUSAL))
@pytest.mark.parametrize("kernel", ["signgd", "asym_signgd"])
def test_sign_kernels_match_float64_signs_for_every_batch_size(arch, kernel):
    model, output = CAUSAL[arch]()
    batch = _one_token_batch()
    J64 = reference_jacobian(model, batch, output, trainable_names(model))
    expected = gram(J64, J64, kernel, TAU_FP32)
    kernels = [linft.ntk(model, batch, output=output, kernel=kernel, batch_size=b) for b in (1, 6)]
    if kernel == "signgd":  # counts of sign agreements: exactly equal
        assert torch.equal(kernels[0], kernels[1]), "the batch size changed the kernel"
    else:  # sums of float32 entries: equal up to their rounding
        assert_rel_close(kernels[0], kernels[1], 1e-6, "batch size 1 vs 6")
    slack = sign_slack(J64, J64, kernel)  # entries that rounding may put on either side
    for K in kernels:
        near = within_slack(K, expected, slack)
        assert_rel_close(K, near, 1e-6, f"{kernel} against the float64 signs")
    # without the threshold the noise's signs would count: the test can tell
    J32 = linft.jacobian(model, batch, output=output).double()
    raw = gram(J32, J32, kernel, tau=0.0)
    if bool((J64.abs() <= 1e-12 * J64.abs().amax(-1, keepdim=True)).any()):
        assert not torch.equal(raw, expected)


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


def test_threshold_is_relative_to_the_row():
    tau = sign_threshold("fp32", torch.float32)
    J = torch.tensor([[[1.0, 0.5 * tau, -2 * tau, 0.0]], [[1e-3, 0.5e-3 * tau, 1e-9, -3e-3]]])
    got = zero_below_threshold(J, tau)
    # row 1 scale 1: 0.5 tau -> 0, 2 tau kept; row 2 scale 3e-3: 1e-9 (< tau * 3e-3) -> 0
    assert torch.equal(got, thresholded(J.double(), tau).float())
    assert got[0, 0, 1] == 0 and got[0, 0, 2] != 0 and got[1, 0, 2] == 0 and got[1, 0, 0] != 0
    assert sign_threshold("fp32", torch.float64) < 1e-13  # a float64 model: float64 rounding
