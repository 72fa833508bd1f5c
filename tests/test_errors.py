"""Bad input gets a clear error naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from models import (
    VOCAB,
    architecture,
    gpt2,
    random_lengths,
    roberta_classifier,
    roberta_mlm,
    token_batch,
)

import linft


@pytest.fixture
def model():
    return roberta_classifier()


@pytest.fixture
def batch():
    return token_batch(random_lengths(4), pad_id=1)


def test_params_matching_nothing(model, batch):
    with pytest.raises(ValueError, match=r"\['\*nothing\*'\] match no parameter"):
        linft.ntk(model, batch, params=["*lora_A*", "*nothing*"])
    with pytest.raises(ValueError, match="selects no parameter"):
        linft.ntk(model, batch, params=lambda n, p: False)


def test_nothing_trainable(model, batch):
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match='params="trainable"'):
        linft.ntk(model, batch)


def test_three_d_logits_need_an_output_helper():
    model, _ = roberta_mlm()
    batch = token_batch(random_lengths(3), pad_id=1, mask_token=True)
    with pytest.raises(ValueError, match=r"linft\.outputs\.last_token.*linft\.outputs\.mask_token"):
        linft.ntk(model, batch)


def test_mask_token_missing():
    model, output = roberta_mlm()
    batch = token_batch(random_lengths(3), pad_id=1)
    with pytest.raises(ValueError, match="mask tokens"):
        linft.ntk(model, batch, output=output)


def test_mismatched_batch_sizes(model, batch):
    batch["attention_mask"] = batch["attention_mask"][:3]
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        linft.ntk(model, batch)


def test_mismatched_keys(model, batch):
    other = {"input_ids": batch["input_ids"]}
    with pytest.raises(ValueError, match="same keys"):
        linft.ntk(model, [batch, other])
    with pytest.raises(ValueError, match="inputs2"), pytest.warns(UserWarning, match="pad token"):
        linft.ntk(model, batch, other)


def test_output_not_a_function_of_the_parameters(model, batch):
    with pytest.raises(ValueError, match="not a function of the selected parameters"):
        linft.ntk(model, batch, output=lambda out, b: out.logits.detach())


def _on_second_block(transform):
    """An output that applies ``transform`` to the logits of the second block only (of
    two samples: the self-check's one-sample forwards do not count)."""
    calls = []

    def output(out, b):
        if out.logits.shape[0] == 2:
            calls.append(1)
        return transform(out.logits) if len(calls) == 2 else out.logits

    return output


def test_nan_output_names_the_sample(model, batch):
    def poison(logits):
        bad = torch.zeros_like(logits)
        bad[1, 0] = float("nan")
        return logits + bad

    output = _on_second_block(poison)

    with pytest.raises(FloatingPointError, match="sample 3"):
        linft.ntk(model, batch, output=output, batch_size=2)


def test_inf_jacobian_names_the_sample(model, batch):
    def kink(logits):
        bend = torch.sqrt((logits[0, 0] - logits[0, 0].detach()).abs())  # value 0, slope inf
        return torch.cat([logits[:1] + bend, logits[1:]])

    output = _on_second_block(kink)

    with pytest.raises(FloatingPointError, match="Jacobian of sample 2"):
        linft.ntk(model, batch, output=output, batch_size=2)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"kernel": "adam"}, "unknown kernel 'adam'"),
        ({"outputs": "diag"}, "unknown outputs 'diag'"),
        ({"precision": "fp16"}, "unknown precision 'fp16'"),
        ({"backend": "cuda"}, "unknown backend 'cuda'"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"jacobian_memory": -1}, "jacobian_memory must be a number of bytes >= 0"),
        ({"jacobian_memory": "8GB"}, "jacobian_memory must be a number of bytes >= 0"),
    ],
)
def test_unknown_options(model, batch, kwargs, word):
    with pytest.raises(ValueError, match=word):
        linft.ntk(model, batch, **kwargs)


