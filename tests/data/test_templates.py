"""Chat / text / preference templating: exact token layout, loss mask, spans, counts, errors."""

import io

import pytest
import sentencepiece as spm

from megatron_omni.data.templates import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    SKIP_REASONS,
    PreferencePair,
    SampleError,
    TemplateConfig,
    TemplatedSample,
    count_tokens,
    media_block,
    sample_form,
    sequence_lengths,
    template_chat,
    template_generation_prompt,
    template_preference,
    template_sample,
    template_text,
)
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

CORPUS = [
    "You are a helpful assistant. What is in this image? Describe the video.",
    "A cat sits on a red mat.\n\nSure, here is a picture: a red car at night.",
    "user assistant system. Transcribe the audio. Hello world!",
] * 20
SYS = "Be brief."
NO_SYS = TemplateConfig(system_prompt=None)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tpl")
    return load_tokenizer(train_tiny_tokenizer(CORPUS, 400, d / "tokenizer.json"))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tpl_sp")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf,
                                   vocab_size=300, model_type="bpe", character_coverage=1.0,
                                   byte_fallback=True, minloglevel=2)
    (d / "sp.model").write_bytes(buf.getvalue())
    return load_tokenizer(d / "sp.model")


def chat(*turns, **extra):
    roles = {"S": "system", "U": "user", "A": "assistant"}
    return {"messages": [{"role": roles[r], "content": c} for r, c in turns], **extra}


def patches(tag, n):
    return f"<{tag}>" + f"<{tag}Patch>" * n + f"</{tag}>"


# ------------------------------------------------------------------------------ worked example


def _worked_example_prompt(tok):
    """The worked example's ids up to the answer, written out token by token: system turn,
    user turn with one 4-patch image and the question, then the assistant header."""
    enc = lambda s: tok.encode(s, parse_special=False)  # noqa: E731
    s = tok.special
    sh, eh, eot = tok.start_header_id, tok.end_header_id, tok.eot_id
    return ([tok.bos_id]
            + [sh] + enc("system") + [eh] + enc("\n\n") + enc("Be brief.") + [eot]
            + [sh] + enc("user") + [eh] + enc("\n\n")
            + [s.image_start, s.image_patch, s.image_patch, s.image_patch, s.image_patch,
               s.image_end]
            + enc("\nWhat is this?") + [eot]
            + [sh] + enc("assistant") + [eh] + enc("\n\n"))


def test_worked_example_token_by_token(tok):
    sample = chat(("S", SYS), ("U", "<image>\nWhat is this?"), ("A", "A cat."),
                  images=["cat.jpg"])
    out = template_chat(sample, tok, image_tokens=[4])
    prompt = _worked_example_prompt(tok)
    answer = tok.encode("A cat.", parse_special=False) + [tok.eot_id]
    assert out.input_ids == prompt + answer
    assert out.labels == [IGNORE_INDEX] * len(prompt) + answer
    assert out.gen_image_spans == [] and out.gen_audio_spans == []
    # The same ids as tokenizing the fully rendered Llama-3 string in one go.
    rendered = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n" + patches("image", 4)
                + "\nWhat is this?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                "A cat.<|eot_id|>")
    assert tok.decode(out.input_ids) == rendered
    assert tok.encode(rendered) == out.input_ids
    assert count_tokens(sample, tok, image_tokens=[4]) == len(out) == len(out.labels)


def test_default_and_configurable_system_prompt(tok):
    sample = chat(("U", "Hi"), ("A", "Hello"))
    text = tok.decode(template_chat(sample, tok).input_ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           + DEFAULT_SYSTEM_PROMPT + "<|eot_id|><|start_header_id|>user")
    text = tok.decode(
        template_chat(sample, tok, config=TemplateConfig(system_prompt="Custom.")).input_ids
    )
    assert "\n\nCustom.<|eot_id|>" in text and DEFAULT_SYSTEM_PROMPT not in text
    text = tok.decode(template_chat(sample, tok, config=NO_SYS).input_ids)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    )
    # The sample's own system message replaces the default; an empty one removes the turn.
    text = tok.decode(template_chat(chat(("S", "Mine."), ("U", "Hi"), ("A", "Yo")), tok).input_ids)
    assert "Mine." in text and DEFAULT_SYSTEM_PROMPT not in text
    text = tok.decode(template_chat(chat(("S", ""), ("U", "Hi"), ("A", "Yo")), tok).input_ids)
    assert "system" not in text
    with pytest.raises(ValueError):
        TemplateConfig(audio_tokens_per_clip=0)


