"""What the report says: kernel spectrum, layer ranking, kernel regression, loss curve.

One pass gives the per-module SGD kernels ``K_l`` over every sample (train and held
out), ``K = sum_l K_l`` (Afzal et al., NeurIPS 2025); with labels a second pass gives
the SignGD kernel (Malladi et al., ICML 2023). Everything that describes training
reads the training block ``K[train, train]``; predictions read ``K[test, train]``.

- spectrum of ``K_train`` (``linft.spectrum``) and of every ``K_l``;
- layer ranking: NTK-greedy selection on ``K_l`` by the condition number of
  ``K_S + ridge I``, with the Weyl bounds (``linft.select_from_kernels``);
- kernel regression ``f = f_0 + K(x, X) (K + r I)^-1 (Y - f_0)`` with one-hot Y, its
  ridge r chosen on the training split by exact leave-one-out: for a sample i, with
  ``A = K + r I`` and ``alpha = A^-1 (Y - f_0)``, the residual of the fit without i is
  ``[(A^-1)_ii]^-1 alpha_i`` (its C x C diagonal block);
- the linearized training loss under full-batch GD with the Euclidean regularizer
  ``lambda = ridge / N`` (``linft.linearized_loss``; ridge r of K and lambda of the
  dynamics are the same regularization, Afzal et al.).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..api import layer_ntks, ntk
from ..dynamics import kernel_regression, linearized_loss
from ..kernel import run
from ..params import group_columns, select_params
from ..select import select_from_kernels
from ..spectrum import spectrum

# Kernel-regression ridges, relative to the mean diagonal of K_train. The low end is
# where a float32 kernel stops being invertible; those ridges are tried and skipped.
RIDGE_GRID = tuple(10.0**e for e in range(-6, 2))
# Below this size one Jacobian serves every kernel of a run without a checkpoint.
JACOBIAN_BYTES = 256 * 2**20


@dataclass
class Task:
    """A model, its inputs, and optionally labels and a train / held-out split."""

    model: torch.nn.Module
    batch: dict
    output: object = None
    params: object = "trainable"
    labels: Tensor | None = None  # class index per sample
    classes: list[str] = field(default_factory=list)
    train: Tensor | None = None  # sample indices (all samples without labels)
    test: Tensor | None = None


@dataclass
class Result:
    """The report (plain types, JSON-ready) and the tensors written beside it."""

    report: dict
    tensors: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)


def finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _four_d(K: Tensor) -> Tensor:
    """linft returns ``[N, M]`` when C = 1; make it ``[N, 1, M, 1]``."""
    return K[:, None, :, None] if K.dim() == 2 else K


def block(K: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``K[rows, :, cols, :]`` of a full kernel."""
    return K[rows][:, :, cols]


def spectrum_summary(K: Tensor, ridge: float, top: int, all_values: bool = False) -> dict:
    s = spectrum(K, ridge=ridge)
    summary = {
        "size": int(s.n),
        "top_eigenvalues": [float(v) for v in s.eigenvalues[:top]],
        "lambda_max": float(s.lambda_max),
        "lambda_min": float(s.lambda_min),
        "condition_number": finite(float(s.condition_number)),
        "rank": int(s.rank),
        "trace": float(s.trace),
        "effective_rank": float(s.effective_rank),
        "stable_rank": float(s.stable_rank),
        "decay_exponent": finite(float(s.decay_exponent)),
        "decay_fit_range": [int(i) for i in s.decay_fit_range],
        "ridge": ridge,
    }
    if all_values:
        summary["eigenvalues"] = [float(v) for v in s.eigenvalues]
    return summary


def initial_outputs(model, batch: dict, output, size: int = 32) -> Tensor:
    """``f_0(x)`` of every sample as float64 ``[N, C]``, in eval mode (as the kernel is)."""
    from ..outputs import default_output

    read = output or default_output
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = next(iter(batch.values())).shape[0]
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for s in range(0, n, size):
                part = {k: v[s : s + size].to(device) for k, v in batch.items()}
                rows.append(read(model(**part), part).detach().double().cpu())
    finally:
        model.train(was_training)
    f0 = torch.cat(rows)
    return f0[:, None] if f0.dim() == 1 else f0


def parameters(model, params) -> dict:
    chosen = select_params(model, params)
    lora = [n for n, _ in chosen if "lora_" in n]
    return {
        "count": int(sum(p.numel() for _, p in chosen)),
        "tensors": len(chosen),
        "lora_tensors": len(lora),
        "names": [n for n, _ in chosen],
    }


