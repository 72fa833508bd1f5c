"""Checkpoints cannot mix two computations, lose work or hand back damaged numbers.

A resume with another output function, LoRA scaling, precision or dtype is refused;
a kernel or Jacobian file cut short, deleted or damaged is an error naming it (never
zeros); a full disk is an ``OSError`` naming the directory (never SIGBUS); the
returned K is a copy unless ``out_device="checkpoint"`` asks for the file.
"""

from __future__ import annotations

import copy
import errno
import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from checks import assert_rel_close, gram
from interrupts import Interrupt, stop_after_blocks
from models import (
    LABEL_WORDS,
    gpt2,
    random_lengths,
    roberta_base_classifier,
    roberta_classifier,
    token_batch,
)
from reference import reference_jacobian

import linft
from linft.kernel.checkpoint import Checkpoint, CheckpointError
from linft.kernel.identity import _sha, describe


def _interrupted(monkeypatch, model, a, directory, blocks: int = 3, **kw) -> None:
    stop_after_blocks(monkeypatch, blocks)
    with pytest.raises(Interrupt):
        linft.ntk(model, a, batch_size=2, checkpoint=directory, **kw)
    stop_after_blocks(monkeypatch, None)


# --- the key covers everything that changes K ------------------------------------------


def test_resume_with_another_output_is_refused(tmp_path, monkeypatch):
    model, output = gpt2()
    a = token_batch(random_lengths(7), pad_id=0)
    _interrupted(monkeypatch, model, a, tmp_path, output=output)
    other = linft.outputs.last_token([*LABEL_WORDS[:2], LABEL_WORDS[2] + 1])  # one label id
    with pytest.raises(CheckpointError, match=r"different computation \(the output function"):
        linft.ntk(model, a, output=other, batch_size=2, checkpoint=tmp_path)
    # an equal helper built anew (another closure object) resumes, and K is right
    calls = stop_after_blocks(monkeypatch, None)
    same = linft.outputs.last_token(list(LABEL_WORDS))
    K = linft.ntk(model, a, output=same, batch_size=2, checkpoint=tmp_path)
    assert calls == [6], "only the unfinished block is computed"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    J = reference_jacobian(model, a, output, names)
    assert_rel_close(K, gram(J, J), 1e-5, "resumed kernel vs float64 reference")


@pytest.mark.parametrize("change", ["lora_alpha", "set_scale"])
def test_resume_with_another_lora_scaling_is_refused(tmp_path, monkeypatch, change):
    base = roberta_base_classifier()
    model = roberta_classifier(base=copy.deepcopy(base))
    a = token_batch(random_lengths(7), pad_id=1)
    expected = linft.ntk(model, a, batch_size=2)
    _interrupted(monkeypatch, model, a, tmp_path)
    if change == "lora_alpha":  # the same weights under another lora_alpha
        other = roberta_classifier(base=base, lora_alpha=12)
        other.load_state_dict(model.state_dict())
        pairs = zip(model.state_dict().values(), other.state_dict().values(), strict=True)
        assert all(torch.equal(p, q) for p, q in pairs)
    else:
        other = copy.deepcopy(model)
        for m in other.modules():
            if hasattr(m, "set_scale"):
                m.set_scale("default", 2.0)
    assert not torch.allclose(linft.ntk(other, a), expected), "the scaling changes K"
    with pytest.raises(CheckpointError, match="LoRA state"):
        linft.ntk(other, a, batch_size=2, checkpoint=tmp_path)
    K = linft.ntk(model, a, batch_size=2, checkpoint=tmp_path)
    assert torch.equal(K, expected)


