"""What identifies a computation: one fingerprint for checkpoints and for ranks.

Two runs compute the same K exactly when they share every part of
``computation_parts``: the settings, the output function (its code, defaults and
closure, ``describe``), the model's class, config, module structure and LoRA state
(scaling, variant, active, merged or disabled adapters), its parameter and buffer
values, the inputs and linft's version. A checkpoint is opened only by the
computation that made it, and under torch.distributed every rank must hold the same
computation; either way a difference is named by its part (``PARTS``).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import re
import sys
import types
from collections.abc import Mapping

import torch
from torch import nn


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


# Why a value must be described, and the way out where it cannot be (``describe``'s ``use``).
_USES = {
    "checkpoint": (
        "a resumed run could not tell whether {what} changed",
        "run without checkpoint=",
    ),
    "ranks": (
        "the ranks of a distributed run could not check that they share {what}",
        "pass group=False for a kernel of this process alone",
    ),
}


def describe(value, what: str = "output", use: str = "checkpoint"):
    """A JSON-able description of ``value`` that two runs share exactly when it computes the
    same (see ``_Describer``). ``TypeError`` names the part that has none."""
    try:
        return _Describer().value(value, what)
    except _Unstable as e:
        why, other = _USES[use]
        raise TypeError(
            f"{e.where} holds a {e.kind} that cannot be described stably, so "
            f"{why.format(what=what)}; give {what} a `checkpoint_key` attribute (a string "
            f"that changes whenever it does), or {other}"
        ) from None


# --- what identifies a computation ---------------------------------------------------

PARTS = {
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
    settings: dict,
    output,
    model: nn.Module,
    batches: list[Mapping],
    *,
    use: str = "checkpoint",
    exact: set[str] | None = None,
) -> dict[str, str]:
    """A hash per part of what changes the kernel (names in ``PARTS``): a checkpoint's key
    hashes them all and a resume names the parts that differ; the ranks of a distributed
    run compare them (``use="ranks"``). ``exact``: the parameters and buffers hashed byte by
    byte (None: all); the others by ``moments`` on their device, which a changed weight
    changes too without copying a large model to the host."""
    from .. import __version__

    weights = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        weights.update(name.encode())
        if exact is None or name in exact:
            _hash_tensor(weights, t)
        elif t.numel() and not t.is_complex() and t.device.type != "meta":
            weights.update(moments(t.detach()).numpy().tobytes())
    inputs = [
        [[k, describe(v, f"inputs[{k!r}]", use)] for k, v in sorted(b.items())] for b in batches
    ]
    return {
        "settings": _sha(_loose(settings)),
        "output": _sha(describe(output, "output", use)),
        "model": _sha(_model(model)),
        "modules": _sha(_modules(model)),
        "weights": weights.hexdigest(),
        "inputs": _sha(inputs),
        "version": str(__version__),
    }


def moments(t: torch.Tensor) -> torch.Tensor:
    """``sum x``, ``sum x^2`` and ``sum (i mod 7) x_i`` in float64 on the tensor's device, in
    chunks: a cheap hash of a large weight (hashing every byte would copy it to the host)."""
    flat, out = t.reshape(-1), torch.zeros(3, dtype=torch.float64, device=t.device)
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        x = flat[i : i + step].double()
        ramp = (torch.arange(i, i + x.numel(), device=x.device) % 7).double()
        out += torch.stack([x.sum(), (x * x).sum(), (x * ramp).sum()])
    return out.cpu()
