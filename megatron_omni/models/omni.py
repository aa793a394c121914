"""The omni model: encoders -> projectors -> embeddings spliced into the shared LLM.

Pipeline placement follows megatron-core's LLaVA (``add_encoder``): the vision encoder (Qwen2-VL
ViT), the audio encoder (SAN-M, fp32) and both projectors live on the FIRST pipeline stage (first
virtual chunk) only; the other stages hold LLM layers. ``parallel.first_stage_num_layers`` lets
the first stage carry fewer LLM layers to balance that extra work.

Splicing: the token embeddings of a packed row are computed in full, media features replace the
patch-token positions in order (images and videos share the vision stream, in order of
appearance; every audio clip fills exactly 256 ``<audioPatch>`` positions, padded with the
``<end_of_audio>`` embedding), and only then is the sequence scattered for sequence parallelism.
A mismatch between patch tokens and features is an error naming the sample, never a silent
truncation.

Outputs: the per-token loss (vocab-parallel cross-entropy) of the last stage; :func:`token_kinds`
says which label positions are ordinary text, image-generation prompt (``<gen_image>`` spans,
ordinary text loss) and speech output (``<gen_audio>`` spans, the separate loss L_gen_a).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from ..config.schema import ConfigError, OmniConfig
from ..data.special_tokens import NUM_SPECIAL, SpecialTokenIds
from ..parallel.device import place_module
from .audio import AudioTokenizerHead, SANMConfig, SANMEncoder, pad_audio_tokens
from .audio_features import CMVN, batch_waveforms_to_features
from .llm import build_llm, llm_transformer_config
from .projector import build_projector

# The omni model's weight map (TP split rule, pipeline placement): weight_maps/omni.py.
from .weight_maps.omni import omni_stage_state_dict

AUDIO_SAMPLE_RATE = 16000


class SpliceError(ValueError):
    """Patch tokens and media features of a batch disagree."""


def special_token_ids(cfg: OmniConfig) -> SpecialTokenIds:
    """The special-token ids implied by the vocabulary layout of ``cfg``."""
    codebook = cfg.model.speech_codebook_size
    base = cfg.model.llm.vocab_size - NUM_SPECIAL - codebook
    if base < 1:
        raise ConfigError(
            f"model.llm.vocab_size ({cfg.model.llm.vocab_size}) must hold the base vocabulary + "
            f"{NUM_SPECIAL} special tokens + model.speech_codebook_size ({codebook}); set it to "
            f"tokenizer.vocab_size")
    return SpecialTokenIds(base_vocab_size=base, speech_codebook_size=codebook)


def sanm_config(cfg: OmniConfig) -> SANMConfig:
    a = cfg.model.audio
    return SANMConfig(input_size=a.input_size, output_size=a.hidden_size,
                      attention_heads=a.num_heads, linear_units=a.ffn_hidden_size,
                      num_blocks=a.num_blocks, kernel_size=a.kernel_size,
                      sanm_shift=a.sanm_shift)


def token_kinds(labels: torch.Tensor, special: SpecialTokenIds) -> dict[str, torch.Tensor]:
    """Boolean masks over label positions: ``gen_image`` and ``gen_audio`` spans (markers
    included) and ``text`` (everything else). Spans never cross samples of a packed row because
    every span closes inside its sample."""

    def inside(start_id: int, end_id: int) -> torch.Tensor:
        starts = (labels == start_id).long().cumsum(-1)
        ends = (labels == end_id).long()
        return (starts - ends.cumsum(-1) + ends) > 0

    gen_image = inside(special.gen_image_start, special.gen_image_end)
    gen_audio = inside(special.gen_audio_start, special.gen_audio_end) | (
        (labels >= special.speech_offset) & (labels < special.vocab_size))
    return {"gen_image": gen_image, "gen_audio": gen_audio, "text": ~(gen_image | gen_audio)}


def _blocks(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D mask as (start, length)."""
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return []
    breaks = (idx[1:] - idx[:-1] != 1).nonzero().flatten() + 1
    starts = torch.cat([idx[:1], idx[breaks]])
    ends = torch.cat([idx[breaks - 1], idx[-1:]]) + 1
    return list(zip(starts.tolist(), (ends - starts).tolist()))


