"""Generation and held-out evaluation with the omni model, from a megatron-omni checkpoint.

Layout
    Generation runs at tensor parallelism N (N = the number of launched processes) and pipeline
    parallelism 1. Pipeline-parallel generation is NOT supported: a checkpoint saved at any
    TP/PP/VPP is resharded to (TP=N, PP=1) when it is loaded (``training.checkpoint`` stores global
    tensor keys, so this is an ordinary :func:`~megatron_omni.training.checkpoint.load_checkpoint`).
    The vocabulary padding of the saved layout is kept (``make_vocab_size_divisible_by`` is
    re-derived for N) so the embedding and output layer shapes match. Data parallelism is not used:
    every process of the job is one TP rank of the same model and sees the same prompt.

Prompt
    The chat template of training (:mod:`megatron_omni.data.templates`): system prompt, one user
    turn whose media placeholders expand to ``<image>`` + N x ``<imagePatch>`` + ``</image>`` (and
    the video / audio equivalents; placeholders go first, joined by "\\n", unless the text places
    them), then the assistant header. Media files are decoded by
    :class:`~megatron_omni.data.media.MediaProcessor` (the same resize / frame / 16 kHz rules as
    training). M-RoPE positions come from :func:`~megatron_omni.models.rope_index.get_rope_index`.

Decoding
    The encoders (ViT, SAN-M, projectors) run ONCE, on the prompt (:meth:`OmniModel.embed`).
    Generated tokens are embedded with the LLM's word embedding only and positioned as 1-D text:
    the i-th generated token sits at ``next_position + i`` on all three M-RoPE rows (the rope
    index rule for text after the prompt).

    * KV cache (default): megatron-core's ``StaticInferenceContext`` with the omni LLM
      (``GPTModel``). One prefill forward over the prompt, then one forward per token with the new
      token only. Two details make it work with M-RoPE and our ``VarlenSDPAttention``:
      megatron-core slices the rotary embedding it is given as ``[offset:offset+1]`` for the query
      and ``[:offset+1]`` for the (un-rotated) cached keys, so every step passes the position ids
      of the WHOLE sequence so far (prompt + generated), not only the new token's; and for a
      decode step (``sequence_len_offset > 0``) megatron-core switches the core attention to
      ``AttnMaskType.no_mask``, so the single query attends to every cached key (a square causal
      mask applied to a 1 x L score matrix would wrongly hide all keys but the first). Decode steps
      therefore always feed exactly one token.
    * No cache (``use_cache=False``): a full forward over prompt + generated tokens at every step
      (same embeddings and positions); the reference the cached path is tested against.

    Greedy (``temperature == 0``) or sampling with temperature, top-k and top-p from a seeded
    ``torch.Generator``. Logits are gathered over TP (megatron-core's ``runtime_gather_output``);
    TP rank 0 picks the token and broadcasts it to the other TP ranks, so all ranks always feed the
    same token. The vocabulary padding and the media patch tokens (``<imagePatch>``,
    ``<videoPatch>``, ``<audioPatch>``: placeholders for encoder features that do not exist at
    generation time) are never generated. Decoding stops at ``<|eot_id|>`` / ``<|end_of_text|>``
    or after ``max_new_tokens``.

Output
    :func:`parse_answer` splits the generated tokens into the text, the ``<gen_image> caption
    </gen_image>`` captions (image-generation prompts) and the ``<gen_audio> ... </gen_audio>``
    speech-token spans (as lists of codebook indices).

Evaluation
    :func:`evaluate` reads the held-out ``val`` split of a prepared dataset per modality through
    :meth:`OmniLoaders.val_loader` (packed rows, exactly as training validation sees them) and
    reports per modality the teacher-forced mean token loss on the trained (assistant / pure-text)
    tokens, and the exact-match accuracy of greedy answers: for every chat sample the prompt is
    everything up to the last assistant header, the reference is the last assistant answer, and a
    greedy answer matches when it ends with a stop token and its decoded text (special and speech
    tokens included) equals the reference's, whitespace-stripped. Pure-text samples count for the
    loss only. Every TP rank reads the same rows (no data parallelism).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "EvalResult",
    "GenerationOutput",
    "OmniGenerator",
    "ParsedAnswer",
    "PromptInputs",
    "SamplingParams",
    "build_chat_prompt",
    "evaluate",
    "format_eval",
    "generation_config",
    "load_generation_model",
    "media_settings_from_prepared",
    "parse_answer",
    "prompt_inputs",
    "sample_token",
]

Media = Union[str, Path, bytes]


# ------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked."""

    max_new_tokens: int = 64
    """Most tokens generated (the stop token counts)."""
    temperature: float = 0.0
    """0 = greedy (argmax); > 0 = sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0 = all). top_k=1 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p
    (1.0 = all)."""
    seed: int = 1234
    """Seed of the sampling generator (a new generator per :meth:`OmniGenerator.generate`)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: Optional[torch.Generator] = None) -> int:
    """Pick the next token from 1-D ``logits`` (already masked with -inf where forbidden)."""
    logits = logits.float()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop = before >= params.top_p  # never drops the most likely token (before = 0)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ------------------------------------------------------------------------------ prompts


@dataclass
class PromptInputs:
    """Everything the model needs for one prompt (token order throughout)."""

    tokens: torch.Tensor
    """LongTensor [T]."""
    position_ids: torch.Tensor
    """LongTensor [3, T]: M-RoPE (t, h, w) positions."""
    next_position: int
    """Position (all three rows) of the first generated token."""
    vision_patches: Optional[torch.Tensor] = None
    """float [P, C*2*14*14]: ViT patches of every image and video, in token order."""
    vision_grid_thw: Optional[torch.Tensor] = None
    """LongTensor [N, 3], same order."""
    audio_waveforms: Optional[list] = None
    """16 kHz mono float waveforms, in token order."""

    def __len__(self) -> int:
        return int(self.tokens.numel())


def _visual_parts(v) -> tuple[torch.Tensor, tuple[int, int, int]]:
    if hasattr(v, "patches"):
        return v.patches, tuple(int(x) for x in v.grid_thw)
    patches, grid = v
    return patches, tuple(int(x) for x in (grid.tolist() if torch.is_tensor(grid) else grid))


def prompt_inputs(tokens: Union[torch.Tensor, Sequence[int]], special, images: Sequence = (),
                  videos: Sequence = (), audios: Sequence[torch.Tensor] = (),
                  spatial_merge_size: int = 2) -> PromptInputs:
    """:class:`PromptInputs` of a templated prompt.

    ``images`` / ``videos``: the prompt's items in order of appearance per kind, each a
    :class:`~megatron_omni.data.media.VisualInput` or ``(patches, grid_thw)``; ``audios``: 16 kHz
    waveforms. Images and videos are interleaved into the vision stream in token order (the order
    ``OmniModel.embed`` splices them).
    """
    from ..models.rope_index import get_rope_index

    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    images = [_visual_parts(v) for v in images]
    videos = [_visual_parts(v) for v in videos]
    idx = get_rope_index(tokens, [g for _, g in images] or None, [g for _, g in videos] or None,
                         token_ids=special, spatial_merge_size=spatial_merge_size)
    starts = tokens[(tokens == special.image_start) | (tokens == special.video_start)].tolist()
    n_audio = int((tokens == special.audio_start).sum())
    if len(starts) != len(images) + len(videos):
        raise ValueError(f"the prompt has {len(starts)} image/video blocks but "
                         f"{len(images) + len(videos)} images/videos were given")
    if n_audio != len(audios):
        raise ValueError(f"the prompt has {n_audio} audio blocks but {len(audios)} clips were "
                         f"given")
    it = {special.image_start: iter(images), special.video_start: iter(videos)}
    ordered = [next(it[s]) for s in starts]
    return PromptInputs(
        tokens=tokens, position_ids=idx.position_ids, next_position=idx.next_position,
        vision_patches=torch.cat([p for p, _ in ordered]) if ordered else None,
        vision_grid_thw=(torch.tensor([g for _, g in ordered], dtype=torch.long)
                         if ordered else None),
        audio_waveforms=list(audios) if audios else None)


def media_settings_from_prepared(path: Union[str, Path]):
    """(ImageSettings, VideoSettings, TemplateConfig) a prepared dataset was made with: ``path``
    is the dataset root (``data.path``) or one modality folder of it."""
    from ..data.format import (
        image_settings_from,
        load_omni_meta,
        omni_meta_path,
        template_config_from,
        video_settings_from,
    )

    path = Path(path)
    candidates = [path] + sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    for c in candidates:
        if omni_meta_path(c).is_file():
            meta = load_omni_meta(c)
            return (image_settings_from(meta["image"]), video_settings_from(meta["video"]),
                    template_config_from(meta["template"]))
    raise FileNotFoundError(f"{path} holds no prepared dataset (.nv-meta/omni.json)")


def build_chat_prompt(tokenizer, text: str = "", *, images: Sequence[Media] = (),
                      videos: Sequence[Media] = (), audios: Sequence[Media] = (),
                      messages: Optional[Sequence[Mapping[str, str]]] = None, processor=None,
                      template=None, spatial_merge_size: int = 2) -> PromptInputs:
    """Template a user turn (or a conversation ending in a user turn) plus the assistant header,
    decode its media files and compute the positions.

    Args:
        tokenizer: the :class:`~megatron_omni.data.tokenizer.OmniTokenizer` of the model.
        text: the user's text; may place the media with ``<image>`` / ``<video>`` / ``<audio>``
            (one per file of that kind), otherwise they go first, images, videos, audios.
        images, videos, audios: media files (paths or encoded bytes).
        messages: instead of ``text``: ``[{"role", "content"}, ...]`` ending with a user turn
            (an optional first system message replaces the default system prompt).
        processor: a :class:`~megatron_omni.data.media.MediaProcessor` (default: CPU decoding
            with the default image/video settings; pass the training settings, see
            :func:`media_settings_from_prepared`).
        template: a :class:`~megatron_omni.data.templates.TemplateConfig` (system prompt, audio
            tokens per clip).
    """
    from ..data.media import MediaProcessor
    from ..data.templates import template_generation_prompt

    if processor is None:
        processor = MediaProcessor("cpu")
    if messages is None:
        messages = [{"role": "user", "content": text}]
    vis_images = [processor.image(src) for src in images]
    vis_videos = [processor.video(src) for src in videos]
    waves = [processor.audio(src) for src in audios]
    sample = {"messages": [dict(m) for m in messages],
              "images": [f"image{i}" for i in range(len(images))],
              "videos": [f"video{i}" for i in range(len(videos))],
              "audios": [f"audio{i}" for i in range(len(audios))]}
    ids = template_generation_prompt(sample, tokenizer,
                                     image_tokens=[v.num_tokens for v in vis_images],
                                     video_tokens=[v.num_tokens for v in vis_videos],
                                     config=template).input_ids
    return prompt_inputs(ids, tokenizer.special, vis_images, vis_videos, waves,
                         spatial_merge_size=spatial_merge_size)


# ------------------------------------------------------------------------------ answers


@dataclass
class GenerationOutput:
    """What :meth:`OmniGenerator.generate` produced."""

    token_ids: list[int]
    """Generated ids, the stop token (if any) included."""
    stop_reason: str
    """``"eot"``, ``"eos"`` or ``"max_new_tokens"``."""
    prompt_length: int = 0
    step_logits: Optional[list] = None
    """With ``keep_logits``: the masked logits [vocab] each token was picked from (CPU)."""

    @property
    def answer_ids(self) -> list[int]:
        """The generated ids without the stop token."""
        if self.stop_reason != "max_new_tokens":
            return self.token_ids[:-1]
        return list(self.token_ids)


@dataclass
class ParsedAnswer:
    """A generated answer split into its parts."""

    text: str
    """The answer outside ``<gen_audio>`` spans (``<gen_image>`` markers kept)."""
    gen_image_captions: list[str] = field(default_factory=list)
    """Text inside each ``<gen_image> ... </gen_image>`` (an image-generation prompt)."""
    speech_codes: list[list[int]] = field(default_factory=list)
    """Codebook indices inside each ``<gen_audio> ... </gen_audio>`` span."""
    unclosed: list[str] = field(default_factory=list)
    """Spans still open when generation stopped (``gen_image`` / ``gen_audio``)."""


def parse_answer(token_ids: Sequence[int], tokenizer) -> ParsedAnswer:
    """Split generated ids (without the stop token) into text, captions and speech codes."""
    sp = tokenizer.special
    text_ids: list[int] = []
    captions, speech, unclosed = [], [], []
    cap: Optional[list[int]] = None
    codes: Optional[list[int]] = None
    for t in (int(x) for x in token_ids):
        if codes is not None:  # inside <gen_audio>
            if t == sp.gen_audio_end:
                speech.append(codes)
                codes = None
            elif sp.is_speech(t):
                codes.append(t - sp.speech_offset)
            continue
        if t == sp.gen_audio_start:
            codes = []
            continue
        text_ids.append(t)
        if t == sp.gen_image_start:
            cap = []
        elif t == sp.gen_image_end and cap is not None:
            captions.append(tokenizer.decode(cap).strip())
            cap = None
        elif cap is not None:
            cap.append(t)
    if cap is not None:
        captions.append(tokenizer.decode(cap).strip())
        unclosed.append("gen_image")
    if codes is not None:
        speech.append(codes)
        unclosed.append("gen_audio")
    return ParsedAnswer(tokenizer.decode(text_ids), captions, speech, unclosed)


# ------------------------------------------------------------------------------ the generator


def _tp_group_info():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 0, 0, None
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_src_rank(), ps.get_tensor_model_parallel_group())


class OmniGenerator:
    """Greedy / sampled decoding with one :class:`~megatron_omni.models.omni.OmniModel` chunk
    holding the whole LLM (PP=1) at any TP (call :meth:`generate` on every TP rank).

    Args:
        model: the model (eval mode is set here).
        stop_ids: id -> name of the ids that end the answer (``<|eot_id|>`` -> "eot",
            ``<|end_of_text|>`` -> "eos"); the name becomes the ``stop_reason``.
        use_cache: KV cache through megatron-core's ``StaticInferenceContext`` (default) or a full
            recompute at every step.
        suppress_ids: ids never generated (default: the media patch tokens).
    """

    def __init__(self, model, stop_ids: Mapping[int, str], *, use_cache: bool = True,
                 suppress_ids: Optional[Iterable[int]] = None):
        if not (model.pre_process and model.post_process):
            raise ValueError("generation needs the whole LLM in one chunk (pipeline parallel "
                             "size 1); pipeline-parallel generation is not supported")
        self.model = model.eval()
        self.stop_ids = {int(k): v for k, v in stop_ids.items()}
        self.use_cache = use_cache
        sp = model.special
        self.vocab_size = int(model.cfg.model.llm.vocab_size)
        if suppress_ids is None:
            suppress_ids = (sp.image_patch, sp.video_patch, sp.audio_patch)
        self.suppress_ids = sorted(set(int(i) for i in suppress_ids))

    @classmethod
    def for_tokenizer(cls, model, tokenizer, **kwargs) -> "OmniGenerator":
        return cls(model, {tokenizer.eot_id: "eot", tokenizer.eos_id: "eos"}, **kwargs)

    # ----------------------------------------------------------------------------- pieces
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on the TP vocabulary padding and the suppressed ids (last dim = padded vocab)."""
        logits = logits.float().clone()
        logits[..., self.vocab_size:] = float("-inf")
        if self.suppress_ids:
            logits[..., self.suppress_ids] = float("-inf")
        return logits

    def embed_prompt(self, prompt: PromptInputs) -> torch.Tensor:
        """Prompt embeddings ``[T, 1, h]`` with media spliced in: the encoders' one run."""
        dev = self.device
        patches = prompt.vision_patches
        return self.model.embed(
            prompt.tokens.to(dev)[None],
            vision_patches=patches.to(dev) if patches is not None else None,
            vision_grid_thw=prompt.vision_grid_thw,
            audio_waveforms=[w.to(dev) for w in prompt.audio_waveforms]
            if prompt.audio_waveforms else None)

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        """Word embeddings ``[n, 1, h]`` of generated tokens (no media)."""
        t = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.model.llm.embedding(input_ids=t, position_ids=None)

    @staticmethod
    def positions(prompt: PromptInputs, num_generated: int) -> torch.Tensor:
        """``[3, 1, T + n]``: the prompt's M-RoPE positions, then 1-D text positions."""
        gen = torch.arange(prompt.next_position, prompt.next_position + num_generated,
                           dtype=torch.long).expand(3, -1)
        return torch.cat([prompt.position_ids.cpu(), gen], dim=1)[:, None, :]

    def _pick(self, logits: torch.Tensor, params: SamplingParams,
              generator: Optional[torch.Generator], kept: Optional[list]) -> int:
        tp, tp_rank, src, group = _tp_group_info()
        masked = self.mask_logits(logits)
        if kept is not None:
            kept.append(masked.cpu())
        token = sample_token(masked, params, generator) if tp_rank == 0 else 0
        if tp > 1:
            t = torch.tensor([token], dtype=torch.long, device=self.device)
            torch.distributed.broadcast(t, src=src, group=group)
            token = int(t.item())
        return token

    # ----------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, prompt: PromptInputs, params: SamplingParams = SamplingParams(),
                 keep_logits: bool = False) -> GenerationOutput:
        """Generate an answer to ``prompt`` (collective over the TP group); ``keep_logits``
        also returns the logits of every step."""
        from megatron.core.inference.contexts import StaticInferenceContext

        llm = self.model.llm
        dev = self.device
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=dev)
            generator.manual_seed(int(params.seed))
        T = len(prompt)
        prompt_emb = self.embed_prompt(prompt)
        out: list[int] = []
        kept: Optional[list] = [] if keep_logits else None
        reason = "max_new_tokens"
        if self.use_cache:
            ctx = StaticInferenceContext(max_batch_size=1,
                                         max_sequence_length=T + params.max_new_tokens)
            logits = llm(None, self.positions(prompt, 0).to(dev), decoder_input=prompt_emb,
                         inference_context=ctx, runtime_gather_output=True)
            ctx.sequence_len_offset = T
            ctx.enable_decode_mode()
        else:
            embs = [prompt_emb]
            logits = llm(None, self.positions(prompt, 0).to(dev), decoder_input=prompt_emb,
                         runtime_gather_output=True)
        while True:
            token = self._pick(logits[0, -1], params, generator, kept)
            out.append(token)
            if token in self.stop_ids:
                reason = self.stop_ids[token]
                break
            if len(out) >= params.max_new_tokens:
                break
            new = self.embed_tokens([token])
            pos = self.positions(prompt, len(out)).to(dev)
            if self.use_cache:
                # One token per step; positions of the whole sequence (see the module docstring).
                logits = llm(None, pos, decoder_input=new, inference_context=ctx,
                             runtime_gather_output=True)
                ctx.sequence_len_offset += 1
            else:
                embs.append(new)
                logits = llm(None, pos, decoder_input=torch.cat(embs, dim=0),
                             runtime_gather_output=True)
        return GenerationOutput(out, reason, T, kept)

    @torch.no_grad()
    def full_logits(self, prompt: PromptInputs, generated: Sequence[int] = ()) -> torch.Tensor:
        """Masked logits ``[T + n, vocab]`` of one full forward over prompt + ``generated``
        (``OmniModel.forward`` on the whole token sequence; what greedy decoding must agree
        with: row ``T - 1 + i`` predicts generated token ``i``)."""
        from ..models.rope_index import get_rope_index

        dev = self.device
        tokens = torch.cat([prompt.tokens, torch.tensor(list(generated), dtype=torch.long)])
        grids = prompt.vision_grid_thw
        sp = self.model.special
        kinds = tokens[(tokens == sp.image_start) | (tokens == sp.video_start)].tolist()
        img = [g for k, g in zip(kinds, grids.tolist() if grids is not None else [])
               if k == sp.image_start]
        vid = [g for k, g in zip(kinds, grids.tolist() if grids is not None else [])
               if k == sp.video_start]
        pos = get_rope_index(tokens, img or None, vid or None, token_ids=sp,
                             spatial_merge_size=self.model.cfg.model.vision.spatial_merge_size)
        logits = self.model(
            tokens.to(dev)[None], pos.position_ids[:, None].to(dev),
            vision_patches=prompt.vision_patches.to(dev)
            if prompt.vision_patches is not None else None,
            vision_grid_thw=grids,
            audio_waveforms=[w.to(dev) for w in prompt.audio_waveforms]
            if prompt.audio_waveforms else None)  # [1, T + n, vocab / TP]
        if _tp_group_info()[0] > 1:
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            logits = gather_from_tensor_model_parallel_region(logits)
        return self.mask_logits(logits[0])


