"""Independent float64 reference: ``torch.func.jacrev`` on one unpadded sample at a time."""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, jacrev


def unpadded(batch: dict, i: int) -> dict:
    """Sample i alone, padding (and the attention mask) removed."""
    mask = batch.get("attention_mask")
    keep = slice(None) if mask is None else mask[i].bool()
    return {
        k: v[i : i + 1][:, keep] if v.dim() > 1 else v[i : i + 1]
        for k, v in batch.items()
        if k != "attention_mask"
    }


def reference_jacobian(model, batch: dict, output, names: list[str]) -> torch.Tensor:
    """[N, C, P] in float64, columns in the order of ``names``."""
    m64 = copy.deepcopy(model).double().eval()
    params = dict(m64.named_parameters())
    chosen = {n: params[n].detach() for n in names}
    rest = {n: p.detach() for n, p in params.items() if n not in chosen}
    n_samples = next(iter(batch.values())).shape[0]
    rows = []
    for i in range(n_samples):
        sample = unpadded(batch, i)

        def f(theta, sample=sample):
            out = functional_call(m64, {**rest, **theta}, args=(), kwargs=sample)
            y = output(out, sample)
            return y.reshape(-1)

        jac = jacrev(f)(chosen)  # name -> [C, *shape]
        rows.append(torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1))
    return torch.stack(rows)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
