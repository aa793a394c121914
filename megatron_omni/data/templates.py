"""Sample -> token ids: the Llama-3 chat template with M2-omni media and generation blocks.

Three sample forms (``docs/data_format.md`` has the full JSONL description):

* chat, ``{"messages": [...], "images": [...], "videos": [...], "audios": [...],
  "speech_tokens": [...]}``::

      <|begin_of_text|>
      <|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>           (no loss)
      <|start_header_id|>user<|end_header_id|>\\n\\n{user, media expanded}<|eot_id|>  (no loss)
      <|start_header_id|>assistant<|end_header_id|>\\n\\n                          (no loss)
      {answer}[<gen_audio><speech_c>...</gen_audio>]<|eot_id|>                   (loss)
      ... more turns ...

  Every media placeholder in a user turn becomes ``<image>`` + N x ``<imagePatch>`` + ``</image>``,
  ``<video>`` + N x ``<videoPatch>`` + ``</video>`` or ``<audio>`` + 256 x ``<audioPatch>`` +
  ``</audio>``; N per item comes from the caller (grid sizes). Placeholder rule, per media kind:
  if no message holds a placeholder of that kind but media of that kind are given, the
  placeholders are put at the start of the first user turn (images, then videos, then audios),
  joined by "\\n" and separated from the user text by "\\n"; otherwise the number of placeholders
  must equal the number of media items.
* pure text, ``{"text": "..."}``: ``<|begin_of_text|>`` text ``<|end_of_text|>``, loss everywhere.
* preference, ``{"prompt": str | messages, "chosen": str, "rejected": str}``: two chat sequences
  that share the prompt (and the assistant header); loss on the answer (+ ``<|eot_id|>``) only.

A generation prompt (:func:`template_generation_prompt`, for inference) is a chat sample whose
messages end with a user turn: it renders exactly what training renders before the answer -
system turn, every turn with its media blocks, then the assistant header
``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` - and stops there (no answer, no
``<|eot_id|>``), so the model continues where training taught it to answer.

``labels`` are aligned with ``input_ids`` (not shifted): ``labels[i]`` is ``input_ids[i]`` where
the loss applies and ``IGNORE_INDEX`` elsewhere; the loss shifts by one inside each sample.

Bad samples raise ``SampleError`` (a ``ValueError``) whose ``reason`` is one of ``SKIP_REASONS``,
so preprocessing can skip and count them. ``sequence_lengths``/``count_tokens`` walk the same plan
as the builders without expanding media blocks, so they are exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from megatron_omni.data.special_tokens import AUDIO_TOKENS_PER_CLIP
from megatron_omni.data.tokenizer import OmniTokenizer

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = (
    "You are M2-omni, a helpful assistant. You understand text, images, video and audio, "
    "and you can answer in text or in speech."
)
ROLES = ("system", "user", "assistant")
MEDIA_KINDS = ("image", "video", "audio")
MEDIA_FIELDS = {"image": "images", "video": "videos", "audio": "audios"}
PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
_PLACEHOLDER_KIND = {v: k for k, v in PLACEHOLDERS.items()}
GEN_IMAGE_MARKERS = ("<gen_image>", "</gen_image>")

SKIP_REASONS = frozenset({
    "bad_sample",                # not a JSON object
    "unknown_format",            # not exactly one of messages / text / prompt
    "empty_conversation",        # messages (or a preference prompt) empty
    "bad_message",               # a message is not {"role": ..., "content": ...}
    "bad_role",                  # role other than system / user / assistant
    "misplaced_system",          # a system message that is not the first message
    "non_string_content",        # content / text / chosen / rejected not a string
    "no_user_turn",
    "no_assistant_turn",
    "empty_answer",              # an assistant turn with no text and no speech
    "empty_text",                # pure-text sample with empty text
    "bad_preference",            # prompt without chosen and rejected, or prompt not ending in user
    "bad_media_field",           # images / videos / audios not a list of strings
    "media_tokens_mismatch",     # caller's token counts do not match the sample's media
    "bad_media_tokens",          # a per-item token count that is not a positive int
    "placeholder_mismatch",      # placeholders of a kind != media items of that kind
    "placeholder_outside_user",  # a media placeholder in a system or assistant turn
    "special_token_in_text",     # any other special-token string inside data text
    "bad_gen_image",             # unbalanced / nested <gen_image> ... </gen_image>
    "bad_speech_tokens",         # speech_tokens not a non-empty list of codes in the codebook
})


class SampleError(ValueError):
    """A sample that cannot be templated; ``reason`` is a short key from ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