# ------------------------------------------------------------------ kernel regression


def targets(labels: Tensor, outputs: int) -> Tensor:
    """One-hot targets ``[N, C]``; with one output, +-1 (class 1 positive)."""
    if outputs == 1:
        return (2.0 * labels.double() - 1.0)[:, None]
    return torch.nn.functional.one_hot(labels, outputs).double()


def predicted_class(pred: Tensor) -> Tensor:
    return (pred[:, 0] > 0).long() if pred.shape[1] == 1 else pred.argmax(1)


def leave_one_out(K: Tensor, R: Tensor, ridges: list[float]) -> list[Tensor | None]:
    """The leave-one-out residuals ``[N, C]`` of kernel ridge regression of R on K (float64)
    at each ridge (None where ``K + r I`` is not positive definite)."""
    n, c = R.shape
    mu, V = torch.linalg.eigh(K.reshape(n * c, n * c).double())
    out = []
    for r in ridges:
        if float(mu.min()) + r <= 0:
            out.append(None)
            continue
        inv = (V / (mu + r)) @ V.T
        alpha = (inv @ R.reshape(-1)).reshape(n, c, 1)
        diag = inv.reshape(n, c, n, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [n, c, c]
        out.append(torch.linalg.solve(diag, alpha)[..., 0])
    return out


def regression(K: Tensor, f0: Tensor, task: Task) -> dict:
    """Held-out accuracy of eNTK kernel regression, ridge chosen by leave-one-out on train
    (highest accuracy, then lowest squared error, then the larger ridge)."""
    tr, te = task.train, task.test
    K_tr, K_te = block(K, tr, tr), block(K, te, tr)
    c = K.shape[1]
    Y = targets(task.labels, c)
    scale = float(K_tr.reshape(tr.numel() * c, -1).diagonal().double().mean())
    ridges = [t * scale for t in RIDGE_GRID]
    loo = leave_one_out(K_tr, Y[tr] - f0[tr], ridges)
    rows = []
    for r, e in zip(ridges, loo, strict=True):
        row = {"ridge": r, "relative_ridge": r / scale}
        try:
            pred = kernel_regression(
                K_tr, Y[tr], K_test=K_te, ridge=r, f0=f0[tr], f0_test=f0[te]
            ).double()
        except torch.linalg.LinAlgError as err:
            row["skipped"] = " ".join(str(err).split(". ")[0].split())
            rows.append(row)
            continue
        if e is None:
            row["skipped"] = "K + ridge I is not positive definite"
            rows.append(row)
            continue
        loo_pred = Y[tr] - e
        row["loo_accuracy"] = float((predicted_class(loo_pred) == task.labels[tr]).double().mean())
        row["loo_mse"] = float(e.square().sum(1).mean() / 2)
        row["test_accuracy"] = float((predicted_class(pred) == task.labels[te]).double().mean())
        rows.append(row)
    usable = [i for i, row in enumerate(rows) if "skipped" not in row]
    result = {"grid": rows, "train": int(tr.numel()), "test": int(te.numel())}
    if not usable:
        result["error"] = (
            "K + ridge I is singular at every ridge of the grid; the kernel is too ill-conditioned "
            "at its precision"
        )
        return result
    best = max(usable, key=lambda i: (rows[i]["loo_accuracy"], -rows[i]["loo_mse"], i))
    result.update(
        chosen=best,
        ridge=rows[best]["ridge"],
        relative_ridge=rows[best]["relative_ridge"],
        loo_accuracy=rows[best]["loo_accuracy"],
        test_accuracy=rows[best]["test_accuracy"],
        majority_accuracy=float(
            (task.labels[te] == torch.bincount(task.labels[tr]).argmax()).double().mean()
        ),
        # the model's own outputs before any training: zero-shot for label-word logits
        initial_accuracy=float((predicted_class(f0[te]) == task.labels[te]).double().mean()),
    )
    return result


def loss_curve(K: Tensor, f0: Tensor, task: Task, ridge: float, lr, steps: int) -> dict:
    """The linearized training loss ``1/(2N) sum ||f_t - y||^2`` of full-batch GD."""
    tr = task.train
    K_tr = block(K, tr, tr)
    n, c = tr.numel(), K.shape[1]
    residual = f0[tr] - targets(task.labels[tr], c)
    lam = ridge / n
    mu_max = float(torch.linalg.eigvalsh(K_tr.reshape(n * c, -1).double())[-1])
    # 1/(lambda + mu_max/N): the fastest mode converges in one step, every mode is stable.
    lr = 1.0 / (lam + mu_max / n) if lr is None else float(lr)
    curve = linearized_loss(K_tr, residual, lr=lr, steps=steps, ridge=lam)
    return {"lr": lr, "steps": steps, "regularizer": lam, "loss": [float(v) for v in curve]}


def _check_classes(classes: int, outputs: int) -> None:
    if classes > max(outputs, 2) or (outputs == 1 and classes > 2):
        raise ValueError(
            f"the labels have {classes} classes but the model has {outputs} output(s) per "
            "sample; give the model one output per class (a head with num_labels, or one "
            "label word per class)"
        )


# ---------------------------------------------------------------------------- kernels


def compute_kernels(
    task: Task, signgd: bool, checkpoint: Path | None, outputs: int | None = None, **ntk_kwargs
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-module SGD kernels over all samples, and the SignGD kernel when asked.

    Without a checkpoint and with a Jacobian of at most ``JACOBIAN_BYTES`` (``outputs``,
    C, known), one ``linft.jacobian`` pass serves both kernels (half the passes of
    ``layer_ntks`` + ``ntk``); otherwise the two resumable kernel runs.
    """
    common = dict(output=task.output, params=task.params, **ntk_kwargs)
    n = next(iter(task.batch.values())).shape[0]
    columns = sum(p.numel() for _, p in select_params(task.model, task.params))
    if checkpoint is None and outputs and n * outputs * columns * 4 <= JACOBIAN_BYTES:
        return _kernels_from_jacobian(task, signgd, **common)
    ck = (lambda name: None) if checkpoint is None else (lambda name: str(checkpoint / name))
    parts = layer_ntks(task.model, task.batch, groups="module", checkpoint=ck("sgd"), **common)
    # A checkpointed kernel may live in a file under checkpoint/; own a copy.
    parts = {k: _four_d(v).clone() for k, v in parts.items()}
    K_sign = None
    if signgd:
        K_sign = _four_d(
            ntk(task.model, task.batch, kernel="signgd", checkpoint=ck("signgd"), **common)
        ).clone()
    return parts, K_sign


def _symmetric(K: Tensor) -> Tensor:
    """Exactly symmetric, as linft's kernels are (a GEMM ``J J^T`` may differ from its
    transpose in the last bit)."""
    return 0.5 * (K + K.T)


def _kernels_from_jacobian(
    task: Task, signgd: bool, *, output, params, precision="fp32", batch_size=None, **_
) -> tuple[dict[str, Tensor], Tensor | None]:
    """``K_l = J_l J_l^T`` per module and ``sign(J) sign(J)^T`` from one Jacobian, whose
    rounding-noise rows are zeroed as ``ntk(kernel="signgd")`` zeroes them (zeroing keeps
    every module's own kernel within its rounding)."""
    J = run.jacobian(
        task.model, task.batch, output=output, params=params, precision=precision,
        batch_size=batch_size, backend="auto", device=None, sign_rows=signgd,
    )  # fmt: skip
    J = J.float()
    n, c = J.shape[:2]
    J = J.reshape(n * c, -1)
    spans = group_columns(select_params(task.model, params), "module")
    parts = {}
    for name, cols in spans.items():
        Jl = torch.cat([J[:, s] for s in cols], dim=1)
        parts[name] = _symmetric(Jl @ Jl.T).reshape(n, c, n, c)
    K_sign = None
    if signgd:
        S = torch.sign(J)
        K_sign = _symmetric(S @ S.T).reshape(n, c, n, c)
    return parts, K_sign


DOMINANT_SHARE = 0.95  # a group holding more of the trace makes the kernel nearly its own


def trace_shares(parts: dict[str, Tensor], tr: Tensor) -> dict[str, float]:
    """Each group's share of the training kernel's trace (the groups' kernels sum to K)."""
    traces = {g: float(torch.einsum("icic->", block(k, tr, tr).double())) for g, k in parts.items()}
    total = sum(traces.values())
    return {g: (t / total if total > 0 else 0.0) for g, t in traces.items()}


def alignment(K: Tensor, labels: Tensor, tr: Tensor) -> float:
    """Kernel-target alignment of the training block (Cristianini et al. 2002):
    ``y^T K y / (||K||_F ||y||^2)`` with y the targets centred over the samples, flattened
    ``[n C]``; 1 when K is the targets' own Gram, 0 when orthogonal to it."""
    K_tr = block(K, tr, tr).double()
    n, c = K_tr.shape[:2]
    Y = targets(labels[tr], c)
    y = (Y - Y.mean(0)).reshape(-1)
    M = K_tr.reshape(n * c, n * c)
    denom = float(torch.linalg.matrix_norm(M)) * float(y @ y)
    return float(y @ M @ y) / denom if denom > 0 else 0.0


def dominance_note(shares: dict[str, float], ranking: list[str]) -> str | None:
    """What a reader of the layer ranking must know when one group is nearly all of K."""
    group, share = max(shares.items(), key=lambda item: item[1])
    if share <= DOMINANT_SHARE:
        return None
    place = ranking.index(group) + 1 if group in ranking else None
    where = f"the ranking by condition number puts it {place} of {len(ranking)}" if place else (
        "the ranking does not list it")  # fmt: skip
    return (
        f"{group} holds {100 * share:.1f}% of the kernel's trace, so the kernel (and every "
        f"answer from it) is nearly that group's alone; {where}, which says how well-conditioned "
        "each module's kernel is, not how much it matters: keep it when choosing a few modules"
    )


def _selection(parts: dict[str, Tensor], tr: Tensor, ridge: float, budget, notes: list) -> dict:
    kernels = {name: block(k, tr, tr) for name, k in parts.items()}
    budget = len(kernels) if budget is None else min(int(budget), len(kernels))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select_from_kernels(kernels, budget=budget, ridge=ridge)
    notes += [str(w.message) for w in caught]
    out = sel.to_dict()
    out.pop("candidates")
    for key in ("scores", "bounds", "condition_numbers"):
        out[key] = [finite(v) for v in out[key]]
    out["table"] = {g: {k: finite(v) for k, v in row.items()} for g, row in out["table"].items()}
    return out


def analyze(
    task: Task,
    *,
    ridge: float = 0.0,
    top: int = 10,
    lr: float | None = None,
    steps: int = 1000,
    budget: int | None = None,
    checkpoint: Path | None = None,
    **ntk_kwargs,
) -> Result:
    """The report of a task (see the module docstring)."""
    notes: list[str] = []
    labelled = task.labels is not None
    n = next(iter(task.batch.values())).shape[0]
    tr = task.train if task.train is not None else torch.arange(n)
    task.train = tr
    f0 = initial_outputs(task.model, task.batch, task.output)
    if labelled:
        _check_classes(len(task.classes), f0.shape[1])
    parts, K_sign = compute_kernels(task, labelled, checkpoint, f0.shape[1], **ntk_kwargs)
    K = sum(parts.values())
    K_tr = block(K, tr, tr)
    layers = {name: spectrum_summary(block(k, tr, tr), ridge, top=3) for name, k in parts.items()}
    selection = _selection(parts, tr, ridge, budget, notes)
    report = {
        "kernel_shape": list(K.shape),
        "train_kernel_shape": list(K_tr.shape),
        "parameters": parameters(task.model, task.params),
        "spectrum": spectrum_summary(K_tr, ridge, top, all_values=True),
        "layers": layers,
        "selection": selection,
        "layer_ranking": selection["groups"],
        "split": {"train": tr.tolist(), "test": [] if task.test is None else task.test.tolist()},
        "trace_shares": trace_shares(parts, tr),
    }
    dominant = dominance_note(report["trace_shares"], selection["groups"])
    if dominant is not None:  # printed with the ranking (format_report), never apart from it
        report["dominant_group"] = dominant
    tensors = {"kernel": K}
    if labelled:
        report["alignment"] = {
            "all": alignment(K, task.labels, tr),
            "groups": {g: alignment(k, task.labels, tr) for g, k in parts.items()},
        }
        report["classes"] = task.classes
        report["labels"] = task.labels.tolist()
        report["regression"] = {
            "sgd": regression(K, f0, task),
            "signgd": regression(K_sign, f0, task),
        }
        report["loss_curve"] = loss_curve(K, f0, task, ridge, lr, steps)
        tensors.update(kernel_signgd=K_sign, f0=f0)
        for kind, reg in report["regression"].items():
            if "error" in reg:
                notes.append(f"{kind} kernel regression: {reg['error']}")
    return Result(report, tensors, notes)
