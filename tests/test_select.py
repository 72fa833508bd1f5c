"""Greedy layer selection against brute force, and the Weyl bounds at every step."""

import itertools
import json
import math
import warnings

import pytest
import torch
from models import VOCAB

import linft
from linft.select import Selection, select_from_kernels


def group_kernels(n, c, ranks, layout="matrix"):
    """Random PSD group kernels J_l J_l^T of the given ranks and varied scales."""
    out = {}
    for i, r in enumerate(ranks):
        J = torch.randn(n * c, r, dtype=torch.float64) * (0.5 + torch.rand(()).item() * 3)
        K = J @ J.T
        out[f"layer.{i}.attn"] = K.reshape(n, c, n, c) if layout == "full" else K
    return out


def as_matrix(K):
    return K.reshape(math.isqrt(K.numel()), -1)


def kappa(K, ridge):
    ev = torch.linalg.eigvalsh(as_matrix(K))
    return ((ev[-1] + ridge) / (ev[0] + ridge)).item()


def lam_min(K, ridge):
    return torch.linalg.eigvalsh(as_matrix(K))[0].item() + ridge


def brute_force_best(kernels, chosen, fn, maximize=False):
    """The group whose addition to ``chosen`` scores best, by direct evaluation."""
    base = sum(as_matrix(kernels[g]) for g in chosen) if chosen else 0
    values = {g: fn(base + as_matrix(K)) for g, K in kernels.items() if g not in chosen}
    return (max if maximize else min)(values, key=values.get), values


CASES = [
    (9, 1, [3, 12, 7, 9, 2], 0.5),
    (5, 3, [20, 4, 15, 11, 8, 6], 0.1),  # N*C = 15, some groups full rank alone
    (7, 2, [5, 9, 30], 2.0),
]


@pytest.mark.parametrize("n, c, ranks, ridge", CASES)
@pytest.mark.parametrize("score", ["condition", "lambda_min"])
def test_greedy_steps_match_brute_force(n, c, ranks, ridge, score):
    kernels = group_kernels(n, c, ranks)
    fn = (lambda K: kappa(K, ridge)) if score == "condition" else (lambda K: lam_min(K, ridge))
    sel = select_from_kernels(kernels, budget=len(kernels), score=score, ridge=ridge)
    assert sel.maximize == (score == "lambda_min")
    for step, group in enumerate(sel.groups):
        best, values = brute_force_best(kernels, sel.groups[:step], fn, sel.maximize)
        assert group == best, f"step {step}: chose {group}, brute force {best}"
        assert sel.scores[step] == pytest.approx(values[best], rel=1e-10)
        for g, v in sel.candidates[step].items():
            assert v == pytest.approx(values[g], rel=1e-10)
    # After all groups the score is that of the full kernel.
    total = sum(as_matrix(K) for K in kernels.values())
    assert sel.scores[-1] == pytest.approx(fn(total), rel=1e-10)
    assert sel.condition_numbers[-1] == pytest.approx(kappa(total, ridge), rel=1e-10)


@pytest.mark.parametrize("n, c, ranks, ridge", CASES)
def test_budget_one_is_brute_force_over_subsets(n, c, ranks, ridge):
    kernels = group_kernels(n, c, ranks, layout="full")
    sel = select_from_kernels(kernels, budget=1, ridge=ridge)
    singles = {s: kappa(kernels[s[0]], ridge) for s in itertools.combinations(kernels, 1)}
    assert (sel.groups[0],) == min(singles, key=singles.get)
    assert len(sel.groups) == len(sel.scores) == len(sel.bounds) == 1


@pytest.mark.parametrize("n, c, ranks, ridge", CASES + [(8, 1, [2, 3, 4, 30], 1e-3)])
def test_bounds_hold_at_every_step(n, c, ranks, ridge):
    kernels = group_kernels(n, c, ranks)
    up = select_from_kernels(kernels, budget=len(kernels), ridge=ridge)
    for s, b in zip(up.scores, up.bounds, strict=True):
        assert s <= b * (1 + 1e-10), (s, b)
    low = select_from_kernels(kernels, budget=len(kernels), score="lambda_min", ridge=ridge)
    for s, b in zip(low.scores, low.bounds, strict=True):
        assert s >= b - 1e-10 * max(1.0, abs(b)), (s, b)
    # The first step starts from K_S = 0: kappa <= (ridge + lambda_max) / (ridge + lambda_min).
    first = up.table[up.groups[0]]
    assert up.bounds[0] == pytest.approx(
        (ridge + first["lambda_max"]) / (ridge + max(first["lambda_min"], 0.0)), rel=1e-12
    )


