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


# Float64 signs of the exact Jacobian: float64 entries at most TAU_FP64 times their row's
# largest magnitude (float64 rounding level) are exact zeros. An independent, per-entry rule:
# linft decides per sample, output and module (linft.kernel.signs).
TAU_FP64 = 2.0**-46
# How far a float32 sign kernel may lie from the float64 signs (relative, Frobenius): the
# entries whose sign float32 rounding alone flips.
SIGN_REL = 1e-4


def thresholded(J: torch.Tensor, tau: float) -> torch.Tensor:
    """J [N, C, P] with every entry |J_ij| <= tau * max_j |J_ij| set to zero."""
    return J.masked_fill(J.abs() <= tau * J.abs().amax(dim=-1, keepdim=True), 0)


def gram(
    Ja: torch.Tensor, Jb: torch.Tensor, kernel: str = "sgd", tau: float = TAU_FP64
) -> torch.Tensor:
    """[N, C, M, C] kernel from float64 Jacobians [N, C, P], [M, C, P]; the sign kernels
    read the signs of the entries above float64 rounding level ``tau``."""
    if kernel in ("signgd", "asym_signgd"):
        Ja = torch.sign(thresholded(Ja, tau))
    if kernel == "signgd":
        Jb = torch.sign(thresholded(Jb, tau))
    elif kernel == "asym_signgd":
        Jb = thresholded(Jb, tau)
    return torch.einsum("icp,jdp->icjd", Ja, Jb)
