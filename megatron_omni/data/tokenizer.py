"""One tokenizer interface over a Hugging Face ``tokenizer.json`` or a SentencePiece model.

The base tokenizer (Llama-3's byte-level BPE in production, a tiny BPE or SentencePiece model in
tests) is wrapped, never modified. Everything M2-omni adds is *appended* after its vocabulary with
stable ids (see ``special_tokens.py``)::

    [0, base)                         the base vocabulary, as the base tokenizer defines it
    [base, base + 29)                 M2-omni special tokens (11 reserved slots first)
    [base + 29, base + 29 + K)        speech codes <speech_0> ... <speech_{K-1}>

The Llama-3 chat tokens (``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|start_header_id|>``,
``<|end_header_id|>``, ``<|eot_id|>``) and a pad token are taken from the base vocabulary when it
has the exact string (Llama-3's tokenizer.json: 128000, 128001, 128006, 128007, 128009 and, for
3.1+, ``<|finetune_right_pad_id|>`` 128004). A base without them gets them in reserved slots 0..5
(``CHAT_FALLBACK_OFFSETS``), so a Llama-3 checkpoint's ids never move and a small test tokenizer
still has a complete chat format.

Special strings are matched in the text by this wrapper (not by the backend), so ``"<image>"``
always encodes to its single id, with either backend, whatever merges the base BPE happens to have.
Text between special strings is encoded by the backend on its own. Decoding is exact for byte-level
BPE; for SentencePiece it is as exact as the model's normaliser (a model trained with
``normalization_rule_name="identity"``, ``add_dummy_prefix=False``,
``remove_extra_whitespaces=False``
round-trips exactly; a default one drops spaces next to special tokens, as SentencePiece always
does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from megatron_omni.data.special_tokens import (
    CHAT_FALLBACK_OFFSETS,
    DEFAULT_SPEECH_CODEBOOK_SIZE,
    NUM_SPECIAL,
    SPECIAL_TOKENS,
    SpecialTokenIds,
    speech_token,
)

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
# Pad strings looked up in the base vocabulary, in order, before falling back to the reserved slot.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", PAD, "<pad>")
# What ``train_tiny_tokenizer`` adds to its base vocabulary, mimicking Llama-3.1's tokenizer.json.
LLAMA3_BASE_SPECIALS = (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    START_HEADER,
    END_HEADER,
    EOT,
    "<|finetune_right_pad_id|>",
)

# Llama-3's pre-tokeniser split pattern (contractions, words, 1-3 digit numbers, punctuation,
# newlines, spaces), so the tiny tokenizer segments text the way Llama-3 does.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# A candidate special string: "<", up to 64 characters without brackets or spaces, ">". Candidates
# are looked up in a dict, so 4096 speech codes cost nothing and "<foo>" stays plain text.
_CANDIDATE = re.compile(r"<[^<>\s]{1,64}>")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be loaded, or ids outside the vocabulary."""


@dataclass(frozen=True)
class ChatTokenIds:
    """Ids of the Llama-3 chat tokens and pad; ``appended`` names those that live in reserved
    slots."""

    bos: int
    eos: int
    start_header: int
    end_header: int
    eot: int
    pad: int
    appended: frozenset[str]


# ----------------------------------------------------------------------------------------- backends


class _HFBackend:
    name = "huggingface"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
            # A second instance that treats the base's own special strings as plain text.
            self.plain = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"cannot load Hugging Face tokenizer {path}: {e}") from e
        self.plain.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        top = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= self.vocab_size:
            raise TokenizerError(
                f"{path}: token ids are not contiguous (max id {top} >= size "
                f"{self.vocab_size}); cannot append special tokens after it"
            )

    def encode(self, text: str, parse_special: bool) -> list[int]:
        tok = self.tok if parse_special else self.plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def lookup(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)


