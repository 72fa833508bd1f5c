"""The report: printed summary, ``report.json``, ``kernel.safetensors`` and ``report.html``
(one self-contained file, figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from . import plots
from .analysis import Result

LOSS_STEPS_SHOWN = (0, 1, 10, 100, 1000, 10000)


def _num(x, spec: str = ".4g") -> str:
    return x if isinstance(x, str) else format(x, spec)


def _plain(x):
    """JSON has no infinities: they become the strings "inf" / "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def title(report: dict) -> str:
    model, data = report.get("model"), report.get("data")
    if model and data:
        return f"{model} on {data}"
    return model or data or "linft report"


# ------------------------------------------------------------------------------ text


def _spectrum_lines(report: dict) -> list[str]:
    s = report["spectrum"]
    n = s["size"]
    lo, hi = s["decay_fit_range"]
    return [
        f"kernel over {report['parameters']['count']:,} parameters "
        f"({report['parameters']['tensors']} tensors); training kernel "
        f"{' x '.join(map(str, report['train_kernel_shape']))}",
        "  top eigenvalues: " + ", ".join(_num(v) for v in s["top_eigenvalues"]),
        f"  condition number: {_num(s['condition_number'])}  (lambda_max {_num(s['lambda_max'])},"
        f" lambda_min {_num(s['lambda_min'])}, rank {s['rank']}/{n}"
        + (f", ridge {s['ridge']:.3g})" if s["ridge"] else ")"),
        f"  decay: lambda_j ~ j^-{_num(s['decay_exponent'], '.3g')} (fit over j = {lo}..{hi}); "
        f"effective rank {_num(s['effective_rank'], '.3g')}, "
        f"stable rank {_num(s['stable_rank'], '.3g')}",
    ]


def _selection_lines(report: dict) -> list[str]:
    sel, layers = report["selection"], report["layers"]
    total = sum(row["trace"] for row in layers.values()) or 1.0
    width = max(len(plots.short_name(g)) for g in layers)
    lines = [
        "layer ranking (NTK-greedy: each step adds the module that keeps kappa(K_S + ridge I) "
        "smallest; Weyl bound, the module's own kappa, its share of the trace)",
        "  (a description of the kernels: on MiniLM + SST-2 a low kappa did not forecast a lower "
        "fine-tuning loss, benchmarks/RESULTS_real.md):",
    ]
    steps = zip(sel["groups"], sel["condition_numbers"], sel["bounds"], strict=True)
    for i, (g, kappa, bound) in enumerate(steps, 1):
        own = layers[g]["condition_number"]
        share = layers[g]["trace"] / total
        lines.append(
            f"  {i:>2}. {plots.short_name(g):<{width}}  kappa {_num(kappa):>9}  "
            f"bound {_num(bound):>9}  own {_num(own):>9}  trace {100 * share:.3g}%"
        )
    if "dominant_group" in report:
        lines.append(f"  warning: {report['dominant_group']}")
    if "alignment" in report:
        a = report["alignment"]
        best = max(a["groups"], key=a["groups"].get)
        lines.append(
            f"kernel-target alignment (training split): {a['all']:.3g}; highest group "
            f"{plots.short_name(best)} {a['groups'][best]:.3g}"
        )
    return lines


def _regression_lines(report: dict) -> list[str]:
    reg = report["regression"]
    sgd = reg["sgd"]
    lines = [
        f"kernel regression on {sgd['test']} held-out samples, trained on {sgd['train']} "
        "(ridge chosen by leave-one-out on the training split):"
    ]
    for kind, name in (("sgd", "SGD"), ("signgd", "SignGD")):
        r = reg[kind]
        if "error" in r:
            lines.append(f"  {name:>6} kernel: {r['error']}")
            continue
        lines.append(
            f"  {name:>6} kernel: held-out accuracy {r['test_accuracy']:.3f} at ridge "
            f"{r['ridge']:.3g} ({r['relative_ridge']:.0e} x mean diagonal); leave-one-out "
            f"{r['loo_accuracy']:.3f}"
        )
    if "majority_accuracy" in sgd:
        lines.append(f"  majority class: {sgd['majority_accuracy']:.3f}")
    if "initial_accuracy" in sgd:
        lines.append(
            f"  the model before training (zero-shot with label words): "
            f"{sgd['initial_accuracy']:.3f}"
        )
    return lines


def _loss_lines(report: dict) -> list[str]:
    curve = report["loss_curve"]
    loss = curve["loss"]
    shown = [t for t in LOSS_STEPS_SHOWN if t < len(loss)]
    if shown[-1] != len(loss) - 1:
        shown.append(len(loss) - 1)
    reg = f", regularizer {curve['regularizer']:.3g}" if curve["regularizer"] else ""
    return [
        f"predicted training loss of fine-tuning (linearized full-batch GD, lr {curve['lr']:.3g}"
        f"{reg}):",
        "  " + ", ".join(f"step {t}: {loss[t]:.4g}" for t in shown),
    ]


def format_report(report: dict) -> str:
    """The summary a researcher reads first."""
    lines = _spectrum_lines(report) + _selection_lines(report)
    if "regression" in report:
        lines += _regression_lines(report) + _loss_lines(report)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ html


def figures(report: dict) -> dict[str, bytes]:
    """The report's PNGs by name (empty without matplotlib)."""
    if not plots.available():
        return {}
    figs = {
        "spectrum": plots.spectrum_png(report["spectrum"]),
        "layers": plots.layers_png(report["selection"], report["layers"]),
    }
    if "loss_curve" in report:
        figs["loss"] = plots.loss_png(report["loss_curve"])
    if "regression" in report:
        figs["accuracy"] = plots.accuracy_png(report["regression"])
    return figs


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222;
       padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
pre { background: #f5f5f5; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
img { max-width: 100%; display: block; margin: 0.5rem 0; }
.note { color: #8a4b00; }
"""


def render_html(report: dict, figs: dict[str, bytes], notes: list[str] = ()) -> str:
    captions = {
        "spectrum": "Spectrum of the training kernel, with the power-law fit and the condition "
        "number",
        "layers": "Condition number of each module's kernel, in the order NTK-greedy adds them",
        "loss": "Predicted training loss of (linearized) fine-tuning",
        "accuracy": "Kernel-regression accuracy against the ridge",
    }
    name = html.escape(title(report))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>linft: {name}</title><style>{_CSS}</style></head><body>",
        f"<h1>linft report: {name}</h1>",
        f"<pre>{html.escape(format_report(report))}</pre>",
    ]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    if not figs:
        parts.append('<p class="note">No figures: install matplotlib to draw them.</p>')
    for key, png in figs.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{html.escape(captions.get(key, key))}</h2>")
        parts.append(f'<img id="{key}" alt="{key}" src="data:image/png;base64,{data}">')
    parts.append("<p>Numbers: report.json; kernels: kernel.safetensors.</p></body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- files


def write_outputs(result: Result, out_dir: str | Path, plot: bool = True) -> list[Path]:
    """Print the summary and write every output file; the one place that writes."""
    from safetensors.torch import save_file

    print(format_report(result.report))
    for note in result.notes:
        print(f"note: {note}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "kernel.safetensors", out / "report.html"]
    written[0].write_text(json.dumps(_plain(result.report), indent=1))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in result.tensors.items()}, str(written[1])
    )
    figs = figures(result.report) if plot else {}
    written[2].write_text(render_html(result.report, figs, result.notes))
    for path in written:
        print(f"wrote {path}")
    return written
