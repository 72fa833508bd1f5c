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


# The sign kernels' rounding threshold (linft.kernel.signs): entries at most tau times
# their row's largest magnitude count as zero. fp32 runs use 2^-17, float64 runs 2^-46.
TAU_FP32 = 2.0**-17
TAU_FP64 = 2.0**-46


def thresholded(J: torch.Tensor, tau: float) -> torch.Tensor:
    """J [N, C, P] with every entry |J_ij| <= tau * max_j |J_ij| set to zero."""
    return J.masked_fill(J.abs() <= tau * J.abs().amax(dim=-1, keepdim=True), 0)


def gram(
    Ja: torch.Tensor, Jb: torch.Tensor, kernel: str = "sgd", tau: float = TAU_FP32
) -> torch.Tensor:
    """[N, C, M, C] kernel from float64 Jacobians [N, C, P], [M, C, P]; the sign kernels
    read the signs of the entries above the rounding threshold ``tau``."""
    if kernel in ("signgd", "asym_signgd"):
        Ja = torch.sign(thresholded(Ja, tau))
    if kernel == "signgd":
        Jb = torch.sign(thresholded(Jb, tau))
    elif kernel == "asym_signgd":
        Jb = thresholded(Jb, tau)
    return torch.einsum("icp,jdp->icjd", Ja, Jb)