@pytest.mark.parametrize(
    "change, part",
    [("precision", "settings"), ("dtype", "parameter or buffer values"), ("signgd", "settings")],
)
def test_resume_with_another_precision_or_dtype_is_refused(tmp_path, monkeypatch, change, part):
    model = roberta_classifier()
    a = token_batch(random_lengths(7), pad_id=1)
    expected = linft.ntk(model, a, batch_size=2)
    _interrupted(monkeypatch, model, a, tmp_path)
    kw, other = {}, model
    if change == "precision":
        kw = dict(precision="bf16")
    elif change == "signgd":
        kw = dict(kernel="signgd")
    else:
        other = copy.deepcopy(model).double()
    with pytest.raises(CheckpointError, match=part):
        linft.ntk(other, a, batch_size=2, checkpoint=tmp_path, **kw)
    assert torch.equal(linft.ntk(model, a, batch_size=2, checkpoint=tmp_path), expected)


def test_output_descriptions():
    """Functions by code, defaults and closure; objects by type and attributes; tensors by
    value; what has no stable description is named in the error."""
    key = lambda f: _sha(describe(f))  # noqa: E731
    helper = linft.outputs.mask_token
    assert key(helper([3, 5], 4)) == key(helper([3, 5], 4))
    assert key(helper([3, 5], 4)) != key(helper([3, 6], 4))
    assert key(helper([3, 5], 4)) != key(helper([3, 5], 7))
    assert key(helper([3, 5], 4)) != key(linft.outputs.last_token([3, 5]))
    assert key(lambda o, b: o.logits[:, 0]) != key(lambda o, b: o.logits[:, 1])
    assert key(lambda o, b: o.logits[:, 0]) != key(lambda o, b: o.hidden[:, 0])

    w = torch.randn(3, 5)
    project = lambda w: lambda o, b: o.logits @ w  # noqa: E731
    assert key(project(w)) == key(project(w.clone()))
    assert key(project(w)) != key(project(w + 1e-6))

    def scaled(o, b, scale=2.0):
        return o.logits * scale

    assert key(scaled) != key(functools.partial(scaled, scale=3.0))
    assert key(functools.partial(scaled, scale=3.0)) == key(functools.partial(scaled, scale=3.0))

    class Head:
        def __init__(self, label):
            self.label = label

        def __call__(self, o, b):
            return o.logits[:, self.label]

    assert key(Head(1)) == key(Head(1)) and key(Head(1)) != key(Head(2))

    lock = threading.Lock()
    locked = lambda o, b: (lock, o.logits)[1]  # noqa: E731
    with pytest.raises(TypeError, match=r"variable 'lock'.*checkpoint_key"):
        describe(locked)
    locked.checkpoint_key = "logits v1"
    assert key(locked) == _sha(["key", "builtins.function", "logits v1"])


def test_unstable_output_is_refused_before_any_work(tmp_path, monkeypatch):
    model = roberta_classifier()
    a = token_batch(random_lengths(3), pad_id=1)
    lock = threading.Lock()
    calls = stop_after_blocks(monkeypatch, None)
    with pytest.raises(TypeError, match="variable 'lock'"):
        linft.ntk(model, a, output=lambda o, b: (lock, o.logits)[1], checkpoint=tmp_path)
    assert calls == []


def test_descriptions_do_not_depend_on_the_string_hash_seed():
    script = textwrap.dedent(
        """
        import linft.outputs as o
        from linft.kernel.identity import _sha, describe
        names = {"logits", "scores", "last"}
        def read(out, batch, keys=frozenset({"a", "b", "c"})):
            return out[[k for k in names if k in {"logits", "scores"}][0]]
        print(_sha(describe(read)), _sha(describe(o.mask_token([3, 4], 2))))
        """
    )
    got = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        got.add(run.stdout)
    assert len(got) == 1, got


# --- damaged files are errors that name them ----------------------------------------------


