"""A short single-process training run with images/videos decoded in the training process
(``data.media_backend=deferred``, CPU here) gives the same losses as decoding in the loader
workers (``cpu``). The GPU variant (``dali_gpu``: DALI mixed) runs in tools/gpu_check.py."""


import pytest
from dist_utils import run_workers

from megatron_omni.data.preprocess import preprocess
from megatron_omni.data.synthetic import corpus_texts, make_synthetic_dataset
from megatron_omni.data.tokenizer import load_tokenizer, train_tiny_tokenizer

pytestmark = pytest.mark.slow


def test_deferred_decode_trains_like_worker_decode(tmp_path):
    raw = tmp_path / "raw"
    make_synthetic_dataset(raw, num_per_modality=8, seed=3)
    tok = train_tiny_tokenizer(corpus_texts(raw), 400, tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(tok, speech_codebook_size=64)
    preprocess(raw, tmp_path / "prepared", tokenizer, workers=1, progress=False)
    losses = {}
    for backend in ("cpu", "deferred"):
        res = run_workers("trainer_run.py", 1, [
            f"model.llm.vocab_size={tokenizer.vocab_size}", "model.speech_codebook_size=64",
            "model.llm.num_layers=2", "model.llm.make_vocab_size_divisible_by=64",
            "model.vision.depth=1", "model.vision.hidden_size=32", "model.vision.num_heads=2",
            "model.audio.hidden_size=32", "model.audio.num_heads=2",
            "model.audio.ffn_hidden_size=64", "model.audio.num_blocks=2",
            f"data.path={tmp_path / 'prepared'}", f"data.tokenizer={tok}",
            "data.modalities=[image,video,interleaved]", "data.seq_length=1024",
            f"data.media_backend={backend}", "data.packing_buffer_size=4",
            "data.shuffle_buffer_size=4", "data.pure_text_ratio=0.3",
            "training.lr=3e-3", "training.lr_warmup_iters=1", "training.log_interval=1",
            "training.train_iters=3", f"training.save={tmp_path / backend}"])
        losses[backend] = (res["first"], res["last"])
    assert losses["cpu"] == losses["deferred"]  # same floats: same pixels, same batches
    assert all(v > 0 for v in losses["cpu"][0].values())
