"""Inputs: a mapping of tensors with a leading sample dimension, or an iterable of such batches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

Batch = Mapping[str, object]


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


def split(inputs: Batch | Iterable[Batch], name: str = "inputs") -> tuple[list[Batch], int]:
    """The caller's batches, validated, and the total number of samples N."""
    if isinstance(inputs, Mapping):
        batches = [inputs]
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, torch.Tensor)):
        batches = list(inputs)
    else:
        raise TypeError(
            f"{name} must be a mapping of tensors (a tokenizer's output) or an iterable of "
            f"such mappings (a DataLoader), got {type(inputs).__name__}"
        )
    if not batches:
        raise ValueError(f"{name} is empty")
    keys = None
    total = 0
    for b, batch in enumerate(batches):
        where = name if len(batches) == 1 else f"{name}, batch {b}"
        if not isinstance(batch, Mapping):
            raise TypeError(f"{where} is a {type(batch).__name__}, not a mapping of tensors")
        if keys is None:
            keys = set(batch)
        elif set(batch) != keys:
            raise ValueError(
                f"{where} has keys {sorted(batch)} but batch 0 has {sorted(keys)}; "
                "every batch needs the same keys"
            )
        total += batch_size(batch, where)
    return batches, total


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
