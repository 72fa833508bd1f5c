"""The command line: demo and analyze write reports whose numbers match the kernel."""

from __future__ import annotations

import json

import torch
from checks import assert_rel_close
from models import roberta_base_classifier, roberta_classifier
from safetensors.torch import load_file

import linft
from linft.cli import main


def _eigenvalues(K: torch.Tensor) -> torch.Tensor:
    n = K.shape[0] * (K.shape[1] if K.dim() == 4 else 1)
    return torch.linalg.eigvalsh(K.reshape(n, n).double()).flip(0)


def _check_report(out_dir) -> dict:
    report = json.loads((out_dir / "report.json").read_text())
    K = load_file(str(out_dir / "kernel.safetensors"))["kernel"]
    assert list(K.shape) == report["kernel_shape"]
    eig = _eigenvalues(K)
    s = report["spectrum"]
    top = torch.tensor(s["top_eigenvalues"], dtype=torch.float64)
    assert_rel_close(top, eig[: top.numel()], 1e-8, "top eigenvalues")
    assert abs(s["lambda_min"] - float(eig[-1])) <= 1e-8 * float(eig[0])
    if isinstance(s["condition_number"], float):
        assert abs(s["condition_number"] / float(eig[0] / eig[-1]) - 1) < 1e-6
    conds = [report["layers"][n]["condition_number"] for n in report["layer_ranking"]]
    finite = [c for c in conds if isinstance(c, float)]
    assert finite == sorted(finite) and conds[: len(finite)] == finite
    return report


def test_demo_prints_and_writes_a_consistent_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "top eigenvalues" in printed and "condition number" in printed
    report = _check_report(tmp_path)
    assert report["kernel_shape"] == [64, 2, 64, 2]
    assert isinstance(report["spectrum"]["condition_number"], float)  # full rank
    assert (tmp_path / "spectrum.png").stat().st_size > 0


def _save_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(path)
    return fast


def test_analyze_a_local_model_with_an_adapter(tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    base = roberta_base_classifier()
    base.save_pretrained(base_dir)
    peft_model = roberta_classifier(base=base)
    peft_model.save_pretrained(adapter_dir)
    tokenizer = _save_tokenizer(base_dir, peft_model.config.vocab_size)
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(4, 90, (int(n),)))
        for n in torch.randint(2, 9, (6,))
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts))

    code = main(
        [
            "analyze",
            "--model",
            str(base_dir),
            "--adapter",
            str(adapter_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--no-plot",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    _check_report(out)
    # the same kernel computed directly on the in-memory model
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    expected = linft.ntk(peft_model, batch)
    K = load_file(str(out / "kernel.safetensors"))["kernel"]
    assert_rel_close(K, expected, 1e-5, "analyze kernel")
    # the run left a finished checkpoint: all 6 samples done in blocks of 4
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["done"]["rows"] == {"0": 4, "4": 2}
