"""The report's figures as PNG bytes (matplotlib, Agg): spectrum, layers, loss, accuracy."""

from __future__ import annotations

import io
import math

SGD, SIGN, GREY = "#1f5fa8", "#c2571a", "#777777"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "grid.linewidth": 0.6,
        }
    )
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _num(x) -> float:
    return float(x) if not isinstance(x, str) else float(x)  # "inf" / "nan" strings


def short_name(name: str) -> str:
    """``base_model.model.bert.encoder.layer.3.attention.self.query`` ->
    ``layer.3.attention.self.query``; ``base_model.model.classifier`` -> ``classifier``."""
    for marker in ("layers.", "layer.", "h.", "block."):
        at = name.find("." + marker)
        if at >= 0:
            return name[at + 1 :]
    return name.removeprefix("base_model.model.")


def spectrum_png(spec: dict) -> bytes:
    """Eigenvalues on log-log axes, the power-law fit, and lambda_max / lambda_min marked."""
    plt = _pyplot()
    eig = spec["eigenvalues"]
    j = [i + 1 for i, v in enumerate(eig) if v > 0]
    lam = [v for v in eig if v > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.loglog(j, lam, ".", color=SGD, ms=4, label="eigenvalue $\\lambda_j$")
    alpha = _num(spec["decay_exponent"])
    lo, hi = spec["decay_fit_range"]
    if math.isfinite(alpha) and hi > lo:
        logs = [math.log(eig[i - 1]) + alpha * math.log(i) for i in range(lo, hi + 1)]
        c = sum(logs) / len(logs)
        xs = [lo, hi]
        ax.loglog(
            xs,
            [math.exp(c) * x**-alpha for x in xs],
            "-",
            color=SIGN,
            lw=1.6,
            label=f"fit $\\lambda_j \\propto j^{{-{alpha:.2f}}}$ (j = {lo}..{hi})",
        )
    lmax, lmin = spec["lambda_max"], spec["lambda_min"]
    ax.axhline(lmax, color=GREY, ls="--", lw=0.8)
    kappa = _num(spec["condition_number"])
    text = (
        f"condition number {kappa:.3g}"
        if math.isfinite(kappa)
        else f"condition number inf (rank {spec['rank']} of {spec['size']})"
    )
    if spec.get("ridge"):
        text += f" (ridge {spec['ridge']:.2g})"
    if lmin > 0:
        ax.axhline(lmin, color=GREY, ls="--", lw=0.8)
        ax.annotate(
            "",
            xy=(1.0, lmin),
            xytext=(1.0, lmax),
            xycoords=("axes fraction", "data"),
            arrowprops=dict(arrowstyle="<->", color=GREY, lw=1.0),
        )
    ax.text(
        0.96, 0.78, text, transform=ax.transAxes, ha="right", va="center", color="#333333",
        bbox=dict(boxstyle="round,pad=0.3", fc="white", ec=GREY, lw=0.6),
    )  # fmt: skip
    for value, name in ((lmax, "$\\lambda_{max}$"), (lmin, "$\\lambda_{min}$")):
        if value > 0:
            ax.text(1.01, value, name, transform=ax.get_yaxis_transform(), ha="left",
                    va="center", color=GREY, fontsize=9, clip_on=False)  # fmt: skip
    ax.set_xlabel("index j")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"eNTK spectrum of the training kernel ({spec['size']} x {spec['size']})")
    ax.legend(loc="lower left", frameon=False)
    return _png(fig)


def layers_png(selection: dict, layers: dict) -> bytes:
    """Each module's own condition number, in NTK-greedy order (best first)."""
    plt = _pyplot()
    order = list(selection["groups"]) + [g for g in layers if g not in selection["groups"]]
    kappas = [_num(layers[g]["condition_number"]) for g in order]
    finite = [k for k in kappas if math.isfinite(k)] or [1.0]
    top = max(finite) * 3
    height = max(2.6, 0.28 * len(order) + 1.2)
    fig, ax = plt.subplots(figsize=(6.4, height))
    ys = list(range(len(order)))[::-1]
    vals = [k if math.isfinite(k) else top for k in kappas]
    colors = [SGD if math.isfinite(k) else GREY for k in kappas]
    ax.barh(ys, vals, color=colors, height=0.65)
    ax.set_xscale("log")
    ax.set_yticks(ys, [f"{i + 1}. {short_name(g)}" for i, g in enumerate(order)])
    for y, k, v in zip(ys, kappas, vals, strict=True):
        ax.text(v, y, f" {k:.3g}" if math.isfinite(k) else " inf", va="center", fontsize=8)
    ax.set_xlim(right=top * 1.5)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("condition number of the module's own kernel")
    ax.set_title("Modules in NTK-greedy order (1 = tune first)")
    return _png(fig)


def loss_png(curve: dict, floor: float | None = None) -> bytes:
    """The predicted training loss of linearized full-batch GD."""
    plt = _pyplot()
    loss = curve["loss"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(range(len(loss)), loss, color=SGD, lw=1.8, label="linearized GD (SGD kernel)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, len(loss) - 1)
    if floor is not None:
        ax.axhline(floor, color=GREY, ls=":", lw=1, label=f"limit {floor:.3g}")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss  $\\sum_i \\|f(x_i) - y_i\\|^2 \\,/\\, 2N$")
    reg = curve["regularizer"]
    ax.set_title(
        f"Predicted fine-tuning loss (lr {curve['lr']:.3g}"
        + (f", regularizer {reg:.2g})" if reg else ")")
    )
    ax.legend(frameon=False)
    return _png(fig)


def accuracy_png(regression: dict) -> bytes:
    """Held-out and leave-one-out accuracy of kernel regression against the ridge."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for kind, color, label in (("sgd", SGD, "SGD kernel"), ("signgd", SIGN, "SignGD kernel")):
        reg = regression.get(kind)
        if not reg:
            continue
        rows = [r for r in reg["grid"] if "skipped" not in r]
        xs = [r["relative_ridge"] for r in rows]
        ax.plot(
            xs, [r["test_accuracy"] for r in rows], "o-", color=color, label=f"{label}, held out"
        )
        ax.plot(
            xs, [r["loo_accuracy"] for r in rows], "--", color=color, alpha=0.7,
            label=f"{label}, leave-one-out on train",
        )  # fmt: skip
        if "chosen" in reg:
            best = reg["grid"][reg["chosen"]]
            ax.plot(
                [best["relative_ridge"]], [best["test_accuracy"]], "*", ms=14, color=color,
                markeredgecolor="black", zorder=5,
            )  # fmt: skip
    sgd = regression.get("sgd", {})
    if "majority_accuracy" in sgd:
        ax.axhline(sgd["majority_accuracy"], color=GREY, ls=":", lw=1, label="majority class")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("ridge / mean diagonal of K_train")
    ax.set_ylabel("accuracy")
    ax.set_title("eNTK kernel regression (star: ridge chosen on train)")
    ax.legend(frameon=False, fontsize=8, loc="lower left")
    return _png(fig)
