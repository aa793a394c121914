"""OmniTokenizer over both backends: loading, stable ids, chat tokens, special-token round trips."""

import io

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from megatron_omni.data.special_tokens import SpecialTokenIds
from megatron_omni.data.tokenizer import (
    OmniTokenizer,
    TokenizerError,
    load_tokenizer,
    train_tiny_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! What is in this image? Describe the video and the audio clip.",
    "Sure, here it is.\n\nThe answer is 42, isn't it? Yes: 1234 apples.",
    "user assistant system café naïve",
] * 20

# Offsets after the base vocabulary, written out (the release's ids for a Llama-3.1/3.3 base, i.e.
# its raw table minus one, minus 128256; <videoPatch> in a slot its table leaves free).
EXPECTED_OFFSETS = {
    "<imagePatch>": 11, "<image>": 12, "</image>": 13, "<video>": 14, "</video>": 15,
    "<gen_imagePatch>": 16, "<gen_image>": 17, "</gen_image>": 18, "<videoPatch>": 20,
    "<end_of_audio>": 21, "<audioPatch>": 22, "<audio>": 23, "</audio>": 24,
    "<gen_audioPatch>": 25, "<gen_audio>": 26, "</gen_audio>": 27,
    "<speech_0>": 29, "<speech_1>": 30, "<speech_4095>": 29 + 4095,
}

ROUND_TRIP = ("Hi <image> and<video>!\n<audio></audio> x</gen_audio><speech_0><speech_4095> "
              "ünïcode 日本 <foo> <speech_4096> <|eot_id|>end")


def _train_sp(path, **kwargs):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf,
                                   vocab_size=400, model_type="bpe", character_coverage=1.0,
                                   byte_fallback=True, minloglevel=2, **kwargs)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "llama3").mkdir()
    (d / "plain").mkdir()
    return {
        # Llama-3-like: the chat tokens are in the base vocabulary.
        "hf_llama3": train_tiny_tokenizer(CORPUS, 400, d / "llama3" / "tokenizer.json"),
        # No chat tokens in the base: they go to the reserved slots.
        "hf_plain": train_tiny_tokenizer(CORPUS, 400, d / "plain" / "tokenizer.json",
                                         llama3_special_tokens=False),
        # SentencePiece that keeps whitespace exactly, and a default one.
        "sp_exact": _train_sp(d / "exact.model", normalization_rule_name="identity",
                              add_dummy_prefix=False, remove_extra_whitespaces=False),
        "sp_default": _train_sp(d / "default.model"),
    }


@pytest.fixture(scope="module")
def toks(files):
    return {k: load_tokenizer(v) for k, v in files.items()}


ALL = ["hf_llama3", "hf_plain", "sp_exact", "sp_default"]
EXACT = ["hf_llama3", "hf_plain", "sp_exact"]


def test_load_picks_backend_by_file_type(files, tmp_path):
    assert load_tokenizer(files["hf_llama3"]).backend == "huggingface"
    assert load_tokenizer(files["hf_llama3"].parent).backend == "huggingface"  # directory
    assert load_tokenizer(files["sp_exact"]).backend == "sentencepiece"
    d = tmp_path / "spdir"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(files["sp_exact"].read_bytes())
    assert load_tokenizer(d).backend == "sentencepiece"
    # A .model extension does not matter: the JSON content decides.
    (tmp_path / "odd.model").write_text(files["hf_plain"].read_text())
    assert load_tokenizer(tmp_path / "odd.model").backend == "huggingface"


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="neither"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="Hugging Face"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken format
    with pytest.raises(TokenizerError, match="tiktoken"):
        load_tokenizer(tmp_path / "tokenizer.model")
    assert issubclass(TokenizerError, ValueError)


@pytest.mark.parametrize("name", ALL)
def test_stable_special_ids(toks, name):
    tok = toks[name]
    base = tok.base_vocab_size
    for token, offset in EXPECTED_OFFSETS.items():
        assert tok.token_to_id(token) == base + offset, token
        assert tok.encode(token) == [base + offset], token
        assert tok.id_to_token(base + offset) == token
    assert tok.vocab_size == base + 29 + 4096
    assert tok.special == SpecialTokenIds(base, 4096)
    assert tok.is_appended(base) and not tok.is_appended(base - 1)
    assert not tok.is_appended(tok.vocab_size)


