"""The M2-omni special tokens and the speech-token codebook, with stable ids.

Special tokens are appended after the base tokenizer's vocabulary in one fixed order, so their id
is always ``base_vocab_size + offset``. The offsets give exactly the ids the authors' release uses
for a Llama-3.1/3.3 base vocabulary of 128256: its config code holds a table of raw ids
(``<imagePatch>`` 128268 ... ``</gen_audio>`` 128284) and subtracts one from every id when
``llm_type`` starts with ``llama3_1`` or ``llama3_3``, so the ids really used are ``<imagePatch>``
= 128267 (offset 11) ... ``</gen_audio>`` = 128283 (offset 27). The eleven slots before
``<imagePatch>`` and the unlisted gaps are reserved names so the offsets never move.
``<videoPatch>`` (the release processor's name for the video patch token; its config calls the
id ``frame_patch_token``) sits in offset 20 (id 128276 on Llama-3), one of the two slots the
release's table leaves free between ``</gen_image>`` and ``<end_of_audio>``.

After the special tokens come the speech-output codes ``<speech_0>`` ... ``<speech_{K-1}>``
(a CosyVoice-style codebook, K = 4096 by default), also with fixed offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

# Offset from the base vocabulary size -> token string. Order is part of the checkpoint format.
_NAMED = {
    11: "<imagePatch>",
    12: "<image>",
    13: "</image>",
    14: "<video>",
    15: "</video>",
    16: "<gen_imagePatch>",
    17: "<gen_image>",
    18: "</gen_image>",
    20: "<videoPatch>",
    21: "<end_of_audio>",
    22: "<audioPatch>",
    23: "<audio>",
    24: "</audio>",
    25: "<gen_audioPatch>",
    26: "<gen_audio>",
    27: "</gen_audio>",
}
# 29 slots (offsets 19 and 28 stay reserved too), so the speech codes and every vocabulary size
# built on ``base + 29 + codebook`` are unchanged.
NUM_SPECIAL = 29
SPECIAL_TOKENS: list[str] = [
    _NAMED.get(i, f"<|omni_reserved_{i}|>") for i in range(NUM_SPECIAL)
]
# Llama-3 chat tokens for base vocabularies that lack them (a tiny BPE, a SentencePiece model).
# When the base tokenizer has the exact string (Llama-3's tokenizer.json does), its own id is used
# and the slot below stays reserved; otherwise the token takes the slot ``base_vocab_size +
# offset``.
# These offsets live inside the eleven reserved slots before ``<imagePatch>``, so no other id
# ever moves.
CHAT_FALLBACK_OFFSETS: dict[str, int] = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,
    "<|start_header_id|>": 2,
    "<|end_header_id|>": 3,
    "<|eot_id|>": 4,
    "<|pad|>": 5,
}
DEFAULT_SPEECH_CODEBOOK_SIZE = 4096
AUDIO_TOKENS_PER_CLIP = 256


def speech_token(code: int) -> str:
    """The token string of speech code ``code``."""
    return f"<speech_{code}>"


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens for one base vocabulary size and codebook size."""

    base_vocab_size: int
    speech_codebook_size: int = DEFAULT_SPEECH_CODEBOOK_SIZE

    def id(self, token: str) -> int:
        """Id of a special token string (``<image>``, ``<speech_12>``, ...)."""
        if token.startswith("<speech_") and token.endswith(">"):
            code = int(token[len("<speech_") : -1])
            if not 0 <= code < self.speech_codebook_size:
                raise KeyError(
                    f"speech code {code} outside codebook of {self.speech_codebook_size}"
                )
            return self.speech_offset + code
        try:
            return self.base_vocab_size + SPECIAL_TOKENS.index(token)
        except ValueError:
            raise KeyError(f"{token!r} is not an M2-omni special token") from None

    @property
    def speech_offset(self) -> int:
        """Id of ``<speech_0>``."""
        return self.base_vocab_size + NUM_SPECIAL

    @property
    def vocab_size(self) -> int:
        """Total vocabulary: base + special tokens + speech codes (before TP padding)."""
        return self.speech_offset + self.speech_codebook_size

    def is_speech(self, token_id: int) -> bool:
        return self.speech_offset <= token_id < self.vocab_size

    # Convenience accessors for the ids used everywhere.
    image_patch = property(lambda self: self.id("<imagePatch>"))
    image_start = property(lambda self: self.id("<image>"))
    image_end = property(lambda self: self.id("</image>"))
    video_patch = property(lambda self: self.id("<videoPatch>"))
    video_start = property(lambda self: self.id("<video>"))
    video_end = property(lambda self: self.id("</video>"))
    audio_patch = property(lambda self: self.id("<audioPatch>"))
    audio_start = property(lambda self: self.id("<audio>"))
    audio_end = property(lambda self: self.id("</audio>"))
    end_of_audio = property(lambda self: self.id("<end_of_audio>"))
    gen_image_start = property(lambda self: self.id("<gen_image>"))
    gen_image_end = property(lambda self: self.id("</gen_image>"))
    gen_audio_start = property(lambda self: self.id("<gen_audio>"))
    gen_audio_end = property(lambda self: self.id("</gen_audio>"))
