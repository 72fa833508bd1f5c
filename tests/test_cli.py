"""The command line: ``linft analyze`` on the folders people have (base + adapter, an
adapter alone, a fresh ``--lora-r``), labels from TSV / CSV / JSONL, numbers that match
a recomputation, and one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from checks import assert_rel_close
from models import (
    LABEL_WORDS,
    gpt2,
    roberta_base_classifier,
    roberta_classifier,
    roberta_mlm,
    trainable_names,
)
from safetensors.torch import load_file

import linft
from linft.cli import main

# ----------------------------------------------------------------------------- helpers


def _eigenvalues(K: torch.Tensor) -> torch.Tensor:
    n = K.shape[0] * (K.shape[1] if K.dim() == 4 else 1)
    return torch.linalg.eigvalsh(K.reshape(n, n).double()).flip(0)


def _train_block(K: torch.Tensor, report: dict) -> torch.Tensor:
    tr = torch.tensor(report["split"]["train"])
    return K[tr][:, :, tr]


def check_report(out_dir) -> dict:
    """The report's spectrum and layer ranking against the saved kernel, recomputed."""
    report = json.loads((out_dir / "report.json").read_text())
    tensors = load_file(str(out_dir / "kernel.safetensors"))
    K = tensors["kernel"]
    assert list(K.shape) == report["kernel_shape"]
    eig = _eigenvalues(_train_block(K, report))
    s = report["spectrum"]
    top = torch.tensor(s["top_eigenvalues"], dtype=torch.float64)
    assert_rel_close(top, eig[: top.numel()], 1e-8, "top eigenvalues")
    assert abs(s["lambda_min"] - float(eig[-1])) <= 1e-8 * float(eig[0])
    if isinstance(s["condition_number"], float):
        assert abs(s["condition_number"] / float(eig[0] / eig[-1]) - 1) < 1e-6
    sel = report["selection"]
    assert sorted(sel["groups"]) == sorted(report["layers"]) == sorted(sel["table"])
    # the first greedy pick is the module whose own kernel is best conditioned
    own = {g: row["condition_number"] for g, row in sel["table"].items()}
    finite = {g: v for g, v in own.items() if isinstance(v, float)}
    if finite:
        assert own[sel["groups"][0]] == min(finite.values())
    assert (out_dir / "report.html").stat().st_size > 0
    # trace shares from the groups' own kernels; alignment recomputed from the saved kernel
    shares = report["trace_shares"]
    total = sum(row["trace"] for row in report["layers"].values())
    for g, share in shares.items():
        assert abs(share - report["layers"][g]["trace"] / total) <= 1e-9
    if "labels" in report:
        tr = torch.tensor(report["split"]["train"])
        Ktr = _train_block(K, report).double()
        n, c = Ktr.shape[:2]
        y = torch.tensor(report["labels"])[tr]
        Y = torch.nn.functional.one_hot(y, c).double() if c > 1 else (2.0 * y.double() - 1)[:, None]
        v = (Y - Y.mean(0)).reshape(-1)
        M = Ktr.reshape(n * c, -1)
        expected = float(v @ M @ v) / (float(torch.linalg.matrix_norm(M)) * float(v @ v))
        assert abs(report["alignment"]["all"] - expected) <= 1e-9
        assert set(report["alignment"]["groups"]) == set(shares)
    return report


