"""Checks of the model and the inputs before any work: each failure is one sentence that
names the problem and the fix, and a warning names an input that makes padding change
the numbers.

What padding guarantees. linft masks padded tokens out of every Jacobian row, so a
sample's row is the same alone and inside a padded batch exactly when the model's own
output for its real tokens is. Most models keep that under right padding with an
attention mask, and under left padding where positions are relative (RoPE, ALiBi, T5's
buckets) or come from the mask or the ids (OPT; RoBERTa with its own pad id). Inputs
that break it get a warning (once per call), found by what the model does, not by its
type:

- padding the model itself sees: the most padded sample goes through the model padded
  and alone, and its outputs (at its real tokens, for per-token outputs) are compared.
  The cause is named: an embedding lookup (absolute positions: GPT-2's ``wpe``, BERT,
  BART without ``position_ids``) that reads other rows for the real tokens, else a part
  of the model that reads padded tokens (a classifier head on the first token under left
  padding);
- padded ids without an ``attention_mask``: a row starts or ends with the model's pad
  token id.

Indices are checked before any lookup runs (on a GPU an index out of range is a
device-side assert that ends the process's CUDA context): token ids and token types
against their embeddings, and positions through the embedding stage of the longest
sample (an embedding lookup or a gather past its table: a sequence longer than the
model's absolute positions).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .batches import Batch, batch_size, call, slice_batch, to_device
from .model_state import changing_message, changing_module, evaluation_mode

_POSITION = re.compile(r"wpe|pos", re.IGNORECASE)
_GATHERS = {torch.gather, torch.Tensor.gather}


def usable_device(value, name: str) -> torch.device:
    """``value`` as a device this process can hold tensors on, or one ``ValueError`` that
    names the argument ``name``, what was wrong and what to pass instead."""
    hint = f"pass {name}=None, 'cpu' or a device such as 'cuda:0'"
    if not isinstance(value, (str, torch.device)) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a device; {hint}")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a device torch knows; {hint}") from None
    if dev.type == "meta":
        raise ValueError(f"{name}='meta' holds no values; {hint}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{name}={value!r} but torch sees no GPU (torch.cuda.is_available() is False); {hint}"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"{name}={value!r} but torch sees {torch.cuda.device_count()} GPU(s); {hint}"
        )
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}={value!r} cannot hold tensors here ({first}); {hint}") from None
    return dev


def _warn(message: str) -> None:
    """Warn at the caller's line (the first frame outside linft)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _root(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile'd model: its eager module


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    try:
        emb = _root(model).get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return emb if isinstance(emb, nn.Embedding) else None


def pad_token_id(model: nn.Module) -> int | None:
    """The model's pad token id: ``config.pad_token_id``, else the generation config's,
    else the input embedding's ``padding_idx``; None when none is a valid token id."""
    emb = _input_embedding(model)
    vocab = None if emb is None else emb.num_embeddings
    root = _root(model)
    candidates = [getattr(getattr(root, attr, None), "pad_token_id", None) for attr in
                  ("config", "generation_config")]  # fmt: skip
    candidates.append(None if emb is None else emb.padding_idx)
    for pad in candidates:
        if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0:
            if vocab is None or pad < vocab:
                return pad
    return None


