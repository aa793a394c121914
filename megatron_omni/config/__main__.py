"""``python -m megatron_omni.config``: every config field with its type, default and docstring.

    python -m megatron_omni.config --explain                    # every section
    python -m megatron_omni.config --explain model.llm          # one section (and its subsections)
    python -m megatron_omni.config --explain training.lr        # one field
    python -m megatron_omni.config --explain stage --config examples/stages/9b/it3.yaml
        # the values that config resolves to (base files and key.sub=value overrides applied),
        # with the default beside every value that differs from it

The text under each field is the docstring written under it in ``config/schema.py``; the YAML
spelling of a field is its dotted name (``model.llm.num_layers: 32`` is ``model: {llm:
{num_layers: 32}}``). Exit status 2 for an unknown section or field, or an invalid config.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import sys
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .loader import field_docs, load_config
from .schema import ConfigError, OmniConfig

WIDTH = 100


@dataclass
class Entry:
    """One line of the explanation: a section (a nested dataclass) or a field."""

    name: str
    """Dotted name: ``model.llm`` (section) or ``model.llm.num_layers`` (field)."""
    doc: str
    is_section: bool
    type: str = ""
    default: Any = None
    value: Any = None


def type_name(t: Any) -> str:
    """``Optional[int]`` -> ``int | None``, ``list[str]`` -> ``list[str]``, ``int`` -> ``int``."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        return " | ".join(type_name(a) for a in args if a is not type(None)) + (
            " | None" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(map(type_name, args))}]"
    return getattr(t, "__name__", str(t))


def fmt(value: Any) -> str:
    """A value as it is written in YAML / on the command line (null, true, 1e-05, [16, 24, 24])."""
    return json.dumps(value)


def entries(default: Any, value: Any = None, prefix: str = "") -> Iterator[Entry]:
    """Sections and fields of the dataclass instance ``default`` in declaration order;
    ``value`` (same class) supplies resolved values."""
    cls = type(default)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        d = getattr(default, f.name)
        v = getattr(value, f.name) if value is not None else None
        doc = inspect.cleandoc(docs.get(f.name, ""))
        if dataclasses.is_dataclass(d):
            cdoc = inspect.cleandoc(type(d).__doc__ or "")
            yield Entry(name, doc if doc == cdoc or not cdoc else f"{doc} {cdoc}", True,
                        type=type(d).__name__)
            yield from entries(d, v, name + ".")
        else:
            yield Entry(name, doc, False, type=type_name(hints[f.name]), default=d, value=v)


def select(all_entries: list[Entry], name: str) -> list[Entry]:
    """The entries under ``name`` (a section or a field); every entry for ``""``."""
    if not name:
        return all_entries
    out = [e for e in all_entries if e.name == name or e.name.startswith(name + ".")]
    if not out:
        known = [e.name for e in all_entries]
        close = difflib.get_close_matches(name, known, n=1)
        sections = sorted({e.name for e in all_entries if e.is_section})
        hint = f"did you mean {close[0]}?" if close else f"sections: {', '.join(sections)}"
        raise ConfigError(f"unknown config section or field {name!r}; {hint}")
    return out


def _wrap(text: str, indent: int) -> list[str]:
    lines = []
    for para in text.split("\n\n"):
        lines += textwrap.wrap(" ".join(para.split()), WIDTH - indent) or [""]
    return [" " * indent + s for s in lines]


def render(selected: list[Entry], with_values: bool) -> str:
    out = []
    for e in selected:
        if e.is_section:
            out += ["", f"[{e.name}]  ({e.type})"] + _wrap(e.doc, 2)
            continue
        if with_values:
            shown = f"{fmt(e.value)}" + (f"   (default {fmt(e.default)})"
                                         if e.value != e.default else "")
        else:
            shown = fmt(e.default)
        out.append(f"  {e.name}: {e.type} = {shown}")
        out += _wrap(e.doc, 6)
    return "\n".join(out).lstrip("\n") + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_omni.config", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--explain", nargs="?", const="", default="", metavar="SECTION_OR_FIELD",
                   help="print the fields (all, or of one dotted section / field) with type, "
                        "default and docstring")
    p.add_argument("--config", metavar="FILE",
                   help="show the values this YAML config (+ overrides) resolves to")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides (with --config)")
    args = p.parse_args(argv)
    try:
        value = None
        if args.config is not None or args.overrides:
            value = load_config(args.config, args.overrides)
        selected = select(list(entries(OmniConfig(), value)), args.explain)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if value is not None:
        src = args.config or "defaults"
        extra = f" + {' '.join(args.overrides)}" if args.overrides else ""
        print(f"# values from {src}{extra}; '(default X)' marks those that differ\n")
    sys.stdout.write(render(selected, with_values=value is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
