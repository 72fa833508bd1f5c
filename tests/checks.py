"""Assertion helpers that report the worst element."""

from __future__ import annotations

import torch


def assert_rel_close(
    actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = ""
) -> None:
    """Frobenius relative error at most ``rel``; on failure name the worst element."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), (
        f"{what}: NaN/inf in result at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    )
    err = float((a - e).norm() / e.norm().clamp_min(1e-300))
    if not err <= rel:
        diff = (a - e).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {rel:.1e}; worst at {idx}: "
            f"{float(a[idx]):.6e} vs {float(e[idx]):.6e}"
        )


def gram(Ja: torch.Tensor, Jb: torch.Tensor, kernel: str = "sgd") -> torch.Tensor:
    """[N, C, M, C] kernel from float64 Jacobians [N, C, P], [M, C, P]."""
    if kernel in ("signgd", "asym_signgd"):
        Ja = torch.sign(Ja)
    if kernel == "signgd":
        Jb = torch.sign(Jb)
    return torch.einsum("icp,jdp->icjd", Ja, Jb)