@pytest.mark.parametrize("arg", ["out_device", "device"])
@pytest.mark.parametrize(
    "value, words",
    [
        ("meta", "='meta' holds no values"),
        ("foo", "='foo' is not a device torch knows"),
        (3, "=3 is not a device"),
        ("cuda", "='cuda' but torch sees no GPU"),
        ("cuda:7", "='cuda:7' but torch sees no GPU"),
    ],
)
def test_bad_devices_name_the_argument(model, batch, monkeypatch, arg, value, words):
    """out_device is checked as device is, before any work, in one sentence with the fix
    (a CUDA device is refused the way a CPU-only torch refuses it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"{arg}{words}.*pass {arg}=None, 'cpu'"):
        linft.ntk(model, batch, **{arg: value})


@pytest.mark.parametrize(
    "key, change, words",
    [
        ("input_ids", lambda t: t[..., None], r"input_ids has shape \(4, \d+, 1\).*squeeze"),
        ("attention_mask", lambda t: t[..., None], r"attention_mask has shape.*squeeze"),
        ("input_ids", lambda t: t[0], r"has shape \(1, 4, \d+\), but it must be \[N, T\]"),
        ("token_type_ids", lambda t: t[:, None, None], r"token_type_ids has shape"),
    ],
)
def test_token_inputs_of_the_wrong_shape_name_it(model, batch, key, change, words):
    batch = dict(batch)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    batch[key] = change(batch[key])
    with pytest.raises(ValueError, match=words):
        linft.ntk(model, batch)


def test_good_out_devices(model, batch):
    K = linft.ntk(model, batch, out_device="cpu")
    assert torch.equal(linft.ntk(model, batch, out_device=torch.device("cpu")), K)


def test_triton_backend_without_a_gpu_is_an_error(model, batch, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine can run the Triton backend")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match='backend="triton" cannot run'):
        linft.ntk(model, batch, backend="triton")


def test_inputs_of_the_wrong_type(model):
    with pytest.raises(TypeError, match=r"mapping such as \{'input_ids': ids.*a tensor"):
        linft.ntk(model, "a sentence")


def test_unknown_groups(model, batch):
    with pytest.raises(ValueError, match='groups must be "module", "layer"'):
        linft.layer_ntks(model, batch, groups="block")


def test_last_token_rejects_empty_rows():
    model, output = gpt2()
    batch = token_batch([4, 3], pad_id=0)
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="all zeros"):
        linft.ntk(model, batch, output=output)


# ----- values the model cannot take ----------------------------------------------------------


@pytest.mark.parametrize(
    "arch, length, fits",
    [("gpt2", 41, 40), ("roberta_cls", 39, 38)],  # RoBERTa's positions start at pad id + 1
)
def test_sequence_longer_than_the_positions(arch, length, fits):
    model, output = architecture(arch)
    pad = model.config.pad_token_id or 0
    with pytest.raises(ValueError, match=rf"sample 1 is {length} tokens.*max_length={fits}\)"):
        linft.ntk(model, token_batch([4, length, 3], pad_id=pad), output=output)
    K = linft.ntk(model, token_batch([fits, 2], pad_id=pad), output=output)  # the longest that fits
    assert torch.isfinite(K).all()


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("input_ids", VOCAB, r"input_ids 97 at position 2.*resize_token_embeddings"),
        ("input_ids", -100, r"input_ids -100 at position 2.*pad token id"),
        ("token_type_ids", 2, r"token_type_ids 2 at position 2.*in \[0, 2\)"),
    ],
)
def test_ids_out_of_range_name_the_sample(model, key, value, words):
    batch = token_batch([5, 4, 6], pad_id=1)
    batch.setdefault(key, torch.zeros_like(batch["input_ids"]))[2, 2] = value
    with pytest.raises(ValueError, match=rf"sample 2 has {words}"):
        linft.ntk(model, batch, batch_size=2)


def test_meta_tensors(batch):
    with pytest.raises(ValueError, match=r"'input_ids' is on the meta device.*real tensors"):
        linft.ntk(roberta_classifier(), {k: v.to("meta") for k, v in batch.items()})
    with torch.device("meta"):
        empty = roberta_classifier()
    with pytest.raises(ValueError, match=r"meta device.*load_state_dict"):
        linft.ntk(empty, batch)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["lora_B", "frozen"])
def test_non_finite_weight_is_named(model, batch, value, which):
    layer = "base_model.model.roberta.encoder.layer"
    name = {
        "lora_B": f"{layer}.1.attention.self.value.lora_B.default.weight",
        "frozen": f"{layer}.0.output.dense.weight",
    }[which]
    with torch.no_grad():
        dict(model.named_parameters())[name][1, 0] = value
    with pytest.raises(ValueError, match=rf"'{name}' holds NaN or inf.*reload"):
        linft.ntk(model, batch)


def test_mask_that_does_not_fit_the_ids(model, batch):
    batch["attention_mask"] = batch["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="pass the mask the tokenizer returned"):
        linft.ntk(model, batch)


class _CountingHead(torch.nn.Module):
    """A head that keeps state between calls: its output grows with each call."""

    def __init__(self, head):
        super().__init__()
        self.head, self.calls = head, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.head(*args, **kwargs) * (1 + 0.1 * self.calls)


@pytest.mark.parametrize("padded", [True, False])
def test_a_head_that_changes_between_calls_is_named(model, padded):
    """Padded, the padding check sees the difference first; unpadded, the self-check. Either
    names the head, not a LoRA module whose rows the changing head scales."""
    inner = model.base_model.model
    inner.classifier = _CountingHead(inner.classifier)
    lengths = random_lengths(4) if padded else [7] * 4
    batch = token_batch(lengths, pad_id=1)
    error = ValueError if padded else linft.SelfCheckError
    with pytest.raises(error, match=r"module 'base_model\.model\.classifier' gives another output"):
        linft.ntk(model, batch)


def test_a_repeatable_model_is_not_called_changing(model):
    from linft.kernel.model_state import changing_module

    batch = token_batch(random_lengths(4), pad_id=1)
    model.eval()
    assert changing_module(model, lambda: model(**batch)) is None
    model.train()  # dropout: another output on every call
    assert changing_module(model, lambda: model(**batch)) is not None
