"""The shared test of a per-parameter rule: a rule's test is a small subclass of ``RuleCase``
naming the module under test (and, where it differs, how the model around it is built).

The model: the module on token features ``[n, T, d_in]`` (an odd shape), then a frozen
mixing read-out to C = 3 outputs over the real tokens (padding masked). Every test draws
fresh inputs (the suite's seeded fixture) and compares with float64 ``torch.func.jacrev``
on each sample alone, its padding removed.
"""

from __future__ import annotations

import copy
import warnings

import torch
from checks import assert_rel_close
from torch import nn
from torch.func import functional_call, jacrev

import linft
from linft.kernel.capture import build_plan
from linft.params import column_offsets, select_params

D_IN, D_OUT, OUTPUTS = 7, 5, 3
LENGTHS = [6, 3, 1, 5]  # padded to 6: one sample of one token


class Net(nn.Module):
    """``module`` on the tokens, then a frozen read-out of the masked token mean."""

    def __init__(self, module: nn.Module, d_out: int = D_OUT):
        super().__init__()
        self.module = module
        self.mix = nn.Linear(d_out, OUTPUTS)
        self.mix.requires_grad_(False)

    def forward(self, x, attention_mask):
        h = torch.tanh(self.module(x))
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.mix((h * m).sum(1) / m.sum(1))


class RuleCase:
    """Subclasses set ``rule`` (the name of the rule that must claim the parameters) and
    implement ``module()``; ``model()`` may wrap it (peft)."""

    rule: str

    def module(self) -> nn.Module:
        raise NotImplementedError

    def model(self) -> nn.Module:
        return Net(self.module())

    def batch(self, lengths: list[int]) -> dict:
        """Inputs of ``model()``: token features ``x`` by default, padded, with the mask."""
        return _batch(lengths)

    # --- what every rule must pass

    def test_the_rule_claims_every_trainable_parameter(self):
        model = self.model()
        selected = select_params(model, "trainable")
        offsets, _ = column_offsets(selected)
        plan = build_plan(model, selected, offsets)
        assert plan.generic == [], f"left to the generic path: {plan.generic}"
        assert {u.rule.name for u in plan.units} == {self.rule}

    def test_kernel_and_jacobian_match_float64(self):
        model = self.model()
        batch = self.batch(LENGTHS)
        J = _reference(model, batch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to the generic path, no other noise
            got = linft.jacobian(model, batch, batch_size=3)
            K = linft.ntk(model, batch, batch_size=3)
        assert_rel_close(got, J, 1e-5, f"{self.rule}: J")
        assert_rel_close(K, torch.einsum("nap,mbp->namb", J, J), 1e-5, f"{self.rule}: K")

    def test_cross_kernel_matches_float64(self):
        model = self.model()
        a, b = self.batch([4, 2]), self.batch([3, 3, 1])
        Ja, Jb = _reference(model, a), _reference(model, b)
        K = linft.ntk(model, a, b, outputs="full")
        assert_rel_close(K, torch.einsum("nap,mbp->namb", Ja, Jb), 1e-5, f"{self.rule}: K(X, X2)")


def _batch(lengths: list[int]) -> dict:
    n, T = len(lengths), max(lengths)
    x = torch.randn(n, T, D_IN)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    return {"x": x.masked_fill(mask[..., None] == 0, 0.0), "attention_mask": mask}


def _reference(model: nn.Module, batch: dict) -> torch.Tensor:
    """``[N, C, P]`` float64, trainable parameters in ``named_parameters`` order."""
    m64 = copy.deepcopy(model).double().eval()
    params = dict(m64.named_parameters())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    chosen = {n: params[n].detach() for n in names}
    rest = {n: p.detach() for n, p in params.items() if n not in chosen}
    rows = []
    for i, keep in enumerate(batch["attention_mask"].bool()):
        sample = {
            k: (v[i : i + 1, keep].double() if v.is_floating_point() else v[i : i + 1, keep])
            for k, v in batch.items()
        }

        def f(theta, sample=sample):
            return functional_call(m64, {**rest, **theta}, args=(), kwargs=sample)[0]

        jac = jacrev(f)(chosen)
        rows.append(torch.cat([jac[n].reshape(OUTPUTS, -1) for n in names], dim=1))
    return torch.stack(rows)