def check_labelled(out_dir, report: dict) -> None:
    """Held-out accuracy, leave-one-out accuracy and the loss curve, recomputed from the
    saved kernels with linft.kernel_regression / linearized_loss and explicit refits."""
    tensors = load_file(str(out_dir / "kernel.safetensors"))
    f0 = tensors["f0"]
    labels = torch.tensor(report["labels"])
    tr, te = torch.tensor(report["split"]["train"]), torch.tensor(report["split"]["test"])
    c = f0.shape[1]
    Y = torch.nn.functional.one_hot(labels, c).double() if c > 1 else (2.0 * labels - 1)[:, None]
    for kind, key in (("sgd", "kernel"), ("signgd", "kernel_signgd")):
        K, reg = tensors[key].double(), report["regression"][kind]
        r = reg["ridge"]
        pred = linft.kernel_regression(
            K[tr][:, :, tr], Y[tr], K_test=K[te][:, :, tr], ridge=r, f0=f0[tr], f0_test=f0[te]
        )
        acc = float((pred.argmax(1) == labels[te]).double().mean())
        assert acc == reg["test_accuracy"], kind
        # leave-one-out by refitting without each training sample
        hits = 0
        for i in range(tr.numel()):
            rest = torch.cat([tr[:i], tr[i + 1 :]])
            one = tr[i : i + 1]
            p = linft.kernel_regression(
                K[rest][:, :, rest], Y[rest], K_test=K[one][:, :, rest], ridge=r,
                f0=f0[rest], f0_test=f0[one],
            )  # fmt: skip
            hits += int(p.argmax(1).item() == labels[one].item())
        assert hits / tr.numel() == pytest.approx(reg["loo_accuracy"], abs=1e-12), kind
    curve = report["loss_curve"]
    K_tr = tensors["kernel"].double()[tr][:, :, tr]
    expected = linft.linearized_loss(
        K_tr, f0[tr] - Y[tr], lr=curve["lr"], steps=curve["steps"], ridge=curve["regularizer"]
    )
    assert_rel_close(
        torch.tensor(curve["loss"], dtype=torch.float64), expected, 1e-10, "loss curve"
    )