@dataclass(frozen=True)
class TemplateConfig:
    """How chat samples are templated."""

    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """System turn used when a sample has no system message; None or "" means no system turn."""
    audio_tokens_per_clip: int = AUDIO_TOKENS_PER_CLIP
    """``<audioPatch>`` tokens per audio clip (M2-omni: always 256)."""

    def __post_init__(self):
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError("TemplateConfig.system_prompt must be a string or None")
        if not isinstance(self.audio_tokens_per_clip, int) or self.audio_tokens_per_clip < 1:
            raise ValueError("TemplateConfig.audio_tokens_per_clip must be a positive int, got "
                             f"{self.audio_tokens_per_clip!r}")


@dataclass
class TemplatedSample:
    """One token sequence. Spans are half-open ``[start, end)`` indices, markers included."""

    input_ids: list[int]
    labels: list[int]
    gen_image_spans: list[tuple[int, int]] = field(default_factory=list)
    """Loss-bearing ``<gen_image> caption </gen_image>`` blocks (image-generation prompts)."""
    gen_audio_spans: list[tuple[int, int]] = field(default_factory=list)
    """Loss-bearing ``<gen_audio> <speech_c>... </gen_audio>`` blocks (speech output)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def loss_mask(self) -> list[bool]:
        return [lab != IGNORE_INDEX for lab in self.labels]

    def gen_image_mask(self) -> list[bool]:
        return _spans_to_mask(self.gen_image_spans, len(self))

    def gen_audio_mask(self) -> list[bool]:
        return _spans_to_mask(self.gen_audio_spans, len(self))


@dataclass
class PreferencePair:
    """A DPO pair: both sequences start with the same ``prompt_len`` tokens."""

    chosen: TemplatedSample
    rejected: TemplatedSample
    prompt_len: int


Templated = Union[TemplatedSample, PreferencePair]


def _spans_to_mask(spans: Sequence[tuple[int, int]], n: int) -> list[bool]:
    mask = [False] * n
    for s, e in spans:
        mask[s:e] = [True] * (e - s)
    return mask


# ------------------------------------------------------------------------------------ the plan
# A plan is a list of pieces: (ids, loss) for tokens, or (_Media, False) for a media block. The
# builders expand it; the counters only add up its lengths.


@dataclass(frozen=True)
class _Media:
    kind: str
    n: int


_Piece = tuple[Union[list[int], _Media], bool]


def media_block(tok: OmniTokenizer, kind: str, n: int) -> list[int]:
    """``<image>`` + n x ``<imagePatch>`` + ``</image>`` (or the video / audio equivalent)."""
    s = tok.special
    start, patch, end = {
        "image": (s.image_start, s.image_patch, s.image_end),
        "video": (s.video_start, s.video_patch, s.video_end),
        "audio": (s.audio_start, s.audio_patch, s.audio_end),
    }[kind]
    return [start] + [patch] * n + [end]


def _media_lists(sample: Mapping, image_tokens: Sequence[int], video_tokens: Sequence[int],
                 cfg: TemplateConfig) -> dict[str, list[int]]:
    """Per kind, the token count of each media item, checked against the sample's media fields."""
    given = {"image": image_tokens, "video": video_tokens}
    out: dict[str, list[int]] = {}
    for kind in MEDIA_KINDS:
        paths = sample.get(MEDIA_FIELDS[kind])
        if paths is None:
            paths = []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise SampleError("bad_media_field", f"{MEDIA_FIELDS[kind]!r} must be a list of paths")
        if kind == "audio":
            out[kind] = [cfg.audio_tokens_per_clip] * len(paths)
            continue
        counts = list(given[kind] or [])
        if len(counts) != len(paths):
            raise SampleError("media_tokens_mismatch", f"{len(paths)} {kind}(s) in the sample but "
                              f"{len(counts)} {kind} token count(s) given")
        for n in counts:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise SampleError("bad_media_tokens", f"{kind} token count must be a positive int, "
                                  f"got {n!r}")
        out[kind] = counts
    return out


