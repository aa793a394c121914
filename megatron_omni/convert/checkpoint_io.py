"""Bounded-memory checkpoint I/O for the conversion tool.

Reading external checkpoints (:class:`TensorSource`)
    A Hugging Face directory (``model.safetensors.index.json`` + shards, one ``*.safetensors``,
    or ``pytorch_model.bin[.index.json]``), a single ``.safetensors`` file or a torch file
    (``model.pt`` of FunASR). Tensors are read one at a time, and only the rows/columns asked
    for: safetensors through ``safe_open(...).get_slice`` (memory-mapped, so a slice costs its
    own bytes), torch files through ``torch.load(weights_only=True, mmap=True)``.

    Only data formats are accepted: every safetensors header is checked against the file size
    before anything is read (a truncated download is a clear error, not a crash in the middle of
    a conversion), and torch files are unpickled with ``weights_only=True`` -- a pickle that needs
    arbitrary code (a custom class, a ``__reduce__`` payload) is refused with
    :class:`UnsafeCheckpointError`; it is never executed.

Reading our checkpoints (:class:`MegatronCheckpointReader`)
    A megatron-omni distributed checkpoint saved at ANY TP/PP is read in its global (TP=1)
    view, a few tensors at a time, through megatron-core's ``dist_checkpointing.load`` with
    ``ShardedTensor`` requests for exactly those tensors (one transformer layer of a stacked
    layer tensor at a time). LoRA deltas (``*lora_A*`` / ``*lora_B*``) are merged on the fly.

Writing (:class:`ShardedSafetensorsWriter`, :func:`atomic_output`)
    Shards are written as tensors arrive (at most ``max_shard_bytes`` held), with
    ``model.safetensors.index.json``; everything goes to a hidden ``.NAME.partial`` directory
    next to the output that is renamed into place only when complete, so a failure never leaves
    a partial output behind. An existing output is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

from ..models.weight_maps.core import ConversionError

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


class UnsafeCheckpointError(ConversionError):
    """A file that would need arbitrary code to load (a pickle beyond plain tensors/containers)."""


class CorruptCheckpointError(ConversionError):
    """A truncated or malformed checkpoint file."""


# --- safetensors validation ----------------------------------------------------------------------

_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def read_safetensors_header(path: PathLike) -> dict:
    """Parse and check a safetensors header: the JSON is well formed and every tensor's bytes
    lie inside the file and match its dtype and shape. Raises :class:`CorruptCheckpointError`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CorruptCheckpointError(
                f"{path} is truncated or not a safetensors file: header of {n} bytes but the "
                f"file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: malformed safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: malformed safetensors header")
    data = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}: malformed entry for {key!r}") from e
        if end > data or begin > end:
            raise CorruptCheckpointError(
                f"{path} is truncated: tensor {key!r} needs bytes {begin}..{end} of the data "
                f"section but the file holds only {data}; download or copy it again")
        spans.append((int(begin), int(end), key))
        if dtype in _ST_DTYPES:
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * _ST_DTYPES[dtype][1]:
                raise CorruptCheckpointError(
                    f"{path}: tensor {key!r} has {end - begin} bytes, {dtype}{shape} needs "
                    f"{numel * _ST_DTYPES[dtype][1]}")
    # Tensors must not share bytes (safetensors' own reader raises a bare error on this).
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0 and b1 < e1:
            raise CorruptCheckpointError(
                f"{path}: tensors {k0!r} (bytes {b0}..{e0}) and {k1!r} (bytes {b1}..{e1}) "
                f"overlap in the data section: the file is damaged or was not written by a "
                f"safetensors writer; obtain it again")
    return header


# --- torch files ---------------------------------------------------------------------------------