def save_tokenizer(path, vocab_size: int, pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"w{i}": i for i in range(5, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, **special, **({"pad_token": "<pad>"} if pad else {})
    )
    fast.save_pretrained(path)
    return fast


def texts(n: int, mask: bool = False) -> list[str]:
    out = []
    for length in torch.randint(3, 9, (n,)).tolist():
        words = [f"w{int(i)}" for i in torch.randint(5, 90, (length,))]
        if mask:
            words[int(torch.randint(0, length, ()))] = "<mask>"
        out.append(" ".join(words))
    return out


def write_data(path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)


def labelled_rows(n: int, classes: int = 3) -> list[dict]:
    labels = torch.randint(0, classes, (n,)).tolist()
    labels[:classes] = range(classes)  # every class present
    return [{"text": t, "label": y} for t, y in zip(texts(n), labels, strict=True)]


def run(*args) -> int:
    return main(["analyze", *map(str, args), "--device", "cpu"])


def batch_of(tokenizer, rows) -> dict:
    return dict(tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt"))


@pytest.fixture
def base_and_adapter(tmp_path):
    """A saved RoBERTa classifier (with tokenizer) and a peft adapter trained on it
    (LoRA with non-zero B and a trainable head)."""
    from transformers import AutoModelForSequenceClassification

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    roberta_base_classifier().save_pretrained(base_dir)
    # loaded from its folder, as people do: adapter_config.json then names that folder
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    peft_model = roberta_classifier(base=base)
    peft_model.save_pretrained(adapter_dir)
    tokenizer = save_tokenizer(base_dir, peft_model.config.vocab_size)
    return base_dir, adapter_dir, peft_model, tokenizer


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("how", "suffix"),
    [("base+adapter", ".tsv"), ("adapter-folder", ".csv"), ("base+adapter", ".jsonl")],
)
def test_analyze_an_adapter_with_labels(tmp_path, base_and_adapter, how, suffix):
    base_dir, adapter_dir, peft_model, tokenizer = base_and_adapter
    rows = labelled_rows(13)  # odd: blocks of 4 leave a block of 1
    data = (tmp_path / "data").with_suffix(suffix)
    write_data(data, rows)
    out = tmp_path / "out"
    model_args = ["--model", base_dir, "--adapter", adapter_dir]
    if how == "adapter-folder":
        model_args = ["--model", adapter_dir]  # base found in adapter_config.json
    code = run(*model_args, "--data", data, "--label-field", "label", "--out", out,
               "--batch-size", 4, "--no-plot", "--steps", 50)  # fmt: skip
    assert code == 0
    report = check_report(out)
    # the adapter's LoRA weights and its head were differentiated, nothing else
    assert report["parameters"]["names"] == trainable_names(peft_model)
    assert report["parameters"]["lora_tensors"] == 8
    K = load_file(str(out / "kernel.safetensors"))["kernel"]
    expected = linft.ntk(peft_model, batch_of(tokenizer, rows))
    assert_rel_close(K, expected, 1e-5, "analyze kernel")
    check_labelled(out, report)
    assert not (out / "checkpoint").exists()  # removed after success


def test_lora_r_trains_the_head_and_a_rerun_resumes(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base_dir = tmp_path / "base"
    roberta_base_classifier(num_labels=2).save_pretrained(base_dir)
    tokenizer = save_tokenizer(base_dir, 97)
    rows = labelled_rows(9, classes=2)
    data = tmp_path / "data.jsonl"
    write_data(data, rows)
    out = tmp_path / "out"
    args = ["--model", base_dir, "--lora-r", 2, "--target-modules", "query,value", "--seed", 7,
            "--data", data, "--label-field", "label", "--out", out, "--no-plot",
            "--keep-checkpoint", "--steps", 20]  # fmt: skip
    assert run(*args) == 0
    report = check_report(out)
    names = report["parameters"]["names"]
    assert sum("lora_" in n for n in names) == 8  # A and B of query, value in 2 layers
    head = [n for n in names if "lora_" not in n]
    assert head and all("classifier" in n for n in head)  # the head is trainable too
    # the same seed builds the same adapter: the kernel of an in-process twin
    torch.manual_seed(7)
    twin = AutoModelForSequenceClassification.from_pretrained(base_dir)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                        task_type=TaskType.SEQ_CLS)  # fmt: skip
    twin = get_peft_model(twin, config)
    assert trainable_names(twin) == names
    K = load_file(str(out / "kernel.safetensors"))["kernel"]
    assert_rel_close(K, linft.ntk(twin, batch_of(tokenizer, rows)), 1e-5, "--lora-r kernel")
    check_labelled(out, report)
    # a rerun finds the checkpoint of the same computation (same seeded weights) and uses it
    meta = out / "checkpoint" / "sgd" / "meta.json"
    key = json.loads(meta.read_text())["key"]
    assert run(*args) == 0
    assert json.loads(meta.read_text())["key"] == key
    assert_rel_close(load_file(str(out / "kernel.safetensors"))["kernel"], K, 0.0, "rerun")


def test_pad_token_is_set_where_the_tokenizer_has_none(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    base_dir, out = tmp_path / "base", tmp_path / "out"
    config = GPT2Config(vocab_size=97, n_positions=40, n_embd=24, n_layer=2, n_head=2,
                        num_labels=2)  # fmt: skip
    GPT2ForSequenceClassification(config).save_pretrained(base_dir)
    tokenizer = save_tokenizer(base_dir, 97, pad=False)
    rows = [{"text": t} for t in texts(5)]
    data = tmp_path / "data.jsonl"
    write_data(data, rows)
    args = ["--model", base_dir, "--lora-r", 2, "--target-modules", "c_attn", "--data", data,
            "--out", out, "--no-plot", "--no-checkpoint"]  # fmt: skip
    assert run(*args) == 0
    report = check_report(out)
    assert report["kernel_shape"] == [5, 2, 5, 2]
    # the classifier reads the last real token, found by the pad id given to the model
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    twin = GPT2ForSequenceClassification.from_pretrained(base_dir)
    twin.config.pad_token_id = tokenizer.eos_token_id
    twin = get_peft_model(twin, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                           task_type=TaskType.SEQ_CLS))  # fmt: skip
    tokenizer.pad_token = tokenizer.eos_token
    batch = batch_of(tokenizer, rows)
    assert (batch["attention_mask"] == 0).any()  # padded
    K = load_file(str(out / "kernel.safetensors"))["kernel"]
    assert_rel_close(K, linft.ntk(twin, batch), 1e-5, "gpt2 kernel")


@pytest.mark.parametrize("kind", ["last-token", "mask-token"])
def test_analyze_language_model_outputs(tmp_path, kind):
    from transformers import GPT2Config, GPT2LMHeadModel, RobertaForMaskedLM

    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    if kind == "last-token":
        cfg = GPT2Config(vocab_size=97, n_positions=40, n_embd=24, n_layer=2, n_head=2)
        GPT2LMHeadModel(cfg).save_pretrained(base_dir)
        peft_model, output = gpt2(base=GPT2LMHeadModel.from_pretrained(base_dir))
    else:
        RobertaForMaskedLM(roberta_base_classifier().config).save_pretrained(base_dir)
        peft_model, output = roberta_mlm(base=RobertaForMaskedLM.from_pretrained(base_dir))
    peft_model.save_pretrained(adapter_dir)
    tokenizer = save_tokenizer(base_dir, 97)
    words = [f"w{i}" for i in LABEL_WORDS]
    rows = [
        {"text": t, "label": words[i % 3]} for i, t in enumerate(texts(7, kind == "mask-token"))
    ]
    data = tmp_path / "data.tsv"
    write_data(data, rows)
    args = ["--model", adapter_dir, "--data", data, "--out", out, "--output", kind,
            "--label-words", ",".join(words), "--label-field", "label", "--no-plot"]  # fmt: skip
    assert run(*args) == 0
    report = check_report(out)
    assert report["kernel_shape"] == [7, 3, 7, 3]
    assert report["classes"] == words
    assert report["labels"] == [i % 3 for i in range(7)]
    expected = linft.ntk(peft_model, batch_of(tokenizer, rows), output=output)
    K = load_file(str(out / "kernel.safetensors"))["kernel"]
    assert_rel_close(K, expected, 1e-5, kind)
    check_labelled(out, report)


# ------------------------------------------------------------------------------ errors


def _error_case(tmp_path, case: str, base_dir, adapter_dir) -> list[str]:
    data = tmp_path / "data.jsonl"
    write_data(data, labelled_rows(6))
    out = tmp_path / "out"
    common = ["--data", data, "--out", out]
    if case == "missing --model":
        return ["--data", data, "--out", out]
    if case == "no such model":
        return ["--model", tmp_path / "nowhere", *common]
    if case == "data suffix":
        bad = tmp_path / "data.txt"
        bad.write_text("hello\n")
        return ["--model", base_dir, "--data", bad, "--out", out]
    if case == "no text field":
        return ["--model", base_dir, *common, "--text-field", "sentence"]
    if case == "no label field":
        return ["--model", adapter_dir, *common, "--label-field", "y"]
    if case == "empty label":
        rows = labelled_rows(6)
        rows[3]["label"] = ""
        write_data(data, rows)
        return ["--model", adapter_dir, *common, "--label-field", "label"]
    if case == "multi-token label word":
        return ["--model", adapter_dir, *common, "--output", "mask-token", "--label-words",
                "w11,w23 w42"]  # fmt: skip
    if case == "mask-token without words":
        return ["--model", adapter_dir, *common, "--output", "mask-token"]
    if case == "adapter twice":
        return ["--model", adapter_dir, "--adapter", adapter_dir, *common]
    if case == "lora-r on an adapter":
        return ["--model", adapter_dir, "--lora-r", 2, *common]
    if case == "base of the adapter missing":
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "gone")
        (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
        return ["--model", adapter_dir, *common]
    if case == "too many classes":
        write_data(data, labelled_rows(8, classes=5))  # the head has 3 outputs
        return ["--model", adapter_dir, *common, "--label-field", "label"]
    if case == "bad split":
        return ["--model", adapter_dir, *common, "--label-field", "label", "--test-fraction", 1.5]
    if case == "bad params":
        return ["--model", adapter_dir, *common, "--params", "nothing.*"]
    raise KeyError(case)


ERROR_CASES = [
    "missing --model", "no such model", "data suffix", "no text field", "no label field",
    "empty label", "multi-token label word", "mask-token without words", "adapter twice",
    "lora-r on an adapter", "base of the adapter missing", "too many classes", "bad split",
    "bad params",
]  # fmt: skip


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, base_and_adapter, case):
    base_dir, adapter_dir, _, _ = base_and_adapter
    if case == "multi-token label word":  # a masked LM adapter, so that label words apply
        from transformers import RobertaForMaskedLM

        base_dir = tmp_path / "mlm"
        RobertaForMaskedLM(roberta_base_classifier().config).save_pretrained(base_dir)
        save_tokenizer(base_dir, 97)
        adapter_dir = tmp_path / "mlm_adapter"
        base = RobertaForMaskedLM.from_pretrained(base_dir)
        roberta_mlm(base=base)[0].save_pretrained(adapter_dir)
    args = _error_case(tmp_path, case, base_dir, adapter_dir)
    with pytest.raises(SystemExit) if case == "missing --model" else _no_exit() as exited:
        code = run(*args)
    if case == "missing --model":
        code = exited.value.code
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("linft") and "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("args", [["--samples", "1000"], ["--samples", "1"], ["--bogus"]])
def test_demo_errors_are_one_line_and_exit_2(capsys, args):
    try:
        code = main(["demo", *args])
    except SystemExit as exited:  # argparse
        code = exited.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("linft")


