"""Loading what ``linft analyze`` works on: the model (base, adapter, fresh LoRA), the
tokenizer, the data table and its labels, and how ``f(x)`` is read off the model."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


class CLIError(ValueError):
    """A problem with the command line's input; the message names it and the fix."""


# --------------------------------------------------------------------------- data


@dataclass
class Table:
    """The rows of a data file: texts, and labels / split names when asked for."""

    texts: list[str]
    labels: list[str] | None = None
    splits: list[str] | None = None


def _text(path: Path) -> str:
    """The file as UTF-8 text; a byte-order mark (as spreadsheet programs write) is skipped."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CLIError(
            f"{path} line {line} is not UTF-8 (byte 0x{data[err.start]:02x}); save the file as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        raise CLIError(f"--data {path} is not a file; pass a .jsonl, .csv or .tsv file")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{path} line {number} is not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise CLIError(f"{path} line {number} is not a JSON object with named fields")
            records.append(record)
        return records
    if path.suffix in (".csv", ".tsv"):
        lines = io.StringIO(_text(path), newline="")
        return list(csv.DictReader(lines, delimiter="\t" if path.suffix == ".tsv" else ","))
    raise CLIError(f"--data {path} is not .jsonl, .csv or .tsv; convert it to one of these")


def _column(records: list[dict], path: Path, field: str, option: str) -> list[str]:
    fields = sorted(records[0]) if records else []
    for number, record in enumerate(records, 1):
        value = record.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            what = "has no" if field not in record else "has an empty"
            raise CLIError(
                f"{path} row {number} {what} field {field!r} (fields: {', '.join(fields)}); "
                f"fill it in or pass {option} naming another field"
            )
    if option == "--label-field":
        for number, record in enumerate(records, 1):
            if _missing(record[field]):
                raise CLIError(
                    f"{path} row {number} has the label {record[field]!r} in field {field!r}, "
                    "a missing value; give the row its label or remove it"
                )
    return [r[field] if isinstance(r[field], str) else json.dumps(r[field]) for r in records]


def _missing(value: object) -> bool:
    """NaN as a table or a JSON writer spells a missing number."""
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("nan", "-nan", "na", "n/a")


def read_table(
    path: str | Path,
    text_field: str,
    label_field: str | None = None,
    split_field: str | None = None,
) -> Table:
    """The texts (and labels, split names) of a ``.jsonl``, ``.csv`` or ``.tsv`` file."""
    path = Path(path)
    records = _records(path)
    if not records:
        raise CLIError(f"--data {path} has no rows")
    texts = _column(records, path, text_field, "--text-field")
    labels = _column(records, path, label_field, "--label-field") if label_field else None
    splits = _column(records, path, split_field, "--split-field") if split_field else None
    return Table(texts, [v.strip() for v in labels] if labels else None, splits)


def encode_labels(values: list[str], label_words: list[str] | None = None) -> tuple[list, list]:
    """``(class index per row, class names)``.

    Label words name the classes when every label is one of them; labels that are
    all integers >= 0 are their own indices; otherwise classes are the sorted
    distinct labels.
    """
    if label_words and set(values) <= set(label_words):
        classes = list(label_words)
    elif all(v.isdigit() for v in values):
        classes = [str(i) for i in range(max(int(v) for v in values) + 1)]
        return [int(v) for v in values], classes
    else:
        classes = sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    return [index[v] for v in values], classes


def split_rows(
    n: int, splits: list[str] | None, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train indices, held-out indices)``: from a split column (``train`` / ``test``),
    else a seeded random ``test_fraction`` of the rows."""
    if splits is not None:
        unknown = sorted(set(splits) - {"train", "test"})
        if unknown:
            raise CLIError(
                f"the split field has values {unknown}; use 'train' and 'test' (held out)"
            )
        train = torch.tensor([i for i, s in enumerate(splits) if s == "train"], dtype=torch.long)
        test = torch.tensor([i for i, s in enumerate(splits) if s == "test"], dtype=torch.long)
    else:
        if not 0 < test_fraction < 1:
            raise CLIError(f"--test-fraction must lie in (0, 1), got {test_fraction}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_test = min(n - 2, max(1, round(test_fraction * n)))
        test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    if train.numel() < 2 or test.numel() < 1:
        raise CLIError(
            f"{n} labelled rows give {train.numel()} training and {test.numel()} held-out "
            "samples; kernel regression needs at least 2 and 1: give more rows"
        )
    return train, test


# -------------------------------------------------------------------------- model


@dataclass
class ModelSpec:
    """Where the model comes from and how it is adapted (the command line's options)."""

    model: str
    output: str = "logits"  # "logits" | "last-token" | "mask-token"
    adapter: str | None = None
    lora_r: int = 0
    target_modules: str | None = None
    num_labels: int | None = None  # classes in the data, for a new classification head
    seed: int = 0
    device: str = "cpu"


def adapter_base(directory: Path) -> str | None:
    """The base model a peft adapter folder was trained on, or None for a model folder."""
    config = directory / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise CLIError(
            f"{config} names no base_model_name_or_path; pass --model BASE_DIR "
            f"--adapter {directory}"
        )
    return base


def _auto_class(output: str):
    import transformers

    return {
        "logits": transformers.AutoModelForSequenceClassification,
        "last-token": transformers.AutoModelForCausalLM,
        "mask-token": transformers.AutoModelForMaskedLM,
    }[output]


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _load_base(base: str, spec: ModelSpec, adapter: Path | None):
    from transformers import AutoConfig

    kwargs = {}
    if adapter is not None and Path(base).is_absolute() and not Path(base).is_dir():
        raise CLIError(
            f"the base model {base} named in {adapter}/adapter_config.json is not a folder "
            f"here; pass --model BASE_DIR --adapter {adapter}"
        )
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        where = f" (named in {adapter}/adapter_config.json)" if adapter else ""
        raise CLIError(
            f"cannot load the model {base!r}{where}: {_one_line(err)}; pass a local Hugging Face "
            "model folder"
            + (f" as --model and the adapter as --adapter {adapter}" if adapter else "")
        ) from None
    has_head = any("ForSequenceClassification" in a for a in config.architectures or [])
    if spec.output == "logits" and spec.num_labels and not has_head and adapter is None:
        kwargs["num_labels"] = spec.num_labels  # the new head gets one output per class
    with warnings.catch_warnings():
        # "Some weights ... newly initialized": the new head is what --lora-r trains
        warnings.simplefilter("ignore")
        return _auto_class(spec.output).from_pretrained(base, **kwargs)


def _tokenizer(*folders: Path | str):
    from transformers import AutoTokenizer

    for folder in folders:
        if folder is not None and (Path(folder) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    try:
        return AutoTokenizer.from_pretrained(folders[-1])
    except (OSError, ValueError) as err:
        raise CLIError(
            f"no tokenizer found in {', '.join(map(str, filter(None, folders)))}: "
            f"{_one_line(err)}; save the tokenizer into the model folder "
            "(tokenizer.save_pretrained)"
        ) from None


def _set_pad_token(tokenizer, model) -> None:
    """Batches are padded, so the tokenizer needs a pad token and the model must know its id
    (a causal LM's sequence classifier finds the last real token by it)."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CLIError(
                "the tokenizer has no pad, eos or unk token to pad with; add one "
                "(tokenizer.add_special_tokens({'pad_token': ...})) and save it"
            )
        tokenizer.pad_token = fallback
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


@contextlib.contextmanager
def peft_notice_filtered():
    """peft asks transformers for a renamed attribute (``is_gradient_checkpointing``) when it
    wraps a model: a FutureWarning that nothing in linft or the user's call can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        yield


def _fresh_lora(model, spec: ModelSpec):
    from peft import LoraConfig, TaskType, get_peft_model

    targets = spec.target_modules.split(",") if spec.target_modules else None
    # SEQ_CLS adds the classification head (classifier / score) to modules_to_save, so it
    # is trained next to the LoRA weights, as in peft's sequence-classification recipe.
    task = TaskType.SEQ_CLS if spec.output == "logits" else None
    config = LoraConfig(
        r=spec.lora_r, lora_alpha=2 * spec.lora_r, target_modules=targets, task_type=task
    )
    try:
        with peft_notice_filtered():
            return get_peft_model(model, config)
    except ValueError as err:
        raise CLIError(f"--lora-r: {_one_line(err)}; pass --target-modules") from None


def gguf_source(path: Path) -> tuple[Path, str] | None:
    """``(folder, file name)`` when ``--model`` is a GGUF file, or a folder holding one and no
    ``config.json`` (a Hugging Face folder wins); None otherwise."""
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(f.name for f in path.glob("*.gguf"))
    if len(found) > 1:
        raise CLIError(
            f"--model {path} holds {len(found)} GGUF files ({', '.join(found)}); pass one of "
            "them as --model"
        )
    return (path, found[0]) if found else None


def _load_gguf(folder: Path, name: str, spec: ModelSpec):
    """A causal LM and its tokenizer from a GGUF file, dequantized to float32 by
    transformers (which needs the ``gguf`` package)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise CLIError(
            f"--model {folder / name} is a GGUF file, which transformers reads with the gguf "
            "package: pip install gguf"
        )
    if spec.output != "last-token":
        raise CLIError(
            f"--model {folder / name} is a causal language model: its outputs are the label "
            "words' logits at the last token (--output last-token --label-words w1,w2)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as err:
        raise CLIError(
            f"cannot load the GGUF file {folder / name}: {_one_line(err)}; pass a GGUF file of "
            "an architecture transformers reads (llama, mistral, qwen2, gemma, ...)"
        ) from None
    return model, tokenizer


def load_model(spec: ModelSpec):
    """``(model, tokenizer, adapter folder or None)``.

    ``--model`` may be a model folder (``config.json``), a GGUF file (or a folder with one:
    a causal LM dequantized to float32) or a peft adapter folder
    (``adapter_config.json``): then its base model is loaded from
    ``base_model_name_or_path`` and the adapter on top of it, trainable. A fresh
    ``--lora-r`` adapter is seeded (``--seed``), as is a new classification head, so
    a rerun builds the same weights and resumes from its checkpoint.
    """
    folder = Path(spec.model)
    gguf = gguf_source(folder)
    if gguf is None and not folder.is_dir():
        raise CLIError(
            f"--model {folder} is not a folder; pass a local Hugging Face model folder "
            "(config.json), a peft adapter folder (adapter_config.json) or a GGUF file"
        )
    adapter = Path(spec.adapter) if spec.adapter else None
    if gguf is not None:
        _check_adapter(adapter, spec)
        torch.manual_seed(spec.seed)
        return _adapted(*_load_gguf(*gguf, spec), adapter, spec)
    base = adapter_base(folder)
    if base is not None:
        if adapter is not None:
            raise CLIError(
                f"--model {folder} is itself a peft adapter; pass its base model as --model "
                "or drop --adapter"
            )
        adapter = folder
    else:
        base = str(folder)
    _check_adapter(adapter, spec)
    torch.manual_seed(spec.seed)  # a new head and a new LoRA adapter are the same on a rerun
    model = _load_base(base, spec, adapter)
    return _adapted(model, _tokenizer(adapter, base), adapter, spec)


def _check_adapter(adapter: Path | None, spec: ModelSpec) -> None:
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise CLIError(
            f"--adapter {adapter} has no adapter_config.json; pass a peft adapter folder"
        )
    if adapter is not None and spec.lora_r:
        raise CLIError(
            f"--lora-r adds a new adapter, but {adapter} is one already; drop --lora-r to analyze "
            "that adapter, or pass its base model alone"
        )


def _adapted(model, tokenizer, adapter: Path | None, spec: ModelSpec):
    """The loaded model with its adapter (trainable) or a new ``--lora-r`` one."""
    _set_pad_token(tokenizer, model)
    if adapter is not None:
        from peft import PeftModel

        with peft_notice_filtered():
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    elif spec.lora_r:
        model = _fresh_lora(model, spec)
    return model.to(spec.device), tokenizer, adapter


# ------------------------------------------------------------------------ outputs


def prompts(texts: list[str], template: str) -> list[str]:
    """Each text put into ``template`` at ``{text}`` (``\\n`` and ``\\t`` as typed on a command
    line are a newline and a tab)."""
    if "{text}" not in template:
        raise CLIError(
            f"--template {template!r} has no {{text}}; mark where each text goes, e.g. "
            "'Review: {text}\\nSentiment:'"
        )
    template = template.replace("\\n", "\n").replace("\\t", "\t")
    return [template.replace("{text}", t) for t in texts]


def next_words(words: list[str], prompt: str) -> list[str]:
    """The label words as the word after ``prompt`` is written: with a leading space unless
    the prompt ends in whitespace or the word has one (``Sentiment:`` + `` positive``)."""
    if not prompt or prompt[-1].isspace():
        return list(words)
    return [w if w[:1].isspace() else " " + w for w in words]


def label_token_ids(tokenizer, words: list[str]) -> list[int]:
    """One vocabulary id per label word; a word the tokenizer splits is an error."""
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = tokenizer.convert_ids_to_tokens(pieces)
            raise CLIError(
                f"label word {word!r} is {len(pieces)} tokens {shown}, not one; pick a word "
                "the tokenizer keeps whole (or with its leading space, e.g. ' great')"
            )
        ids.append(pieces[0])
    return ids


def output_helper(kind: str, label_words: list[str] | None, tokenizer):
    """The ``linft.outputs`` helper for ``--output``."""
    from .. import outputs

    if kind == "logits":
        if label_words:
            raise CLIError("--label-words applies to --output last-token or mask-token only")
        return outputs.logits()
    ids = label_token_ids(tokenizer, label_words) if label_words else None
    if kind == "last-token":
        return outputs.last_token(ids)
    if ids is None:
        raise CLIError("--output mask-token needs --label-words (one word per class)")
    if tokenizer.mask_token_id is None:
        raise CLIError("--output mask-token needs a tokenizer with a mask token")
    return outputs.mask_token(ids, tokenizer.mask_token_id)
