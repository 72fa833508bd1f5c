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


# A float32 Jacobian entry within this relative band of the threshold may fall on either side
# of it from rounding alone (a LoRA entry at 1.0006 tau in float64 was 0.9995 tau in float32).
SIGN_BAND = 0.05


def sign_slack(
    Ja: torch.Tensor, Jb: torch.Tensor, kernel: str, tau: float = TAU_FP32
) -> torch.Tensor:
    """[N, C, M, C]: how far a float32 sign kernel may lie from ``gram(Ja, Jb, kernel, tau)``
    of float64 Jacobians through entries within ``SIGN_BAND`` of the threshold alone. Each
    such entry moves a term of the sum by at most 1 (a sign against a zero), or by its own
    magnitude for the raw side of ``asym_signgd``; zero where no entry is that close."""

    def near(J):
        rel = J.abs() / J.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
        return ((rel > tau / (1 + SIGN_BAND)) & (rel <= tau * (1 + SIGN_BAND))).double()

    na, nb = near(Ja), near(Jb)
    # Each term of the sum changes only where either side's entry is near the threshold, by
    # at most the size of the b side's entry: 1 for a sign, |J_b| for asym_signgd's raw side.
    w = torch.ones_like(Jb) if kernel == "signgd" else Jb.abs()
    either = torch.einsum("icp,jdp->icjd", na, w) + (nb * w).sum(-1)[None, None]
    return either - torch.einsum("icp,jdp->icjd", na, nb * w)


def within_slack(K: torch.Tensor, expected: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """``expected`` moved towards K by at most ``slack`` per entry (unchanged where 0)."""
    return expected + (K.double() - expected).clamp(-slack, slack)
