"""``linft.ntk_operator``: the kernel as an operator agrees with the formed kernel and with
the float64 reference, wherever J lives, and its spectrum with ``eigh``."""

from __future__ import annotations

import pytest
import torch
from checks import assert_rel_close, gram
from interrupts import Interrupt, stop_after_blocks
from models import random_lengths, roberta_classifier, token_batch
from reference import reference_jacobian

import linft
from linft.kernel.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = roberta_classifier(num_labels=3)
    batch = token_batch(random_lengths(11), pad_id=1)
    K = linft.ntk(model, batch, batch_size=3, progress=False).reshape(33, 33)
    return model, batch, K


STORES = {
    "memory": lambda tmp: dict(),
    "files": lambda tmp: dict(memory=0, checkpoint=tmp),
    "memory and files": lambda tmp: dict(memory=2 * 9 * 1251 * 4, checkpoint=tmp),
    "recompute": lambda tmp: dict(store="recompute"),
    "fp64 products": lambda tmp: dict(accumulate="fp64"),
}


@pytest.mark.parametrize("where", list(STORES))
def test_operator_is_the_kernel(case, tmp_path, where):
    model, batch, K = case
    op = linft.ntk_operator(model, batch, batch_size=3, progress=False, **STORES[where](tmp_path))
    assert op.shape == (33, 33) and op.num_outputs == 3
    X = torch.randn(33, 5, dtype=torch.float64)
    assert_rel_close(op.matmul(X), K.double() @ X, 2e-6, f"K X, J in {where}")
    assert_rel_close(op.matmul(X[:, 0]), K.double() @ X[:, 0], 2e-6, "K x")
    assert_rel_close(op.diagonal(), K.diagonal(), 1e-6, "diagonal")
    assert op.trace() == pytest.approx(float(K.double().trace()), rel=1e-6)
    assert_rel_close(op.to_dense(), K, 1e-6, "to_dense")
    if where == "fp64 products":
        assert op.matmul(X).dtype == torch.float64
    if where in ("files", "memory and files"):
        assert "in files of" in op.store


def test_operator_against_float64_reference(case):
    model, batch, _ = case
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    J = reference_jacobian(model, batch, linft.outputs.logits(), names)
    exact = gram(J, J).reshape(33, 33)
    op = linft.ntk_operator(model, batch, batch_size=4, progress=False)
    X = torch.randn(33, 3, dtype=torch.float64)
    assert_rel_close(op.matmul(X), exact @ X, 1e-5, "K X against float64")
    G = J.reshape(33, -1).T @ J.reshape(33, -1)
    assert_rel_close(op.feature_gram(), G, 1e-5, "J^T J against float64")


def test_sign_operator_is_the_sign_kernel(case):
    model, batch, _ = case
    K = linft.ntk(model, batch, kernel="signgd", batch_size=4, progress=False)
    op = linft.ntk_operator(model, batch, kernel="signgd", batch_size=4, progress=False)
    X = torch.randn(33, 2)
    assert torch.equal(op.to_dense(), K.reshape(33, 33))
    assert_rel_close(op.matmul(X), K.reshape(33, 33) @ X, 1e-5, "sign K X")


def test_spectrum_of_operator_gram_route_matches_eigh():
    torch.manual_seed(1)
    model = roberta_classifier(num_labels=2)
    batch = token_batch(random_lengths(700), pad_id=1)  # n C = 1400 > P = 1226
    op = linft.ntk_operator(model, batch, batch_size=100, progress=False)
    assert op.num_features < op.shape[0]
    K = op.to_dense().double()
    w = torch.linalg.eigvalsh(K).flip(0)
    s = linft.spectrum(op, k=20)
    assert s.method == "gram" and s.complete
    top = float(w[0])
    assert (s.eigenvalues - w[:20]).abs().max() <= 1e-5 * top
    assert s.lambda_min == 0.0 and s.condition_number == float("inf")
    assert s.rank <= op.num_features
    assert s.trace == pytest.approx(float(K.trace()), rel=1e-6)
    dense = linft.spectrum(K)
    assert s.effective_rank == pytest.approx(dense.effective_rank, rel=1e-4)
    passes = op.passes
    e = linft.topk_eigh(op, 8)
    assert e.method == "gram" and e.converged and op.passes - passes == 4
    assert (e.values.double() - w[:8]).abs().max() <= 1e-5 * top
    # the vectors: K v = lambda v, checked on the formed kernel
    r = K @ e.vectors.double() - e.vectors.double() * w[:8]
    assert float(r.norm(dim=0).max()) <= 1e-4 * top
    assert bool((e.errors <= 1e-4).all())


