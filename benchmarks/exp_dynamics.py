"""Does the eNTK predict LoRA fine-tuning? Linearized against actual loss curves.

A small RoBERTa (built from a config, random weights, no download) with LoRA on
every query and value projection is fine-tuned by full-batch gradient descent on
``1/(2N) sum_i ||f(x_i) - y_i||^2 + (lambda/2) ||theta - theta_0||^2`` over the LoRA
weights of a subset S of the adapted modules. Inputs are random token sequences
with padding; the two targets are the logits of a teacher: the same network with
its LoRA weights moved in a random direction (reachable, mildly nonlinear).

For each subset, ``linft.ntk(model, inputs, params=<globs of S>)`` gives K_S at
initialization and ``linft.linearized_loss`` the predicted loss curve. Reported:

(a) predicted against actual loss for several lambda: the largest gap over the
    run, relative to the initial loss, and the final losses;
(b) across all subsets at one lambda: the Spearman rank correlation between the
    condition number of ``K_S/N + lambda I`` at initialization and the final
    training loss.

The step size of each run is ``0.5/(lambda + mu_max(K_S)/N)``, a quarter of the
linear stability bound, so a run's speed is set by the condition number, not by
the kernel's scale.

    python benchmarks/exp_dynamics.py            # CPU, a few minutes
    python benchmarks/exp_dynamics.py --large    # larger model and N, for a GPU
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import sys
import time
from dataclasses import dataclass

import torch
from scipy.stats import spearmanr

import linft

SIZES = {
    "small": dict(
        hidden=32, layers=3, heads=2, inter=37, vocab=100, n=32, seq=10, rank=4, steps=300
    ),
    "large": dict(
        hidden=256, layers=6, heads=4, inter=512, vocab=1000, n=256, seq=32, rank=8, steps=500
    ),
}
# lambda in units of the mean eigenvalue of K_all / N, the scale on which it competes.
LAMBDA_FACTORS = (0.0, 0.1, 1.0, 10.0, 100.0)
RANK_LAMBDA_FACTORS = (0.0, 1.0)
# lr = LR_FRACTION * 2/(lambda + mu_max/N): a quarter of the linear stability bound, since
# the curvature of the nonlinear model makes half of it diverge for some subsets.
LR_FRACTION = 0.25
# At most this many subsets in (b): all of them for the small model, a seeded sample otherwise.
MAX_SUBSETS = 80
N_OUTPUTS = 2
TEACHER_SCALE = 1.0


@dataclass
class Run:
    subset: str
    lam: float
    kappa: float
    predicted: torch.Tensor
    actual: torch.Tensor

    @property
    def gap(self) -> float:
        """Largest |predicted - actual| over the run, relative to the initial loss."""
        return float((self.predicted - self.actual).abs().max() / self.actual[0])

    @property
    def final_gap(self) -> float:
        """|predicted - actual| / actual at the last step."""
        return float((self.predicted[-1] - self.actual[-1]).abs() / self.actual[-1])


def build_model(size: dict, seed: int, device: torch.device) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        intermediate_size=size["inter"],
        max_position_embeddings=size["seq"] + 4,
        num_labels=N_OUTPUTS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = RobertaForSequenceClassification(config)
    # init_lora_weights=False: B != 0, so both A and B move and the kernel sees both.
    lora = LoraConfig(
        r=size["rank"],
        lora_alpha=size["rank"],
        target_modules=["query", "value"],
        init_lora_weights=False,
    )
    model = get_peft_model(model, lora).to(device=device, dtype=torch.float64)
    return model.eval()


def make_inputs(size: dict, seed: int, device: torch.device) -> dict:
    """Random token sequences of varying length, padded with id 1."""
    g = torch.Generator().manual_seed(seed + 1)
    n, seq = size["n"], size["seq"]
    ids = torch.randint(3, size["vocab"], (n, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def teacher_targets(model, batch, seed: int, scale: float) -> torch.Tensor:
    """Outputs of a teacher: the same network with every LoRA weight moved by
    ``scale`` times its standard deviation in a random direction. The task is
    reachable by LoRA; ``scale`` sets how far, hence how nonlinear, it is."""
    g = torch.Generator().manual_seed(seed + 2)
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    saved = [p.clone() for p in lora]
    for p in lora:
        p.add_(scale * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    y = model(**batch).logits.clone()
    for p, p0 in zip(lora, saved, strict=True):
        p.copy_(p0)
    return y


def module_names(model: torch.nn.Module) -> list[str]:
    """Short names ``L<layer>.<query|value>`` of the adapted modules, in model order."""
    out = []
    for name, _ in model.named_parameters():
        if ".lora_A." in name:
            parts = name.split(".")
            layer = parts[parts.index("layer") + 1]
            out.append(f"L{layer}.{parts[parts.index('lora_A') - 1][0]}")
    return out


def patterns(subset: tuple[str, ...]) -> list[str]:
    full = {"q": "query", "v": "value"}
    out = []
    for m in subset:
        layer, kind = m[1:].split(".")
        out.append(f"*layer.{layer}.attention.self.{full[kind]}.lora_*")
    return out


def subset_params(model: torch.nn.Module, subset: tuple[str, ...]) -> list[torch.nn.Parameter]:
    import fnmatch

    pats = patterns(subset)
    return [p for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, q) for q in pats)]


def train(model, batch, y, params, *, lam: float, lr: float, steps: int) -> torch.Tensor:
    """Full-batch GD; returns the data loss 1/(2N) sum ||f - y||^2 after 0..steps steps."""
    n = y.shape[0]
    start = [p.detach().clone() for p in params]
    losses = torch.empty(steps + 1, dtype=torch.float64)
    try:
        for t in range(steps + 1):
            data = (model(**batch).logits - y).square().sum() / (2 * n)
            losses[t] = data.item()
            if t == steps:
                break
            penalty = sum((p - p0).square().sum() for p, p0 in zip(params, start, strict=True))
            grads = torch.autograd.grad(data + 0.5 * lam * penalty, params)
            with torch.no_grad():
                for p, g_ in zip(params, grads, strict=True):
                    p.sub_(lr * g_)
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
    return losses


def run_subset(model, batch, y, subset, lam, steps, cache) -> Run:
    if subset not in cache:
        K = linft.ntk(model, batch, params=patterns(subset)).to(torch.float64)
        cache[subset] = (K, torch.linalg.eigvalsh(K.reshape(y.numel(), -1)))
    K, mu = cache[subset]
    n = y.shape[0]
    lr = LR_FRACTION * 2.0 / (lam + float(mu[-1]) / n)
    with torch.no_grad():
        r0 = model(**batch).logits - y
    predicted = linft.linearized_loss(K.cpu(), r0.cpu(), lr=lr, steps=steps, ridge=lam)
    actual = train(model, batch, y, subset_params(model, subset), lam=lam, lr=lr, steps=steps)
    kappa = float((lam + mu[-1] / n) / (lam + mu[0] / n))
    return Run("+".join(subset), lam, kappa, predicted, actual)


def table_a(runs: list[Run], lam_unit: float) -> str:
    lines = [
        "| subset | lambda / unit | kappa(K_S/N + lambda I) | max gap / L0 | final actual | "
        "final predicted | final gap / actual |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.subset} | {r.lam / lam_unit:g} | {r.kappa:.3g} | {r.gap:.2e} | "
            f"{r.actual[-1]:.4g} | {r.predicted[-1]:.4g} | {r.final_gap:.2e} |"
        )
    return "\n".join(lines)


def spearman(runs: list[Run]) -> tuple[float, float]:
    """Rank correlation of kappa with the final actual and the final predicted loss."""
    kappas = [r.kappa for r in runs]
    actual = spearmanr(kappas, [float(r.actual[-1]) for r in runs]).statistic
    predicted = spearmanr(kappas, [float(r.predicted[-1]) for r in runs]).statistic
    return float(actual), float(predicted)


def table_b(by_lambda: dict[float, list[Run]]) -> str:
    factors = list(by_lambda)
    head = "| subset |" + "".join(
        f" kappa (lambda {f:g}) | final actual (lambda {f:g}) | final predicted (lambda {f:g}) |"
        for f in factors
    )
    lines = [head, "|---|" + "---:|" * (3 * len(factors))]
    first = by_lambda[factors[0]]
    for i in sorted(range(len(first)), key=lambda i: first[i].kappa):
        row = f"| {first[i].subset} |"
        for f in factors:
            r = by_lambda[f][i]
            row += f" {r.kappa:.4g} | {r.actual[-1]:.4g} | {r.predicted[-1]:.4g} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--large", action="store_true", help="larger model and N (use a GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-scale", type=float, default=TEACHER_SCALE)
    ap.add_argument("--out", default="benchmarks/RESULTS_dynamics.md")
    args = ap.parse_args(argv)
    size = dict(SIZES["large" if args.large else "small"])
    steps = args.steps or size["steps"]
    device = torch.device(args.device)
    t0 = time.perf_counter()

    model = build_model(size, args.seed, device)
    batch = make_inputs(size, args.seed, device)
    y = teacher_targets(model, batch, args.seed, args.teacher_scale)
    mods = module_names(model)
    subsets = [s for k in range(1, len(mods) + 1) for s in itertools.combinations(mods, k)]
    if len(subsets) > MAX_SUBSETS:
        pick = torch.randperm(len(subsets), generator=torch.Generator().manual_seed(args.seed))
        subsets = [subsets[int(i)] for i in pick[:MAX_SUBSETS]]
    cache: dict = {}

    everything = tuple(mods)
    run_subset(model, batch, y, everything, 0.0, 0, cache)  # fills the kernel cache
    n = y.shape[0]
    lam_unit = float(cache[everything][1].mean()) / n
    showcase = [everything, tuple(m for m in mods if m.startswith("L0.")), (mods[-1],)]
    runs_a = [
        run_subset(model, batch, y, s, f * lam_unit, steps, cache)
        for s in showcase
        for f in LAMBDA_FACTORS
    ]
    runs_b = {
        f: [run_subset(model, batch, y, s, f * lam_unit, steps, cache) for s in subsets]
        for f in RANK_LAMBDA_FACTORS
    }
    a = table_a(runs_a, lam_unit)
    b = table_b(runs_b)
    rhos = [
        f"- lambda = {f:g} unit: rho(kappa, final actual loss) = {ra:.3f}; "
        f"rho(kappa, final predicted loss) = {rp:.3f}."
        for f, (ra, rp) in ((f, spearman(r)) for f, r in runs_b.items())
    ]
    elapsed = time.perf_counter() - t0

    command = "python benchmarks/exp_dynamics.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    report = "\n".join(
        [
            "# Linearized dynamics against LoRA fine-tuning",
            "",
            f"Command: `{command}`  ",
            f"Date: {datetime.date.today().isoformat()}; device: {device}; "
            f"torch {torch.__version__}; python {platform.python_version()}; {elapsed:.0f} s.  ",
            f"Model: RoBERTa, hidden {size['hidden']}, {size['layers']} layers, random weights, "
            f"LoRA r={size['rank']} on query/value (B != 0), float64. Data: N={n} random sequences "
            f"(length <= {size['seq']}, padded), C={N_OUTPUTS} teacher logits (LoRA weights "
            f"moved by {args.teacher_scale:g} std). Full-batch GD, "
            f"{steps} steps, lr = {2 * LR_FRACTION:g}/(lambda + mu_max/N). Unit of lambda: "
            f"mean eigenvalue of K_all / N = {lam_unit:.4g}.",
            "",
            "## (a) Predicted (linft.linearized_loss) against actual training loss",
            "",
            "Max gap: max over steps of |predicted - actual| / initial loss. Final gap: "
            "|predicted - actual| / actual at the last step.",
            "",
            a,
            "",
            f"## (b) Condition number at initialization against final loss "
            f"({len(subsets)} subsets)",
            "",
            "kappa = condition number of K_S/N + lambda I at initialization; Spearman rank "
            "correlation across subsets:",
            "",
            *rhos,
            "",
            b,
            "",
        ]
    )
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report)
    return report


if __name__ == "__main__":
    main()
