"""Inputs: what the caller passes, made into batches (mappings of tensors with a leading
sample dimension N), or one sentence that names the fix.

Accepted: a tokenizer's output (a mapping of tensors, NumPy arrays or lists, padded or
ragged), one example (1-D ``input_ids``), a list of per-example mappings (the rows of a
``datasets.Dataset``), a tensor (the model is called ``model(x)``) or a tuple of tensors
(``model(*xs)``), each with the samples along its first dimension, or an iterable of any
of these batches (a DataLoader). Examples of unequal length
are collated into one batch, right padded to the longest: ``input_ids`` with the model's pad
token id, the other keys with their usual fill (``_FILL``), and an ``attention_mask`` that
marks the padding is added when none is given. Right padding leaves every real token at its
own position, so it changes no number for a model that honours the mask (validate.py warns
where the model's output changes under padding).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

Batch = Mapping[str, object]

# The rank of one example's main input; one more is a batch.
_EXAMPLE_RANK = {"input_ids": 1, "inputs_embeds": 2}
# What ragged keys other than input_ids are padded with (labels: the loss's ignore index).
_FILL = {
    "attention_mask": 0,
    "token_type_ids": 0,
    "position_ids": 0,
    "special_tokens_mask": 1,
    "labels": -100,
    "inputs_embeds": 0,
}
_PADDED_HINT = "pass a padded batch (tokenizer(texts, padding=True, return_tensors='pt'))"


class _Ragged(Exception):
    """A list whose rows have different lengths (collated row by row instead)."""


# Positional inputs (a tensor: ``model(x)``; a tuple of tensors: ``model(*xs)``) sit in a
# batch under these keys, in order, so that every stage slices, moves, checks and
# fingerprints them as it does named inputs; ``arguments`` gives them back to the model.
_ARG = "args[{}]"


def _arg_index(key: object) -> int | None:
    if isinstance(key, str) and key.startswith("args[") and key.endswith("]"):
        inner = key[5:-1]
        return int(inner) if inner.isdigit() else None
    return None


def arguments(batch: Batch) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model's call on ``batch``."""
    positional = sorted((i, k) for k in batch if (i := _arg_index(k)) is not None)
    args = tuple(batch[k] for _, k in positional)
    return args, {k: v for k, v in batch.items() if _arg_index(k) is None}


def call(model, batch: Batch):
    """The model's output on ``batch``: positional inputs as positional arguments."""
    args, kwargs = arguments(batch)
    return model(*args, **kwargs)


def _is_positional(inputs: object) -> bool:
    """One batch of positional inputs: a tensor or array, or a tuple of them."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        return True
    return (
        isinstance(inputs, tuple)
        and bool(inputs)
        and all(isinstance(x, (torch.Tensor, np.ndarray)) for x in inputs)
    )


def _as_mapping(item: object, names: Sequence[str] = ()) -> object:
    """A tensor or a tuple of tensors as a batch: under the names of the forward's
    parameters that take them (``names``; a Hugging Face model's first is ``input_ids``, so
    every check of named inputs applies), positional beyond those; anything else as is."""
    if not _is_positional(item):
        return item
    xs = item if isinstance(item, tuple) else (item,)
    return {(names[i] if i < len(names) else _ARG.format(i)): x for i, x in enumerate(xs)}


def positional_names(model) -> tuple[str, ...]:
    """The names a call ``model(*xs)`` binds its leading arguments to, as far as they can be
    passed by keyword (none for a positional-only ``forward(self, x, /)`` or ``*args``)."""
    import inspect

    root = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its eager module
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return ()
    kinds = {p.kind for p in params}
    passes_on = kinds == {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    base = getattr(root, "get_base_model", None)
    if passes_on and callable(base):  # a peft wrapper: forward(*args, **kwargs) to its model
        return positional_names(base())
    names = []
    for p in params:
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        names.append(p.name)
    return tuple(names)


def batch_size(batch: Batch, where: str = "inputs") -> int:
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not sizes:
        raise ValueError(f"{where} holds no tensor with a leading sample dimension")
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"{where}: tensors disagree on the number of samples {sizes}; every tensor "
            "needs the same leading (sample) dimension"
        )
    return next(iter(sizes.values()))


def slice_batch(batch: Batch, start: int, stop: int) -> dict[str, object]:
    return {
        k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
        for k, v in batch.items()
    }


def _is_text(value: object) -> bool:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return isinstance(value, (str, bytes)) or (
        isinstance(value, np.ndarray) and value.dtype.kind in "US"
    )


def _as_tensor(value: object, key: str, where: str, scalars: bool = True) -> object:
    """Tensors, arrays, (nested) lists and, with ``scalars``, numbers as tensors; anything
    else (a flag, a cache) as it is."""
    if isinstance(value, torch.Tensor):
        return value
    if _is_text(value):
        raise TypeError(
            f"{where}: {key!r} holds text, not numbers; pass only what the tokenizer returns "
            f"(drop the column, e.g. dataset.remove_columns([{key!r}]))"
        )
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = value.tolist()
    if isinstance(value, np.ndarray) or (scalars and isinstance(value, (int, float, np.generic))):
        return torch.as_tensor(np.asarray(value))
    if isinstance(value, (list, tuple)):
        try:
            t = torch.tensor(value)
        except (ValueError, TypeError, RuntimeError) as e:  # rows of different lengths
            raise _Ragged from e
        # an empty list is float by default; ids, masks and labels are integers
        return t.long() if t.numel() == 0 and key != "inputs_embeds" else t
    return value


def _rank(value: object) -> int | None:
    """The number of dimensions of a tensor, array or nested list (None for anything else)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim
    if isinstance(value, (list, tuple)):
        return 1 + (_rank(value[0]) or 0) if value else 1
    return None


