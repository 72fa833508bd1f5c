"""How the network output ``f(x) in R^C`` is read off a model's output.

An output helper is a callable ``(model_output, batch) -> Tensor[n, C]`` (or
``[n]``, meaning C = 1). ``logits()`` fits sequence classifiers; language
models produce ``[n, T, V]`` logits and need ``mask_token`` (prompt-based
fine-tuning of masked LMs, Malladi et al. 2023) or ``last_token`` (causal LMs).

Token positions come from the batch (``input_ids``, ``attention_mask``). Logits longer
than the batch by ``k`` tokens carry ``k`` prepended virtual tokens (peft's prompt tuning
and p-tuning put them before the input), so a batch position ``t`` is logits position
``k + t``; prefix tuning adds no logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

OutputFn = Callable[[object, Mapping[str, object]], torch.Tensor]

_HINT = (
    "pass output=linft.outputs.last_token(label_token_ids) for a causal LM, or "
    "output=linft.outputs.mask_token(label_token_ids, mask_token_id) for a masked LM"
)


def _logits_of(model_output: object) -> torch.Tensor:
    if isinstance(model_output, torch.Tensor):
        return model_output
    logits = getattr(model_output, "logits", None)
    if logits is None and isinstance(model_output, Mapping):
        logits = model_output.get("logits")
    if logits is None and isinstance(model_output, (tuple, list)) and model_output:
        logits = model_output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"cannot find logits in the model output of type {type(model_output).__name__}; "
            "pass output=callable(model_output, batch) -> Tensor[n, C]"
        )
    return logits


def _virtual_tokens(logits: torch.Tensor, width: int, helper: str) -> int:
    """How many tokens (peft's virtual tokens) precede the batch's tokens in the logits."""
    extra = logits.shape[1] - width
    if extra < 0:
        raise ValueError(
            f"{helper}: the logits cover {logits.shape[1]} tokens but the batch has {width}; "
            "pass the batch that produced these logits"
        )
    return extra


def _label_ids(label_token_ids: Sequence[int] | torch.Tensor | None, device) -> torch.Tensor | None:
    if label_token_ids is None:
        return None
    ids = torch.as_tensor(label_token_ids, dtype=torch.long, device=device).flatten()
    if ids.numel() == 0:
        raise ValueError("label_token_ids is empty; give the token id of each label word")
    return ids


def logits() -> OutputFn:
    """``model_output.logits`` of shape ``[n, C]`` (sequence classification)."""

    def read(model_output: object, batch: Mapping[str, object]) -> torch.Tensor:
        out = _logits_of(model_output)
        if out.dim() > 2:
            raise ValueError(
                f"the model's logits have shape {tuple(out.shape)} (one row per token), so "
                f"the default output cannot tell which entries are f(x); {_HINT}"
            )
        return out

    return read


def mask_token(label_token_ids: Sequence[int] | torch.Tensor, mask_token_id: int) -> OutputFn:
    """Logits of the label words at the (single) mask token of each sample."""

    def read(model_output: object, batch: Mapping[str, object]) -> torch.Tensor:
        out = _logits_of(model_output)
        input_ids = batch.get("input_ids")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError("mask_token needs 'input_ids' in the batch to find the mask token")
        is_mask = input_ids == mask_token_id
        counts = is_mask.sum(dim=1)
        bad = torch.nonzero(counts != 1).flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"sample {i} of the batch has {int(counts[i])} mask tokens (id {mask_token_id}); "
                "mask_token needs exactly one per sample"
            )
        if out.dim() != 3:
            raise ValueError(f"mask_token expects [n, T, V] logits, got {tuple(out.shape)}")
        pos = is_mask.long().argmax(dim=1).to(out.device)
        pos = pos + _virtual_tokens(out, input_ids.shape[1], "mask_token")
        rows = out[torch.arange(out.shape[0], device=out.device), pos]  # [n, V]
        ids = _label_ids(label_token_ids, rows.device)
        return rows[:, ids]

    return read


def last_token(label_token_ids: Sequence[int] | torch.Tensor | None = None) -> OutputFn:
    """Logits at the last real (non-padded) token of a causal LM, left or right padded
    (the last 1 of ``attention_mask``; the last token without a mask)."""

    def read(model_output: object, batch: Mapping[str, object]) -> torch.Tensor:
        out = _logits_of(model_output)
        if out.dim() != 3:
            raise ValueError(f"last_token expects [n, T, V] logits, got {tuple(out.shape)}")
        n, t = out.shape[:2]
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            # Index of the last 1 in each row, whichever side the padding is on.
            ar = torch.arange(mask.shape[1], device=mask.device)
            pos = torch.where(mask.bool(), ar, -1).amax(dim=1)
            if (pos < 0).any():
                raise ValueError("a sample's attention_mask is all zeros: it has no real token")
            pos = pos.to(out.device) + _virtual_tokens(out, mask.shape[1], "last_token")
        else:
            pos = torch.full((n,), t - 1, device=out.device)
        rows = out[torch.arange(n, device=out.device), pos]
        ids = _label_ids(label_token_ids, rows.device)
        return rows if ids is None else rows[:, ids]

    return read


# The default when ``output=None``: 1-D or 2-D logits as they are.
default_output = logits()