def test_content_is_trimmed_like_llama3(tok):
    a = template_chat(chat(("U", "  Hi \n"), ("A", "\nHello  ")), tok, config=NO_SYS)
    b = template_chat(chat(("U", "Hi"), ("A", "Hello")), tok, config=NO_SYS)
    assert a.input_ids == b.input_ids


# ----------------------------------------------------------------------------------- loss mask


def _assistant_regions(tok, ids):
    """[start, end) of every assistant answer (content + <|eot_id|>), found from the headers."""
    header = (
        [tok.start_header_id] + tok.encode("assistant") + [tok.end_header_id] + tok.encode("\n\n")
    )
    regions = []
    for i in range(len(ids)):
        if ids[i : i + len(header)] == header:
            start = i + len(header)
            end = ids.index(tok.eot_id, start) + 1
            regions.append((start, end))
    return regions


def test_loss_only_on_assistant_tokens_multi_turn(tok):
    sample = chat(
        ("U", "<image> What is this?"),
        ("A", "A cat."),
        ("U", "And the colour?"),
        ("A", "Red. <gen_image>a red cat</gen_image>"),
        images=["x.png"],
    )
    out = template_chat(sample, tok, image_tokens=[3])
    regions = _assistant_regions(tok, out.input_ids)
    assert len(regions) == 2
    expected = [False] * len(out)
    for s, e in regions:
        expected[s:e] = [True] * (e - s)
    assert out.loss_mask() == expected
    for i, (t, lab) in enumerate(zip(out.input_ids, out.labels)):
        assert lab == (t if expected[i] else IGNORE_INDEX)
    assert tok.decode([t for t in out.labels if t != IGNORE_INDEX]) == (
        "A cat.<|eot_id|>Red. <gen_image>a red cat</gen_image><|eot_id|>"
    )


def test_gen_image_span(tok):
    out = template_chat(
        chat(
            ("U", "Draw a red car."), ("A", "Here it is: <gen_image>a red car at night</gen_image>")
        ),
        tok,
        config=NO_SYS,
    )
    s = tok.special
    ((start, end),) = out.gen_image_spans
    assert out.input_ids[start] == s.gen_image_start and out.input_ids[end - 1] == s.gen_image_end
    assert tok.decode(out.input_ids[start:end]) == "<gen_image>a red car at night</gen_image>"
    assert out.input_ids[end] == tok.eot_id
    mask = out.gen_image_mask()
    assert sum(mask) == end - start and all(mask[start:end])
    assert all(out.labels[i] == out.input_ids[i] for i in range(start, end))
    assert out.gen_audio_spans == [] and not any(out.gen_audio_mask())


def test_gen_audio_span_after_text(tok):
    codes = [5, 0, 4095, 17]
    out = template_chat(
        chat(("U", "Say hi."), ("A", "Hello world!"), speech_tokens=codes), tok, config=NO_SYS
    )
    s = tok.special
    ((start, end),) = out.gen_audio_spans
    assert out.input_ids[start:end] == (
        [s.gen_audio_start] + [s.speech_offset + c for c in codes] + [s.gen_audio_end]
    )
    # Text, then the speech block directly, then <|eot_id|>; all of it in the loss.
    assert tok.decode(out.input_ids).endswith(
        "assistant<|end_header_id|>\n\nHello world!<gen_audio><speech_5><speech_0><speech_4095>"
        "<speech_17></gen_audio><|eot_id|>"
    )
    assert out.labels[start : end + 1] == out.input_ids[start : end + 1]
    assert out.gen_audio_mask() == [start <= i < end for i in range(len(out))]
    assert all(s.is_speech(t) for t in out.input_ids[start + 1 : end - 1])


def test_speech_only_answer_and_per_message_speech(tok):
    sample = {
        "messages": [
            {"role": "user", "content": "<audio>"},
            {"role": "assistant", "content": "", "speech_tokens": [1, 2]},
            {"role": "user", "content": "Again."},
            {"role": "assistant", "content": "OK.", "speech_tokens": [3]},
        ],
        "audios": ["q.wav"],
    }
    out = template_chat(sample, tok, config=NO_SYS)
    assert len(out.gen_audio_spans) == 2
    (a0, a1), (b0, b1) = out.gen_audio_spans
    assert a1 - a0 == 4 and b1 - b0 == 3
    assert out.input_ids[a0 - 1] == tok.encode("\n\n")[-1]  # speech right after the header
    assert count_tokens(sample, tok, config=NO_SYS) == len(out)


# -------------------------------------------------------------------------------------- media


def test_media_blocks_and_order(tok):
    sample = chat(
        ("U", "First <image> then <image>, a clip <video> and a sound <audio>."),
        ("A", "Done."),
        images=["a.png", "b.png"],
        videos=["v.mp4"],
        audios=["s.wav"],
    )
    out = template_chat(sample, tok, image_tokens=[2, 5], video_tokens=[7], config=NO_SYS)
    text = tok.decode(out.input_ids)
    assert (
        "First "
        + patches("image", 2)
        + " then "
        + patches("image", 5)
        + ", a clip "
        + patches("video", 7)
        + " and a sound "
        + patches("audio", 256)
        + "."
    ) in text
    s = tok.special
    assert out.input_ids.count(s.image_patch) == 7
    assert out.input_ids.count(s.video_patch) == 7
    assert out.input_ids.count(s.audio_patch) == 256
    assert all(
        lab == IGNORE_INDEX
        for t, lab in zip(out.input_ids, out.labels)
        if t in (s.image_patch, s.video_patch, s.audio_patch)
    )
    assert media_block(tok, "video", 2) == [
        s.video_start,
        s.video_patch,
        s.video_patch,
        s.video_end,
    ]


def test_placeholders_prepended_when_none_inline(tok):
    sample = chat(
        ("U", "Compare them."),
        ("A", "Same."),
        images=["a.png", "b.png"],
        videos=["v.mp4"],
        audios=["s.wav"],
    )
    out = template_chat(sample, tok, image_tokens=[1, 2], video_tokens=[3], config=NO_SYS)
    assert tok.decode(out.input_ids).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + patches("image", 1)
        + "\n"
        + patches("image", 2)
        + "\n"
        + patches("video", 3)
        + "\n"
        + patches("audio", 256)
        + "\nCompare them.<|eot_id|>"
    )


def test_prepend_rule_is_per_kind_and_goes_to_first_user_turn(tok):
    # The image is in-line (second user turn); the audio has no placeholder -> first user turn.
    sample = chat(
        ("U", "Listen."),
        ("A", "OK."),
        ("U", "Now look: <image>"),
        ("A", "Nice."),
        images=["a.png"],
        audios=["s.wav"],
    )
    text = tok.decode(template_chat(sample, tok, image_tokens=[2], config=NO_SYS).input_ids)
    assert "user<|end_header_id|>\n\n" + patches("audio", 256) + "\nListen.<|eot_id|>" in text
    assert "Now look: " + patches("image", 2) + "<|eot_id|>" in text
    # Media only, no user text: just the blocks.
    text = tok.decode(
        template_chat(chat(("U", ""), ("A", "Hi."), audios=["a.wav"]), tok, config=NO_SYS).input_ids
    )
    assert "user<|end_header_id|>\n\n" + patches("audio", 256) + "<|eot_id|>" in text


def test_audio_tokens_per_clip_config(tok):
    cfg = TemplateConfig(system_prompt=None, audio_tokens_per_clip=3)
    out = template_chat(chat(("U", "<audio>"), ("A", "x"), audios=["a"]), tok, config=cfg)
    assert out.input_ids.count(tok.special.audio_patch) == 3


# ---------------------------------------------------------------------------- text, preference


def test_pure_text(tok):
    out = template_text({"text": "Hello world! A cat."}, tok)
    assert out.input_ids == [tok.bos_id] + tok.encode("Hello world! A cat.") + [tok.eos_id]
    assert out.labels == out.input_ids
    assert template_sample({"text": "x y"}, tok).input_ids[-1] == tok.eos_id
    assert count_tokens({"text": "Hello world! A cat."}, tok) == len(out)


