"""Load a run configuration: YAML file + ``key.sub=value`` overrides -> validated dataclasses;
and read back the config a checkpoint was saved with (:func:`parse_saved_config`)."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import logging
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .schema import ConfigError, OmniConfig

log = logging.getLogger(__name__)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, known: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {where}{close[0]}?" if close else f"; known: {sorted(known)}"
    return ConfigError(f"unknown config key {where}{key}{hint}")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the declared field type, or say what is wrong."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(typ, value, prefix=where + ".")
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors with a suggestion."""
    types = _field_types(cls)
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in types:
            raise _unknown(key, types, prefix)
        kwargs[key] = _coerce(value, types[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _parse_value(text: str) -> Any:
    """CLI values are YAML scalars/lists: 4, 1e-4, true, null, [16,24,24], "text"."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: Iterable[str]) -> dict:
    """``["parallel.tensor_model_parallel_size=2", ...]`` -> nested dict."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = _parse_value(raw)
    return out


def merge(base: Mapping, over: Mapping) -> dict:
    """``over`` laid over ``base``, nested mappings merged key by key (neither is changed)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out



def to_dict(cfg) -> dict:
    """Plain nested dict of a config (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> OmniConfig:
    """Read a YAML file (may be None), apply overrides, build and validate the config.

    A YAML file may name ``base: other.yaml`` (relative to itself) to inherit from another file.
    """
    data: dict = {}
    if path is not None:
        data = _read_yaml(Path(path))
    data = merge(data, parse_overrides(overrides))
    cfg = from_dict(OmniConfig, data)
    from .validate import validate

    validate(cfg)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the
    last value silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                f"{seen[key]}) in {key_node.start_mark.name}; keep one of them")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _safe_load_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error or a duplicate key is a ConfigError naming the place."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(f"config file {path} is not valid YAML at {where}: {e.problem}"
                          f"{' (' + e.context + ')' if e.context else ''}; fix the syntax "
                          f"there") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    data = _safe_load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    base = data.pop("base", None)
    if base:
        parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
        data = merge(parent, data)
    return data


def read_config_file(path: str | Path) -> dict:
    """A config YAML file as a nested dict (``base:`` files resolved, duplicate keys refused),
    not yet built or validated."""
    return _read_yaml(Path(path))


# --------------------------------------------------------------------------- saved configs

SAVED_CONFIG_STRICT_SECTIONS = ("model",)
"""Sections of a saved config in which a key this version does not know is an error."""


def _unknown_paths(cls, data: Mapping, prefix: str = "") -> list[str]:
    types = _field_types(cls)
    out = []
    for k, v in data.items():
        if k not in types:
            out.append(f"{prefix}{k}")
        elif dataclasses.is_dataclass(types[k]) and isinstance(v, Mapping):
            out += _unknown_paths(types[k], v, f"{prefix}{k}.")
    return out


def _without(data: Mapping, paths: Iterable[str]) -> dict:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for path in paths:
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node[p] = dict(node[p])
            node = node[p]
        node.pop(last, None)
    return out


@dataclasses.dataclass(frozen=True)
class SavedConfig:
    """The run config a checkpoint was saved with: the YAML dump of the whole
    :class:`OmniConfig`, written by the megatron-omni version that trained it (every checkpoint
    reader goes through :func:`parse_saved_config`; ``training.checkpoint.read_saved_config``
    finds it in a checkpoint).

    The one rule for keys this version does not know (a checkpoint of another version):

    * under ``model`` (:data:`SAVED_CONFIG_STRICT_SECTIONS`): a :class:`ConfigError` naming every
      one of them. The model section decides which weights exist and what they mean; dropping a
      setting the weights depend on would build another architecture and load the weights into
      it, or fail later with an error that does not say why. Use the megatron-omni version that
      wrote the checkpoint (or, for generation, pass a config file).
    * anywhere else (parallel, data, training, stage, alignment): dropped, with one warning
      naming every one of them. Those settings say how the run was trained, not how to read its
      weights; a renamed logging or data option must not lock anyone out of a checkpoint.

    Values of known keys are checked as in any config (:func:`from_dict`).
    """

    raw: dict
    """The saved config as written (every key; e.g. for a LoRA scale the schema lost)."""
    where: str
    """The checkpoint, for messages."""

    def unknown_keys(self) -> list[str]:
        """Dotted paths of the keys this version does not know."""
        return _unknown_paths(OmniConfig, self.raw)

    def data(self) -> dict:
        """The saved config with the rule above applied: a dict :func:`from_dict` accepts."""
        unknown = self.unknown_keys()
        strict = [k for k in unknown if k.split(".")[0] in SAVED_CONFIG_STRICT_SECTIONS]
        if strict:
            raise ConfigError(
                f"{self.where}: the saved run config has model settings this version of "
                f"megatron-omni does not know: {', '.join(strict)}. They decide the model's "
                f"weights, so the checkpoint cannot be read safely; use the megatron-omni version "
                f"that wrote it (or pass a config file that describes the model)")
        if unknown:
            log.warning("%s: ignoring saved config keys unknown to this version of megatron-omni "
                        "(they do not affect the weights): %s", self.where, ", ".join(unknown))
        return _without(self.raw, unknown)

    def config(self, overrides: Iterable[str] | Mapping = ()) -> OmniConfig:
        """The :class:`OmniConfig` (``overrides``: ``key=value`` strings or a nested dict, laid
        over it); built, not validated against a world size."""
        over = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
        return from_dict(OmniConfig, merge(self.data(), over))


def parse_saved_config(text: str | None, where: str) -> SavedConfig:
    """The :class:`SavedConfig` of a checkpoint's saved config YAML (``checkpoint_meta
    ["config"]``); a ConfigError if there is none or it does not parse."""
    if not text:
        raise ConfigError(f"{where} holds no run config (it was not saved by megatron-omni's "
                          f"save_checkpoint with the run config); pass the training config YAML")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the saved run config is not valid YAML ({e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the saved run config is not a mapping")
    return SavedConfig(raw, where)


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source)."""
    import inspect

    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    tree = ast.parse(src)
    docs = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs
