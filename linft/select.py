"""Greedy choice of which parameter groups (layers) to fine-tune, from their kernels.

The kernel decomposes over parameter groups, ``K_S = sum_{l in S} K_l`` with each
``K_l`` PSD, so choosing layers chooses which ``K_l`` enter. Weyl's inequalities
bound what adding a group can do to the spectrum (Afzal et al., NeurIPS 2025):

    lambda_max(K_S + K_l) <= lambda_max(K_S) + lambda_max(K_l)
    lambda_min(K_S + K_l) >= lambda_min(K_S) + lambda_min(K_l)

hence ``kappa(K_S + K_l + rI) <= (lambda_max(K_S) + r + lambda_max(K_l)) /
(lambda_min(K_S) + r + lambda_min(K_l))`` for ridge ``r``. Afzal et al. use bounds of
this kind to choose layers; their exact rule is not public, so linft implements
greedy selection under a budget by a documented score and reports the bounds
next to the exact values. The score's premise, that a better-conditioned K_S trains to a
lower loss, did not hold across pairs of layers of the pretrained MiniLM on SST-2
(``benchmarks/exp_real.py``, section (c) of ``RESULTS_real.md``): read the ranking as a
description of the kernels, not as a forecast of fine-tuning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .spectrum import precision_floor

__all__ = ["Selection", "select_from_kernels", "select_layers"]

Score = str | Callable[[Tensor], float]
_SCORES = ("condition", "lambda_min")


@dataclass
class Selection:
    """The outcome of greedy layer selection.

    Attributes:
        groups: chosen group names, in the order they were added.
        scores: the exact score of the chosen set after each step.
        bounds: the Weyl bound on that score from the previous set and the added
            group alone (an upper bound for ``"condition"``, a lower bound for
            ``"lambda_min"``; NaN for a caller's score).
        table: per group: ``lambda_max``, ``lambda_min``, ``condition_number``
            (``(lambda_max + ridge)/(lambda_min + ridge)``) and ``trace`` of ``K_l``.
        score: the score's name; ``maximize`` whether larger was better.
        ridge: the ridge added to every kernel before scoring.
        candidates: per step, the exact score of every group that could be added.
        condition_numbers: the condition number of ``K_S + ridge I`` after each step.
    """

    groups: list[str]
    scores: list[float]
    bounds: list[float]
    table: dict[str, dict[str, float]]
    score: str = "condition"
    maximize: bool = False
    ridge: float = 0.0
    candidates: list[dict[str, float]] = field(default_factory=list)
    condition_numbers: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (JSON-ready; infinities stay ``float('inf')``)."""
        return {
            "groups": list(self.groups),
            "scores": list(self.scores),
            "bounds": list(self.bounds),
            "condition_numbers": list(self.condition_numbers),
            "table": {k: dict(v) for k, v in self.table.items()},
            "score": self.score,
            "maximize": self.maximize,
            "ridge": self.ridge,
            "candidates": [dict(c) for c in self.candidates],
        }

    def __str__(self) -> str:
        better = "larger" if self.maximize else "smaller"
        w = max([len("group"), *map(len, self.table)])
        lines = [f"Selection by {self.score} ({better} is better), ridge = {self.ridge:.3g}"]
        lines.append(f"{'step':>4}  {'group':<{w}} {'score':>11} {'bound':>11} {'kappa':>11}")
        steps = zip(self.groups, self.scores, self.bounds, self.condition_numbers, strict=True)
        for i, (g, s, b, k) in enumerate(steps, 1):
            lines.append(f"{i:>4}  {g:<{w}} {s:>11.4g} {b:>11.4g} {k:>11.4g}")
        lines += [
            "",
            f"{'group':<{w}} {'lambda_max':>11} {'lambda_min':>11} {'kappa':>11} {'trace':>11}",
        ]
        for g, row in self.table.items():
            lines.append(
                f"{g:<{w}} {row['lambda_max']:>11.4g} {row['lambda_min']:>11.4g} "
                f"{row['condition_number']:>11.4g} {row['trace']:>11.4g}"
            )
        return "\n".join(lines)


def _matrix(K: Tensor, name: str) -> tuple[Tensor, float]:
    """A group kernel as a float64 symmetric ``[N*C, N*C]`` matrix, and the error it carries
    at the precision it came in (:func:`linft.spectrum.precision_floor`)."""
    K = torch.as_tensor(K).detach()
    precision = K.dtype
    if K.dim() == 4 and K.shape[:2] == K.shape[2:]:
        K = K.reshape(K.shape[0] * K.shape[1], -1)
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(
            f"kernel of group {name!r} must be [N, C, N, C] or square, got {list(K.shape)}"
        )
    K = K.to(torch.float64)
    if not torch.isfinite(K).all():
        raise ValueError(f"kernel of group {name!r} has non-finite entries")
    scale = float(K.abs().max())
    if float((K - K.T).abs().max()) > 1e-6 * scale:
        raise ValueError(
            f"kernel of group {name!r} is not symmetric; selection needs PSD kernels "
            "(kernel='sgd' or 'signgd', not 'asym_signgd')"
        )
    K = 0.5 * (K + K.T)
    return K, precision_floor(K, precision)[0]


def _condition(lo: float, hi: float) -> float:
    """``hi/lo``, infinite when ``lo <= 0`` (a singular or indefinite system)."""
    return hi / lo if lo > 0 else math.inf


def _ends(K: Tensor, ridge: float, floor: float) -> tuple[float, float]:
    """``(lambda_min, lambda_max)`` of ``K + ridge I``.

    ``lambda_min(K)`` within ``floor`` of 0 is taken as 0, so that a K_S singular at
    its precision scores ``kappa = inf`` without ridge rather than a huge number made
    of rounding. ``floor`` is the error K_S carries: the sum over its groups of
    ``(8 u + n eps64) || |K_l| ||_2``, ``u`` the unit roundoff of the dtype K_l came in
    (Weyl; see :mod:`linft.spectrum`), which judges a float32 kernel at float32.
    """
    ev = torch.linalg.eigvalsh(K)
    lo, hi = float(ev[0]), float(ev[-1])
    if abs(lo) <= floor:
        lo = 0.0
    return lo + ridge, hi + ridge


def _group_table(
    mats: Mapping[str, Tensor], floors: Mapping[str, float], ridge: float
) -> dict[str, dict[str, float]]:
    table = {}
    for name, K in mats.items():
        lo, hi = _ends(K, 0.0, floors[name])
        table[name] = {
            "lambda_max": hi,
            "lambda_min": lo,
            "condition_number": _condition(lo + ridge, hi + ridge),
            "trace": float(K.diagonal().sum()),
        }
        if lo < -1e-6 * max(abs(hi), 1e-300):
            warnings.warn(
                f"kernel of group {name!r} has lambda_min = {lo:.3g} < 0: it is not PSD and "
                "the Weyl bounds need not hold",
                RuntimeWarning,
                stacklevel=3,
            )
    return table


def _scorer(score: Score, ridge: float, maximize: bool | None) -> tuple[Callable, str, bool]:
    """``((K_S, floor of K_S) -> value, name, maximize)``."""
    if callable(score):
        return (lambda K, floor: score(K)), getattr(score, "__name__", "custom"), bool(maximize)
    if score not in _SCORES:
        raise ValueError(
            f"score must be one of {_SCORES} or a callable (K_S) -> float, got {score!r}"
        )
    if maximize is not None and maximize != (score == "lambda_min"):
        raise ValueError(f"score {score!r} has a fixed direction; leave maximize unset")
    if score == "condition":
        return (lambda K, floor: _condition(*_ends(K, ridge, floor))), score, False
    return (lambda K, floor: _ends(K, ridge, floor)[0]), score, True


def _bound(
    score: str, ends: tuple[float, float] | None, row: dict[str, float], ridge: float
) -> float:
    """The Weyl bound on the score of ``K_S + K_l`` from ``K_S``'s ends and ``K_l``'s row."""
    lo_s, hi_s = ends if ends is not None else (ridge, ridge)  # K_S = 0 before the first step
    # A PSD group kernel's lambda_min is >= 0; rounding may make it slightly negative.
    lo_l = max(row["lambda_min"], 0.0)
    if score == "condition":
        return _condition(lo_s + lo_l, hi_s + row["lambda_max"])
    if score == "lambda_min":
        return lo_s + lo_l
    return math.nan


def select_from_kernels(
    kernels: Mapping[str, Tensor],
    *,
    budget: int,
    score: Score = "condition",
    ridge: float = 0.0,
    maximize: bool | None = None,
) -> Selection:
    """Greedy selection of ``budget`` groups from precomputed group kernels.

    At each step, add the group ``l`` whose ``K_S + K_l`` has the best score:

    - ``"condition"`` (default): ``kappa(K_S + ridge I) = (lambda_max + ridge) /
      (lambda_min + ridge)``, smaller is better (the rate of the linearized
      dynamics, Afzal et al., NeurIPS 2025). With ``ridge = 0`` any rank-deficient
      ``K_S`` has ``kappa = inf``; pass a ridge (``N * lambda`` matches the
      regularized dynamics of :func:`linft.linearized_loss`).
    - ``"lambda_min"``: ``lambda_min(K_S) + ridge``, larger is better.
    - a callable ``(K_S) -> float`` on the float64 ``[N*C, N*C]`` matrix without the
      ridge; smaller is better unless ``maximize=True``.

    Ties go to the group that comes first in ``kernels``. Each group kernel is
    converted once; each step costs one ``eigvalsh`` per remaining group.

    Args:
        kernels: group name -> kernel ``[N, C, N, C]`` or ``[N*C, N*C]`` (as from
            :func:`linft.layer_ntks`); all the same shape, symmetric PSD.
        budget: the number of groups to choose, ``1 <= budget <= len(kernels)``.
    """
    ridge = float(ridge)
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    if not kernels:
        raise ValueError("kernels is empty: there is no group to select")
    if isinstance(budget, bool) or int(budget) != budget or not 1 <= budget <= len(kernels):
        raise ValueError(f"budget must be an integer in [1, {len(kernels)}], got {budget!r}")
    converted = {name: _matrix(K, name) for name, K in kernels.items()}
    mats = {name: M for name, (M, _) in converted.items()}
    floors = {name: floor for name, (_, floor) in converted.items()}
    shapes = {tuple(K.shape) for K in mats.values()}
    if len(shapes) > 1:
        raise ValueError(f"group kernels have different shapes: {sorted(shapes)}")
    fn, name, maximize = _scorer(score, ridge, maximize)
    sel = Selection([], [], [], _group_table(mats, floors, ridge), name, maximize, ridge)
    _greedy(sel, mats, floors, fn, int(budget))
    return sel


def _greedy(
    sel: Selection,
    mats: dict[str, Tensor],
    floors: dict[str, float],
    fn: Callable,
    budget: int,
) -> None:
    total, ends, floor = None, None, 0.0
    remaining = list(mats)
    for _ in range(budget):
        cand = {
            g: float(fn(mats[g] if total is None else total + mats[g], floor + floors[g]))
            for g in remaining
        }
        sign = -1.0 if sel.maximize else 1.0
        best = min(remaining, key=lambda g: (sign * cand[g], remaining.index(g)))
        if all(math.isinf(v) for v in cand.values()) and sel.score == "condition":
            warnings.warn(
                "every candidate has an infinite condition number (singular K_S); pass "
                "ridge > 0 for a meaningful ranking",
                RuntimeWarning,
                stacklevel=4,
            )
        sel.bounds.append(_bound(sel.score, ends, sel.table[best], sel.ridge))
        total = mats[best] if total is None else total + mats[best]
        floor += floors[best]  # the groups' errors add up in K_S
        ends = _ends(total, sel.ridge, floor)
        remaining.remove(best)
        sel.groups.append(best)
        sel.scores.append(cand[best])
        sel.candidates.append(cand)
        sel.condition_numbers.append(_condition(*ends))


def select_layers(
    model: torch.nn.Module,
    inputs: Any,
    *,
    budget: int,
    score: Score = "condition",
    ridge: float = 0.0,
    groups: str | Callable[[str], str] = "module",
    maximize: bool | None = None,
    **ntk_kwargs: Any,
) -> Selection:
    """Greedy layer selection from the model's per-group eNTKs.

    Computes every group's kernel once with
    ``linft.layer_ntks(model, inputs, groups=groups, **ntk_kwargs)`` and hands them
    to :func:`select_from_kernels` (see there for ``score``, ``ridge``, ``maximize``
    and the bounds).
    """
    import linft  # the kernel stack loads only when a model is analyzed

    if ntk_kwargs.get("out", "full") != "full":
        raise ValueError('select_layers needs every group kernel whole: leave out= at "full"')
    kernels = linft.layer_ntks(model, inputs, groups=groups, **ntk_kwargs)
    chosen = None
    if kernels is not None:  # None: a rank other than 0 of a distributed run
        chosen = select_from_kernels(
            kernels, budget=budget, score=score, ridge=ridge, maximize=maximize
        )
    return _from_rank_zero(chosen, ntk_kwargs.get("group"))


def _from_rank_zero(chosen: Selection | None, group) -> Selection:
    """Under torch.distributed every rank gets rank 0's selection (the kernels are there)."""
    from .kernel import distributed

    group = distributed.resolve_group(group)
    if group is None:
        return chosen
    import torch.distributed as dist

    box = [chosen]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]