def test_layouts_agree_and_table():
    mats = group_kernels(4, 3, [5, 2, 12])
    full = {g: K.reshape(4, 3, 4, 3) for g, K in mats.items()}
    a = select_from_kernels(mats, budget=2, ridge=0.3)
    b = select_from_kernels(full, budget=2, ridge=0.3)
    assert a.groups == b.groups and a.scores == pytest.approx(b.scores, rel=1e-12)
    for g, K in mats.items():
        ev = torch.linalg.eigvalsh(K)
        row = a.table[g]
        assert row["lambda_max"] == pytest.approx(ev[-1].item(), rel=1e-12)
        assert row["trace"] == pytest.approx(K.trace().item(), rel=1e-12)
        assert row["condition_number"] == pytest.approx(kappa(K, 0.3), rel=1e-10)
    # A rank-2 group of a 12x12 kernel is singular: infinite kappa without ridge.
    assert select_from_kernels(mats, budget=1).table["layer.1.attn"]["condition_number"] == math.inf


def test_float32_kernels_accepted():
    mats = group_kernels(6, 1, [8, 3, 10])
    a = select_from_kernels(mats, budget=2, ridge=0.1)
    b = select_from_kernels({g: K.float() for g, K in mats.items()}, budget=2, ridge=0.1)
    assert a.groups == b.groups


@pytest.mark.parametrize("n, ranks", [(40, [5, 8, 12]), (37, [3, 9, 6, 11])])
def test_float32_singular_kernels_judged_at_float32(n, ranks):
    # Group Grams accumulated in float32 whose ranks sum below n: every K_S is singular,
    # although its rounding-level eigenvalues pass float64's n * eps.
    mats = {f"g{i}": (lambda J: J @ J.T)(torch.randn(n, r)) for i, r in enumerate(ranks)}
    total = sum(K.double() for K in mats.values())
    ev = torch.linalg.eigvalsh(total)
    assert float(ev.abs().min()) > n * torch.finfo(torch.float64).eps * float(ev[-1])
    with pytest.warns(RuntimeWarning, match="ridge"):
        sel = select_from_kernels(mats, budget=len(ranks))
    assert all(math.isinf(k) for k in sel.condition_numbers)
    assert all(row["condition_number"] == math.inf for row in sel.table.values())
    assert all(row["lambda_min"] == 0.0 for row in sel.table.values())
    # With a ridge: lambda_min(K_S) is 0 at float32, kappa = (lambda_max + ridge) / ridge.
    ridge = 1e-2
    sel = select_from_kernels(mats, budget=len(ranks), ridge=ridge)
    assert sel.condition_numbers[-1] == pytest.approx((float(ev[-1]) + ridge) / ridge, rel=1e-9)


def test_custom_score_and_maximize():
    mats = group_kernels(6, 1, [1, 6, 3, 9])
    traces = {g: K.trace().item() for g, K in mats.items()}
    most = select_from_kernels(mats, budget=4, score=lambda K: K.trace().item(), maximize=True)
    assert most.groups == sorted(traces, key=traces.get, reverse=True)
    assert all(math.isnan(b) for b in most.bounds)

    def neg_rank(K):
        return -float(torch.linalg.matrix_rank(K))

    # Ranks 1, 6, 3, 6 (N = 6): the tie between groups 1 and 3 goes to the first.
    fewest = select_from_kernels(mats, budget=1, score=neg_rank)
    assert fewest.groups == ["layer.1.attn"] and fewest.score == "neg_rank"


def test_singular_without_ridge_warns():
    mats = group_kernels(10, 1, [2, 3, 4])
    with pytest.warns(RuntimeWarning, match="ridge"):
        sel = select_from_kernels(mats, budget=1)
    assert sel.scores == [math.inf]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_from_kernels(mats, budget=3, ridge=1e-2)


