"""Resumable kernels: K in a memory-mapped file, finished J blocks on disk.

A checkpoint directory holds ``meta.json`` (what is being computed, which blocks
are finished and their checksums), one ``K_<group>.bin`` per kernel (float32/64,
row-major, preallocated, mapped with ``torch.from_file``) and
``J_<side>_<start>.safetensors`` for the finished blocks whose Jacobians later
tiles still need. A block is marked finished only after all of its tiles are in K
and its J is saved, so a run killed at any point resumes by recomputing at most
the block it was on.

A checkpoint is opened only by the computation that made it: its key hashes
everything that changes K (``computation_parts``): the settings, the output
function (its code, defaults and closure, ``describe``), the model's class,
config, module structure and LoRA state (scaling, variant, active, merged or
disabled adapters), its parameter and buffer values, the inputs and linft's
version. A resume with any of them changed is refused, naming what differs.

Each finished block records a CRC-32 of its J file and of the region of every K
its tiles wrote; a resume checks K's size and these sums before using them, so a
file cut short, deleted or damaged is an error that names it, never zeros or
stray bits in K. (CRC-32 finds damage, not deliberate edits.)
"""

from __future__ import annotations

import enum
import errno
import functools
import hashlib
import json
import os
import re
import sys
import types
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

META = "meta.json"
FORMAT = 2  # layout of meta.json
_CHUNK = 1 << 24  # bytes per step when summing K or filling it with zeros
_FIX = "delete the directory {dir} to start over"


class CheckpointError(ValueError):
    """A checkpoint directory that holds another computation or damaged files."""