def safe_torch_load(path: PathLike):
    """``torch.load`` that only accepts data: tensors and plain containers
    (``weights_only=True``; memory-mapped when the file format allows)."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported (?:global|operand)[^.]*?(?:GLOBAL \S+|$)", str(e))
        reason = m.group(0) if m else (str(e).strip().splitlines() or [""])[0]
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is a pickle that needs code beyond tensors and plain "
            f"containers to unpickle ({reason.strip()}). Only safetensors files and "
            f"torch.load(weights_only=True) files are accepted; convert it to safetensors with "
            f"a tool you trust") from None
    except (EOFError, RuntimeError, ValueError, OSError) as e:
        raise CorruptCheckpointError(f"cannot read {path}: {type(e).__name__}: {e} (truncated or "
                                     f"not a torch checkpoint?)") from None


def _flatten_state(obj) -> dict[str, torch.Tensor]:
    """A state dict out of what ``torch.load`` returned (plain dict, or {'state_dict'|'model':
    dict})."""
    if isinstance(obj, Mapping):
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(torch.is_tensor(v)
                                                            for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        if tensors:
            return tensors
    raise ConversionError("the torch file holds no state dict of tensors")


# --- external sources ----------------------------------------------------------------------------

class TensorSource:
    """Named tensors spread over one or more files, read lazily and by slices."""

    def __init__(self, files: Sequence[PathLike], weight_map: Optional[dict[str, str]] = None,
                 what: str = "checkpoint"):
        self.what = what
        self.files = [Path(f) for f in files]
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._handles: dict[Path, object] = {}
        self._torch: dict[Path, dict] = {}
        self._means: dict[str, torch.Tensor] = {}
        for f in self.files:
            if not f.is_file():
                raise ConversionError(f"{what}: {f} does not exist")
            if f.suffix == ".safetensors":
                for key, info in read_safetensors_header(f).items():
                    if key == "__metadata__":
                        continue
                    self._add(key, f, tuple(info["shape"]),
                              _ST_DTYPES.get(info["dtype"], (None, 0))[0])
            else:
                state = _flatten_state(safe_torch_load(f))
                self._torch[f] = state
                for key, t in state.items():
                    self._add(key, f, tuple(t.shape), t.dtype)
        if weight_map is not None:
            absent = sorted(k for k in weight_map if k not in self._where)
            if absent:
                raise CorruptCheckpointError(
                    f"{what}: the index lists {len(absent)} tensor(s) its shards lack: "
                    f"{', '.join(absent[:8])}")

    def _add(self, key, f, shape, dtype):
        if key in self._where:
            raise CorruptCheckpointError(f"{self.what}: tensor {key!r} is in both "
                                         f"{self._where[key]} and {f}")
        self._where[key], self._shapes[key], self._dtypes[key] = f, shape, dtype

    @classmethod
    def open(cls, path: PathLike, what: str = "checkpoint") -> "TensorSource":
        """A directory (safetensors index, one or more ``*.safetensors``, or torch ``.bin``
        index / files) or a single file."""
        path = Path(path)
        if not path.exists():
            raise ConversionError(f"{what}: {path} does not exist")
        if path.is_file():
            return cls([path], what=what)
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CorruptCheckpointError(f"{index}: malformed index ({e})") from e
                files = sorted({path / f for f in weight_map.values()})
                return cls(files, weight_map, what=what)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            files = sorted([*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        if not files:
            raise ConversionError(f"{what}: no *.safetensors, *.bin, *.pt or *.pth file in {path}")
        return cls(files, what=what)

    # -- queries
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple:
        try:
            return self._shapes[key]
        except KeyError:
            raise ConversionError(f"{self.what} has no tensor {key!r}") from None

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def meta_state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Shape-only (meta device) tensors under ``prefix``, for shape inference."""
        return {k: torch.empty(s, dtype=self._dtypes[k] or torch.float32, device="meta")
                for k, s in self._shapes.items() if k.startswith(prefix)}

    # -- reads
    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            from safetensors import safe_open

            h = safe_open(str(f), framework="pt", device="cpu")
            self._handles[f] = h
        return h

    def read(self, key: str, rows: Optional[tuple[int, int]] = None,
             cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Tensor ``key`` (rows ``[a, b)`` of dim 0 and columns ``[c, d)`` of dim 1 if given);
        only those bytes are read."""
        f = self._where.get(key)
        if f is None:
            raise ConversionError(f"{self.what} has no tensor {key!r}")
        shape = self._shapes[key]
        r = slice(*rows) if rows is not None else slice(0, shape[0] if shape else None)
        if f in self._torch:
            t = self._torch[f][key]
            if not shape:
                return t.clone()
            t = t[r] if cols is None else t[r, cols[0]:cols[1]]
            return t.clone()
        sl = self._handle(f).get_slice(key)
        if not shape:
            return sl[:]
        return (sl[r] if cols is None else sl[r, cols[0]:cols[1]]).contiguous()

    def row_mean(self, key: str, block: int = 8192) -> torch.Tensor:
        """Mean over dim 0 (float32), accumulated ``block`` rows at a time."""
        if key not in self._means:
            n = self.shape(key)[0]
            acc = None
            for a in range(0, n, block):
                part = self.read(key, (a, min(n, a + block))).to(torch.float64).sum(0)
                acc = part if acc is None else acc + part
            self._means[key] = (acc / n).to(torch.float32)
        return self._means[key]

    def close(self) -> None:
        self._handles.clear()
        self._torch.clear()


def read_json(path: PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path}: malformed JSON ({e})") from e


# --- output --------------------------------------------------------------------------------------

def partial_dir(out: PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def check_output(out: PathLike, force: bool) -> None:
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it")


def prepare_output(out: PathLike, force: bool) -> Path:
    """Create (empty) the hidden directory a conversion writes into; returns it."""
    check_output(out, force)
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)  # a previous failed run
    tmp.mkdir(parents=True)
    return tmp


def publish_output(tmp: PathLike, out: PathLike, force: bool) -> None:
    """Move a finished ``tmp`` to ``out`` (replacing it only with ``force``)."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        if not force:
            raise ConversionError(f"{out} appeared during the conversion; pass --force")
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def discard_output(out: PathLike) -> None:
    shutil.rmtree(partial_dir(out), ignore_errors=True)


@contextlib.contextmanager
def atomic_output(out: PathLike, force: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``out``, on failure it is removed."""
    tmp = prepare_output(out, force)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_output(tmp, out, force)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: Union[str, int]) -> int:
    """``"5GB"`` / ``"500MiB"`` / ``"1048576"`` -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ConversionError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB, 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000i-of-0000N.safetensors`` shards as they arrive (at most
    ``max_shard_bytes`` buffered; a larger single tensor gets a shard of its own) and, on
    :meth:`close`, ``model.safetensors.index.json``."""

    def __init__(self, directory: PathLike, max_shard_bytes: int, prefix: str = "model"):
        self.dir = Path(directory)
        self.max = max(1, int(max_shard_bytes))
        self.prefix = prefix
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ConversionError(f"tensor {name!r} written twice")
        self._seen.add(name)
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger tensor: safetensors wants its own storage
        nbytes = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max:
            self._flush()
        self._buf[name] = t
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        path = self.dir / f".{self.prefix}-shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buf, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> dict:
        """Flush, give the shards their final names and write the index; returns the index."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, 1):
            final = self.dir / f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.rename(path, final)
            weight_map.update({k: final.name for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / f"{self.prefix}.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n")
        return index


def load_safetensors_dir(path: PathLike, keys: Optional[Iterable[str]] = None
                         ) -> dict[str, torch.Tensor]:
    """Every tensor (or ``keys``) of a safetensors directory in memory (tests, small models)."""
    src = TensorSource.open(path)
    return {k: src.read(k) for k in (keys if keys is not None else src.keys())}


# --- process group for single-process tools ------------------------------------------------------

def ensure_process_group() -> None:
    """A one-rank gloo process group if none exists (``dist_checkpointing`` needs one)."""
    import tempfile

    if torch.distributed.is_initialized():
        return
    fd, store = tempfile.mkstemp(prefix="omni_convert_pg_")
    os.close(fd)
    os.unlink(store)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0,
                                         world_size=1)


def ensure_single_rank_megatron() -> None:
    """megatron-core parallel state for one process (TP=PP=1), reusing an existing one."""
    from megatron.core import parallel_state as ps

    from ..config import ParallelConfig
    from ..parallel import runtime

    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size() != 1
                or ps.get_pipeline_model_parallel_world_size() != 1):
            raise ConversionError("this command runs in one process (TP=PP=1); it was started "
                                  "inside a model-parallel job")
        return
    ensure_process_group()
    runtime.initialize(ParallelConfig(backend="gloo"), seed=1234,
                       env=runtime.DistEnv(0, 1, 0, "127.0.0.1", 0, "single"))


# --- our distributed checkpoints -----------------------------------------------------------------

_STACKED = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)(?P<post>(?!\d+\.).+)$")


