"""Every input form a user has at hand gives the reference kernel (or one sentence naming the
fix); padding that changes the model's own output is warned about, padding that does not is not."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from checks import assert_rel_close, gram
from models import (
    architecture,
    gpt2,
    llama,
    random_lengths,
    roberta_classifier,
    token_batch,
    trainable_names,
)
from reference import reference_jacobian, relative_error

import linft

FP32_REL = 1e-5


def _reference(model, batch, output):
    J = reference_jacobian(model, batch, output, trainable_names(model))
    return gram(J, J)


def _rows(batch: dict) -> list[dict]:
    """The samples of a right-padded batch as per-example lists (rows of a datasets.Dataset)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [{"input_ids": batch["input_ids"][i, :n].tolist()} for i, n in enumerate(lengths)]


class _Rows:
    """What iterating a ``datasets.Dataset`` with format "torch" yields: one mapping of 1-D
    tensors per example."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        for i, n in enumerate(self.batch["attention_mask"].sum(dim=1).tolist()):
            yield {
                "input_ids": self.batch["input_ids"][i, :n],
                "attention_mask": self.batch["attention_mask"][i, :n],
            }


FORMS = {
    "rows of lists": _rows,
    "rows of tensors": _Rows,
    "numpy": lambda b: {k: v.numpy() for k, v in b.items()},
    "lists": lambda b: {k: v.tolist() for k, v in b.items()},
    "ragged lists": lambda b: {"input_ids": [r["input_ids"] for r in _rows(b)]},
}


@pytest.mark.parametrize("arch", ["roberta_cls", "llama"])
def test_input_forms_give_the_reference_kernel(arch):
    """Lists, arrays and per-example rows are collated right padded with the model's pad id
    and an attention mask: the kernel of the padded tensors, the reference's."""
    model, output = architecture(arch)
    batch = token_batch(random_lengths(4, high=7), pad_id=model.config.pad_token_id)
    expected = _reference(model, batch, output)
    for form, make in FORMS.items():
        K = linft.ntk(model, make(batch), output=output, batch_size=3)
        assert_rel_close(K, expected, FP32_REL, f"{arch}, {form}")


def test_one_example_without_a_batch_dimension():
    model, output = gpt2()
    ids = torch.randint(5, 97, (7,))  # odd length, no sample dimension
    K = linft.ntk(model, {"input_ids": ids}, output=output)
    expected = _reference(model, {"input_ids": ids[None]}, output)
    assert K.shape == (1, 3, 1, 3)
    assert_rel_close(K, expected, FP32_REL, "1-D input_ids")
    J = linft.jacobian(model, {"input_ids": ids.tolist(), "attention_mask": [1] * 7}, output=output)
    expected = reference_jacobian(model, {"input_ids": ids[None]}, output, trainable_names(model))
    assert_rel_close(J, expected, FP32_REL, "1-D lists, jacobian")


def test_cross_kernel_of_rows():
    model, output = llama()
    a = token_batch(random_lengths(3), pad_id=0)
    b = token_batch([6, 2], pad_id=0)
    K = linft.ntk(model, _rows(a), _rows(b), output=output)
    names = trainable_names(model)
    Ja = reference_jacobian(model, a, output, names)
    Jb = reference_jacobian(model, b, output, names)
    assert_rel_close(K, gram(Ja, Jb), FP32_REL, "cross kernel of rows")


def test_rows_of_unequal_length_need_a_pad_id():
    model, output = gpt2()  # GPT-2 has no pad token
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    with pytest.raises(ValueError, match=r"padded batch.*model\.config\.pad_token_id"):
        linft.ntk(model, rows, output=output)
    model.config.pad_token_id = 0
    K = linft.ntk(model, rows, output=output)
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}  # fmt: skip
    assert_rel_close(K, _reference(model, batch, output), FP32_REL, "rows padded with id 0")


@pytest.mark.parametrize(
    "inputs",
    [
        {"input_ids": torch.empty(0, 5, dtype=torch.long)},
        [],
        iter([]),
        [{"input_ids": torch.empty(0, 3, dtype=torch.long)}],
    ],
    ids=["empty batch", "empty list", "empty iterator", "list of an empty batch"],
)
def test_no_samples(inputs):
    model = roberta_classifier()
    with pytest.raises(ValueError, match="no samples; pass at least one"):
        linft.ntk(model, inputs)