def test_base_vocab_size_per_backend(files, toks):
    hf = Tokenizer.from_file(str(files["hf_llama3"]))
    assert toks["hf_llama3"].base_vocab_size == hf.get_vocab_size(with_added_tokens=True)
    sp = spm.SentencePieceProcessor(model_file=str(files["sp_exact"]))
    assert toks["sp_exact"].base_vocab_size == sp.get_piece_size() == 400


def test_llama3_ids_match_the_release():
    """For a Llama-3.1/3.3 base the release uses its raw table minus one (issue #9)."""
    ids = SpecialTokenIds(128256)
    assert (ids.image_patch, ids.image_start, ids.image_end) == (128267, 128268, 128269)
    assert (ids.video_start, ids.video_end) == (128270, 128271)
    assert (ids.id("<gen_imagePatch>"), ids.id("<gen_image>"), ids.id("</gen_image>")) == (
        128272, 128273, 128274)
    assert (ids.end_of_audio, ids.audio_patch, ids.audio_start, ids.audio_end) == (
        128277, 128278, 128279, 128280)
    assert (ids.id("<gen_audioPatch>"), ids.gen_audio_start, ids.gen_audio_end) == (
        128281, 128282, 128283)
    # The video patch id is in one of the two slots the release's table leaves free.
    assert ids.video_patch == 128276
    assert ids.speech_offset == 128285 and ids.vocab_size == 128285 + 4096


def test_chat_tokens_from_base_when_present(files, toks):
    tok = toks["hf_llama3"]
    raw = Tokenizer.from_file(str(files["hf_llama3"]))
    chat = tok.chat
    assert chat.appended == frozenset()
    assert chat.bos == raw.token_to_id("<|begin_of_text|>") == tok.bos_id
    assert chat.eos == raw.token_to_id("<|end_of_text|>") == tok.eos_id
    assert chat.start_header == raw.token_to_id("<|start_header_id|>")
    assert chat.end_header == raw.token_to_id("<|end_header_id|>")
    assert chat.eot == raw.token_to_id("<|eot_id|>") == tok.eot_id
    assert chat.pad == raw.token_to_id("<|finetune_right_pad_id|>") == tok.pad_id
    ids = (chat.bos, chat.eos, chat.start_header, chat.end_header, chat.eot)
    assert max(ids) < tok.base_vocab_size
    # The reserved slots stay reserved.
    base = tok.base_vocab_size
    assert [tok.id_to_token(base + i) for i in (*range(11), 19, 28)] == [
        f"<|omni_reserved_{i}|>" for i in (*range(11), 19, 28)
    ]
    assert tok.encode("<|eot_id|>") == [chat.eot]


@pytest.mark.parametrize("name", ["hf_plain", "sp_exact", "sp_default"])
def test_chat_tokens_appended_in_reserved_slots(toks, name):
    tok = toks[name]
    base = tok.base_vocab_size
    expected = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|start_header_id|>": 2,
        "<|end_header_id|>": 3,
        "<|eot_id|>": 4,
        "<|pad|>": 5,
    }
    assert tok.chat.appended == frozenset(expected)
    for token, offset in expected.items():
        assert tok.token_to_id(token) == base + offset
        assert tok.encode(token) == [base + offset]
        assert tok.id_to_token(base + offset) == token
    assert (
        tok.bos_id,
        tok.eos_id,
        tok.start_header_id,
        tok.end_header_id,
        tok.eot_id,
        tok.pad_id,
    ) == tuple(base + i for i in range(6))
    # Slots 6..10 keep their reserved names; the ones taken no longer exist by name.
    assert tok.token_to_id("<|omni_reserved_6|>") == base + 6
    with pytest.raises(KeyError):
        tok.token_to_id("<|omni_reserved_0|>")