@pytest.mark.parametrize(
    "prompt",
    [
        "What is this? <image>",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What is this? <image>"},
        ],
    ],
)
def test_preference_pair(tok, prompt):
    sample = {
        "prompt": prompt,
        "chosen": "A red cat.",
        "rejected": "A dog, <gen_image>a dog</gen_image>",
        "images": ["c.png"],
    }
    pair = template_preference(sample, tok, image_tokens=[3])
    assert isinstance(pair, PreferencePair)
    p = pair.prompt_len
    assert pair.chosen.input_ids[:p] == pair.rejected.input_ids[:p]
    assert tok.decode(pair.chosen.input_ids[:p]).endswith(
        patches("image", 3) + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    for seq, answer in (
        (pair.chosen, "A red cat."),
        (pair.rejected, "A dog, <gen_image>a dog</gen_image>"),
    ):
        assert seq.labels[:p] == [IGNORE_INDEX] * p
        assert seq.labels[p:] == seq.input_ids[p:]
        assert tok.decode(seq.input_ids[p:]) == answer + "<|eot_id|>"
    assert len(pair.rejected.gen_image_spans) == 1 and pair.chosen.gen_image_spans == []
    assert sequence_lengths(sample, tok, image_tokens=[3]) == (len(pair.chosen), len(pair.rejected))
    assert count_tokens(sample, tok, image_tokens=[3]) == len(pair.chosen) + len(pair.rejected)
    assert isinstance(template_sample(sample, tok, image_tokens=[3]), PreferencePair)


def test_preference_prompt_gen_image_is_not_a_label_span(tok):
    prompt = [
        {"role": "user", "content": "Draw"},
        {"role": "assistant", "content": "<gen_image>x</gen_image>"},
        {"role": "user", "content": "Again"},
    ]
    pair = template_preference(
        {"prompt": prompt, "chosen": "<gen_image>y</gen_image>", "rejected": "no"}, tok
    )
    assert len(pair.chosen.gen_image_spans) == 1
    assert pair.chosen.gen_image_spans[0][0] >= pair.prompt_len
    assert pair.rejected.gen_image_spans == []


def test_sample_form(tok):
    assert sample_form({"messages": []}) == "chat"
    assert sample_form({"text": ""}) == "text"
    assert sample_form({"prompt": "", "chosen": "", "rejected": ""}) == "preference"


# ------------------------------------------------------------------------------------- counts

COUNT_CASES = [
    ("text", {"text": "Hello world!\n\nA cat sits."}, {}),
    ("chat", chat(("U", "Hi"), ("A", "Hello"), ("U", "Bye"), ("A", "Bye!")), {}),
    (
        "image",
        chat(("U", "<image>\nWhat?"), ("A", "A cat."), images=["a"]),
        {"image_tokens": [100]},
    ),
    (
        "video",
        chat(("U", "Describe <video>"), ("A", "A dog runs."), videos=["v"]),
        {"video_tokens": [1024]},
    ),
    ("audio", chat(("U", "Transcribe."), ("A", "Hello world."), audios=["a", "b"]), {}),
    ("speech", chat(("U", "Talk."), ("A", "Sure."), speech_tokens=list(range(50))), {}),
    ("gen_image", chat(("U", "Draw."), ("A", "<gen_image>a red car</gen_image>")), {}),
    (
        "mixed",
        chat(
            ("S", "Be brief."),
            ("U", "<image> and <image>, <video>"),
            ("A", "Two images."),
            ("U", "And this <audio>?"),
            (
                "A",
                "Speech.",
            ),
            images=["a", "b"],
            videos=["v"],
            audios=["s"],
            speech_tokens=[1, 2, 3],
        ),
        {"image_tokens": [4, 9], "video_tokens": [16]},
    ),
    (
        "preference",
        {"prompt": "<image> Which?", "chosen": "Left.", "rejected": "Right!", "images": ["a"]},
        {"image_tokens": [12]},
    ),
]


@pytest.mark.parametrize("name,sample,kw", COUNT_CASES, ids=[c[0] for c in COUNT_CASES])
@pytest.mark.parametrize("backend", ["hf", "sp"])
def test_count_equals_real_length(tok, sp_tok, name, sample, kw, backend):
    t = tok if backend == "hf" else sp_tok
    out = template_sample(sample, t, **kw)
    seqs = [out.chosen, out.rejected] if isinstance(out, PreferencePair) else [out]
    assert sequence_lengths(sample, t, **kw) == tuple(len(s.input_ids) for s in seqs)
    assert count_tokens(sample, t, **kw) == sum(len(s.input_ids) for s in seqs)
    for s in seqs:
        assert isinstance(s, TemplatedSample) and len(s.labels) == len(s.input_ids)
        assert any(lab != IGNORE_INDEX for lab in s.labels)


# ------------------------------------------------------------------------------------- errors

U, A = ("U", "Hi"), ("A", "Hello")
ERROR_CASES = [
    (
        "placeholder_mismatch",
        chat(("U", "<image> <image>"), A, images=["a"]),
        {"image_tokens": [1]},
    ),
    (
        "placeholder_mismatch",
        chat(("U", "<image>"), A, images=["a", "b"]),
        {"image_tokens": [1, 1]},
    ),
    ("placeholder_mismatch", chat(("U", "<audio>"), A), {}),
    ("placeholder_mismatch", {"text": "hello", "images": ["a"]}, {"image_tokens": [1]}),
    (
        "placeholder_outside_user",
        chat(U, ("A", "see <image>"), images=["a"]),
        {"image_tokens": [1]},
    ),
    ("placeholder_outside_user", chat(("S", "<video>"), U, A, videos=["v"]), {"video_tokens": [1]}),
    ("empty_conversation", {"messages": []}, {}),
    ("empty_conversation", {"messages": "Hi"}, {}),
    ("no_assistant_turn", chat(U, ("U", "again")), {}),
    ("no_user_turn", chat(("S", "x"), A), {}),
    (
        "bad_role",
        {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
        {},
    ),
    ("bad_role", {"messages": [{"role": None, "content": "Hi"}]}, {}),
    (
        "non_string_content",
        {"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "x"}]},
        {},
    ),
    (
        "non_string_content",
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
        {},
    ),
    ("non_string_content", {"text": 5}, {}),
    ("non_string_content", {"prompt": "q", "chosen": 1, "rejected": "b"}, {}),
    ("bad_message", {"messages": ["Hi"]}, {}),
    ("bad_message", {"messages": [{"role": "user"}]}, {}),
    ("misplaced_system", chat(U, ("S", "late"), A), {}),
    ("empty_answer", chat(U, ("A", "   ")), {}),
    ("empty_answer", {"prompt": "q", "chosen": "", "rejected": "b"}, {}),
    ("empty_text", {"text": ""}, {}),
    ("bad_sample", ["not", "a", "dict"], {}),
    ("unknown_format", {}, {}),
    ("unknown_format", {"messages": [], "text": "x"}, {}),
    ("bad_preference", {"prompt": "q", "chosen": "a"}, {}),
    (
        "bad_preference",
        {
            "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "chosen": "a",
            "rejected": "b",
        },
        {},
    ),
    ("bad_media_field", chat(U, A, images="a.png"), {}),
    ("bad_media_field", chat(U, A, audios=[3]), {}),
    ("media_tokens_mismatch", chat(("U", "<image>"), A, images=["a"]), {}),
    ("media_tokens_mismatch", chat(U, A), {"video_tokens": [4]}),
    ("bad_media_tokens", chat(("U", "<image>"), A, images=["a"]), {"image_tokens": [0]}),
    ("bad_media_tokens", chat(("U", "<image>"), A, images=["a"]), {"image_tokens": [2.5]}),
    ("special_token_in_text", chat(("U", "end<|eot_id|>"), A), {}),
    ("special_token_in_text", chat(("U", "<imagePatch>"), A), {}),
    ("special_token_in_text", chat(U, ("A", "<gen_audio><speech_1></gen_audio>")), {}),
    ("special_token_in_text", chat(("U", "<gen_image>x</gen_image>"), A), {}),
    ("special_token_in_text", {"text": "a <image> b"}, {}),
    ("bad_gen_image", chat(U, ("A", "x </gen_image>")), {}),
    ("bad_gen_image", chat(U, ("A", "<gen_image> x")), {}),
    ("bad_gen_image", chat(U, ("A", "<gen_image><gen_image>x</gen_image></gen_image>")), {}),
    ("bad_speech_tokens", chat(U, A, speech_tokens=[]), {}),
    ("bad_speech_tokens", chat(U, A, speech_tokens=[4096]), {}),
    ("bad_speech_tokens", chat(U, A, speech_tokens=[-1]), {}),
    ("bad_speech_tokens", chat(U, A, speech_tokens=["1"]), {}),
    ("bad_speech_tokens", chat(U, A, speech_tokens=[True]), {}),
    (
        "bad_speech_tokens",
        {
            "messages": [
                {"role": "user", "content": "x", "speech_tokens": [1]},
                {"role": "assistant", "content": "y"},
            ]
        },
        {},
    ),
    (
        "bad_speech_tokens",
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y", "speech_tokens": [1]},
            ],
            "speech_tokens": [2],
        },
        {},
    ),
    ("bad_speech_tokens", {"text": "x", "speech_tokens": [1]}, {}),
]


@pytest.mark.parametrize(
    "reason,sample,kw", ERROR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ERROR_CASES)]
)
def test_errors(tok, reason, sample, kw):
    assert reason in SKIP_REASONS
    with pytest.raises(SampleError) as e:
        template_sample(sample, tok, **kw)
    assert e.value.reason == reason, str(e.value)
    assert isinstance(e.value, ValueError)
    # The counter rejects the same samples for the same reason.
    with pytest.raises(SampleError) as e:
        count_tokens(sample, tok, **kw)
    assert e.value.reason == reason


