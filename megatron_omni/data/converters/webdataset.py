"""WebDataset image-text tars (as img2dataset writes them) -> caption samples.

``--input`` is one ``.tar`` or a folder of them (read in name order). Members are grouped into
samples by WebDataset's rule (the key is the member path up to the first dot of its file name):
``000000012.jpg`` + ``000000012.txt`` (and/or ``000000012.json`` with a ``"caption"``). Each
sample becomes ``{"messages": [{"role": "user", "content": "<image>\\n<instruction>"},
{"role": "assistant", "content": "<caption>"}], "images": ["media/<modality>/..."],
"task": "caption"}``; the instruction is "Describe the image briefly." unless --instruction /
--instructions-file say otherwise. The image is extracted into the output folder (which is then
the media root for preprocessing); tars are read as a stream, never unpacked as a whole.

Skipped: a sample without caption (``no_caption``) or image (``no_image``, e.g. img2dataset's
failed downloads), and any member with an absolute path, a ``..`` component, or that is a link or
a device (``unsafe_member``): nothing from a tar is ever written under a name it chose.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from megatron_omni.data.converters.common import (
    ConvertError,
    Instructions,
    Item,
    Options,
    OutputDir,
    Sample,
    Skip,
    attempt,
    with_placeholder,
)

DEFAULT_CAPTION_INSTRUCTION = "Describe the image briefly."
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def tar_files(input_path: Path) -> list[Path]:
    if input_path.is_dir():
        tars = sorted(p for p in input_path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not tars:
            raise ConvertError(f"no .tar files in {input_path}")
        return tars
    if not input_path.is_file():
        raise ConvertError(f"{input_path} does not exist")
    return [input_path]


def _unsafe(name: str) -> bool:
    p = PurePosixPath(name)
    return name.startswith(("/", "\\")) or ".." in p.parts or "\\" in name or \
        re.match(r"^[A-Za-z]:", name) is not None


def _samples(tar_path: Path, progress: Callable[[int], None]
             ) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """``(key, {ext: bytes}, unsafe-reason or None)`` per sample, streaming through the tar."""
    key, parts, bad = None, {}, None
    try:
        tar = tarfile.open(tar_path, mode="r|*")
    except tarfile.TarError as e:
        raise ConvertError(f"{tar_path}: not a readable tar ({e})") from None
    with tar:
        try:
            for m in tar:
                progress(m.size + 512)
                m_key, ext = None, None
                match = _KEY.match(m.name)
                if match:
                    m_key, ext = match.group(1), match.group(2).lower()
                else:
                    m_key, ext = m.name, ""
                if m.isdir():
                    continue
                if m_key != key:
                    if key is not None:
                        yield key, parts, bad
                    key, parts, bad = m_key, {}, None
                if _unsafe(m.name):
                    bad = f"member {m.name!r} has an absolute path or '..'"
                    continue
                if not m.isfile():
                    bad = f"member {m.name!r} is a link or a special file"
                    continue
                f = tar.extractfile(m)
                parts[ext] = f.read() if f is not None else b""
        except tarfile.TarError as e:
            raise ConvertError(f"{tar_path}: damaged tar after key {key!r} ({e}); what came "
                               "before was converted") from None
    if key is not None:
        yield key, parts, bad


def _caption(parts: dict[str, bytes]) -> str | None:
    if "txt" in parts:
        try:
            text = parts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Skip("bad_utf8", "the .txt caption is not UTF-8") from None
        if text:
            return text
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta = None
        cap = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(cap, str) and cap.strip():
            return cap.strip()
    return None


def convert_webdataset(opts: Options, out: OutputDir, progress: Callable[[int], None]
                       ) -> Iterator[Item]:
    instr = Instructions(opts.instructions or [DEFAULT_CAPTION_INSTRUCTION], opts.seed)
    index = 0
    for tar_path in tar_files(opts.input):
        for key, parts, bad in _samples(tar_path, progress):
            sid = f"{tar_path.name}/{key}"
            yield attempt(sid, caption_sample, parts, bad, instr.pick(sid), out, index)
            index += 1


def caption_sample(parts: dict[str, bytes], bad: str | None, instruction: str, out: OutputDir,
                   index: int) -> Sample:
    if bad is not None:
        raise Skip("unsafe_member", bad)
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise Skip("no_image", f"no {'/'.join(IMAGE_EXTS)} member")
    caption = _caption(parts)
    if caption is None:
        raise Skip("no_caption", "no .txt and no 'caption' in .json")
    rel, full = out.write_media(index, 0, ext, parts[ext])
    prompt = with_placeholder(instruction, "<image>")
    return Sample({"messages": [{"role": "user", "content": prompt},
                                {"role": "assistant", "content": caption}],
                   "images": [rel], "task": "caption"}, created=[full])