class PlainOperator:
    """Only what any operator has: no factor F to take the Gram or feature routes."""

    def __init__(self, op):
        self.op, self.shape, self.dtype = op, op.shape, op.dtype

    def matmul(self, X):
        return self.op.matmul(X)

    def trace(self):
        return self.op.trace()

    def to_dense(self):
        return self.op.to_dense()


def test_spectrum_of_any_operator_krylov_route_matches_eigh():
    torch.manual_seed(2)
    model = roberta_classifier(num_labels=2)
    batch = token_batch(random_lengths(150), pad_id=1)  # n C = 300 < P: no Gram route
    ntk_op = linft.ntk_operator(model, batch, batch_size=50, progress=False)
    assert ntk_op.num_features > ntk_op.shape[0]
    op = PlainOperator(ntk_op)
    K = op.to_dense().double()
    w = torch.linalg.eigvalsh(K).flip(0)
    s = linft.spectrum(op, k=10)
    assert s.method == "krylov" and not s.complete
    assert (s.eigenvalues - w[:10]).abs().max() <= 1e-5 * float(w[0])
    assert s.lambda_min == pytest.approx(float(w[-1]), rel=1e-3, abs=1e-5 * float(w[0]))
    assert bool((s.certified <= 1e-4).all())
    full = linft.spectrum(op)  # k=None, small n: the formed kernel
    assert full.complete and (full.eigenvalues - w).abs().max() <= 1e-5 * float(w[0])


def test_kernel_regression_takes_the_operator(case):
    model, batch, K = case
    op = linft.ntk_operator(model, batch, progress=False)
    y = torch.randn(11, 3)
    got = linft.kernel_regression(op, y, ridge=1.0)
    assert_rel_close(got, linft.kernel_regression(K, y, ridge=1.0), 1e-5, "regression")


def test_killed_j_pass_resumes(case, tmp_path, monkeypatch):
    model, batch, K = case
    stop_after_blocks(monkeypatch, 2)
    with pytest.raises(Interrupt):
        linft.ntk_operator(model, batch, batch_size=3, checkpoint=tmp_path, progress=False)
    calls = stop_after_blocks(monkeypatch, None)
    op = linft.ntk_operator(model, batch, batch_size=3, checkpoint=tmp_path, progress=False)
    assert calls == [6, 9]  # blocks 0 and 3 were finished by the first run
    assert_rel_close(op.to_dense(), K, 1e-6, "resumed operator")
    again = linft.ntk_operator(model, batch, batch_size=3, checkpoint=tmp_path, memory=0)
    assert calls == [6, 9]  # nothing recomputed
    assert_rel_close(again.to_dense(), K, 1e-6, "operator from files")


def test_damaged_j_file_is_named(case, tmp_path):
    model, batch, _ = case
    linft.ntk_operator(model, batch, batch_size=3, checkpoint=tmp_path, progress=False)
    path = tmp_path / "J_rows_3.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="J_rows_3.safetensors.*damaged.*delete"):
        linft.ntk_operator(model, batch, batch_size=3, checkpoint=tmp_path, progress=False)


def test_store_choice_is_said_in_one_line(case, tmp_path, capsys):
    model, batch, _ = case
    linft.ntk_operator(model, batch, batch_size=3, memory=0, checkpoint=tmp_path, progress=True)
    err = [line for line in capsys.readouterr().err.splitlines() if "ntk_operator" in line]
    assert len(err) == 1 and "0 blocks in memory, 4 in files of" in err[0]