class OmniModel(MegatronModule):
    """M2-omni: Qwen2-VL ViT + SAN-M + projectors + Llama-3 M-RoPE LLM (one pipeline chunk)."""

    def __init__(self, cfg: OmniConfig, pre_process: Optional[bool] = None,
                 post_process: Optional[bool] = None, vp_stage: Optional[int] = None,
                 cmvn: Optional[CMVN] = None):
        config = llm_transformer_config(cfg)
        super().__init__(config=config)
        self.cfg = cfg
        self.special = special_token_ids(cfg)
        self.llm = build_llm(cfg, pre_process, post_process, vp_stage, config=config,
                             scatter_embedding_sequence_parallel=False)
        self.pre_process = self.llm.pre_process
        self.post_process = self.llm.post_process
        self.vp_stage = vp_stage
        self.model_type = self.llm.model_type  # the schedules read it
        # finalize_model_grads reads these to all-reduce tied embeddings across stages.
        self.share_embeddings_and_output_weights = self.llm.share_embeddings_and_output_weights
        self.add_encoders = self.pre_process
        if cmvn is None and cfg.model.audio.enabled and cfg.model.audio.cmvn_file:
            from .audio_features import load_cmvn

            cmvn = load_cmvn(cfg.model.audio.cmvn_file)
        self.cmvn = cmvn
        hidden = cfg.model.llm.hidden_size
        m = cfg.model
        if self.add_encoders and m.vision.enabled:
            from .vision import VisionEncoder

            self.vision_model = VisionEncoder(cfg)
            self.linear_proj = build_projector(self.vision_model.out_hidden, hidden,
                                               m.projector.vision_depth,
                                               dtype=config.params_dtype)
        if self.add_encoders and m.audio.enabled:
            self.audio_model = SANMEncoder(sanm_config(cfg))
            self.audio_head = AudioTokenizerHead(m.audio.frames_per_token,
                                                 m.audio.tokens_per_clip)
            self.linear_proj_audio = build_projector(m.audio.frames_per_token * m.audio.hidden_size,
                                                     hidden, m.projector.audio_depth,
                                                     dtype=config.params_dtype)
        # Plain torch modules (ViT patch embedding and merger norm, projectors, SAN-M, torch
        # norms) are built on the CPU; megatron-core modules already sit on the compute device.
        place_module(self)

    # --- pipeline plumbing ------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.llm.shared_embedding_or_output_weight()

    # --- encoders -----------------------------------------------------------------------------
    def vision_features(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N_patches, C*T*14*14] + grid -> L2-normalised LLM-space features [N/4, hidden]."""
        vit = self.vision_model(patches, grid_thw)
        # The ViT's output dtype follows its params (bf16 under training.bf16): cast explicitly.
        feats = self.linear_proj(vit.to(self.linear_proj[0].weight.dtype))
        return F.normalize(feats, dim=-1)

    def audio_features(self, waveforms: Sequence[torch.Tensor]) -> torch.Tensor:
        """16 kHz waveforms -> [clips, 256, hidden] (padded with ``<end_of_audio>``, then
        L2-normalised row by row as the release does)."""
        device = self.linear_proj_audio[0].weight.device
        feats, lengths = batch_waveforms_to_features(list(waveforms), AUDIO_SAMPLE_RATE,
                                                     self.cmvn, device=device)
        hidden, lengths = self.audio_model(feats, lengths)
        tokens, token_lengths = self.audio_head(hidden, lengths)
        projected = self.linear_proj_audio(tokens.to(self.linear_proj_audio[0].weight.dtype))
        eoa = torch.tensor([[self.special.end_of_audio]], device=device)
        pad = self.llm.embedding.word_embeddings(eoa)[0, 0]
        return pad_audio_tokens(projected, pad, self.cfg.model.audio.tokens_per_clip,
                                lengths=token_lengths, l2_normalize=True)

    # --- splicing -----------------------------------------------------------------------------
    @staticmethod
    def _sample_of(pos: int, cu_seqlens: Optional[torch.Tensor], names: Optional[Sequence[str]]
                   ) -> str:
        if cu_seqlens is None:
            return f"position {pos}"
        cu = cu_seqlens.to(torch.long)
        idx = int(torch.searchsorted(cu, torch.tensor(pos, device=cu.device), right=True)) - 1
        name = names[idx] if names is not None and idx < len(names) else f"#{idx}"
        return f"sample {name} (position {pos})"

    def _splice(self, emb_bsh: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor,
                item_sizes: list[int], kind: str, cu_seqlens, names) -> torch.Tensor:
        blocks = _blocks(mask[0])
        for i, (start, length) in enumerate(blocks):
            if i >= len(item_sizes):
                raise SpliceError(f"{self._sample_of(start, cu_seqlens, names)}: {kind} block #{i}"
                                  f" has {length} patch tokens but the batch has only "
                                  f"{len(item_sizes)} {kind} item(s)")
            if length != item_sizes[i]:
                raise SpliceError(f"{self._sample_of(start, cu_seqlens, names)}: {kind} item #{i} "
                                  f"has {length} patch tokens but {item_sizes[i]} features")
        if len(blocks) != len(item_sizes):
            raise SpliceError(f"{len(item_sizes)} {kind} item(s) in the batch but only "
                              f"{len(blocks)} {kind} block(s) of patch tokens in the row")
        if feats.shape[0] != int(mask.sum()):
            raise SpliceError(f"{kind}: {int(mask.sum())} patch tokens but {feats.shape[0]} "
                              f"feature rows")
        return emb_bsh.masked_scatter(mask.unsqueeze(-1), feats.to(emb_bsh.dtype))

    def _untouched_trainable(self, vision: bool, audio: bool) -> list[torch.nn.Parameter]:
        """Trainable encoder/projector parameters this micro-batch does not use (training with
        autograd on only)."""
        if not (self.training and torch.is_grad_enabled()):
            return []
        mods = []
        if not vision:
            mods += [getattr(self, n, None) for n in ("vision_model", "linear_proj")]
        if not audio:
            mods += [getattr(self, n, None) for n in ("audio_model", "audio_head",
                                                      "linear_proj_audio")]
        return [p for m in mods if m is not None for p in m.parameters() if p.requires_grad]

    def embed(self, tokens: torch.Tensor, vision_patches=None, vision_grid_thw=None,
              audio_waveforms=None, cu_seqlens=None, sample_names=None) -> torch.Tensor:
        """Token embeddings with media spliced in, ``[s, b, h]`` (scattered under SP)."""
        emb = self.llm.embedding(input_ids=tokens, position_ids=None)  # [s, b, h], not scattered
        emb_bsh = emb.transpose(0, 1)
        sp = self.special
        vis_mask = (tokens == sp.image_patch) | (tokens == sp.video_patch)
        if vision_grid_thw is not None and len(vision_grid_thw) > 0:
            if not hasattr(self, "vision_model"):
                raise SpliceError("the batch has images/videos but model.vision.enabled is false")
            grid = torch.as_tensor(vision_grid_thw, dtype=torch.long).reshape(-1, 3)
            merge = self.cfg.model.vision.spatial_merge_size ** 2
            sizes = (grid.prod(-1) // merge).tolist()
            emb_bsh = self._splice(emb_bsh, vis_mask,
                                   self.vision_features(vision_patches, grid), sizes, "vision",
                                   cu_seqlens, sample_names)
        elif bool(vis_mask.any()):
            start = int(vis_mask[0].nonzero()[0])
            raise SpliceError(f"{self._sample_of(start, cu_seqlens, sample_names)}: image/video "
                              f"patch tokens but no vision inputs in the batch")
        aud_mask = tokens == sp.audio_patch
        if audio_waveforms is not None and len(audio_waveforms) > 0:
            if not hasattr(self, "audio_model"):
                raise SpliceError("the batch has audio but model.audio.enabled is false")
            feats = self.audio_features(audio_waveforms)
            n = self.cfg.model.audio.tokens_per_clip
            emb_bsh = self._splice(emb_bsh, aud_mask, feats.reshape(-1, feats.shape[-1]),
                                   [n] * feats.shape[0], "audio", cu_seqlens, sample_names)
        elif bool(aud_mask.any()):
            start = int(aud_mask[0].nonzero()[0])
            raise SpliceError(f"{self._sample_of(start, cu_seqlens, sample_names)}: audio patch "
                              f"tokens but no audio inputs in the batch")
        emb = emb_bsh.transpose(0, 1).contiguous()
        untouched = self._untouched_trainable(
            vision=vision_grid_thw is not None and len(vision_grid_thw) > 0,
            audio=audio_waveforms is not None and len(audio_waveforms) > 0)
        if untouched:
            # Zero-weight contribution: every trainable parameter is in every micro-batch's graph
            # (its gradient here is exactly 0). megatron-core's DDP with overlap_grad_reduce
            # launches a bucket's reduction when all its parameters reported a gradient in the
            # last micro-batch, with the per-parameter counts recorded at step 1; a parameter the
            # last micro-batch skips leaves its bucket unlaunched (``finish_grad_sync`` /
            # ``reset`` assert). Reading one element per parameter keeps the forward free.
            zero = torch.stack([p.reshape(-1)[0].float() for p in untouched]).sum() * 0.0
            emb = emb + zero.to(emb.dtype)
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                labels: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None,
                vision_patches: Optional[torch.Tensor] = None,
                vision_grid_thw: Optional[torch.Tensor] = None,
                audio_waveforms: Optional[Sequence[torch.Tensor]] = None,
                sample_names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Per-token loss ``[b, s]`` on the last stage with labels; hidden states elsewhere."""
        decoder_input = None
        if self.pre_process:
            cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
            decoder_input = self.embed(tokens, vision_patches, vision_grid_thw, audio_waveforms,
                                       cu, sample_names)
        return self.llm(tokens, position_ids, labels=labels, packed_seq_params=packed_seq_params,
                        decoder_input=decoder_input)


