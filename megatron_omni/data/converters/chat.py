"""Conversation formats: LLaVA-style (with images / videos), ShareGPT text, OpenAI ``messages``.

LLaVA / ShareGPT: ``{"id", "image": str | [str], "video": str | [str], "system": str,
"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}]}``. Speakers map to our
roles (human/user -> user, gpt/assistant/chatgpt/bing/bard/model -> assistant, system -> system);
``<image>`` / ``<video>`` tags stay where they are. A sample whose text holds no tag of a kind is
written as it is: preprocessing then puts the placeholders at the start of the first user turn
(``docs/data_format.md``, placeholder rule). A video sample (``video`` and no ``image``) whose text
uses ``<image>`` and not ``<video>`` (LLaVA-Video-style sets do this) gets its tags renamed to
``<video>``.

OpenAI: ``{"messages": [{"role", "content": str | [part, ...]}]}`` with parts
``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}`` (also a plain
string) and ``{"type": "input_audio", "input_audio": {"data", "format"}}``. Parts are joined with
"\\n", each medium becoming its placeholder at its place. ``data:`` URLs and base64 audio are
written into the output folder; local paths (relative to --media-root, absolute inside it, or
``file://``) are hard-linked (else copied) there too, so the output folder is the media root of
the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from megatron_omni.data.converters.common import (
    Item,
    Options,
    OutputDir,
    Sample,
    Skip,
    attempt,
    decode_base64,
    decode_data_url,
    get_field,
    iter_json_records,
    map_role,
    media_reference,
)


def _as_list(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    raise Skip("bad_record", f"{what} must be a path or a list of paths")


def _source_id(rec: Any, fallback: str) -> str:
    if isinstance(rec, dict):
        v = get_field(rec, "id", "key", "sample_id", "uid")
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v):
            return str(v)
    return fallback


def record_items(opts: Options, progress: Callable[[int], None],
                 make: Callable[[Any, int, Path], Sample]) -> Iterator[Item]:
    """One :class:`Item` per record of a JSON array / JSONL input: ``make(record, index,
    media_root)`` under :func:`attempt`, unreadable lines as their skip, ids from the record."""
    media_root = opts.media_root or opts.input.parent
    for i, rec in iter_json_records(opts.input, progress):
        sid = _source_id(rec, f"{opts.input.name}:{i}")
        if isinstance(rec, Skip):
            yield Item(sid, rec)
            continue
        yield attempt(sid, make, rec, i, media_root)


def conversation_sample(rec: Any, media_root: Path) -> Sample:
    """One LLaVA / ShareGPT record -> our chat sample."""
    if not isinstance(rec, dict):
        raise Skip("bad_record", f"a record must be a JSON object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise Skip("bad_record", "'conversations' must be a non-empty list")
    messages = []
    system = rec.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise Skip("bad_record", f"turn {i} is not an object")
        speaker = get_field(turn, "from", "role")
        text = get_field(turn, "value", "content")
        if not isinstance(text, str):
            raise Skip("bad_record", f"turn {i} has no string 'value'")
        messages.append({"role": map_role(speaker), "content": text})
    images = [media_reference(p, media_root) for p in _as_list(rec.get("image"), "image")
              + _as_list(rec.get("images"), "images")]
    videos = [media_reference(p, media_root) for p in _as_list(rec.get("video"), "video")
              + _as_list(rec.get("videos"), "videos")]
    if videos and not images:
        texts = [m["content"] for m in messages]
        if not any("<video>" in t for t in texts) and any("<image>" in t for t in texts):
            for m in messages:
                m["content"] = m["content"].replace("<image>", "<video>")
    obj: dict[str, Any] = {"messages": messages}
    if images:
        obj["images"] = images
    if videos:
        obj["videos"] = videos
    return Sample(obj)


def convert_conversations(opts: Options, out: OutputDir, progress: Callable[[int], None]
                          ) -> Iterator[Item]:
    """``--format llava`` and ``--format sharegpt`` (a JSON array or JSONL)."""
    yield from record_items(opts, progress, lambda rec, i, root: conversation_sample(rec, root))


# ------------------------------------------------------------------------------------ OpenAI


class _MediaSink:
    """Places a sample's media in the output folder and remembers what it wrote."""

    def __init__(self, out: OutputDir, media_root: Path, index: int):
        self.out, self.media_root, self.index = out, media_root, index
        self.created: list[Path] = []
        self.k = 0

    def _put(self, result: tuple[str, Path]) -> str:
        self.created.append(result[1])
        self.k += 1
        return result[0]

    def from_url(self, url: Any) -> str:
        if isinstance(url, str) and url.startswith("data:"):
            data, ext = decode_data_url(url)
            return self._put(self.out.write_media(self.index, self.k, ext, data))
        rel = media_reference(url, self.media_root)
        src = self.media_root / rel
        root = self.media_root.resolve()
        full = src.resolve()
        if root not in full.parents:
            raise Skip("bad_media_path", f"media path {url!r} leaves the media root")
        if not full.is_file():
            raise Skip("missing_file", f"{url}: no such file under {self.media_root}")
        return self._put(self.out.link_media(self.index, self.k, full))

    def from_base64(self, data: Any, fmt: Any) -> str:
        ext = fmt if isinstance(fmt, str) else "wav"
        return self._put(self.out.write_media(self.index, self.k, ext, decode_base64(data)))


def _openai_content(content: Any, sink: _MediaSink, media: dict[str, list[str]]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Skip("bad_record", f"content must be a string or a list of parts, got "
                   f"{type(content).__name__}")
    pieces = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise Skip("bad_record", "a text part without a string 'text'")
            pieces.append(text)
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            media["images"].append(sink.from_url(url))
            pieces.append("<image>")
        elif kind == "input_audio":
            ref = part.get("input_audio")
            if not isinstance(ref, dict):
                raise Skip("bad_record", "input_audio must be an object with data and format")
            media["audios"].append(sink.from_base64(ref.get("data"), ref.get("format")))
            pieces.append("<audio>")
        else:
            raise Skip("unsupported_content", f"content part type {kind!r}")
    return "\n".join(pieces)


def openai_sample(rec: Any, out: OutputDir, media_root: Path, index: int) -> Sample:
    if not isinstance(rec, dict):
        raise Skip("bad_record", f"a record must be a JSON object, got {type(rec).__name__}")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise Skip("bad_record", "'messages' must be a non-empty list")
    sink = _MediaSink(out, media_root, index)
    media: dict[str, list[str]] = {"images": [], "audios": []}
    messages = []
    try:
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise Skip("bad_record", f"message {i} is not an object")
            if m.get("tool_calls") or m.get("function_call"):
                raise Skip("unsupported_content", f"message {i} holds tool calls")
            role = map_role(m.get("role"))
            messages.append({"role": role,
                             "content": _openai_content(m.get("content"), sink, media)})
    except Exception:
        for p in sink.created:
            p.unlink(missing_ok=True)
        raise
    obj: dict[str, Any] = {"messages": messages}
    obj.update({k: v for k, v in media.items() if v})
    return Sample(obj, created=sink.created)


def convert_openai(opts: Options, out: OutputDir, progress: Callable[[int], None]
                   ) -> Iterator[Item]:
    """``--format openai`` (JSONL or a JSON array of ``{"messages": [...]}``)."""
    yield from record_items(opts, progress,
                            lambda rec, i, root: openai_sample(rec, out, root, i))