@pytest.mark.parametrize(
    "inputs, error, words",
    [
        (torch.ones(2, 4), TypeError, r"input_ids\.long\(\)"),
        (torch.ones(2, 4, 1, dtype=torch.long), ValueError, r"input_ids has shape \(2, 4, 1\)"),
        ([{"input_ids": [5, 6], "text": "a b"}], TypeError, r"remove_columns\(\['text'\]\)"),
        ({"input_ids": [[5, 6]], "text": [["a b"]]}, TypeError, r"remove_columns\(\['text'\]\)"),
        ([{"input_ids": [5, 6]}, {"input_ids": [[5, 6]]}], ValueError, "list of examples or"),
        ([{"input_ids": [5, 6]}, {"input_ids": [5], "labels": 0}], ValueError, "same keys"),
        ({"input_ids": [[5, 6], [7]], "mystery": [[1], [2, 3]]}, ValueError, "padded batch"),
        ({"input_ids": torch.ones(2, 0, dtype=torch.long)}, ValueError, "at least one token"),
        ({"input_ids": torch.ones(2, 3)}, TypeError, r"input_ids\.long\(\)"),
    ],
    ids=[
        "bare float tensor",
        "bare 3-D tensor",
        "text column",
        "text in a batch",
        "mixed",
        "keys",
        "unknown ragged key",
        "no tokens",
        "float ids",
    ],  # fmt: skip
)
def test_inputs_that_name_their_fix(inputs, error, words):
    model = roberta_classifier()
    with pytest.raises(error, match=words):
        linft.ntk(model, inputs)


def test_a_bare_tensor_is_the_forwards_first_input():
    """``model(ids)`` binds ids to a Hugging Face model's ``input_ids``: the same kernel as
    the mapping, and the same checks (an id out of range is named)."""
    model = roberta_classifier()
    ids = token_batch([5, 5, 5], pad_id=1)["input_ids"]
    K = linft.ntk(model, ids)
    assert torch.equal(K, linft.ntk(model, {"input_ids": ids}))
    with pytest.raises(ValueError, match="input_ids"):
        linft.ntk(model, ids.masked_fill(ids == ids[0, 1], 10**6))


# ----- padding -------------------------------------------------------------------------------


def _padding_warnings(caught) -> list[str]:
    found = [str(w.message) for w in caught]
    return [m for m in found if "padded" in m or "pad token" in m]


def _run(model, batch, output):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = linft.ntk(model, batch, output=output, batch_size=2)
    return K, _padding_warnings(caught)


def _left_positions(batch: dict) -> dict:
    return {**batch, "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


INVARIANT = {
    "gpt2, right padded": ("gpt2", False, lambda b: b),
    "gpt2, left padded with position_ids": ("gpt2", True, _left_positions),
    "llama, left padded (rotary positions)": ("llama", True, lambda b: b),
    "roberta, right padded": ("roberta_cls", False, lambda b: b),
}


@pytest.mark.parametrize("case", list(INVARIANT))
def test_no_padding_warning_where_padding_changes_nothing(case):
    arch, left, edit = INVARIANT[case]
    model, output = architecture(arch)
    batch = edit(token_batch(random_lengths(3), pad_id=model.config.pad_token_id or 0, left=left))
    K, found = _run(model, batch, output)
    assert not found, found
    assert_rel_close(K, _reference(model, batch, output), FP32_REL, case)


BROKEN = {
    # absolute positions shift under left padding
    "gpt2, left padded": ("gpt2", True, True, r"transformer\.wpe'.*position_ids"),
    # the classifier head reads the first token, a pad under left padding
    "roberta, left padded": ("roberta_cls", True, True, r"sees the padding.*padding_side = 'right"),
    # the model attends to the pad tokens
    "roberta, no attention_mask": ("roberta_cls", False, False, "no attention_mask is given"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_padding_warning_where_the_model_changes_under_padding(case):
    """One warning naming the cause and the fix, and the warning is warranted: the padded
    kernel really differs from the samples' kernel alone."""
    arch, left, with_mask, words = BROKEN[case]
    model, output = architecture(arch)
    batch = token_batch(random_lengths(3), pad_id=model.config.pad_token_id or 0, left=left)
    reference = _reference(model, batch, output)  # each sample alone, unpadded
    if not with_mask:
        del batch["attention_mask"]
    K, found = _run(model, batch, output)
    assert len(found) == 1, found
    assert re.search(words, found[0]), found[0]
    i = int(batch["input_ids"].eq(model.config.pad_token_id or 0).sum(dim=1).argmax())
    err = relative_error(K[i, :, i], reference[i, :, i])
    assert err > 1e-4, f"the most padded sample's kernel should differ, differs by {err:.1e}"


def test_numpy_ids_keep_their_integer_type():
    model, output = llama()
    batch = token_batch([4, 2], pad_id=0)
    arrays = {k: np.asarray(v, dtype=np.int32) for k, v in batch.items()}
    K = linft.ntk(model, arrays, output=output)
    assert_rel_close(K, _reference(model, batch, output), FP32_REL, "int32 arrays")