def fingerprint(parts: dict, tensors: list[torch.Tensor]) -> str:
    """Hash of the computation's settings and of every input and parameter value it reads."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in tensors:
        _hash_tensor(h, t)
    return h.hexdigest()


def _hash_tensor(h, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise TypeError("a tensor on the meta device has no values to fingerprint")
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), t.dtype)).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__name__)}"


# --- stable descriptions ------------------------------------------------------------

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")  # a repr that holds a memory address changes per run
_MAX_DEPTH = 40
_BUILTINS = (
    types.BuiltinFunctionType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
)


class _Unstable(Exception):
    def __init__(self, where: str, value):
        super().__init__(where)
        self.where, self.kind = where, type(value).__name__


class _Describer:
    """JSON-able descriptions that are equal in two processes exactly when the described
    values compute the same: functions by module, qualname, code (bytecode, constants and
    names, nested code included), defaults, closure cells and the globals they read that
    hold data or functions of their own module; callable objects by type, ``__call__``
    and attributes; tensors and arrays by value; other values by a repr free of memory
    addresses. What has none of these raises ``_Unstable``."""

    def __init__(self):
        self.path: set[int] = set()  # ids being described (cycles)

    def value(self, v, where: str, depth: int = 0):
        if depth > _MAX_DEPTH:
            raise _Unstable(where, v)
        if v is None or isinstance(v, (bool, str)) or type(v) is int:
            return v
        key = _user_key(v)
        if key is not None:
            return ["key", _qualname(type(v)), key]
        if isinstance(v, enum.Enum):
            return ["enum", _qualname(type(v)), v.name]
        if isinstance(v, (int, float, complex)):
            return [type(v).__name__, repr(v)]
        if isinstance(v, (bytes, bytearray)):
            return ["bytes", hashlib.sha256(v).hexdigest()]
        if isinstance(v, torch.Tensor):
            if v.layout != torch.strided or v.device.type == "meta":
                raise _Unstable(where, v)
            h = hashlib.sha256()
            _hash_tensor(h, v)
            return ["tensor", h.hexdigest()]
        if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return ["torch", str(v)]
        if isinstance(v, slice):
            return ["slice", self.value((v.start, v.stop, v.step), where, depth + 1)]
        if isinstance(v, types.ModuleType):
            return ["module", v.__name__]
        if isinstance(v, type):
            return ["class", _qualname(v)]
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(v, (numpy.ndarray, numpy.generic)):
            if v.dtype.hasobject:
                raise _Unstable(where, v)
            data = numpy.ascontiguousarray(v)
            return ["ndarray", data.dtype.str, list(data.shape), hashlib.sha256(data).hexdigest()]
        if id(v) in self.path:
            return ["cycle", _qualname(type(v))]
        self.path.add(id(v))
        try:
            return self._compound(v, where, depth + 1)
        finally:
            self.path.discard(id(v))

    def _compound(self, v, where: str, depth: int):
        if isinstance(v, (list, tuple)):
            return [_qualname(type(v)), [self.value(x, where, depth) for x in v]]
        if isinstance(v, Mapping):
            items = [
                [self.value(k, where, depth), self.value(x, where, depth)] for k, x in v.items()
            ]
            return [_qualname(type(v)), sorted(items, key=json.dumps)]
        if isinstance(v, (set, frozenset)):
            items = [self.value(x, where, depth) for x in v]
            return [_qualname(type(v)), sorted(items, key=json.dumps)]
        if isinstance(v, types.FunctionType):
            return self.function(v, where, depth)
        if isinstance(v, types.MethodType):
            return [
                "method",
                self.value(v.__self__, where, depth),
                self.value(v.__func__, where, depth),
            ]
        if isinstance(v, _BUILTINS):
            owner = getattr(v, "__self__", None)
            bound = None
            if not isinstance(owner, (types.ModuleType, type, type(None))):
                bound = self.value(owner, where, depth)
            return ["builtin", _qualname(v), bound]
        if isinstance(v, functools.partial):
            parts = (v.func, v.args, v.keywords)
            return ["partial", self.value(parts, where, depth)]
        if isinstance(v, nn.Module):
            h = hashlib.sha256()
            for name, t in [*v.named_parameters(), *v.named_buffers()]:
                h.update(name.encode())
                _hash_tensor(h, t)
            return ["nn.Module", _qualname(type(v)), _modules(v), h.hexdigest()]
        return self._object(v, where, depth)

    def _object(self, v, where: str, depth: int):
        attrs = _attributes(v)
        call = next((vars(c)["__call__"] for c in type(v).__mro__ if "__call__" in vars(c)), None)
        call = self.function(call, where, depth) if isinstance(call, types.FunctionType) else None
        if attrs is not None:
            described = {k: self.value(x, f"{where}.{k}", depth) for k, x in sorted(attrs.items())}
            return ["object", _qualname(type(v)), call, described]
        text = repr(v)
        if _ADDRESS.search(text) or " object at " in text:
            raise _Unstable(where, v)
        return ["repr", _qualname(type(v)), call, hashlib.sha256(text.encode()).hexdigest()]

    def function(self, f: types.FunctionType, where: str, depth: int):
        code = f.__code__
        cells = []
        for name, cell in zip(code.co_freevars, f.__closure__ or (), strict=True):
            try:
                content = cell.cell_contents
            except ValueError:  # a cell not yet bound
                cells.append([name, ["empty"]])
                continue
            cells.append([name, self.value(content, f"{where} (variable {name!r})", depth)])
        return [
            "function",
            f.__module__,
            f.__qualname__,
            _code(code),
            self.value(f.__defaults__, f"{where} (defaults)", depth),
            self.value(f.__kwdefaults__, f"{where} (defaults)", depth),
            cells,
            self._globals(f, where, depth),
        ]

    def _globals(self, f: types.FunctionType, where: str, depth: int):
        """The globals the code reads: data by value, functions of its own module by their
        code, anything else (modules, classes, other libraries' functions) by name."""
        found = []
        for name in sorted(_names(f.__code__)):
            if name not in f.__globals__:
                continue  # a builtin, or an attribute name
            v = f.__globals__[name]
            if isinstance(v, types.FunctionType) and v.__module__ != f.__module__:
                found.append([name, ["ref", _qualname(v)]])
            else:
                found.append([name, self.value(v, f"{where} (global {name!r})", depth)])
        return found


def _user_key(v) -> str | None:
    """``checkpoint_key``: a string a callable may carry that changes whenever it does."""
    if isinstance(v, (torch.Tensor, type, types.ModuleType)):
        return None
    try:
        key = getattr(v, "checkpoint_key", None)
    except Exception:
        return None
    return key if isinstance(key, str) else None


def _attributes(v) -> dict | None:
    attrs = getattr(v, "__dict__", None)
    attrs = dict(attrs) if isinstance(attrs, dict) else None
    slots = []
    for c in type(v).__mro__:
        own = getattr(c, "__slots__", ()) or ()
        slots += [own] if isinstance(own, str) else list(own)
    if slots:
        attrs = attrs or {}
        attrs.update((s, getattr(v, s)) for s in slots if s != "__dict__" and hasattr(v, s))
    return attrs


def _code(code: types.CodeType) -> list:
    consts = [
        _code(c) if isinstance(c, types.CodeType) else _Describer().value(c, "a constant")
        for c in code.co_consts
    ]  # described, not repr'd: a frozenset's repr follows the per-process string hash
    return [
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
        code.co_code.hex(),
        list(code.co_names),
        consts,
    ]


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _names(c)
    return names


def describe(value, what: str = "output"):
    """A JSON-able description of ``value`` that two runs share exactly when it computes the
    same (see ``_Describer``). ``TypeError`` names the part that has none."""
    try:
        return _Describer().value(value, what)
    except _Unstable as e:
        raise TypeError(
            f"checkpoint: {e.where} holds a {e.kind} that cannot be described stably, so a "
            f"resumed run could not tell whether {what} changed; give {what} a "
            "`checkpoint_key` attribute (a string that changes whenever it does), or run "
            "without checkpoint="
        ) from None


# --- what identifies a computation ---------------------------------------------------

_PARTS = {
    "settings": "the settings (kernel, outputs, precision, dtypes, groups, params or sizes)",
    "output": "the output function (output=)",
    "model": "the model's class or config",
    "modules": "the model's modules or LoRA state (scaling, variant, active, merged or "
    "disabled adapters)",
    "weights": "the model's parameter or buffer values",
    "inputs": "the inputs",
    "version": "linft's version",
}
_MODULE_SKIP = {"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


def _loose(v, depth: int = 0):
    """Data by value, anything else by its type: module attributes and configs."""
    if depth > 8:
        return ["deep", _qualname(type(v))]
    if isinstance(v, Mapping):
        items = [[_loose(k, depth + 1), _loose(x, depth + 1)] for k, x in v.items()]
        return ["dict", sorted(items, key=json.dumps)]
    if isinstance(v, (list, tuple)):
        return ["list", [_loose(x, depth + 1) for x in v]]
    if isinstance(v, (set, frozenset)):
        return ["set", sorted((_loose(x, depth + 1) for x in v), key=json.dumps)]
    data = (int, float, complex, str, bytes, enum.Enum, torch.Tensor, torch.dtype, torch.device)
    if v is None or isinstance(v, (*data, slice)):
        try:
            return _Describer().value(v, "")
        except _Unstable:
            return ["type", _qualname(type(v))]
    if isinstance(v, (types.FunctionType, *_BUILTINS)):
        return ["ref", _qualname(v)]
    return ["type", _qualname(type(v))]


def _lora_state(m: nn.Module) -> dict:
    return {
        "scaling": getattr(m, "scaling", None),
        "use_dora": getattr(m, "use_dora", None),
        "variant": {
            k: _qualname(type(x)) for k, x in (getattr(m, "lora_variant", None) or {}).items()
        },
        "active": list(getattr(m, "active_adapters", None) or []),
        "merged": list(getattr(m, "merged_adapters", None) or []),
        "disabled": bool(getattr(m, "disable_adapters", False)),
    }


def _modules(model: nn.Module) -> list:
    """Every submodule: its name, class and plain attributes (LoRA scaling, ranks, dropout
    rates, epsilons...), the LoRA state of adapter layers spelled out."""
    rows = []
    for name, m in model.named_modules():
        attrs = {
            k: _loose(v) for k, v in vars(m).items() if k not in _MODULE_SKIP and "hook" not in k
        }
        row = [name, _qualname(type(m)), sorted(attrs.items())]
        if isinstance(getattr(m, "scaling", None), Mapping):
            row.append(_loose(_lora_state(m)))
        rows.append(row)
    return rows


def _model(model: nn.Module):
    config = getattr(model, "config", None)
    config = config.to_dict() if callable(getattr(config, "to_dict", None)) else None
    peft = getattr(model, "peft_config", None)
    if isinstance(peft, Mapping):
        peft = {
            k: c.to_dict() if callable(getattr(c, "to_dict", None)) else c for k, c in peft.items()
        }
    return [_qualname(type(model)), _loose(config), _loose(peft)]


def computation_parts(
    settings: dict, output, model: nn.Module, batches: list[Mapping]
) -> dict[str, str]:
    """A hash per part of what changes the kernel (names in ``_PARTS``); the checkpoint's
    key hashes them all, and a resume names the parts that differ."""
    from .. import __version__

    weights = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        weights.update(name.encode())
        _hash_tensor(weights, t)
    inputs = [[[k, describe(v, f"inputs[{k!r}]")] for k, v in sorted(b.items())] for b in batches]
    return {
        "settings": _sha(_loose(settings)),
        "output": _sha(describe(output, "output")),
        "model": _sha(_model(model)),
        "modules": _sha(_modules(model)),
        "weights": weights.hexdigest(),
        "inputs": _sha(inputs),
        "version": str(__version__),
    }


# --- files ---------------------------------------------------------------------------


def _preallocate(path: Path, nbytes: int) -> None:
    """Reserve the file's blocks on disk now: writes to a memory map past a full disk end
    the process with SIGBUS, a failed reservation is an ``OSError`` before any tile.
    Data already in the file stays (a resume, or another process sharing it)."""
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size > nbytes:
            os.ftruncate(fd, nbytes)
        fallocate = getattr(os, "posix_fallocate", None)  # absent on macOS
        try:
            if fallocate is None:
                raise OSError(errno.ENOSYS, "posix_fallocate is not available")
            fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            _fill_zeros(fd, min(size, nbytes), nbytes)  # no fallocate on this system or disk
    except OSError as e:
        os.close(fd)
        fd = -1
        if created:
            path.unlink(missing_ok=True)
        raise OSError(
            e.errno,
            f"cannot reserve {nbytes} bytes for the kernel file {path.name} in {path.parent} "
            f"({e.strerror}); free space on that disk, or pass checkpoint= a directory on a "
            "disk with room",
        ) from e
    finally:
        if fd >= 0:
            os.close(fd)


def _fill_zeros(fd: int, start: int, stop: int) -> None:
    zeros = bytes(min(_CHUNK, max(stop - start, 0)))
    pos = start
    while pos < stop:
        pos += os.pwrite(fd, zeros[: stop - pos], pos)


def _write_atomic(path: Path, data: bytes, sync: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves the old or the new file


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


class Checkpoint:
    """One computation's checkpoint directory (see the module docstring).

    ``key``: the computation's key, or a mapping part -> hash (``computation_parts``)
    so that a refused resume names the parts that differ. ``meta_name``: the meta
    file; processes that share the directory and write disjoint regions of K keep one
    each. ``cross``: the cross kernel K(X, X2), whose row blocks write whole rows.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        key: str | Mapping[str, str],
        block_size: int,
        meta_name: str = META,
        *,
        cross: bool = False,
    ):
        self.dir = Path(directory)
        self.meta_name = meta_name
        self.cross = cross
        self._maps: dict[str, torch.Tensor] = {}
        parts = dict(key) if isinstance(key, Mapping) else None
        key = _sha(parts) if parts is not None else key
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / meta_name
        if meta_path.exists():
            meta = self._read_meta(meta_path)
            if meta.get("format") != FORMAT:
                raise CheckpointError(
                    f"checkpoint {self.dir} was written by another version of linft; {self._fix()}"
                )
            if meta.get("key") != key:
                raise CheckpointError(self._different(meta.get("parts"), parts))
            self.meta = meta
            self._verify()
        else:
            self.meta = {
                "format": FORMAT,
                "key": key,
                "parts": parts,
                "block_size": block_size,
                "done": {"rows": {}, "cols": {}},
                "sums": {"rows": {}, "cols": {}},
                "kernels": {},
            }
            self._save_meta()

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    def finished(self, side: str) -> dict[int, int]:
        """start -> number of samples of the finished blocks of one side."""
        return {int(s): int(n) for s, n in self.meta["done"].get(side, {}).items()}

    def kernel(
        self, name: str, rows: int, cols: int, dtype: torch.dtype, per: int = 1
    ) -> torch.Tensor:
        """The memory-mapped ``[rows, cols]`` kernel of group ``name``, ``per`` rows per
        sample (C for ``outputs="full"``); preallocated on first use."""
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
        record = {
            "file": f"K_{safe}.bin",
            "rows": rows,
            "cols": cols,
            "dtype": str(dtype),
            "per": per,
        }
        known = self.meta["kernels"].get(name)
        if self._any_done():
            if known != record:
                raise CheckpointError(
                    f"checkpoint {self.dir} holds the kernel {name!r} as {known}, but this run "
                    f"makes {record}; {self._fix()}"
                )
            return self._map(name)
        _preallocate(self.dir / record["file"], rows * cols * dtype.itemsize)
        if known != record:
            self.meta["kernels"][name] = record
            self._save_meta()
        self._maps.pop(name, None)
        return self._map(name)

    def load(self, side: str, start: int) -> torch.Tensor:
        """The saved J of a finished block, checked against its checksum."""
        from safetensors.torch import load as from_bytes

        path = self._j_path(side, start)
        sums = self.meta["sums"][side].get(str(start), {})
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(self._damaged(path, side, start, "is missing")) from None
        if "J" in sums and (len(data) != sums["J_bytes"] or zlib.crc32(data) != sums["J"]):
            raise CheckpointError(self._damaged(path, side, start, "is damaged (checksum)"))
        return from_bytes(data)["J"]

    def finish(
        self, side: str, start: int, J: torch.Tensor, keep: bool, region: list | None = None
    ) -> None:
        """Mark a block finished once its tiles are in K: save its J if ``keep`` and the
        checksums of its J file and of each kernel's ``region`` (sample ranges
        ``[r0, r1, c0, c1]``; default: what the single-process run writes for it)."""
        n = int(J.shape[0])
        sums: dict = {}
        if keep:
            from safetensors.torch import save

            data = save({"J": J.detach().cpu().contiguous()})
            _write_atomic(self._j_path(side, start), data)
            sums.update(J=zlib.crc32(data), J_bytes=len(data))
        regions = self._regions(side, start, n) if region is None else [list(r) for r in region]
        sums["regions"] = regions
        sums["K"] = {name: self._region_sum(name, regions) for name in self.meta["kernels"]}
        self.meta["sums"].setdefault(side, {})[str(start)] = sums  # any side: distributed.py
        self.meta["done"].setdefault(side, {})[str(start)] = n
        self._save_meta()

    # --- internals

    def _fix(self) -> str:
        return _FIX.format(dir=self.dir)

    def _any_done(self) -> bool:
        return any(self.meta["done"].values())

    def _j_path(self, side: str, start: int) -> Path:
        return self.dir / f"J_{side}_{start}.safetensors"

    def _map(self, name: str) -> torch.Tensor:
        if name not in self._maps:
            rec = self.meta["kernels"][name]
            rows, cols = rec["rows"], rec["cols"]
            path = str(self.dir / rec["file"])
            K = torch.from_file(path, shared=True, size=rows * cols, dtype=_dtype(rec["dtype"]))
            self._maps[name] = K.view(rows, cols)
        return self._maps[name]

    def _regions(self, side: str, start: int, n: int) -> list:
        end = start + n
        if side == "cols" or not self.meta["kernels"]:
            return []  # X2 blocks write no tile when they finish
        if self.cross:
            rec = next(iter(self.meta["kernels"].values()))
            return [[start, end, 0, rec["cols"] // rec["per"]]]
        # block j of K(X, X) writes tiles (i, j), i <= j, and their mirrors (j, i)
        return [[0, end, start, end]] + ([[start, end, 0, start]] if start else [])

    def _region_sum(self, name: str, regions: list) -> int:
        K, per = self._map(name), self.meta["kernels"][name]["per"]
        crc = 0
        for r0, r1, c0, c1 in regions:
            part = K[r0 * per : r1 * per, c0 * per : c1 * per]
            step = max(1, _CHUNK // max(1, part.shape[1] * part.element_size()))
            for i in range(0, part.shape[0], step):
                chunk = part[i : i + step].contiguous().view(torch.uint8).numpy()
                crc = zlib.crc32(chunk, crc)
        return crc

    def _verify(self) -> None:
        """Before any use: every kernel file of finished blocks present at its size, their
        regions and J files as they were written."""
        done = [
            (side, int(s), n)
            for side in self.meta["done"]
            for s, n in self.meta["done"][side].items()
        ]
        if not done:
            return
        for rec in self.meta["kernels"].values():
            path = self.dir / rec["file"]
            want = rec["rows"] * rec["cols"] * _dtype(rec["dtype"]).itemsize
            if not path.exists():
                raise CheckpointError(
                    f"checkpoint {self.dir}: the kernel file {path.name} is missing, but "
                    f"{len(done)} finished blocks were written to it; {self._fix()}"
                )
            if path.stat().st_size != want:
                raise CheckpointError(
                    f"checkpoint {self.dir}: the kernel file {path.name} has "
                    f"{path.stat().st_size} bytes, not {want} (cut short or replaced); "
                    f"{self._fix()}"
                )
        for side, start, n in done:
            sums = self.meta["sums"][side][str(start)]
            path = self._j_path(side, start)
            if "J" in sums and not path.exists():
                raise CheckpointError(self._damaged(path, side, start, "is missing"))
            if "J" in sums and path.stat().st_size != sums["J_bytes"]:
                raise CheckpointError(self._damaged(path, side, start, "was cut short"))
            for name, crc in sums["K"].items():
                if self._region_sum(name, sums["regions"]) != crc:
                    file = self.meta["kernels"][name]["file"]
                    raise CheckpointError(
                        f"checkpoint {self.dir}: the kernel file {file} is damaged in the "
                        f"tiles of {side} block {start}..{start + n - 1} (checksum); "
                        f"{self._fix()}"
                    )

    def _damaged(self, path: Path, side: str, start: int, what: str) -> str:
        n = self.meta["done"][side].get(str(start), 0)
        return (
            f"checkpoint {self.dir}: the Jacobian file {path.name} of the finished {side} "
            f"block {start}..{start + n - 1} {what}; {self._fix()}"
        )

    def _different(self, theirs, ours) -> str:
        what = "other model weights, inputs or settings"
        if isinstance(theirs, dict) and isinstance(ours, dict):
            changed = [_PARTS.get(p, p) for p in ours if theirs.get(p) != ours.get(p)]
            what = "; ".join(changed) or what
        return (
            f"checkpoint {self.dir} holds a different computation ({what} changed); pass a "
            f"new directory, or {self._fix()}"
        )

    def _read_meta(self, path: Path) -> dict:
        try:
            meta = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(
                f"checkpoint {self.dir}: {path.name} is damaged (not JSON); {self._fix()}"
            ) from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {self.dir}: {path.name} is damaged; {self._fix()}")
        return meta

    def _save_meta(self) -> None:
        _write_atomic(self.dir / self.meta_name, json.dumps(self.meta).encode(), sync=True)