def _damage(directory: Path, how: str, rows: int, done: int) -> str:
    """Damage a checkpoint whose first ``done`` kernel rows and columns are finished (block
    2 among them; the kernel ``rows`` wide); return the file name the error must give."""
    K = directory / "K_all.bin"
    if how == "truncate K":
        os.truncate(K, K.stat().st_size // 2)
    elif how == "delete K":
        K.unlink()
    elif how in ("corrupt K", "1e34 in K"):
        r, c = torch.randint(0, done, (2,)).tolist()  # inside the finished blocks
        value = np.float32("nan" if how == "corrupt K" else 1e34)
        with open(K, "r+b") as fh:
            fh.seek((r * rows + c) * 4)
            fh.write(value.tobytes())
    elif how == "delete J":
        (directory / "J_rows_2.safetensors").unlink()
        return "J_rows_2.safetensors"
    elif how == "corrupt J":
        J = directory / "J_rows_2.safetensors"
        data = bytearray(J.read_bytes())
        data[-5] ^= 0x40
        J.write_bytes(bytes(data))
        return "J_rows_2.safetensors"
    return "K_all.bin"


@pytest.mark.parametrize(
    "how", ["truncate K", "delete K", "corrupt K", "1e34 in K", "delete J", "corrupt J"]
)
def test_damaged_file_is_named(tmp_path, monkeypatch, how):
    model = roberta_classifier()
    a = token_batch(random_lengths(5), pad_id=1)
    _interrupted(monkeypatch, model, a, tmp_path, blocks=2, verify=False)
    name = _damage(tmp_path, how, 5 * 3, 4 * 3)
    calls = stop_after_blocks(monkeypatch, None)
    with pytest.raises(CheckpointError, match=rf"{name}.*delete the directory"):
        linft.ntk(model, a, batch_size=2, checkpoint=tmp_path, verify=False)
    assert calls == [], "the damage is found before any block is computed"


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("how", ["truncate K", "corrupt K"])
def test_damaged_finished_checkpoint_is_not_returned(tmp_path, how, cross):
    """A completed checkpoint is checked before its K is returned."""
    model = roberta_classifier()
    a = token_batch(random_lengths(5), pad_id=1)
    b = token_batch(random_lengths(3), pad_id=1) if cross else None
    expected = linft.ntk(model, a, b, batch_size=2, checkpoint=tmp_path, verify=False)
    again = linft.ntk(model, a, b, batch_size=2, checkpoint=tmp_path, verify=False)
    assert torch.equal(again, expected)
    K = tmp_path / "K_all.bin"
    if how == "truncate K":
        os.truncate(K, K.stat().st_size - 4)
    else:
        cols = (3 if cross else 5) * 3
        r, c = int(torch.randint(0, 15, ())), int(torch.randint(0, cols, ()))
        with open(K, "r+b") as fh:
            fh.seek((r * cols + c) * 4)
            fh.write(np.float32(1e34).tobytes())
    with pytest.raises(CheckpointError, match="K_all.bin"):
        linft.ntk(model, a, b, batch_size=2, checkpoint=tmp_path, verify=False)


@pytest.mark.parametrize(
    "edit",
    ["drop the checksums", "drop a checksum field", "block size", "kernel record", "no kernels"],
)
def test_edited_meta_is_named(tmp_path, monkeypatch, edit):
    """Metadata that lists a finished block without what a resume reads: one sentence
    naming the file and the fix, before any block is computed."""
    model = roberta_classifier()
    a = token_batch(random_lengths(5), pad_id=1)
    _interrupted(monkeypatch, model, a, tmp_path, blocks=2, verify=False)
    path = tmp_path / "meta.json"
    meta = json.loads(path.read_text())
    start = next(iter(meta["done"]["rows"]))
    if edit == "drop the checksums":
        del meta["sums"]["rows"][start]
    elif edit == "drop a checksum field":
        del meta["sums"]["rows"][start]["regions"]
    elif edit == "block size":
        meta["block_size"] = "two"
    elif edit == "kernel record":
        next(iter(meta["kernels"].values()))["dtype"] = "float99"
    else:
        del meta["kernels"]
    path.write_text(json.dumps(meta))
    calls = stop_after_blocks(monkeypatch, None)
    with pytest.raises(CheckpointError, match=r"meta.json is damaged or was edited.*delete the"):
        linft.ntk(model, a, batch_size=2, checkpoint=tmp_path, verify=False)
    assert calls == []


def test_damaged_meta_is_named(tmp_path):
    model = roberta_classifier()
    a = token_batch(random_lengths(3), pad_id=1)
    linft.ntk(model, a, checkpoint=tmp_path)
    (tmp_path / "meta.json").write_text('{"key": ')
    with pytest.raises(CheckpointError, match="meta.json is damaged"):
        linft.ntk(model, a, checkpoint=tmp_path)


# --- a full disk is an OSError, not SIGBUS ------------------------------------------------

_FULL_DISK = """
import errno, json, os, resource, signal, sys
import torch
from linft.kernel.checkpoint import Checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
results = []
for mode, directory in zip(("fallocate", "zeros"), sys.argv[1:]):
    if mode == "zeros":  # a system or disk without fallocate
        def no_fallocate(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        os.posix_fallocate = no_fallocate
    ckpt = Checkpoint(directory, "key", 4)
    try:
        ckpt.kernel("all", 300, 301, torch.float32)  # 361200 bytes
        results.append(None)
    except OSError as e:
        results.append([e.errno, str(e)])
print(json.dumps(results))
"""


def test_full_disk_is_an_os_error_naming_the_directory(tmp_path):
    """Under a file-size limit (as on a full disk) the kernel file cannot be reserved: an
    OSError naming the directory, not SIGBUS at a later write to the memory map."""
    dirs = [tmp_path / "fallocate", tmp_path / "zeros"]
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, *map(str, dirs)], capture_output=True, text=True
    )
    assert run.returncode == 0, f"the run died (signal {-run.returncode}): {run.stderr[-2000:]}"
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for directory, result in zip(dirs, results, strict=True):
        assert result is not None, "the kernel file was not reserved"
        code, message = result
        assert code == errno.EFBIG
        assert str(directory) in message and "free space" in message
        assert not (directory / "K_all.bin").exists(), "the partial file is removed"