class _SPBackend:
    name = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except Exception as e:
            hint = ""
            try:
                first = path.read_bytes()[:200].split(b"\n", 1)[0]
                if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first):
                    hint = (
                        " (this looks like a tiktoken BPE file, e.g. Meta's original Llama-3 "
                        "tokenizer.model: use the Hugging Face tokenizer.json instead)"
                    )
            except OSError:
                pass
            raise TokenizerError(f"cannot load SentencePiece model {path}: {e}{hint}") from e
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, parse_special: bool) -> list[int]:
        # SentencePiece never matches control symbols in text; user-defined symbols it handles
        # itself.
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.sp.decode(ids)  # control symbols (<s>, </s>) always decode to ""

    def lookup(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        if self.sp.id_to_piece(i) != token or self.sp.is_unknown(i):
            return None
        return i

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)


# ---------------------------------------------------------------------------------------- tokenizer


class OmniTokenizer:
    """The base tokenizer plus the M2-omni special tokens, chat tokens and speech codebook."""

    def __init__(
        self,
        backend: _HFBackend | _SPBackend,
        *,
        speech_codebook_size: int = DEFAULT_SPEECH_CODEBOOK_SIZE,
    ):
        if speech_codebook_size < 0:
            raise TokenizerError(f"speech_codebook_size must be >= 0, got {speech_codebook_size}")
        self._backend = backend
        self.base_vocab_size: int = backend.vocab_size
        self.special = SpecialTokenIds(self.base_vocab_size, speech_codebook_size)
        base = self.base_vocab_size

        # Appended slots: reserved names, the named M2-omni tokens, then the speech codes.
        slot_names = list(SPECIAL_TOKENS)
        chat: dict[str, int] = {}
        appended: set[str] = set()
        for token in (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT):
            found = backend.lookup(token)
            if found is None:
                found = base + CHAT_FALLBACK_OFFSETS[token]
                slot_names[CHAT_FALLBACK_OFFSETS[token]] = token
                appended.add(token)
            chat[token] = found
        pad = next((i for i in map(backend.lookup, PAD_CANDIDATES) if i is not None), None)
        if pad is None:
            pad = base + CHAT_FALLBACK_OFFSETS[PAD]
            slot_names[CHAT_FALLBACK_OFFSETS[PAD]] = PAD
            appended.add(PAD)
        self.chat = ChatTokenIds(
            bos=chat[BEGIN_OF_TEXT],
            eos=chat[END_OF_TEXT],
            start_header=chat[START_HEADER],
            end_header=chat[END_HEADER],
            eot=chat[EOT],
            pad=pad,
            appended=frozenset(appended),
        )

        self._id_to_str: dict[int, str] = {base + i: s for i, s in enumerate(slot_names)}
        self._id_to_str.update(
            {self.special.speech_offset + c: speech_token(c) for c in range(speech_codebook_size)}
        )
        self._str_to_id: dict[str, int] = {s: i for i, s in self._id_to_str.items()}
        # Chat strings that live in the base vocabulary are matched here too, so they are single
        # ids with every backend.
        self._str_to_id.update(chat)
        assert len(self._id_to_str) == NUM_SPECIAL + speech_codebook_size

    # ---------------------------------------------------------------------------- properties
    @property
    def backend(self) -> str:
        """``"huggingface"`` or ``"sentencepiece"``."""
        return self._backend.name

    @property
    def vocab_size(self) -> int:
        """Base + special tokens + speech codes (the model pads this for TP)."""
        return self.special.vocab_size

    @property
    def speech_codebook_size(self) -> int:
        return self.special.speech_codebook_size

    bos_id = property(lambda self: self.chat.bos)
    eos_id = property(lambda self: self.chat.eos)
    pad_id = property(lambda self: self.chat.pad)
    eot_id = property(lambda self: self.chat.eot)
    start_header_id = property(lambda self: self.chat.start_header)
    end_header_id = property(lambda self: self.chat.end_header)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Every string this wrapper matches in text -> its id (appended tokens and chat tokens)."""
        return dict(self._str_to_id)

    # ------------------------------------------------------------------------------- lookups
    def token_to_id(self, token: str) -> int:
        """Id of a special/chat token string; ``KeyError`` if it is not one."""
        try:
            return self._str_to_id[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer") from None

    def id_to_token(self, token_id: int) -> str:
        """The token string of one id (a base piece, or a special token's string)."""
        self._check_ids([token_id])
        if token_id >= self.base_vocab_size:
            return self._id_to_str[token_id]
        return self._backend.id_to_token(token_id)

    def is_appended(self, token_id: int) -> bool:
        """True for ids after the base vocabulary (special tokens and speech codes)."""
        return self.base_vocab_size <= token_id < self.vocab_size

    def find_special_tokens(self, text: str) -> list[tuple[int, int, str]]:
        """``(start, end, token)`` for every special/chat token string in ``text``, in order."""
        return [
            (m.start(), m.end(), m.group())
            for m in _CANDIDATE.finditer(text)
            if m.group() in self._str_to_id
        ]

    # ------------------------------------------------------------------------ encode/decode
    def encode(
        self, text: str, *, add_bos: bool = False, add_eos: bool = False, parse_special: bool = True
    ) -> list[int]:
        """Token ids of ``text``; special token strings become their single ids.

        With ``parse_special=False`` the whole text is plain text (also the base tokenizer's own
        special strings, for a Hugging Face backend). No BOS/EOS unless asked.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = [self.chat.bos] if add_bos else []
        pos = 0
        if parse_special:
            for start, end, token in self.find_special_tokens(text):
                if start > pos:
                    ids += self._backend.encode(text[pos:start], True)
                ids.append(self._str_to_id[token])
                pos = end
        if pos < len(text):
            ids += self._backend.encode(text[pos:], parse_special)
        if add_eos:
            ids.append(self.chat.eos)
        return ids

    def decode(
        self, ids: Sequence[int] | Iterable[int], *, skip_special_tokens: bool = False
    ) -> str:
        """Text of ``ids``; appended tokens render as their strings (or vanish when skipping)."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < self.base_vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self._backend.decode(run, skip_special_tokens))
                run = []
            if not skip_special_tokens:
                out.append(self._id_to_str[i])
        if run:
            out.append(self._backend.decode(run, skip_special_tokens))
        return "".join(out)

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})"
            )

    def __repr__(self) -> str:
        return (
            f"OmniTokenizer(backend={self.backend}, base_vocab_size={self.base_vocab_size}, "
            f"vocab_size={self.vocab_size}, chat tokens appended={sorted(self.chat.appended)})"
        )