def _is_example(item: Mapping) -> bool:
    """One example: its ``input_ids`` are 1-D (or its ``inputs_embeds`` 2-D)."""
    return any(k in item and _rank(item[k]) == r for k, r in _EXAMPLE_RANK.items())


def _pad_rows(rows: list[torch.Tensor], fill, key: str, where: str) -> torch.Tensor:
    if len({r.shape[1:] for r in rows}) > 1 or any(r.dim() == 0 for r in rows):
        raise ValueError(
            f"{where}: the examples' {key!r} have shapes {sorted({tuple(r.shape) for r in rows})}, "
            "which differ beyond their length; pass a batch of equal shapes"
        )
    out = rows[0].new_full((len(rows), max(r.shape[0] for r in rows), *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def collate(examples: Sequence[Mapping], pad_id: int | None, where: str) -> dict[str, object]:
    """One batch from per-example mappings, right padded (module docstring)."""
    keys = list(examples[0])
    for i, ex in enumerate(examples):
        if set(ex) != set(keys):
            raise ValueError(
                f"{where}: example {i} has keys {sorted(ex)} but example 0 has {sorted(keys)}; "
                "every example needs the same keys"
            )
    out: dict[str, object] = {}
    lengths = None
    for key in keys:
        values = [
            _as_tensor(ex[key], key, f"{where}, example {i}") for i, ex in enumerate(examples)
        ]
        if not all(isinstance(v, torch.Tensor) for v in values):
            if any(v is not values[0] and v != values[0] for v in values):
                raise TypeError(f"{where}: {key!r} differs between examples and is not a tensor")
            out[key] = values[0]
            continue
        if len({v.shape for v in values}) == 1:
            out[key] = torch.stack(values)
            continue
        fill = pad_id if key == "input_ids" else _FILL.get(key)
        sizes = sorted({v.shape[0] if v.dim() else 0 for v in values})
        if fill is None and key == "input_ids":
            raise ValueError(
                f"{where}: the examples have {sizes[0]} to {sizes[-1]} tokens and the model has "
                f"no pad token id to pad them with; {_PADDED_HINT} or set "
                "model.config.pad_token_id"
            )
        if fill is None:
            raise ValueError(
                f"{where}: the examples' {key!r} have different lengths {sizes} and linft does "
                f"not know what to pad {key!r} with; {_PADDED_HINT}"
            )
        out[key] = _pad_rows(values, fill, key, where)
        if key in _EXAMPLE_RANK:
            lengths = [v.shape[0] for v in values]
    if lengths is not None and "attention_mask" not in out:
        ar = torch.arange(max(lengths))
        out["attention_mask"] = (ar < torch.tensor(lengths)[:, None]).long()
    return out


def _batch(mapping: Mapping, pad_id: int | None, where: str) -> dict[str, object]:
    """A caller's mapping as a batch: one example gets a sample dimension; arrays and lists
    become tensors; a mapping of ragged lists (a tokenizer's unpadded output, a slice of a
    ``datasets.Dataset``) is collated row by row."""
    if _is_example(mapping):
        return collate([mapping], pad_id, where)
    try:
        return {k: _as_tensor(v, k, where, scalars=False) for k, v in mapping.items()}
    except _Ragged:
        pass
    columns = {k: v for k, v in mapping.items() if _rank(v)}
    n = {len(v) for v in columns.values()}
    if len(n) != 1:
        raise ValueError(
            f"{where}: its columns disagree on the number of samples {sorted(n)}; every "
            "value needs the same leading (sample) dimension"
        )
    rows = [{k: v[i] for k, v in columns.items()} for i in range(n.pop())]
    rest = {k: v for k, v in mapping.items() if k not in columns}
    return {**collate(rows, pad_id, where), **rest}


def _not_inputs(inputs: object, name: str) -> TypeError:
    shape = getattr(inputs, "shape", None)
    got = type(inputs).__name__ + ("" if shape is None else f" of shape {tuple(shape)}")
    return TypeError(
        f"{name} must be a mapping such as {{'input_ids': ids, 'attention_mask': mask}} (a "
        f"tokenizer's output), a tensor (model(x)) or a tuple of tensors (model(*xs)), a list "
        f"of per-example mappings or an iterable of batches (a DataLoader), got {got}"
    )


def split(
    inputs: Batch | Iterable[Batch],
    name: str = "inputs",
    pad_id: int | None = None,
    names: Sequence[str] = (),
) -> tuple[list[Batch], int]:
    """The caller's batches, as mappings of tensors, and the total number of samples N.

    ``pad_id``: the model's pad token id, for collating examples of unequal length;
    ``names``: what the model's forward calls its leading positional inputs
    (``positional_names``).
    """
    if isinstance(inputs, Mapping) or _is_positional(inputs):
        items, whole = [_as_mapping(inputs, names)], True
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        items, whole = [_as_mapping(item, names) for item in inputs], False
    else:
        raise _not_inputs(inputs, name)
    for b, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise _not_inputs(item, name if whole else f"{name}[{b}]")
    examples = [_is_example(item) for item in items]
    if not whole and all(examples) and items:
        batches = [collate(items, pad_id, name)]
    elif not whole and any(examples):
        raise ValueError(
            f"{name} mixes single examples (1-D input_ids, e.g. item "
            f"{examples.index(True)}) and batches (item {examples.index(False)}); pass a list "
            "of examples or an iterable of batches"
        )
    else:
        batches = [
            _batch(item, pad_id, name if whole else f"{name}, batch {b}")
            for b, item in enumerate(items)
        ]
    keys, total, kept = None, 0, []
    for b, batch in enumerate(batches):
        where = name if len(batches) == 1 else f"{name}, batch {b}"
        if keys is None:
            keys = set(batch)
        elif set(batch) != keys:
            raise ValueError(
                f"{where} has keys {sorted(batch)} but batch 0 has {sorted(keys)}; "
                "every batch needs the same keys"
            )
        n = batch_size(batch, where) if batch else 0
        if n:
            kept.append(batch)  # a batch of no samples adds nothing
        total += n
    if total == 0:
        raise ValueError(f"{name} holds no samples; pass at least one")
    return kept, total


def check_same_keys(a: list[Batch], b: list[Batch]) -> None:
    if set(a[0]) != set(b[0]):
        raise ValueError(
            f"inputs has keys {sorted(a[0])} but inputs2 has {sorted(b[0])}; "
            "the cross kernel needs both to be fed to the model the same way"
        )


def blocks(batches: list[Batch], block_size: int) -> list[tuple[int, Batch]]:
    """(first sample index, block) pairs of at most ``block_size`` samples."""
    out, start = [], 0
    for batch in batches:
        n = batch_size(batch, "inputs")
        for s in range(0, n, block_size):
            e = min(n, s + block_size)
            out.append((start + s, batch if (s, e) == (0, n) else slice_batch(batch, s, e)))
        start += n
    return out


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """Move tensors to ``device``; float features (not masks) to the compute dtype."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and k != "attention_mask":
                v = v.to(device=device, dtype=dtype)
            else:
                v = v.to(device)
        out[k] = v
    return out
