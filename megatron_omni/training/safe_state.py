"""Rank-local checkpoint state as tagged JSON: readable without running any code.

A checkpoint's per-rank file (RNG streams, the data loader's position, ...) used to be a pickle,
and unpickling runs whatever the file says: a checkpoint from someone else could execute their
code on resume. This module writes the same state as plain JSON with type tags and reads it back
constructing only:

* JSON scalars, lists, ``tuple``, ``dict`` (any hashable keys), ``collections.Counter``, ``bytes``;
* ``torch.Tensor`` and ``numpy.ndarray`` / numpy scalars (raw bytes + dtype + shape, base64);
* dataclasses and ``FlexState`` dicts from Energon's state types (``megatron.energon.*``): the
  allow-list is "a class defined in a ``megatron.energon`` module that is a dataclass or the
  ``FlexState`` dict", instantiated without calling its ``__init__`` (fields are set directly).

Anything else is refused at SAVE time (:class:`UnsafeStateError` names the type and where it
sits), so an unsupported object never produces a checkpoint that cannot be resumed.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
from collections import Counter
from typing import Any

import numpy as np
import torch

__all__ = ["UnsafeStateError", "dumps", "loads", "encode", "decode"]

_ALLOWED_MODULE_PREFIX = "megatron.energon."


class UnsafeStateError(TypeError):
    """An object that the safe format cannot store or a tag/class it refuses to load."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"), validate=True)


def _allowed_class(cls: type) -> bool:
    mod = getattr(cls, "__module__", "") or ""
    if not mod.startswith(_ALLOWED_MODULE_PREFIX):
        return False
    from megatron.energon.state import FlexState

    return dataclasses.is_dataclass(cls) or issubclass(cls, FlexState)


def encode(obj: Any, where: str = "state") -> Any:
    """``obj`` -> a JSON-serialisable tree with type tags (see the module docstring)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)) and type(obj) in (int, float):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": _b64(raw), "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape)}
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        if a.dtype == object:
            raise UnsafeStateError(f"{where}: numpy object arrays cannot be stored safely")
        return {"__ndarray__": _b64(a.tobytes()), "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(obj, np.generic):
        return {"__npscalar__": obj.item(), "dtype": obj.dtype.str}
    if isinstance(obj, bytes):
        return {"__bytes__": _b64(obj)}
    if isinstance(obj, tuple) and type(obj) is tuple:
        return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list) and type(obj) is list:
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if type(obj) in (dict, Counter):
        tag = "__counter__" if type(obj) is Counter else "__dict__"
        return {tag: [[encode(k, f"{where} key"), encode(v, f"{where}[{k!r}]")]
                      for k, v in obj.items()]}
    cls = type(obj)
    if _allowed_class(cls):
        name = f"{cls.__module__}:{cls.__qualname__}"
        if isinstance(obj, dict):  # FlexState
            return {"__class__": name, "items": [[encode(k, f"{where} key"),
                                                  encode(v, f"{where}[{k!r}]")]
                                                 for k, v in obj.items()]}
        return {"__class__": name,
                "fields": {f.name: encode(getattr(obj, f.name), f"{where}.{f.name}")
                           for f in dataclasses.fields(obj)}}
    raise UnsafeStateError(
        f"{where}: a {cls.__module__}.{cls.__qualname__} cannot be stored in the rank state "
        f"file (allowed: JSON scalars, list/tuple/dict/Counter, bytes, tensors, numpy arrays, "
        f"Energon state dataclasses); convert it to one of those")


def _resolve_class(name: str) -> type:
    mod, _, qual = name.partition(":")
    if not mod.startswith(_ALLOWED_MODULE_PREFIX):
        raise UnsafeStateError(f"refusing to build {name}: only {_ALLOWED_MODULE_PREFIX}* state "
                               f"classes are allowed")
    obj: Any = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type) or not _allowed_class(obj):
        raise UnsafeStateError(f"refusing to build {name}: not an Energon state class")
    return obj


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise UnsafeStateError(f"unknown tensor dtype {name!r}")
    return dt


def decode(tree: Any) -> Any:
    """Inverse of :func:`encode`; builds nothing outside the allow-list."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode(v) for v in tree]
    if not isinstance(tree, dict):
        raise UnsafeStateError(f"unexpected JSON value {type(tree).__name__}")
    if "__tensor__" in tree:
        dt = _torch_dtype(tree["dtype"])
        raw = _unb64(tree["__tensor__"])
        shape = [int(s) for s in tree["shape"]]
        if not raw:
            return torch.empty(shape, dtype=dt)
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt)
        return flat.reshape(shape).clone()
    if "__ndarray__" in tree:
        dt = np.dtype(tree["dtype"])
        if dt.hasobject:
            raise UnsafeStateError("numpy object dtype refused")
        return np.frombuffer(_unb64(tree["__ndarray__"]), dtype=dt).reshape(
            [int(s) for s in tree["shape"]]).copy()
    if "__npscalar__" in tree:
        dt = np.dtype(tree["dtype"])
        if dt.hasobject:
            raise UnsafeStateError("numpy object dtype refused")
        return dt.type(tree["__npscalar__"])
    if "__bytes__" in tree:
        return _unb64(tree["__bytes__"])
    if "__tuple__" in tree:
        return tuple(decode(v) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {_hashable(decode(k)): decode(v) for k, v in tree["__dict__"]}
    if "__counter__" in tree:
        return Counter({_hashable(decode(k)): decode(v) for k, v in tree["__counter__"]})
    if "__class__" in tree:
        cls = _resolve_class(tree["__class__"])
        if "items" in tree:
            out = cls.__new__(cls)
            dict.update(out, {_hashable(decode(k)): decode(v) for k, v in tree["items"]})
            return out
        out = cls.__new__(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in tree["fields"].items():
            if k not in names:
                raise UnsafeStateError(f"{cls.__qualname__} has no field {k!r}")
            object.__setattr__(out, k, decode(v))
        return out
    raise UnsafeStateError(f"unknown tag in {sorted(tree)[:3]}")


def _hashable(k: Any) -> Any:
    if isinstance(k, list):
        return tuple(_hashable(x) for x in k)
    return k


def dumps(obj: Any) -> bytes:
    """``obj`` as tagged JSON bytes (raises :class:`UnsafeStateError` for an unsupported type)."""
    return json.dumps(encode(obj), separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    """Read what :func:`dumps` wrote; never executes code from the file."""
    try:
        tree = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeStateError(f"not a rank state file (invalid JSON: {e})") from None
    return decode(tree)