# ------------------------------------------------------------------------------------- loading


def load_tokenizer(
    path: str | Path, *, speech_codebook_size: int = DEFAULT_SPEECH_CODEBOOK_SIZE
) -> OmniTokenizer:
    """Load a tokenizer, picking the backend by file type.

    A directory is searched for ``tokenizer.json`` (preferred) then ``tokenizer.model``. A file
    whose content starts with ``{`` is a Hugging Face ``tokenizers`` JSON; anything else is tried
    as a SentencePiece model.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise TokenizerError(f"{path} holds neither tokenizer.json nor tokenizer.model")
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    backend = _HFBackend(path) if head.startswith(b"{") else _SPBackend(path)
    return OmniTokenizer(backend, speech_codebook_size=speech_codebook_size)


def train_tiny_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | Path,
    *,
    llama3_special_tokens: bool = True,
) -> Path:
    """Train a small byte-level BPE (``tokenizers``) on ``texts`` and save it as a tokenizer.json.

    Same pipeline shape as Llama-3's file: Llama-3 split regex + byte-level mapping, BPE, byte-level
    decoder, no normaliser.

    ``vocab_size`` counts the 256 byte symbols plus merges (a small corpus may stop short of it).
    With ``llama3_special_tokens`` the Llama-3.1 chat/pad tokens are added after the BPE vocabulary,
    as in Llama-3's own file, so the chat tokens come from the base; without them the wrapper
    appends them in reserved slots. Returns ``out_path``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tiny_tokenizer needs at least one non-empty text")
    if vocab_size <= 256:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # Llama-3's pre-tokenisation: split with its regex, then map bytes to printable symbols.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    if llama3_special_tokens:
        tok.add_special_tokens(list(LLAMA3_BASE_SPECIALS))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return out_path