@pytest.mark.parametrize("name", EXACT)
def test_round_trip_with_special_tokens(toks, name):
    tok = toks[name]
    ids = tok.encode(ROUND_TRIP)
    assert tok.decode(ids) == ROUND_TRIP
    base = tok.base_vocab_size
    appended = [tok.id_to_token(i) for i in ids if i >= base]
    assert appended == [
        "<image>",
        "<video>",
        "<audio>",
        "</audio>",
        "</gen_audio>",
        "<speech_0>",
        "<speech_4095>",
    ] + (["<|eot_id|>"] if name != "hf_llama3" else [])
    assert ids.count(tok.eot_id) == 1
    # "<foo>" and an out-of-codebook code stay plain text.
    assert tok.decode(tok.encode("<foo><speech_4096>")) == "<foo><speech_4096>"
    assert all(i < base for i in tok.encode("<foo><speech_4096>"))


def test_our_ids_win_over_a_base_that_already_has_the_string(tmp_path):
    # E.g. a LLaVA-style tokenizer.json that added "<image>" itself: ours must still win.
    path = train_tiny_tokenizer(CORPUS, 400, tmp_path / "tokenizer.json")
    raw = Tokenizer.from_file(str(path))
    raw.add_special_tokens(["<image>"])
    raw.save(str(path))
    theirs = raw.token_to_id("<image>")
    tok = load_tokenizer(path)
    assert theirs < tok.base_vocab_size
    assert tok.encode("look <image>")[-1] == tok.base_vocab_size + 12 != theirs
    assert tok.decode(tok.encode("look <image>")) == "look <image>"


def test_sentencepiece_default_normaliser_keeps_single_ids(toks):
    tok = toks["sp_default"]
    text = "Hi <image> and <speech_7> done"
    ids = tok.encode(text)
    assert ids.count(tok.special.image_start) == 1
    assert ids.count(tok.special.speech_offset + 7) == 1
    # SentencePiece's normaliser owns the whitespace; everything else survives.
    assert tok.decode(ids).replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize("name", ALL)
def test_bos_eos_only_when_asked(toks, name):
    tok = toks[name]
    plain = tok.encode("hello world")
    assert tok.bos_id not in plain and tok.eos_id not in plain
    assert tok.encode("hello world", add_bos=True) == [tok.bos_id] + plain
    assert tok.encode("hello world", add_bos=True, add_eos=True) == [tok.bos_id] + plain + [
        tok.eos_id
    ]


@pytest.mark.parametrize("name", EXACT)
def test_parse_special_false_is_plain_text(toks, name):
    tok = toks[name]
    text = "a <image> b <|eot_id|> c"
    ids = tok.encode(text, parse_special=False)
    assert all(i < tok.base_vocab_size for i in ids)
    assert tok.eot_id not in ids  # also the base's own <|eot_id|> (hf_llama3)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", EXACT)
def test_decode_skip_special_tokens(toks, name):
    tok = toks[name]
    ids = tok.encode("<|begin_of_text|>hello<image><imagePatch></image> world<|eot_id|>")
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"


def test_decode_rejects_out_of_range_ids(toks):
    tok = toks["hf_plain"]
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(TokenizerError):
        tok.decode([-1])
    with pytest.raises(KeyError):
        tok.token_to_id("<not_special>")
    with pytest.raises(TypeError):
        tok.encode(["not", "a", "string"])


def test_speech_codebook_size_is_configurable(files):
    tok = load_tokenizer(files["hf_plain"], speech_codebook_size=16)
    assert tok.vocab_size == tok.base_vocab_size + 29 + 16
    assert tok.encode("<speech_15>") == [tok.base_vocab_size + 29 + 15]
    assert all(i < tok.base_vocab_size for i in tok.encode("<speech_16>"))
    assert isinstance(tok, OmniTokenizer)


def test_train_tiny_tokenizer_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        train_tiny_tokenizer(["", ""], 300, tmp_path / "t.json")
    with pytest.raises(ValueError, match="256"):
        train_tiny_tokenizer(CORPUS, 200, tmp_path / "t.json")


def test_tiny_tokenizer_segments_like_llama3(files):
    raw = Tokenizer.from_file(str(files["hf_llama3"]))
    pieces = [p for p, _ in raw.pre_tokenizer.pre_tokenize_str("\n\nIt's 12345 ok")]
    assert pieces == ["ĊĊ", "It", "'s", "Ġ", "123", "45", "Ġok"]