def test_every_reason_is_tested():
    assert {c[0] for c in ERROR_CASES} == set(SKIP_REASONS)


def test_form_specific_entry_points_check_the_form(tok):
    with pytest.raises(SampleError, match="messages"):
        template_chat({"text": "x"}, tok)
    with pytest.raises(SampleError):
        template_text(chat(U, A), tok)
    with pytest.raises(SampleError):
        template_preference({"text": "x"}, tok)


# ------------------------------------------------------------------------- generation prompts


def _first_answer_token(out):
    return next(i for i, lab in enumerate(out.labels) if lab != IGNORE_INDEX)


def test_generation_prompt_worked_example(tok):
    """The prompt of a generation is the training template of the same conversation up to (not
    including) the answer's first token: ends with the assistant header, no answer, no eot."""
    question = chat(("S", SYS), ("U", "<image>\nWhat is this?"), images=["cat.jpg"])
    out = template_generation_prompt(question, tok, image_tokens=[4])
    prompt = _worked_example_prompt(tok)
    assert out.input_ids == prompt
    assert out.labels == [IGNORE_INDEX] * len(prompt)
    assert tok.decode(out.input_ids).endswith(
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    trained = template_chat(chat(("S", SYS), ("U", "<image>\nWhat is this?"), ("A", "A cat."),
                                 images=["cat.jpg"]), tok, image_tokens=[4])
    assert trained.input_ids[:_first_answer_token(trained)] == out.input_ids


@pytest.mark.parametrize("config", [None, NO_SYS, TemplateConfig(system_prompt="Custom.")])
def test_generation_prompt_equals_training_before_the_last_answer(tok, config):
    """Multi-turn history (an earlier answer with speech and a gen_image caption, media
    placeholders prepended to the first user turn): the prompt is the training sequence of the
    conversation cut before its last answer."""
    history = [
        {"role": "user", "content": "Draw something."},
        {"role": "assistant", "content": "Sure: <gen_image>a red cat</gen_image>",
         "speech_tokens": [1, 2]},
        {"role": "user", "content": "And now describe the clip."},
    ]
    media = {"images": ["a.png"], "videos": ["v.mp4"], "audios": ["s.wav"]}
    prompt = template_generation_prompt({"messages": history, **media}, tok, image_tokens=[3],
                                        video_tokens=[5], config=config)
    trained = template_chat({"messages": history + [{"role": "assistant", "content": "Red."}],
                             **media}, tok, image_tokens=[3], video_tokens=[5], config=config)
    cut = max(i for i, lab in enumerate(trained.labels)
              if lab == IGNORE_INDEX) + 1  # first token of the LAST answer
    assert trained.input_ids[:cut] == prompt.input_ids
    assert tok.decode(trained.input_ids[cut:]) == "Red.<|eot_id|>"
    assert prompt.gen_image_spans == [] and prompt.gen_audio_spans == []  # no loss, no spans


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is this? <image>"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image> Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More."}],
])
def test_generation_prompt_equals_the_preference_prompt(tok, messages):
    """What generation templated before (the shared prompt of a stand-in preference pair): the
    same ids, so generation prompts did not change."""
    sample = {"messages": messages, "images": ["c.png"]}
    prompt = template_generation_prompt(sample, tok, image_tokens=[3])
    pair = template_preference({"prompt": messages, "chosen": "-", "rejected": "-",
                                "images": ["c.png"]}, tok, image_tokens=[3])
    assert prompt.input_ids == pair.chosen.input_ids[:pair.prompt_len]


def test_generation_prompt_errors(tok):
    with pytest.raises(SampleError) as e:
        template_generation_prompt(chat(("U", "Hi"), ("A", "Hello")), tok)
    assert e.value.reason == "no_user_turn"
    with pytest.raises(SampleError) as e:
        template_generation_prompt(chat(("U", "Hi"), speech_tokens=[1]), tok)
    assert e.value.reason == "bad_speech_tokens"
    with pytest.raises(SampleError) as e:
        template_generation_prompt({"text": "Hi"}, tok)
    assert e.value.reason == "unknown_format"
    with pytest.raises(SampleError) as e:
        template_generation_prompt(chat(("U", "<image> and <image>")), tok, image_tokens=[2])
    assert e.value.reason in ("media_tokens_mismatch", "placeholder_mismatch")
