"""Preference pairs in the common DPO layout -> our preference form (``docs/data_format.md`` 3).

Input records (JSON array or JSONL): ``{"prompt", "chosen", "rejected"}`` plus optional
``"image"`` / ``"images"`` (paths relative to --media-root). ``question`` is accepted for
``prompt`` (RLAIF-V style). Each of prompt / chosen / rejected may be a string or, in TRL's
conversational layout, a list of ``{"role", "content"}`` messages, content being a string or
parts (``{"type": "text", "text"}``, ``{"type": "image"}`` -> ``<image>``): the prompt list is kept
as a message list (it must end with a user turn), chosen / rejected lists give their last
assistant message. With no prompt at all (TRL's "implicit prompt"), the messages chosen and
rejected share before their last turn are the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from megatron_omni.data.converters.chat import _as_list, record_items
from megatron_omni.data.converters.common import (
    Item,
    Options,
    OutputDir,
    Sample,
    Skip,
    map_role,
    media_reference,
)


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Skip("bad_record", f"content must be a string or parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image":
            pieces.append("<image>")
        else:
            raise Skip("unsupported_content", f"content part {part!r:.60}")
    return "\n".join(pieces)


def _messages(v: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise Skip("bad_record", f"{what} must be a string or a non-empty message list")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise Skip("bad_record", f"{what} message {i} is not an object")
        out.append({"role": map_role(m.get("role")), "content": _content(m.get("content"))})
    return out


def _answer(v: Any, what: str) -> str:
    if isinstance(v, str):
        return v
    msgs = _messages(v, what)
    if msgs[-1]["role"] != "assistant":
        raise Skip("bad_record", f"{what} must end with an assistant message")
    return msgs[-1]["content"]


def dpo_sample(rec: Any, media_root: Path) -> Sample:
    if not isinstance(rec, dict):
        raise Skip("bad_record", f"a record must be a JSON object, got {type(rec).__name__}")
    if "chosen" not in rec or "rejected" not in rec:
        raise Skip("bad_record", "a preference record needs 'chosen' and 'rejected'")
    prompt = rec.get("prompt", rec.get("question"))
    chosen, rejected = rec["chosen"], rec["rejected"]
    if prompt is None:
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if len(c) < 2 or c[:-1] != r[:-1]:
            raise Skip("bad_record", "no prompt, and chosen / rejected share no conversation "
                       "before their last turn")
        prompt_obj: Any = c[:-1]
    elif isinstance(prompt, str):
        prompt_obj = prompt
    else:
        prompt_obj = _messages(prompt, "prompt")
    obj: dict[str, Any] = {"prompt": prompt_obj, "chosen": _answer(chosen, "chosen"),
                           "rejected": _answer(rejected, "rejected")}
    images = [media_reference(p, media_root) for p in _as_list(rec.get("image"), "image")
              + _as_list(rec.get("images"), "images")]
    if images:
        obj["images"] = images
    return Sample(obj)


def convert_dpo(opts: Options, out: OutputDir, progress: Callable[[int], None]
                ) -> Iterator[Item]:
    yield from record_items(opts, progress, lambda rec, i, root: dpo_sample(rec, root))