_FULL_DISK_AT_J = """
import json, resource, signal, sys
sys.path.insert(0, sys.argv[2])
from models import random_lengths, roberta_classifier, token_batch
import torch
import linft
torch.manual_seed(0)
model = roberta_classifier()
a = token_batch(random_lengths(5), pad_id=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # K and meta fit, a J block not
try:
    linft.ntk(model, a, batch_size=2, checkpoint=sys.argv[1], verify=False)
    print(json.dumps(None))
except OSError as e:
    print(json.dumps([type(e).__name__, e.errno, str(e)]))
"""


def test_full_disk_while_a_jacobian_block_is_written_names_the_directory(tmp_path):
    """A J block that does not fit (a file size limit, as a full disk) is an OSError naming
    the file, the directory and the fix; once there is room the run resumes to the right K."""
    tests = Path(__file__).resolve().parent
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_AT_J, str(tmp_path), str(tests)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, f"the run died (signal {-run.returncode}): {run.stderr[-2000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result is not None, "every file fitted: the limit no longer tests a J block"
    kind, code, message = result
    assert kind == "OSError" and code == errno.EFBIG
    assert "J_rows_0.safetensors" in message and str(tmp_path) in message
    assert "free space" in message and "resume" in message
    assert not list(tmp_path.glob("*.tmp")), "the partial file is removed"
    torch.manual_seed(0)  # the same model and inputs as the limited run
    model = roberta_classifier()
    a = token_batch(random_lengths(5), pad_id=1)
    K = linft.ntk(model, a, batch_size=2, checkpoint=tmp_path, verify=False)
    assert_rel_close(K, linft.ntk(model, a, verify=False), 1e-6)


