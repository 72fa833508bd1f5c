"""Plain PyTorch models as a torch.func user writes them: a tensor input (``model(x)``), a
tuple (``model(*xs)``), a positional-only ``forward``, a tensor output read as f(x)
(flattened per sample). Exact against a float64 ``torch.func`` reference on each sample
alone; cross kernels, blocks, checkpoints and the self-check take them as they take a
tokenizer's output."""

from __future__ import annotations

import copy

import pytest
import torch
from checks import assert_rel_close
from interrupts import Interrupt, stop_after_blocks
from torch import nn
from torch.func import functional_call, jacrev

import linft
from linft.kernel.checkpoint import CheckpointError


class TutorialCNN(nn.Module):
    """The torch.func NTK tutorial's network: three 3x3 convolutions, then a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, (3, 3))
        self.conv2 = nn.Conv2d(32, 32, (3, 3))
        self.conv3 = nn.Conv2d(32, 32, (3, 3))
        self.fc = nn.Linear(21632, 10)

    def forward(self, x, /):
        x = self.conv1(x).relu()
        x = self.conv2(x).relu()
        x = self.conv3(x).relu()
        return self.fc(x.flatten(1))


class TwoInputMLP(nn.Module):
    """``model(x, z)``, positional only: features and a side input."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 16)
        self.b = nn.Linear(3, 16, bias=False)
        self.out = nn.Linear(16, 4)

    def forward(self, x, z, /):
        return self.out(torch.tanh(self.a(x) + self.b(z)))


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` on ``[N, T, D]`` features; f(x) is every output entry."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.encoder(x))  # [N, T, 2]: flattened to C = 2T


def reference(model, xs: tuple) -> torch.Tensor:
    """``[N, C, P]`` in float64: each sample alone, ``model(*sample)`` flattened."""
    m64 = copy.deepcopy(model).double().eval()
    params = {n: p.detach() for n, p in m64.named_parameters()}
    rows = []
    for i in range(xs[0].shape[0]):
        sample = tuple(x[i : i + 1].double() for x in xs)

        def f(theta, sample=sample):
            return functional_call(m64, theta, args=sample).reshape(-1)

        jac = jacrev(f)(params)
        rows.append(torch.cat([jac[n].flatten(1) for n in params], dim=1))
    return torch.stack(rows)


def full_kernel(J: torch.Tensor, J2: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nap,mbp->namb", J, J2)


CASES = {
    "cnn": (TutorialCNN, lambda n: (torch.randn(n, 3, 32, 32),)),
    "mlp, two inputs": (TwoInputMLP, lambda n: (torch.randn(n, 7), torch.randn(n, 3))),
    "transformer encoder": (Encoder, lambda n: (torch.randn(n, 5, 16),)),
}


def _inputs(xs: tuple):
    return xs[0] if len(xs) == 1 else xs  # a tensor alone, or a tuple


@pytest.mark.filterwarnings("ignore:parameters of .* take the exact but slow")
@pytest.mark.parametrize("case", list(CASES))
def test_plain_model_kernels_match_float64(case):
    build, draw = CASES[case]
    torch.manual_seed(len(case))
    model = build()
    xs, xs2 = draw(3), draw(2)
    J, J2 = reference(model, xs), reference(model, xs2)
    K = linft.ntk(model, _inputs(xs))
    assert_rel_close(K, full_kernel(J, J), 1e-5, f"{case}: K(X, X)")
    cross = linft.ntk(model, _inputs(xs), _inputs(xs2), batch_size=2)
    assert_rel_close(cross, full_kernel(J, J2), 1e-5, f"{case}: K(X, X2)")
    assert_rel_close(linft.jacobian(model, _inputs(xs)), J, 1e-5, f"{case}: J")


def test_batches_of_tensors_and_a_checkpoint(tmp_path, monkeypatch):
    """An iterable of tensor batches (a DataLoader's), blocks of 2, a checkpoint that a
    stopped run resumes from, and the trace kernel."""
    torch.manual_seed(0)
    model = TwoInputMLP()
    x, z = torch.randn(5, 7), torch.randn(5, 3)
    J = reference(model, (x, z))
    loader = [(x[:3], z[:3]), (x[3:], z[3:])]
    stop_after_blocks(monkeypatch, 2)
    with pytest.raises(Interrupt):
        linft.ntk(model, loader, batch_size=2, checkpoint=tmp_path)
    calls = stop_after_blocks(monkeypatch, None)
    K = linft.ntk(model, loader, batch_size=2, checkpoint=tmp_path)
    assert calls == [3], "only the block the stopped run did not reach"  # blocks 0-1, 2, 3-4
    assert_rel_close(K, full_kernel(J, J), 1e-5, "blocks")
    trace = linft.ntk(model, (x, z), outputs="trace")
    assert_rel_close(trace, torch.einsum("nap,map->nm", J, J), 1e-5, "trace")


def test_plain_model_with_another_input_in_the_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    model = TwoInputMLP()
    x, z = torch.randn(4, 7), torch.randn(4, 3)
    linft.ntk(model, (x, z), checkpoint=tmp_path)
    with pytest.raises(CheckpointError, match="different computation"):
        linft.ntk(model, (x, z + 1), checkpoint=tmp_path)


def test_a_wrong_rule_on_a_plain_model_fails_the_self_check(monkeypatch):
    """The self-check's reference calls the model with the same positional inputs."""
    from linft.kernel import engine

    torch.manual_seed(0)
    model = TwoInputMLP()
    real = engine.JacobianEngine._forward

    def skewed(self, batch):
        return real(self, batch) * 1.01

    monkeypatch.setattr(engine.JacobianEngine, "_forward", skewed)
    with pytest.raises(linft.SelfCheckError, match="module"):
        linft.ntk(model, (torch.randn(4, 7), torch.randn(4, 3)))


def test_inputs_that_are_not_tensors_are_named():
    model = TwoInputMLP()
    with pytest.raises(TypeError, match=r"a tensor \(model\(x\)\) or a tuple of tensors"):
        linft.ntk(model, 3.0)


def test_layer_kernels_of_a_plain_model_sum_to_its_kernel():
    torch.manual_seed(0)
    model = TwoInputMLP()
    xs = (torch.randn(4, 7), torch.randn(4, 3))
    parts = linft.layer_ntks(model, xs, outputs="trace")
    assert set(parts) == {"a", "b", "out"}
    J = reference(model, xs)
    assert_rel_close(sum(parts.values()), torch.einsum("nap,map->nm", J, J), 1e-5, "sum")