def _bad_input(tmp_path, case: str) -> tuple[list, list[str]]:
    """Arguments of one bad input and the words its one-line error must hold."""
    data = tmp_path / "data.csv"
    rows = labelled_rows(6)
    write_data(data, rows)
    if case == "not utf-8":
        text = data.read_bytes().replace(b"w1", b"caf\xe9", 1)  # Latin-1, row 1 or later
        line = text[: text.index(b"\xe9")].count(b"\n") + 1
        data.write_bytes(text)
        return ["--data", data], [str(data), f"line {line}", "not UTF-8", "save the file as UTF-8"]
    if case == "nan label":
        rows[4]["label"] = "nan"
        write_data(data, rows)
        return ["--data", data], [str(data), "row 5", "'nan'", "missing", "give the row its label"]
    if case == "max-samples 0":
        return ["--data", data, "--max-samples", 0], ["--max-samples", "at least 1", "'0'"]
    if case == "lora-r 0":
        return ["--data", data, "--lora-r", 0], ["--lora-r", "at least 1", "leave it out"]
    raise KeyError(case)


@pytest.mark.parametrize("case", ["not utf-8", "nan label", "max-samples 0", "lora-r 0"])
def test_bad_input_names_the_cause_and_the_fix(tmp_path, capsys, base_and_adapter, case):
    _, adapter_dir, _, _ = base_and_adapter
    args, words = _bad_input(tmp_path, case)
    out = tmp_path / "out"
    capsys.readouterr()  # what building the fixture printed
    try:
        code = run("--model", adapter_dir, *args, "--label-field", "label", "--out", out)
    except SystemExit as exited:  # argparse
        code = exited.code
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (out / "report.json").exists()


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_a_byte_order_mark_is_read(tmp_path, suffix):
    """Spreadsheet programs start UTF-8 files with a BOM: the header is still 'text'."""
    from linft.cli.load import read_table

    rows = labelled_rows(5)
    rows[2]["text"] = "crème brûlée"
    path = (tmp_path / "data").with_suffix(suffix)
    write_data(path, rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    table = read_table(path, "text", "label")
    assert table.texts == [r["text"] for r in rows]
    assert table.labels == [str(r["label"]) for r in rows]


def test_a_group_holding_nearly_all_of_the_trace_is_named_with_the_ranking():
    from linft.cli.analysis import dominance_note
    from linft.cli.report import _selection_lines

    shares = {"head": 0.997, "layer.0.query": 0.002, "layer.0.value": 0.001}
    note = dominance_note(shares, ["layer.0.query", "layer.0.value", "head"])
    assert "head holds 99.7% of the kernel's trace" in note and "puts it 3 of 3" in note
    assert dominance_note({"a": 0.6, "b": 0.4}, ["a", "b"]) is None
    report = {
        "selection": {"groups": ["a", "b"], "condition_numbers": [2.0, 3.0], "bounds": [2.0, 3.0]},
        "layers": {"a": {"trace": 1.0, "condition_number": 2.0},
                   "b": {"trace": 99.0, "condition_number": 5.0}},
        "dominant_group": note,
    }  # fmt: skip
    lines = _selection_lines(report)
    assert lines[-1] == f"  warning: {note}"  # right under the ranking it qualifies