def _few(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (
        f" and {len(names) - 3} more" if len(names) > 3 else ""
    )


def check_model(model: nn.Module, selected: list) -> None:
    """Every weight is materialized and finite: a meta tensor has no values, and a NaN or
    inf weight (a diverged LoRA update) makes every kernel entry meaningless."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = [n for n, t in tensors if t.is_meta]
    if meta:
        raise ValueError(
            f"the model's {_few(meta)} are on the meta device and hold no values (a model "
            "built under init_empty_weights or offloaded by a device_map); load the weights "
            "onto a real device, e.g. from_pretrained(...) without offloading, or "
            "model.to_empty(device=...) followed by load_state_dict(...)"
        )
    bad = _non_finite(model)
    if bad:
        raise ValueError(
            f"the model's parameter {_few(bad)} holds NaN or inf, so every kernel entry would "
            "be NaN or meaningless; reload or re-initialize those weights (e.g. the adapter "
            "from its last good checkpoint)"
        )


def _non_finite(model: nn.Module) -> list[str]:
    """Names of floating parameters with a NaN or inf: one reduction each (the largest
    magnitude propagates both), one host sync per device."""
    per_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.numel():
            per_device.setdefault(p.device, []).append((name, p))
    bad = []
    for items in per_device.values():
        with torch.no_grad():
            top = torch.stack(
                [torch.linalg.vector_norm(p.detach(), float("inf")).float() for _, p in items]
            )
            finite = torch.isfinite(top).tolist()
        bad += [name for (name, _), ok in zip(items, finite, strict=True) if not ok]
    return bad


def check_batches(model: nn.Module, batches: list[Batch], name: str) -> None:
    """The batches can be fed to the model: real tensors, token ids in range, masks that fit,
    sequences within the model's positions; warns where padding changes numbers."""
    emb = _input_embedding(model)
    types = _named_embedding(model, "token_type_embeddings")
    start = 0
    for b, batch in enumerate(batches):
        where = name if len(batches) == 1 else f"{name}, batch {b}"
        _check_tensors(batch, where)
        _check_ids(batch, "input_ids", emb, start, where)
        _check_ids(batch, "token_type_ids", types, start, where)
        _check_mask(batch, start, where)
        start += batch_size(batch, where)
    if _has_other_embeddings(model, emb):
        _check_positions(model, batches, name)
    with evaluation_mode(model):  # as the run sees it: no dropout
        _warn_padding(model, batches, name)
    _warn_pad_without_mask(model, batches, name)


def _check_tensors(batch: Batch, where: str) -> None:
    for key, v in batch.items():
        if isinstance(v, torch.Tensor) and v.is_meta:
            raise ValueError(
                f"{where}: {key!r} is on the meta device and holds no values; pass real "
                "tensors (on 'cpu' or the model's device)"
            )
    _check_shapes(batch, where)
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(
            f"{where}: input_ids has dtype {ids.dtype}; token ids must be integers: pass "
            "input_ids.long()"
        )
    if ids.dim() >= 2 and ids.shape[-1] == 0:
        raise ValueError(
            f"{where}: input_ids has shape {tuple(ids.shape)}, no tokens per sample; pass at "
            "least one token per sample"
        )


# Token-level inputs of a batch and the numbers of dimensions the models take them in.
_TOKEN_DIMS = {
    "input_ids": (2,),
    "token_type_ids": (2,),
    "decoder_input_ids": (2,),
    "attention_mask": (2, 4),  # [N, T], or a model's own [N, 1, T, T] mask
    "decoder_attention_mask": (2, 4),
}


def _check_shapes(batch: Batch, where: str) -> None:
    for key, dims in _TOKEN_DIMS.items():
        v = batch.get(key)
        if not isinstance(v, torch.Tensor) or v.dim() in dims:
            continue
        shape = tuple(v.shape)
        if v.dim() > 2 and shape[-1] == 1:
            fix = f"drop the trailing dimension ({key}.squeeze(-1))"
        elif v.dim() == 1:
            fix = f"for one sample pass {key}[None]"
        else:
            fix = "pass what the tokenizer returned (return_tensors='pt')"
        raise ValueError(
            f"{where}: {key} has shape {shape}, but it must be [N, T] (samples, tokens); {fix}"
        )


def _named_embedding(model: nn.Module, attr: str) -> nn.Embedding | None:
    return next(
        (m for n, m in _root(model).named_modules()
         if n.rsplit(".", 1)[-1] == attr and isinstance(m, nn.Embedding)),
        None,
    )  # fmt: skip


def _first(where: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(where)[0])


def _check_ids(batch: Batch, key: str, emb: nn.Embedding | None, start: int, where: str):
    """Ids index an embedding: negative or too large ones are an error before any lookup
    (on a GPU a bad index is a device-side assert that kills the process's CUDA context)."""
    ids = batch.get(key)
    if emb is None or not isinstance(ids, torch.Tensor) or ids.numel() == 0:
        return
    if ids.is_floating_point() or ids.dtype == torch.bool:
        return
    rows = emb.num_embeddings
    low, high = int(ids.min()), int(ids.max())
    if low >= 0 and high < rows:
        return
    bad = _first(ids < 0) if low < 0 else _first(ids >= rows)
    sample, pos = start + bad[0], bad[1:]
    at = f"sample {sample} has {key} {int(ids[bad])}" + (f" at position {pos[-1]}" if pos else "")
    if key == "token_type_ids":
        fix = f"token type ids must be in [0, {rows}): pass the tokenizer's own token_type_ids"
    elif low < 0:
        fix = (
            f"token ids must be in [0, {rows}): pad input_ids with the pad token id (-100 "
            "marks ignored labels, not tokens)"
        )
    else:
        fix = (
            f"the model's input embedding has {rows} rows: use the model's own tokenizer, or "
            "after adding tokens resize it (model.resize_token_embeddings(len(tokenizer)))"
        )
    raise ValueError(f"{where}: {at}; {fix}")


def _check_mask(batch: Batch, start: int, where: str) -> None:
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape != mask.shape:
        raise ValueError(
            f"{where}: attention_mask has shape {tuple(mask.shape)} but input_ids has "
            f"{tuple(ids.shape)}; pass the mask the tokenizer returned with these ids"
        )
    empty = ~mask.bool().any(dim=1)
    if bool(empty.any()):
        raise ValueError(
            f"{where}: the attention_mask of sample {start + _first(empty)[0]} is all zeros "
            "(it has no real token); drop that sample"
        )


# ----- positions: one sample through the model's embedding stage ---------------------------


def _has_other_embeddings(model: nn.Module, emb: nn.Embedding | None) -> bool:
    """Embeddings besides the token embedding (positions, token types): only these can be
    indexed out of range by a long sequence or read other rows under padding."""
    return any(isinstance(m, nn.Embedding) and m is not emb for m in _root(model).modules())


class _Stop(Exception):
    """The embedding stage is over: the rest of the forward is not needed."""


class _Lookups(TorchFunctionMode):
    """Records every embedding lookup ``(weight, indices)``, and checks the indices of every
    lookup and gather (RoBERTa gathers its token types by position) before it runs."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        # (table, indices, table size) of the first index out of range
        self.out_of_range: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            idx = args[0] if args else kwargs["input"]
            table = args[1] if len(args) > 1 else kwargs["weight"]
            self.calls.append((table, idx))
            self._check(table, idx, table.shape[0])
        elif func in _GATHERS:
            table, dim = args[0], args[1] if len(args) > 1 else kwargs["dim"]
            idx = args[2] if len(args) > 2 else kwargs["index"]
            self._check(table, idx, table.shape[dim])
        return func(*args, **kwargs)

    def _check(self, table: torch.Tensor, idx: torch.Tensor, size: int) -> None:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            self.out_of_range = (table, idx, size)
            raise _Stop


def _stop(module, args, kwargs):
    raise _Stop


def _lookups(model: nn.Module, sample: Batch) -> _Lookups:
    """The embedding lookups of ``sample`` (one row), without gradients, up to the first
    transformer block (the first call of a ``ModuleList``'s child): the embedding stage."""
    root = _root(model)
    p = next(root.parameters(), None)
    if p is not None:
        dtype = next((q.dtype for q in root.parameters() if q.is_floating_point()), p.dtype)
        sample = to_device(sample, p.device, dtype)
    blocks = [c for m in root.modules() if isinstance(m, nn.ModuleList) for c in m]
    handles = [c.register_forward_pre_hook(_stop, with_kwargs=True) for c in blocks]
    mode = _Lookups()
    try:
        with torch.no_grad(), mode:
            call(root, sample)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return mode


def _weight_name(model: nn.Module, weight: torch.Tensor) -> str | None:
    for n, m in _root(model).named_modules():
        if getattr(m, "weight", None) is weight:
            return n
    return None


def _longest_rows(batches: list[Batch]) -> Iterator[tuple[int, Batch, int]]:
    """``(global index, batch, row)`` of the sample with the most real tokens and of a
    sample of the widest batch: the largest position any sample reaches is at one of them
    (positions by slot grow with the padded width, by mask or ids with the real length)."""
    best, widest, start = None, None, 0
    for batch in batches:
        ids = batch.get("input_ids", batch.get("inputs_embeds"))
        mask = batch.get("attention_mask")
        if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
            return
        width = ids.shape[1]
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape[:2]:
            real = mask.bool().sum(dim=1)
        else:
            real = torch.full((ids.shape[0],), width)
        row = int(real.argmax())
        if best is None or int(real[row]) > best[0]:
            best = (int(real[row]), (start + row, batch, row))
        if widest is None or width > widest[0]:
            widest = (width, (start + row, batch, row))
        start += ids.shape[0]
    if best is not None:
        yield best[1]
        if widest[1][0] != best[1][0]:
            yield widest[1]


def _check_positions(model: nn.Module, batches: list[Batch], name: str) -> None:
    """No sample indexes an embedding out of range: a sequence longer than the model's
    absolute positions fails inside the lookup (a device-side assert on a GPU)."""
    for index, batch, row in _longest_rows(batches):
        sample = slice_batch(batch, row, row + 1)
        found = _lookups(model, sample).out_of_range
        if found is None:
            continue
        table, idx, rows = found
        module = _weight_name(model, table)
        top = int(idx.max())
        width = next(v.shape[1] for k, v in sample.items() if k in ("input_ids", "inputs_embeds"))
        fits = width - (top + 1 - rows)
        if top < rows or fits < 1 or (module and not _POSITION.search(module.rsplit(".")[-1])):
            raise ValueError(
                f"{name}: sample {index} reads row {top} (or {int(idx.min())}) of the model's "
                f"{module or 'table'} of {rows} rows; pass ids within its range"
            )
        what = f"position embedding {module!r}" if module else "positions"
        raise ValueError(
            f"{name}: sample {index} is {width} tokens long (with padding) but at most {fits} "
            f"fit the model's {what}; truncate (and pad) the inputs to at most {fits} tokens "
            f"(tokenizer(..., truncation=True, max_length={fits}))"
        )


def _most_padded_row(batches: list[Batch]) -> tuple[int, Batch, int] | None:
    """``(global index, batch, row)`` of the sample with the most padding (None: none)."""
    best, start = None, 0
    for batch in batches:
        mask, n = batch.get("attention_mask"), batch_size(batch)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == n:
            pads = (~mask.bool()).sum(dim=1)
            row = int(pads.argmax())
            if int(pads[row]) and (best is None or int(pads[row]) > best[0]):
                best = (int(pads[row]), (start + row, batch, row))
        start += n
    return None if best is None else best[1]


def _alone(sample: Batch) -> Batch:
    """The sample (one row) with its padded tokens removed."""
    keep = sample["attention_mask"][0].bool()
    width = keep.shape[0]
    return {
        k: v[:, keep] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == width else v
        for k, v in sample.items()
    }


def _aligned(t: torch.Tensor, width: int, keep: torch.Tensor) -> torch.Tensor | None:
    """The entries of a padded sample's per-token tensor ``t`` at its real tokens (and at the
    slots prepended before them, e.g. peft's virtual tokens), or None if ``t`` is not
    per-token."""
    if t.dim() < 2 or t.shape[0] != 1 or t.shape[1] < width:
        return None
    extra = t.shape[1] - width
    cols = torch.cat([torch.arange(extra), extra + keep.cpu()]).to(t.device)
    return t[:, cols]


def _output_tensor(out: object) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    t = getattr(out, "logits", None)
    if t is None and isinstance(out, (tuple, list)) and out:
        t = out[0]
    return t if isinstance(t, torch.Tensor) else None


# NOTE: padded and alone differ only by rounding where the model is padding-invariant
# (about 1e-7 relative in float32 on the test models); where it is not, by 3% (padded ids
# unmasked) to 78% (left-padded GPT-2). A tolerance per output dtype sits between the two.
_PADDING_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
_LOW_PRECISION_TOLERANCE = 5e-2


def _warn_padding(model: nn.Module, batches: list[Batch], name: str) -> None:
    """Warn if the model's own output for the most padded sample differs from the sample
    alone: padding then changes its kernel rows (module docstring)."""
    found = _most_padded_row(batches)
    if found is None:
        return
    index, batch, row = found
    padded = slice_batch(batch, row, row + 1)
    mask = padded["attention_mask"][0].bool()
    keep, width = mask.nonzero().flatten(), mask.shape[0]
    (out_p, looked_p), (out_a, looked_a) = _run(model, padded), _run(model, _alone(padded))
    if out_p is None or out_a is None:
        return
    if out_p.shape != out_a.shape:
        out_p = _aligned(out_p, width, keep)
        if out_p is None or out_p.shape != out_a.shape:
            return  # the output is neither per sample nor per token: nothing to compare
    a, p = out_a.double(), out_p.double()
    err = float((p - a).norm() / a.norm().clamp_min(1e-300))
    if not err > _PADDING_TOLERANCE.get(out_a.dtype, _LOW_PRECISION_TOLERANCE):
        return
    changing = changing_module(_root(model), lambda: _run(model, padded))
    if changing is not None:  # not the padding: the same input gives another output
        raise ValueError(f"{name}: {changing_message(changing)}")
    side = "left" if not bool(mask[0]) else "right"
    moved = _moved_lookup(model, looked_p, looked_a, width, keep)
    if moved is not None:
        cause = f"its position embedding {moved!r} puts the real tokens at other positions"
        fix = "pad on the right, or pass position_ids (e.g. "
        fix += "(attention_mask.cumsum(-1) - 1).clamp(min=0))"
    else:
        other = "right" if side == "left" else "left"
        cause = "the model sees the padding (e.g. a classification head that reads the "
        cause += "first token, or positions counted across the pads)"
        fix = f"pad on the {other} (tokenizer.padding_side = {other!r})"
    _warn(
        f"{name}: sample {index} is {side}-padded and the model's own output for it differs "
        f"from the sample alone by {err:.1e} (relative): {cause}, so padding changes its "
        f"kernel rows; {fix}"
    )


def _run(model: nn.Module, sample: Batch) -> tuple[torch.Tensor | None, list]:
    """The model's output tensor for one sample and its embedding lookups."""
    root = _root(model)
    p = next(root.parameters(), None)
    if p is not None:
        dtype = next((q.dtype for q in root.parameters() if q.is_floating_point()), p.dtype)
        sample = to_device(sample, p.device, dtype)
    mode = _Lookups()
    with torch.no_grad(), mode:
        out = call(root, sample)
    return _output_tensor(out), mode.calls


def _moved_lookup(model, looked_p: list, looked_a: list, width: int, keep) -> str | None:
    """The embedding that reads other rows for the real tokens padded than alone."""
    for (w, idx), (w2, idx2) in zip(looked_p, looked_a, strict=False):
        if w is not w2:
            continue
        got = _aligned(idx.reshape(1, -1), width, keep)
        if got is not None and got.shape[1] == idx2.numel():
            if not torch.equal(got.flatten(), idx2.flatten().to(got.device)):
                return _weight_name(model, w) or "position table"
    return None


def _warn_pad_without_mask(model: nn.Module, batches: list[Batch], name: str) -> None:
    pad = pad_token_id(model)
    if pad is None:
        return
    start = 0
    for batch in batches:
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        n = batch_size(batch)
        if mask is None and isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.numel():
            ends = (ids[:, 0] == pad) | (ids[:, -1] == pad)
            if bool(ends.any()):
                _warn(
                    f"{name}: sample {start + _first(ends)[0]} starts or ends with the pad "
                    f"token id {pad} but no attention_mask is given, so the model attends to "
                    "the pad tokens and they change the numbers; pass the tokenizer's "
                    "attention_mask (an all-ones mask if these are real tokens)"
                )
                return
        start += n
