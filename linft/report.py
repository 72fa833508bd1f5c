"""Kernel analysis report: the kernel, its spectrum, a layer ranking; JSON, plot, safetensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .api import layer_ntks


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def spectrum_summary(K: torch.Tensor, ridge: float, top: int, all_values: bool = False) -> dict:
    from .spectrum import spectrum

    s = spectrum(K, ridge=ridge)
    summary = {
        "size": int(s.n),
        "top_eigenvalues": [float(v) for v in s.eigenvalues[:top]],
        "lambda_max": float(s.lambda_max),
        "lambda_min": float(s.lambda_min),
        "condition_number": _finite(float(s.condition_number)),
        "rank": int(s.rank),
        "trace": float(s.trace),
        "effective_rank": float(s.effective_rank),
        "stable_rank": float(s.stable_rank),
        "decay_exponent": _finite(float(s.decay_exponent)),
        "decay_fit_range": [int(i) for i in s.decay_fit_range],
        "ridge": ridge,
    }
    if all_values:
        summary["eigenvalues"] = [float(v) for v in s.eigenvalues]
    return summary


def analyze(
    model, inputs, *, ridge: float = 0.0, top: int = 10, **ntk_kwargs
) -> tuple[dict, torch.Tensor]:
    """The report dict and the kernel. Per-module kernels come from the same
    pass as the full one (``K = sum_l K_l``); modules are ranked by the
    condition number of ``K_l + ridge I`` (smallest first)."""
    parts = layer_ntks(model, inputs, groups="module", **ntk_kwargs)
    K = sum(parts.values())
    layers = {name: spectrum_summary(k, ridge, top=3) for name, k in parts.items()}

    def key(name):
        c = layers[name]["condition_number"]
        return float(c) if isinstance(c, float) else float("inf")

    ranking = sorted(layers, key=key)
    report = {
        "kernel_shape": list(K.shape),
        "spectrum": spectrum_summary(K, ridge, top, all_values=True),
        "layers": {name: layers[name] for name in ranking},
        "layer_ranking": ranking,
    }
    return report, K


def _num(x: float | str, spec: str = ".4g") -> str:
    return x if isinstance(x, str) else format(x, spec)


def format_report(report: dict) -> str:
    s = report["spectrum"]
    lines = [
        f"kernel {' x '.join(map(str, report['kernel_shape']))}",
        "top eigenvalues: " + ", ".join(_num(v) for v in s["top_eigenvalues"]),
        f"condition number: {_num(s['condition_number'])}  (lambda_max {_num(s['lambda_max'])}, "
        f"lambda_min {_num(s['lambda_min'])}, rank {s['rank']}/{s['size']})",
        f"effective rank {_num(s['effective_rank'])}, stable rank {_num(s['stable_rank'])}, "
        f"decay exponent {_num(s['decay_exponent'], '.3g')}",
        "modules by condition number of their own kernel (best first):",
    ]
    for name in report["layer_ranking"]:
        lines.append(f"  {_num(report['layers'][name]['condition_number']):>12}  {name}")
    return "\n".join(lines)


def write_report(
    report: dict, K: torch.Tensor, out_dir: str | Path, plot: bool = True
) -> list[Path]:
    """report.json, kernel.safetensors and (with matplotlib) spectrum.png in ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "kernel.safetensors"]
    written[0].write_text(json.dumps(report, indent=2))
    save_file({"kernel": K.detach().cpu().contiguous()}, str(written[1]))
    if plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return written
        eig = [v for v in report["spectrum"]["eigenvalues"] if v > 0]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.loglog(range(1, len(eig) + 1), eig)
        ax.set_xlabel("index j")
        ax.set_ylabel("eigenvalue")
        ax.set_title("eNTK spectrum")
        fig.tight_layout()
        fig.savefig(out / "spectrum.png", dpi=120)
        plt.close(fig)
        written.append(out / "spectrum.png")
    return written