class MegatronCheckpointReader:
    """Read a megatron-omni distributed checkpoint tensor by tensor in its global (TP=1) view.

    ``names()`` are our canonical full names (``llm.decoder.layers.3.input_layernorm.weight``):
    stacked layer tensors (``...layers.self_attention.linear_qkv.weight`` of shape ``[L, ...]``)
    are split per layer and Transformer Engine layer-norm names mapped to local ones. Reads go
    through ``dist_checkpointing.load`` with one ``ShardedTensor`` request per tensor (for a
    stacked tensor: one layer), so memory holds only what is asked for. Needs a process group;
    a one-rank gloo group is created when there is none.
    """

    def __init__(self, path: PathLike):
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

        from ..config.schema import ConfigError
        from ..models.weight_maps.sharding import local_name
        from ..training.checkpoint import FORMAT, META_KEY, read_saved_config, resolve_checkpoint

        ensure_process_group()
        try:
            self.dir = resolve_checkpoint(path)
        except Exception as e:  # CheckpointError: no complete checkpoint
            raise ConversionError(str(e)) from e
        common = dist_checkpointing.load_common_state_dict(str(self.dir))
        meta = common.get(META_KEY) or {}
        if meta.get("format") != FORMAT:
            raise ConversionError(f"{self.dir} is not a megatron-omni checkpoint ({FORMAT})")
        self.meta = meta
        self.extra_state = common.get("extra_state") or {}
        try:  # the one reader of a checkpoint's saved config (its rule for unknown keys)
            saved = read_saved_config(self.dir, meta)
            self.cfg, self.raw_config = saved.config(), saved.raw
        except ConfigError as e:
            raise ConversionError(str(e)) from e
        self._entries: dict[str, tuple[str, Optional[int], tuple, torch.dtype]] = {}
        for key, st in load_sharded_metadata(str(self.dir)).items():
            if not isinstance(st, ShardedTensor) or key.startswith("optimizer."):
                continue
            shape = tuple(st.global_shape)
            m = _STACKED.match(st.key)
            if m:
                for i in range(shape[0]):
                    name = f"{m.group('pre')}{i}.{m.group('post')}"
                    name = local_name(name)
                    self._entries[name] = (st.key, i, shape, st.dtype)
            else:
                name = local_name(st.key)
                self._entries[name] = (st.key, None, shape, st.dtype)
        # PEFT-style names: ``x.base_layer.weight`` is the base of ``x.lora_A...``.
        self._entries = {k.replace(".base_layer.", "."): v for k, v in self._entries.items()}

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple:
        key, layer, shape, _ = self._entry(name)
        return shape[1:] if layer is not None else shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[3]

    def _entry(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise ConversionError(f"{self.dir} has no tensor {name!r}") from None

    def read_many(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors (global view), in one ``dist_checkpointing.load`` call."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request = {}
        for i, name in enumerate(names):
            key, layer, shape, dtype = self._entry(name)
            if layer is None:
                request[f"t{i}"] = ShardedTensor.from_rank_offsets(
                    key, torch.empty(shape, dtype=dtype), replica_id=0)
            else:
                # One layer of a stacked tensor: a [1, ...] block at offset ``layer`` of dim 0
                # (without prepend_axis_num: that path builds a torch ShardedTensor that cannot
                # describe a partial read in a one-rank group).
                request[f"t{i}"] = ShardedTensor.from_rank_offsets(
                    key, torch.empty((1,) + shape[1:], dtype=dtype), (0, layer, shape[0]),
                    replica_id=0)
        # Only part of each global tensor is requested: skip the "every shard read exactly once"
        # check, which is meant for whole-model loads.
        loaded = dist_checkpointing.load(request, str(self.dir), validate_access_integrity=False)
        out = {}
        for i, name in enumerate(names):
            t = loaded[f"t{i}"]
            out[name] = t[0] if self._entries[name][1] is not None else t
        return out

    # -- LoRA
    def lora_pairs(self) -> dict[str, tuple[str, str]]:
        """Base weight name -> (lora_A name, lora_B name)."""
        from ..training.lora import lora_pairs

        return lora_pairs(self._entries)

    def read_merged(self, names: Sequence[str], scale: Optional[float]
                    ) -> dict[str, torch.Tensor]:
        """Like :meth:`read_many`, with ``W + scale * B @ A`` for weights that have a LoRA
        delta."""
        from ..training.lora import merge_lora

        pairs = self.lora_pairs()
        extra = [n for name in names if name in pairs for n in pairs[name]]
        got = self.read_many(list(names) + extra)
        out = {}
        for name in names:
            t = got[name]
            if name in pairs:
                if scale is None:
                    raise ConversionError("the checkpoint holds LoRA deltas but no scale is "
                                          "known; pass --lora-scale (alpha / rank)")
                a, b = pairs[name]
                t = merge_lora(t, got[a], got[b], scale)
            out[name] = t
        return out

    def lora_scale_from_config(self) -> Optional[float]:
        """``alpha / rank`` from the saved run config if it names them: ``lora_alpha`` with
        ``lora_rank`` (or ``lora_r``) in one section, or a ``lora`` section with ``alpha`` and
        ``rank`` (or ``r``)."""
        from ..training.lora import lora_scale_from_config

        return lora_scale_from_config(self.raw_config)

