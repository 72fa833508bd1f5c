"""linft.ntk(..., backend="triton") end to end against the float64 reference.

On a machine without CUDA the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py), so the sizes stay small.
"""

from __future__ import annotations

import pytest
import torch
from checks import assert_rel_close, gram
from models import (
    ARCHITECTURES,
    architecture,
    architecture_batch,
    random_lengths,
    token_batch,
    trainable_names,
)
from reference import reference_jacobian

import linft
from linft.backends import resolve_ops

pytest.importorskip("triton", reason="the Triton backend needs Triton installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(arch: str, left: bool = False):
    model, output = architecture(arch)
    return model, output, architecture_batch(arch, 3, left=left or arch == "llama")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_triton_backend_matches_reference(arch):
    model, output, batch = _case(arch)
    J = reference_jacobian(model, batch, output, trainable_names(model))
    model.to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    K = linft.ntk(model, batch, output=output, backend="triton", batch_size=2)
    assert_rel_close(K.cpu(), gram(J, J), 1e-5, arch)
    flat = K.reshape(K.shape[0] * K.shape[1], -1)
    assert torch.equal(flat, flat.T)


@pytest.mark.parametrize("kernel", ["signgd", "asym_signgd"])
def test_triton_sign_kernels_cross_and_trace_match_torch_backend(kernel):
    model, output, a = _case("gpt2")
    b = token_batch(random_lengths(2), pad_id=0)
    model.to(DEVICE)
    a, b = ({k: v.to(DEVICE) for k, v in x.items()} for x in (a, b))
    for outputs in ("full", "trace"):
        got = linft.ntk(
            model, a, b, output=output, kernel=kernel, outputs=outputs, backend="triton"
        )
        want = linft.ntk(
            model, a, b, output=output, kernel=kernel, outputs=outputs, backend="torch"
        )
        assert_rel_close(got, want, 1e-5, f"{kernel}/{outputs}")


def test_triton_bf16_within_one_percent():
    model, output, batch = _case("roberta_cls")
    J = reference_jacobian(model, batch, output, trainable_names(model))
    model.to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    K = linft.ntk(model, batch, output=output, backend="triton", precision="bf16")
    assert K.dtype == torch.float32
    assert_rel_close(K.cpu(), gram(J, J), 1e-2, "bf16")


def test_auto_backend_picks_triton_only_for_cuda():
    assert resolve_ops("auto", torch.device("cpu")).name == "torch"
    assert resolve_ops("triton", torch.device(DEVICE)).name == "triton"
    if torch.cuda.is_available():
        assert resolve_ops("auto", torch.device("cuda")).name == "triton"