def test_errors():
    mats = group_kernels(5, 1, [3, 4])
    with pytest.raises(ValueError, match="budget"):
        select_from_kernels(mats, budget=0)
    with pytest.raises(ValueError, match="budget"):
        select_from_kernels(mats, budget=3)
    with pytest.raises(ValueError, match="ridge"):
        select_from_kernels(mats, budget=1, ridge=-1.0)
    with pytest.raises(ValueError, match="score"):
        select_from_kernels(mats, budget=1, score="trace")
    with pytest.raises(ValueError, match="maximize"):
        select_from_kernels(mats, budget=1, score="condition", maximize=True)
    with pytest.raises(ValueError, match="empty"):
        select_from_kernels({}, budget=1)
    with pytest.raises(ValueError, match="different shapes"):
        select_from_kernels({"a": torch.eye(3), "b": torch.eye(4)}, budget=1)
    with pytest.raises(ValueError, match="symmetric"):
        select_from_kernels({"a": torch.randn(4, 4)}, budget=1)
    with pytest.raises(ValueError, match="non-finite"):
        select_from_kernels({"a": torch.full((2, 2), math.nan)}, budget=1)


def test_selection_report():
    sel = select_from_kernels(group_kernels(5, 2, [4, 7, 10]), budget=2, ridge=0.2)
    assert isinstance(sel, linft.Selection) and linft.Selection is Selection
    d = sel.to_dict()
    assert json.loads(json.dumps(d))["groups"] == sel.groups
    text = str(sel)
    assert all(g in text for g in sel.table) and "condition" in text


def test_select_layers_passes_arguments(monkeypatch):
    mats = group_kernels(4, 2, [3, 8, 5])
    seen = {}

    def fake_layer_ntks(model, inputs, *, groups="module", **kw):
        seen.update(model=model, inputs=inputs, groups=groups, **kw)
        return mats

    monkeypatch.setattr(linft, "layer_ntks", fake_layer_ntks)
    sel = linft.select_layers("m", "x", budget=2, ridge=0.5, groups="layer", params="lora")
    assert seen == {"model": "m", "inputs": "x", "groups": "layer", "params": "lora"}
    assert sel.groups == select_from_kernels(mats, budget=2, ridge=0.5).groups


def tiny_lora_model():
    from models import roberta_classifier

    return roberta_classifier(num_labels=2).double().eval()


def independent_group_kernels(model, batch):
    """Per-module kernels J_l J_l^T from torch.func, independent of linft's capture."""
    from torch.func import functional_call, jacrev

    lora = {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}

    def logits(ps):
        return functional_call(model, ps, args=(), kwargs=batch).logits

    jac = jacrev(logits)(lora)
    groups = {}
    for name, j in jac.items():
        module = name.split(".lora_")[0]
        groups.setdefault(module, []).append(j.reshape(j.shape[0] * j.shape[1], -1))
    return {g: torch.cat(js, 1) @ torch.cat(js, 1).T for g, js in groups.items()}


def test_select_layers_end_to_end_matches_brute_force():
    model = tiny_lora_model()
    ids = torch.randint(5, VOCAB, (6, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding
    mask[4, 5:] = 0
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))
    batch = {"input_ids": ids, "attention_mask": mask}
    ridge = 1e-4
    sel = linft.select_layers(model, batch, budget=1, ridge=ridge, params="lora")
    ref = independent_group_kernels(model, batch)
    assert sorted(sel.table) == sorted(ref)
    singles = {g: kappa(K, ridge) for g, K in ref.items()}
    assert sel.groups == [min(singles, key=singles.get)]
    for g, K in ref.items():
        assert sel.table[g]["condition_number"] == pytest.approx(singles[g], rel=1e-6)
        assert sel.table[g]["trace"] == pytest.approx(K.trace().item(), rel=1e-8)
    # Greedy over all groups: each step is the brute-force best given the previous ones.
    full = linft.select_layers(model, batch, budget=len(ref), ridge=ridge, params="lora")
    for step, group in enumerate(full.groups):
        best, _ = brute_force_best(ref, full.groups[:step], lambda K: kappa(K, ridge))
        assert group == best