def test_recompute_refuses_a_changed_model(case):
    model, batch, _ = case
    op = linft.ntk_operator(model, batch, store="recompute", progress=False)
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        p.add_(1.0)
    try:
        with pytest.raises(RuntimeError, match="weights changed.*build a new operator"):
            op.matmul(torch.randn(33, 1))
    finally:
        with torch.no_grad():
            p.sub_(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kernel="asym_signgd"), "not symmetric"),
        (dict(store="disk"), "choose one of"),
        (dict(accumulate="bf16"), "choose one of"),
        (dict(memory=-1), "memory must be a number of bytes"),
        (dict(store="recompute", checkpoint="x"), "keeps no J"),
        (dict(memory=0), "pass checkpoint=DIR"),
    ],
)
def test_bad_arguments_are_named(case, kwargs, message):
    model, batch, _ = case
    with pytest.raises((ValueError, MemoryError), match=message):
        linft.ntk_operator(model, batch, progress=False, **kwargs)


def test_operator_products_check_their_input(case):
    model, batch, _ = case
    op = linft.ntk_operator(model, batch, progress=False)
    with pytest.raises(ValueError, match=r"X must be \[33, b\]"):
        op.matmul(torch.randn(32, 2))
    with pytest.raises(ValueError, match="method='gram' needs"):
        linft.topk_eigh(op, 2, method="gram")  # P > n C here


def test_feature_kernel_is_j_transpose_j_in_one_pass(case):
    model, batch, _ = case
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    J = reference_jacobian(model, batch, linft.outputs.logits(), names).reshape(33, -1)
    op = linft.ntk_operator(model, batch, batch_size=4, progress=False)
    G = op.feature_kernel()
    P = op.num_features
    assert G.shape == (P, P)
    V = torch.randn(P, 4, dtype=torch.float64)
    passes = op.passes
    assert_rel_close(G.matmul(V), J.T @ (J @ V), 1e-5, "J^T J V against float64")
    assert op.passes - passes == 1
    assert G.trace() == pytest.approx(float(J.square().sum()), rel=1e-6)
    assert op.passes - passes == 1  # the diagonal was kept from the J pass


@pytest.mark.parametrize("n_samples", [150, 700])  # P > n C, and P < n C past the Gram limit
def test_features_route_matches_eigh(monkeypatch, n_samples):
    import linft.eig

    monkeypatch.setattr(linft.eig, "GRAM_LIMIT", 100)  # P = 1226 or 1251: no Gram route
    torch.manual_seed(3)
    model = roberta_classifier(num_labels=2)
    batch = token_batch(random_lengths(n_samples), pad_id=1)
    op = linft.ntk_operator(model, batch, batch_size=100, progress=False)
    K = op.to_dense().double()
    w = torch.linalg.eigvalsh(K).flip(0)
    top = float(w[0])
    s = linft.spectrum(op, k=12)
    assert s.method == "features" and not s.complete
    assert (s.eigenvalues - w[:12]).abs().max() <= 1e-5 * top
    assert bool((s.certified <= 1e-4).all())
    assert s.trace == pytest.approx(float(K.trace()), rel=1e-6)
    if op.num_features < op.shape[0]:
        assert s.lambda_min == 0.0
    passes = op.passes
    e = linft.topk_eigh(op, 6)
    assert e.method == "features" and e.converged
    # one pass per product with J^T J, then the vectors (one) and their certificate (two)
    assert op.passes - passes == e.matmuls - 1 + 3
    assert (e.values.double() - w[:6]).abs().max() <= 1e-5 * top
    r = K @ e.vectors.double() - e.vectors.double() * w[:6]
    assert float(r.norm(dim=0).max()) <= 1e-4 * top
    # the same pairs as Krylov on K itself, at twice the passes per product
    passes = op.passes
    kry = linft.topk_eigh(op, 6, method="krylov")
    assert op.passes - passes == 2 * kry.matmuls
    assert (kry.values.double() - e.values.double()).abs().max() <= 1e-5 * top


def test_passes_over_j_show_progress(case, capsys):
    model, batch, _ = case
    op = linft.ntk_operator(model, batch, batch_size=3, progress=True)
    capsys.readouterr()
    op.matmul(torch.randn(33, 2))
    assert "passes over J: " in capsys.readouterr().err and op.passes == 2
    quiet = linft.ntk_operator(model, batch, batch_size=3, progress=False)
    quiet.matmul(torch.randn(33, 2))
    assert capsys.readouterr().err == ""