def test_checkpoint_that_is_a_file_is_named(tmp_path):
    model = roberta_classifier()
    a = token_batch(random_lengths(3), pad_id=1)
    path = tmp_path / "run.ckpt"
    path.write_text("notes")
    with pytest.raises(CheckpointError, match=r"is a file, not a directory; pass checkpoint= a"):
        linft.ntk(model, a, checkpoint=path)
    with pytest.raises(CheckpointError, match=r"cannot create the checkpoint directory .*run"):
        linft.ntk(model, a, checkpoint=path / "inside")
    assert path.read_text() == "notes"


@pytest.mark.parametrize("fallocate", [True, False])
def test_kernel_file_is_reserved_and_shared(tmp_path, monkeypatch, fallocate):
    """Every block of K is on disk before the first tile (no sparse file), and a second
    process's view of the same directory (its own meta file) keeps what the first wrote."""
    if not fallocate:

        def unsupported(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", unsupported)
    rows, cols = 37, 301  # 44548 bytes, not a multiple of the 4 KiB block
    first = Checkpoint(tmp_path, "key", 4)
    K = first.kernel("all", rows, cols, torch.float32)
    path = tmp_path / "K_all.bin"
    assert path.stat().st_size == rows * cols * 4
    assert path.stat().st_blocks * 512 >= rows * cols * 4, "the file is sparse"
    values = torch.randn(rows, cols)
    K.copy_(values)
    second = Checkpoint(tmp_path, "key", 4, meta_name="meta_rank1.json")
    assert torch.equal(second.kernel("all", rows, cols, torch.float32), values)
    assert (tmp_path / "meta_rank1.json").exists() and (tmp_path / "meta.json").exists()


def test_no_room_stops_the_run_before_any_block_is_finished(tmp_path, monkeypatch):
    model = roberta_classifier()
    a = token_batch(random_lengths(5), pad_id=1)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=rf"{tmp_path}.*free space"):
        linft.ntk(model, a, batch_size=2, checkpoint=tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["done"] == {"rows": {}, "cols": {}}
    assert not (tmp_path / "K_all.bin").exists()


# --- the returned kernel ----------------------------------------------------------------


@pytest.mark.parametrize("cross", [False, True])
def test_returned_kernel_is_a_copy(tmp_path, monkeypatch, cross):
    model = roberta_classifier()
    a = token_batch(random_lengths(7), pad_id=1)
    b = token_batch(random_lengths(5), pad_id=1) if cross else None
    expected = linft.ntk(model, a, b, batch_size=2)
    _interrupted(monkeypatch, model, a, tmp_path, blocks=3 + (3 if cross else 0), inputs2=b)
    K = linft.ntk(model, a, b, batch_size=2, checkpoint=tmp_path)
    assert torch.equal(K, expected)
    on_disk = np.fromfile(tmp_path / "K_all.bin", dtype=np.float32).copy()
    K.fill_(float("nan"))
    assert np.array_equal(np.fromfile(tmp_path / "K_all.bin", dtype=np.float32), on_disk)
    assert torch.equal(linft.ntk(model, a, b, batch_size=2, checkpoint=tmp_path), expected)


def test_out_device_checkpoint_returns_the_memory_map(tmp_path):
    model = roberta_classifier()
    a = token_batch(random_lengths(5), pad_id=1)
    expected = linft.ntk(model, a, batch_size=2)
    K = linft.ntk(model, a, batch_size=2, checkpoint=tmp_path, out_device="checkpoint")
    assert torch.equal(K, expected)
    K[0, 1, 2, 0] = 1e30  # the map is the file
    on_disk = np.fromfile(tmp_path / "K_all.bin", dtype=np.float32).reshape(15, 15)
    assert on_disk[1, 6] == np.float32(1e30)
    # an edit of a finished tile is then found, not returned
    with pytest.raises(CheckpointError, match="K_all.bin is damaged"):
        linft.ntk(model, a, batch_size=2, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="checkpoint=DIR"):
        linft.ntk(model, a, out_device="checkpoint")
