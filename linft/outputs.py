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
    """``model_output.logits`` of shape ``[n, C]`` (sequence classification); a model that
    returns a plain tensor: that tensor, flattened per sample (``[n, ...]`` as ``[n, C]``)."""

    def read(model_output: object, batch: Mapping[str, object]) -> torch.Tensor:
        out = _logits_of(model_output)
        if isinstance(model_output, torch.Tensor) and out.dim() > 2:
            return out.reshape(out.shape[0], -1)  # a plain network's output: every entry
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


def _decoder_positions(model_output: object, batch: Mapping[str, object]) -> torch.Tensor | None:
    """Index of the last real decoder token of each sample of an encoder-decoder model (its
    logits are over the decoder's tokens, not the encoder's); None for a decoder-only model.

    The decoder's tokens are ``decoder_input_ids`` (padding from ``decoder_attention_mask``),
    or, without them, ``labels`` shifted right by the model (padding where labels are -100);
    ``labels`` alone count only when the output is a sequence-to-sequence output, since a
    causal LM's batch may carry labels of its own tokens.
    """
    seq2seq = _has(model_output, "encoder_last_hidden_state")
    ids = batch.get("decoder_input_ids")
    labels = batch.get("labels")
    if isinstance(ids, torch.Tensor):
        mask = batch.get("decoder_attention_mask")
        width = ids.shape[1]
        real = mask.bool() if isinstance(mask, torch.Tensor) else None
        what = "decoder_attention_mask"
    elif seq2seq and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        width = labels.shape[1]
        real = labels != -100
        what = "labels (all -100)"
    else:
        return None
    if real is None:
        return torch.full((ids.shape[0],), width - 1, dtype=torch.long)
    ar = torch.arange(width, device=real.device)
    pos = torch.where(real, ar, -1).amax(dim=1)
    if (pos < 0).any():
        i = int(torch.nonzero(pos < 0)[0, 0])
        raise ValueError(
            f"last_token: sample {i} has no real decoder token ({what}); give every sample at "
            "least one decoder token"
        )
    return pos


def _has(model_output: object, key: str) -> bool:
    if isinstance(model_output, Mapping):
        return model_output.get(key) is not None
    return getattr(model_output, key, None) is not None


def last_token(label_token_ids: Sequence[int] | torch.Tensor | None = None) -> OutputFn:
    """Logits at the last real (non-padded) token of a causal LM, left or right padded
    (the last 1 of ``attention_mask``; the last token without a mask). For an encoder-decoder
    model (T5, BART) the decoder's last real token: the last 1 of ``decoder_attention_mask``
    over ``decoder_input_ids``, or the last label that is not -100 when the decoder reads
    ``labels``."""

    def read(model_output: object, batch: Mapping[str, object]) -> torch.Tensor:
        out = _logits_of(model_output)
        if out.dim() != 3:
            raise ValueError(f"last_token expects [n, T, V] logits, got {tuple(out.shape)}")
        n, t = out.shape[:2]
        mask = batch.get("attention_mask")
        decoder = _decoder_positions(model_output, batch)
        if decoder is not None:
            if out.shape[1] != _decoder_width(batch):
                raise ValueError(
                    f"last_token: the logits cover {out.shape[1]} tokens but the decoder's "
                    f"inputs have {_decoder_width(batch)}; pass the batch that produced them"
                )
            pos = decoder.to(out.device)
        elif isinstance(mask, torch.Tensor):
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


def _decoder_width(batch: Mapping[str, object]) -> int:
    ids = batch.get("decoder_input_ids")
    return (ids if isinstance(ids, torch.Tensor) else batch["labels"]).shape[1]


# The default when ``output=None``: 1-D or 2-D logits as they are.
default_output = logits()