# ------------------------------------------------------------------------------ loading


def generation_config(checkpoint: Union[str, Path], tensor_parallel_size: int = 1,
                      overrides: Sequence[str] = (), config: Union[str, Path, None] = None):
    """The run config saved with ``checkpoint`` (or the config file ``config``), set to the
    generation layout (TP = ``tensor_parallel_size``, PP = 1, no VPP/CP/SP, no recompute) and the
    saved layout's padded vocabulary; ``overrides`` (``key=value``) last.

    The saved config is read by ``training.checkpoint.read_saved_config`` (its rule for keys this
    version does not know: an error under ``model``, a warning elsewhere); a ``config`` file is
    read like a training config (``base:`` files, duplicate keys refused, unknown keys errors).
    """
    from ..config.loader import from_dict, merge, parse_overrides, read_config_file
    from ..config.schema import ConfigError, OmniConfig
    from ..config.validate import padded_vocab_size, validate
    from ..training.checkpoint import read_saved_config

    if config is not None:
        data = read_config_file(config)
    else:
        data = read_saved_config(checkpoint).data()
    over = parse_overrides(overrides)
    saved = from_dict(OmniConfig, merge(data, over))
    llm = saved.model.llm
    padded = padded_vocab_size(llm.vocab_size, llm.make_vocab_size_divisible_by,
                               saved.parallel.tensor_model_parallel_size)
    tp = int(tensor_parallel_size)
    if padded % tp:
        raise ConfigError(f"the checkpoint's padded vocabulary ({padded}) is not divisible by "
                          f"TP={tp}; generate at a TP that divides it")
    layout = {
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1,
                     "virtual_pipeline_model_parallel_size": None, "context_parallel_size": 1,
                     "sequence_parallel": False, "first_stage_num_layers": None},
        "model": {"llm": {"make_vocab_size_divisible_by": padded // tp}},
        "training": {"recompute_granularity": None},
    }
    cfg = from_dict(OmniConfig, merge(merge(data, layout), over))
    if padded_vocab_size(cfg.model.llm.vocab_size, cfg.model.llm.make_vocab_size_divisible_by,
                         tp) != padded:
        raise ConfigError("model.llm.make_vocab_size_divisible_by was overridden to a value "
                          "that changes the checkpoint's padded vocabulary")
    validate(cfg)
    return cfg


def load_generation_model(checkpoint: Union[str, Path], cfg):
    """Build the model for ``cfg`` (a :func:`generation_config`) on this TP rank, load the
    checkpoint's weights into it (resharded to this layout) and put it in eval mode on the GPU
    when there is one. Collective: call on every rank after ``parallel.runtime.initialize``."""
    from megatron.core import parallel_state as ps

    from ..config.schema import ConfigError
    from ..models.omni import OmniModel
    from ..training.checkpoint import load_checkpoint

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call megatron_omni.parallel.runtime.initialize first")
    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise ConfigError("pipeline-parallel generation is not supported: launch with "
                          "parallel.pipeline_model_parallel_size=1 (the checkpoint is resharded)")
    if ps.get_tensor_model_parallel_world_size() != cfg.parallel.tensor_model_parallel_size:
        raise ConfigError(f"initialised TP={ps.get_tensor_model_parallel_world_size()} but the "
                          f"config has {cfg.parallel.tensor_model_parallel_size}")
    model = OmniModel(cfg, pre_process=True, post_process=True)
    if torch.cuda.is_available():
        model = model.cuda()
    al = getattr(cfg, "alignment", None)
    if al is not None and al.lora_rank > 0:  # an alignment-stage (AT) checkpoint: its adapters
        from ..training.lora import apply_lora

        apply_lora([model], al.lora_rank, al.lora_alpha, targets=al.lora_targets)
    load_checkpoint(checkpoint, [model], weights_only=True)
    return model.eval()


# ------------------------------------------------------------------------------ evaluation


@dataclass
class EvalResult:
    """Per-modality scores of :func:`evaluate`."""

    modality: str
    samples: int = 0
    """Held-out samples seen (every form)."""
    loss_tokens: int = 0
    loss_sum: float = 0.0
    answered: int = 0
    """Chat samples whose last answer was generated greedily."""
    exact: int = 0
    examples: list = field(default_factory=list)
    """A few (prompt tail, reference, answer) triples."""
    note: str = ""

    @property
    def loss(self) -> float:
        return self.loss_sum / self.loss_tokens if self.loss_tokens else float("nan")

    @property
    def accuracy(self) -> Optional[float]:
        return self.exact / self.answered if self.answered else None

    def as_dict(self) -> dict:
        return {"modality": self.modality, "samples": self.samples,
                "loss_tokens": self.loss_tokens,
                "loss": None if math.isnan(self.loss) else self.loss,
                "answered": self.answered, "exact": self.exact, "accuracy": self.accuracy,
                "examples": self.examples, "note": self.note}


def _assistant_header(tokenizer) -> list[int]:
    return ([tokenizer.start_header_id] + tokenizer.encode("assistant", parse_special=False)
            + [tokenizer.end_header_id] + tokenizer.encode("\n\n", parse_special=False))


def _split_samples(batch: dict, special) -> list[dict]:
    """One packed row -> its samples: token range, loss mask, media (token order)."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    if tokens.shape[0] != 1:
        raise ValueError("evaluation reads rows of micro-batch size 1")
    tokens, mask = tokens[0].cpu(), mask[0].cpu()
    cu = batch["cu_seqlens"].tolist()
    names = batch["sample_keys"][0]
    grids = batch.get("vision_grid_thw")
    grids = grids.tolist() if grids is not None else []
    patches = batch.get("vision_patches")
    waves = list(batch.get("audio_waveforms") or [])
    p_off, g_i, a_i = 0, 0, 0
    out = []
    for s, key in enumerate(names):
        a, b = cu[s], cu[s + 1]
        ids = tokens[a:b]
        starts = ids[(ids == special.image_start) | (ids == special.video_start)].tolist()
        images, videos = [], []
        for st in starts:
            g = grids[g_i]
            n = math.prod(g)
            item = (patches[p_off:p_off + n].cpu(), tuple(g))
            (images if st == special.image_start else videos).append(item)
            p_off += n
            g_i += 1
        n_aud = int((ids == special.audio_start).sum())
        audios = [w.cpu() for w in waves[a_i:a_i + n_aud]]
        a_i += n_aud
        out.append({"key": key, "ids": ids, "loss": mask[a:b], "images": images,
                    "videos": videos, "audios": audios})
    return out


def _answer_split(ids: torch.Tensor, loss: torch.Tensor, header: list[int]
                  ) -> Optional[tuple[int, list[int]]]:
    """(prompt length, reference ids) of a chat sample's last answer; None for pure text."""
    where = loss.nonzero().flatten()
    if where.numel() == 0:
        return None
    end = int(where[-1])
    start = end
    while start > 0 and bool(loss[start - 1]):
        start -= 1
    prompt_len = start + 1  # position i predicts token i + 1
    if prompt_len < len(header) or ids[prompt_len - len(header):prompt_len].tolist() != header:
        return None
    return prompt_len, ids[prompt_len:end + 2].tolist()


@torch.no_grad()
def evaluate(model, tokenizer, data_cfg, *, modalities: Optional[Sequence[str]] = None,
             max_samples: Optional[int] = None, max_new_tokens: int = 64,
             answer_slack: int = 4, num_examples: int = 3,
             printer: Optional[Callable[[str], None]] = None) -> dict[str, EvalResult]:
    """Teacher-forced loss and greedy exact-match accuracy per modality on the ``val`` split.

    Args:
        model: the generation model (TP ranks all call this with the same arguments).
        tokenizer: the model's tokenizer (the one the dataset was prepared with).
        data_cfg: a ``DataConfig`` whose ``path`` is the prepared dataset (seq_length, budgets
            and media backend are taken from it; one row per batch, no text mixing).
        modalities: default: every modality folder of ``data_cfg.path`` with a val split.
        max_samples: per modality, stop after this many samples (default: the whole split).
        max_new_tokens: cap of a greedy answer; each answer may run to the reference length +
            ``answer_slack`` tokens (+ the stop token).
    """
    from ..data.format import DATASET_YAML, META_DIR, MODALITIES
    from ..data.loaders import OmniLoaders
    from ..models.attention import packed_seq_params
    from ..training.trainer import to_model_batch

    sp = tokenizer.special
    root = Path(data_cfg.path)
    if modalities is None:
        modalities = [m for m in MODALITIES if m != "preference"  # pairs: not an answer task
                      and (root / m / META_DIR / DATASET_YAML).is_file()]
    dcfg = dataclasses.replace(data_cfg, micro_batch_size=1, pure_text_ratio=0.0, num_workers=0,
                               modalities=list(modalities))
    loaders = OmniLoaders(dcfg, tokenizer, dp_rank=0, dp_size=1, modalities=[])
    # With deferred decoding (data.media_backend dali_gpu/auto on a GPU) images/videos arrive
    # encoded: decode them here, as the trainer's data source does.
    from ..data.media.deferred import make_training_decoder

    decoder = make_training_decoder(dcfg.media_backend) if loaders.defer_decoding else None
    gen = OmniGenerator.for_tokenizer(model, tokenizer, use_cache=True)
    header = _assistant_header(tokenizer)
    merge = model.cfg.model.vision.spatial_merge_size
    results: dict[str, EvalResult] = {}
    for m in modalities:
        res = results[m] = EvalResult(m)
        try:
            batches = iter(loaders.val_loader(m))
        except Exception as e:  # no dataset or no val split for this modality
            res.note = f"no held-out split ({type(e).__name__}: {e})"
            continue
        for batch in batches:
            if max_samples is not None and res.samples >= max_samples:
                break
            if decoder is not None:
                batch = decoder.decode(batch)
            b = to_model_batch(batch)
            per_token = model(b["tokens"], b["position_ids"], labels=b["labels"],
                              packed_seq_params=packed_seq_params(b["cu_seqlens"]),
                              vision_patches=b.get("vision_patches"),
                              vision_grid_thw=b.get("vision_grid_thw"),
                              audio_waveforms=b.get("audio_waveforms"),
                              sample_names=b.get("sample_names"))
            lm = b["loss_mask"].to(per_token.device).float()
            for s in _split_samples(batch, sp):
                if max_samples is not None and res.samples >= max_samples:
                    break
                a, e = _sample_range(batch, s["key"])
                res.samples += 1
                res.loss_sum += float((per_token[0, a:e].float() * lm[0, a:e]).sum())
                res.loss_tokens += int(lm[0, a:e].sum())
                split = _answer_split(s["ids"], s["loss"], header)
                if split is None:
                    continue
                prompt_len, ref = split
                prompt = prompt_inputs(s["ids"][:prompt_len], sp, s["images"], s["videos"],
                                       s["audios"], spatial_merge_size=merge)
                ref_answer = [t for t in ref if t not in gen.stop_ids]
                budget = min(max_new_tokens, len(ref_answer) + answer_slack) + 1
                out = gen.generate(prompt, SamplingParams(max_new_tokens=budget))
                got = tokenizer.decode(out.answer_ids).strip()
                want = tokenizer.decode(ref_answer).strip()
                res.answered += 1
                res.exact += int(got == want and out.stop_reason != "max_new_tokens")
                if len(res.examples) < num_examples:
                    question = tokenizer.decode(
                        [t for t in s["ids"][:prompt_len].tolist() if not tokenizer.is_appended(t)
                         or sp.is_speech(t)])
                    res.examples.append({"key": s["key"], "prompt_tail": question[-80:],
                                         "reference": want, "answer": got})
    if printer is not None:
        printer(format_eval(results))
    return results


def _sample_range(batch: dict, key: str) -> tuple[int, int]:
    names = batch["sample_keys"][0]
    cu = batch["cu_seqlens"].tolist()
    i = names.index(key)
    return cu[i], cu[i + 1]


def format_eval(results: Mapping[str, EvalResult]) -> str:
    """A small table of :func:`evaluate`'s results."""
    lines = [f"{'modality':<12} {'samples':>7} {'loss tokens':>11} {'loss':>8} "
             f"{'exact match':>12} {'accuracy':>8}"]
    for m, r in results.items():
        if r.note and not r.samples:
            lines.append(f"{m:<12} {r.note}")
            continue
        acc = f"{r.accuracy:8.3f}" if r.accuracy is not None else f"{'n/a':>8}"
        loss = f"{r.loss:8.4f}" if r.loss_tokens else f"{'n/a':>8}"
        lines.append(f"{m:<12} {r.samples:>7} {r.loss_tokens:>11} {loss} "
                     f"{f'{r.exact}/{r.answered}':>12} {acc}")
    return "\n".join(lines)