PARTS = ("vision", "audio", "projectors", "llm")


def part_of(name: str) -> str:
    """Which trainable part a parameter name belongs to."""
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("audio_model."):
        return "audio"
    if name.startswith(("linear_proj.", "linear_proj_audio.")):
        return "projectors"
    return "llm"


def set_trainable(model: torch.nn.Module, vision: bool = True, audio: bool = True,
                  projectors: bool = True, llm: bool = True) -> dict[str, int]:
    """Freeze/unfreeze by part (call BEFORE wrapping in DDP so frozen params get no grad buffer
    and no optimizer state). Returns the trainable parameter count per part."""
    flags = {"vision": vision, "audio": audio, "projectors": projectors, "llm": llm}
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        part = part_of(name)
        p.requires_grad_(flags[part])
        if flags[part]:
            counts[part] += p.numel()
    return counts


def build_omni_chunks(cfg: OmniConfig, cmvn: Optional[CMVN] = None) -> list[OmniModel]:
    """This rank's model chunks (one per virtual pipeline stage)."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [OmniModel(cfg, cmvn=cmvn)]
    return [OmniModel(cfg, vp_stage=i, cmvn=cmvn) for i in range(vpp)]


def load_full_omni_state(chunk: OmniModel, full: dict, strict: bool = True) -> None:
    """Load this chunk's TP/PP part of a full (TP=1, PP=1) omni state dict."""
    from megatron.core import parallel_state as ps

    from .llm import chunk_layer_range, load_local_state

    offset, n = chunk_layer_range(chunk.llm)
    local = omni_stage_state_dict(full, ps.get_tensor_model_parallel_rank(),
                                  ps.get_tensor_model_parallel_world_size(), offset, n,
                                  chunk.pre_process, chunk.post_process)
    load_local_state(chunk, local, strict)