def _check_speech(codes: Any, tok: OmniTokenizer) -> list[int]:
    k = tok.speech_codebook_size
    if (not isinstance(codes, list) or not codes
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < k
                       for c in codes)):
        raise SampleError(
            "bad_speech_tokens", f"speech_tokens must be a non-empty list of ints in [0, {k})"
        )
    return codes


def _check_messages(messages: Any, *, need_assistant: bool) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise SampleError("empty_conversation", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise SampleError("bad_message", f"message {i} must be an object with role and content")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise SampleError("bad_role", f"message {i} has role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise SampleError(
                "non_string_content",
                f"message {i} content is {type(content).__name__}, not a string",
            )
        if role == "system" and i != 0:
            raise SampleError("misplaced_system", f"system message at position {i}; only first")
        out.append((role, content))
    roles = [r for r, _ in out]
    if "user" not in roles:
        raise SampleError("no_user_turn", "the conversation has no user turn")
    if need_assistant and "assistant" not in roles:
        raise SampleError("no_assistant_turn", "the conversation has no assistant turn")
    return out


def _text(tok: OmniTokenizer, text: str) -> list[int]:
    return tok.encode(text, parse_special=False) if text else []


def _header(tok: OmniTokenizer, role: str) -> list[int]:
    return [tok.start_header_id] + _text(tok, role) + [tok.end_header_id] + _text(tok, "\n\n")


def _content_pieces(
    tok: OmniTokenizer, role: str, content: str, media_iter: dict, loss: bool
) -> list[_Piece]:
    """Split one turn's (stripped) content at its allowed special strings."""
    allowed = {
        "user": set(PLACEHOLDERS.values()),
        "assistant": set(GEN_IMAGE_MARKERS),
        "system": set(),
    }[role]
    pieces: list[_Piece] = []
    pos = 0
    in_gen = False
    for start, end, token in tok.find_special_tokens(content):
        if token not in allowed:
            if token in _PLACEHOLDER_KIND:
                raise SampleError("placeholder_outside_user", f"{token} in a {role} turn")
            raise SampleError("special_token_in_text", f"{token} inside {role} text")
        if start > pos:
            pieces.append((_text(tok, content[pos:start]), loss))
        pos = end
        if token in _PLACEHOLDER_KIND:
            pieces.append(
                (
                    _Media(_PLACEHOLDER_KIND[token], next(media_iter[_PLACEHOLDER_KIND[token]])),
                    False,
                )
            )
        else:  # <gen_image> / </gen_image>
            opening = token == GEN_IMAGE_MARKERS[0]
            if opening == in_gen:
                raise SampleError("bad_gen_image", f"unbalanced {token} in an assistant turn")
            in_gen = opening
            pieces.append(([tok.token_to_id(token)], loss))
    if in_gen:
        raise SampleError("bad_gen_image", "<gen_image> without </gen_image>")
    if pos < len(content):
        pieces.append((_text(tok, content[pos:]), loss))
    return pieces


def _conversation_plan(
    tok: OmniTokenizer,
    sample: Mapping,
    turns: list[tuple[str, str]],
    speech: dict[int, list[int]],
    image_tokens: Sequence[int],
    video_tokens: Sequence[int],
    cfg: TemplateConfig,
    assistant_loss: bool,
) -> list[_Piece]:
    """``speech`` maps a turn index to the speech codes its assistant answer ends with."""
    media = _media_lists(sample, image_tokens, video_tokens, cfg)
    turns = [(role, content.strip()) for role, content in turns]
    for role, content in turns:
        for ph in PLACEHOLDERS.values():
            if role != "user" and ph in content:
                raise SampleError("placeholder_outside_user", f"{ph} in a {role} turn")

    # Placeholder rule, per kind: none in-line -> prepend to the first user turn.
    prefix = []
    for kind in MEDIA_KINDS:
        ph = PLACEHOLDERS[kind]
        found = sum(c.count(ph) for _, c in turns)
        if found == 0:
            prefix += [ph] * len(media[kind])
        elif found != len(media[kind]):
            raise SampleError(
                "placeholder_mismatch",
                f"{found} {ph} placeholder(s) but {len(media[kind])} {kind}(s)",
            )
    if prefix:
        first_user = next(i for i, (r, _) in enumerate(turns) if r == "user")
        text = turns[first_user][1]
        turns[first_user] = ("user", "\n".join(prefix) + ("\n" + text if text else ""))

    media_iter = {k: iter(v) for k, v in media.items()}
    plan: list[_Piece] = [([tok.bos_id], False)]
    if turns[0][0] != "system":
        # The default system prompt; a sample's own system message (even "") replaces it.
        turns.insert(0, ("system", (cfg.system_prompt or "").strip()))
        speech = {i + 1: codes for i, codes in speech.items()}
    for i, (role, content) in enumerate(turns):
        if role == "system" and not content:
            continue
        loss = assistant_loss and role == "assistant"
        plan.append((_header(tok, role), False))
        plan += _content_pieces(tok, role, content, media_iter, loss)
        codes = speech.get(i)
        if codes is not None:
            plan.append(
                (
                    [tok.special.gen_audio_start]
                    + [tok.special.speech_offset + c for c in codes]
                    + [tok.special.gen_audio_end],
                    loss,
                )
            )
        if role == "assistant" and not content and codes is None:
            raise SampleError("empty_answer", "an assistant turn has no text and no speech")
        plan.append(([tok.eot_id], loss))
    return plan


# ------------------------------------------------------------------------------ per-form plans


def sample_form(sample: Any) -> str:
    """``"chat"``, ``"text"`` or ``"preference"``; ``SampleError`` if it is none of them."""
    if not isinstance(sample, Mapping):
        raise SampleError(
            "bad_sample", f"a sample must be a JSON object, got {type(sample).__name__}"
        )
    keys = [k for k in ("messages", "text", "prompt") if k in sample]
    if len(keys) != 1:
        raise SampleError(
            "unknown_format",
            "a sample needs exactly one of 'messages' (chat), "
            f"'text' (pure text) or 'prompt' (preference); found {keys}",
        )
    return {"messages": "chat", "text": "text", "prompt": "preference"}[keys[0]]


def _message_speech(messages, tok) -> dict[int, list[int]]:
    """Message index -> its checked ``speech_tokens`` (assistant messages only)."""
    speech: dict[int, list[int]] = {}
    for i, m in enumerate(messages):
        if "speech_tokens" in m:
            if m["role"] != "assistant":
                raise SampleError("bad_speech_tokens", f"speech_tokens on a {m['role']} message")
            speech[i] = _check_speech(m["speech_tokens"], tok)
    return speech


def _chat_plan(sample, tok, image_tokens, video_tokens, cfg) -> list[_Piece]:
    turns = _check_messages(sample["messages"], need_assistant=True)
    speech = _message_speech(sample["messages"], tok)
    if sample.get("speech_tokens") is not None:
        last = max(i for i, (r, _) in enumerate(turns) if r == "assistant")
        if last in speech:
            raise SampleError(
                "bad_speech_tokens",
                "speech_tokens given both on the sample and on its last assistant turn",
            )
        speech[last] = _check_speech(sample["speech_tokens"], tok)
    return _conversation_plan(tok, sample, turns, speech, image_tokens, video_tokens, cfg, True)


def _text_plan(sample, tok) -> list[_Piece]:
    text = sample["text"]
    if not isinstance(text, str):
        raise SampleError("non_string_content", f"text is {type(text).__name__}, not a string")
    if not text:
        raise SampleError("empty_text", "pure-text sample with empty text")
    found = tok.find_special_tokens(text)
    if found:
        raise SampleError("special_token_in_text", f"{found[0][2]} inside pure text")
    if any(sample.get(f) for f in MEDIA_FIELDS.values()):
        raise SampleError("placeholder_mismatch", "a pure-text sample cannot carry media")
    if sample.get("speech_tokens") is not None:
        raise SampleError("bad_speech_tokens", "speech_tokens need a chat sample")
    return [([tok.bos_id] + _text(tok, text) + [tok.eos_id], True)]


def _preference_plans(sample, tok, image_tokens, video_tokens, cfg):
    if "chosen" not in sample or "rejected" not in sample:
        raise SampleError("bad_preference", "a preference sample needs 'chosen' and 'rejected'")
    if sample.get("speech_tokens") is not None:
        raise SampleError(
            "bad_speech_tokens", "speech_tokens are not supported in preference pairs"
        )
    prompt = sample["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    turns = _check_messages(prompt, need_assistant=False)
    if turns[-1][0] != "user":
        raise SampleError("bad_preference", "the preference prompt must end with a user turn")
    answers = []
    for key in ("chosen", "rejected"):
        ans = sample[key]
        if not isinstance(ans, str):
            raise SampleError("non_string_content", f"{key} is {type(ans).__name__}, not a string")
        ans = ans.strip()
        if not ans:
            raise SampleError("empty_answer", f"{key} is empty")
        answers.append(ans)
    shared = _conversation_plan(tok, sample, turns, {}, image_tokens, video_tokens, cfg, False)
    shared.append((_header(tok, "assistant"), False))
    plans = []
    for ans in answers:
        body = _content_pieces(tok, "assistant", ans, {}, True) + [([tok.eot_id], True)]
        plans.append(shared + body)
    return plans, _plan_len(shared)


def _generation_prompt_plan(sample, tok, image_tokens, video_tokens, cfg) -> list[_Piece]:
    """Everything before the answer: the conversation (no loss) + the assistant header."""
    if not isinstance(sample, Mapping) or "messages" not in sample:
        raise SampleError("unknown_format", "a generation prompt needs 'messages'")
    turns = _check_messages(sample["messages"], need_assistant=False)
    if turns[-1][0] != "user":
        raise SampleError("no_user_turn", "a generation prompt must end with a user turn (the "
                          "turn the assistant answers)")
    if sample.get("speech_tokens") is not None:
        raise SampleError("bad_speech_tokens", "a generation prompt has no answer to carry "
                          "speech_tokens; put them on an earlier assistant message")
    speech = _message_speech(sample["messages"], tok)
    plan = _conversation_plan(tok, sample, turns, speech, image_tokens, video_tokens, cfg, False)
    return plan + [(_header(tok, "assistant"), False)]


def _plans(sample, tok, image_tokens, video_tokens, config) -> tuple[list[list[_Piece]], int]:
    cfg = config or TemplateConfig()
    form = sample_form(sample)
    if form == "chat":
        return [_chat_plan(sample, tok, image_tokens, video_tokens, cfg)], 0
    if form == "text":
        return [_text_plan(sample, tok)], 0
    return _preference_plans(sample, tok, image_tokens, video_tokens, cfg)


def _plan_len(plan: list[_Piece]) -> int:
    return sum(p.n + 2 if isinstance(p, _Media) else len(p) for p, _ in plan)


def _build(tok: OmniTokenizer, plan: list[_Piece]) -> TemplatedSample:
    ids: list[int] = []
    labels: list[int] = []
    for piece, loss in plan:
        part = media_block(tok, piece.kind, piece.n) if isinstance(piece, _Media) else piece
        ids += part
        labels += part if loss else [IGNORE_INDEX] * len(part)
    s = tok.special
    return TemplatedSample(
        ids,
        labels,
        _spans(ids, labels, s.gen_image_start, s.gen_image_end),
        _spans(ids, labels, s.gen_audio_start, s.gen_audio_end),
    )


def _spans(ids: list[int], labels: list[int], start: int, end: int) -> list[tuple[int, int]]:
    spans, open_at = [], None
    for i, t in enumerate(ids):
        if t == start:
            open_at = i
        elif t == end and open_at is not None:
            if labels[open_at] != IGNORE_INDEX:
                spans.append((open_at, i + 1))
            open_at = None
    return spans


# ----------------------------------------------------------------------------------- public API


def template_sample(
    sample: Mapping,
    tok: OmniTokenizer,
    *,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    config: TemplateConfig | None = None,
) -> Templated:
    """Template any sample form: a ``TemplatedSample`` (chat, text) or a ``PreferencePair``.

    ``image_tokens[i]`` / ``video_tokens[i]``: the number of patch tokens of the sample's i-th
    image / video (after the 2x2 merge). Audio clips always take ``config.audio_tokens_per_clip``.
    """
    plans, prompt_len = _plans(sample, tok, image_tokens, video_tokens, config)
    if len(plans) == 2:
        return PreferencePair(_build(tok, plans[0]), _build(tok, plans[1]), prompt_len)
    return _build(tok, plans[0])


def template_chat(
    sample: Mapping,
    tok: OmniTokenizer,
    *,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    config: TemplateConfig | None = None,
) -> TemplatedSample:
    """Template a chat sample (``{"messages": ...}``)."""
    if sample_form(sample) != "chat":
        raise SampleError("unknown_format", "template_chat needs a 'messages' sample")
    return _build(
        tok, _chat_plan(sample, tok, image_tokens, video_tokens, config or TemplateConfig())
    )


def template_text(sample: Mapping, tok: OmniTokenizer) -> TemplatedSample:
    """Template a pure-text sample (``{"text": ...}``): BOS + text + EOS, loss on every token."""
    if sample_form(sample) != "text":
        raise SampleError("unknown_format", "template_text needs a 'text' sample")
    return _build(tok, _text_plan(sample, tok))


def template_preference(
    sample: Mapping,
    tok: OmniTokenizer,
    *,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    config: TemplateConfig | None = None,
) -> PreferencePair:
    """Template a preference sample (``{"prompt", "chosen", "rejected"}``) into a DPO pair."""
    if sample_form(sample) != "preference":
        raise SampleError("unknown_format", "template_preference needs a 'prompt' sample")
    plans, prompt_len = _preference_plans(
        sample, tok, image_tokens, video_tokens, config or TemplateConfig()
    )
    return PreferencePair(_build(tok, plans[0]), _build(tok, plans[1]), prompt_len)


def template_generation_prompt(
    sample: Mapping,
    tok: OmniTokenizer,
    *,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    config: TemplateConfig | None = None,
) -> TemplatedSample:
    """Template the prompt of a generation: ``{"messages": [... ending with a user turn],
    "images": [...], "videos": [...], "audios": [...]}`` up to and including the assistant
    header, with no answer and no ``<|eot_id|>`` after it; no label carries a loss.

    The ids are exactly those training gives the same conversation before its answer's first
    token (earlier assistant turns, with their ``speech_tokens``, render as in training).
    """
    return _build(tok, _generation_prompt_plan(sample, tok, image_tokens, video_tokens,
                                               config or TemplateConfig()))


def sequence_lengths(
    sample: Mapping,
    tok: OmniTokenizer,
    *,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    config: TemplateConfig | None = None,
) -> tuple[int, ...]:
    """Exact token length of each sequence the sample yields (one; two for a preference pair),
    without expanding media blocks. Raises the same ``SampleError`` as templating."""
    plans, _ = _plans(sample, tok, image_tokens, video_tokens, config)
    return tuple(_plan_len(p) for p in plans)


def count_tokens(
    sample: Mapping,
    tok: OmniTokenizer,
    *,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    config: TemplateConfig | None = None,
) -> int:
    """Total tokens of the sample (both sequences of a preference pair summed)."""
    return sum(
        sequence_lengths(
            sample, tok, image_tokens=image_tokens, video_tokens=video_tokens, config=config
        )
    )
