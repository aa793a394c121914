"""The Qwen2-VL vision transformer ("NaViT", native resolution) on megatron-core modules.

Pipeline of one forward (docs/recipe.md section 1, "vision encoder"):

1. **Patch embedding.** Each row of ``pixel_patches`` is one 3-D patch, flattened in the order
   (channel, frame, y, x) = the layout of a Conv3d weight ``[width, C, 2, 14, 14]``. A Conv3d
   whose kernel equals its stride and its input is a plain matrix product with the flattened
   kernel, so that is how it is computed (no bias). The weight keeps the Conv3d shape, so
   checkpoints map one to one.
2. **2-D rotary.** Each patch gets the (row, column) of its patch grid; the head dimension is
   split in two halves of rotary pairs, the first rotated by the row, the second by the column
   (theta 10000, ``head_dim/4`` frequencies each). Rows of ``pixel_patches`` come in the
   "2x2-merge-contiguous" order ``(t, h/2, w/2, 2, 2)`` (see ``data/media/vision.py:patchify``),
   so the positions are built in that order. The per-token table ``[N, 1, 1, head_dim]`` is
   handed to megatron-core, whose ``apply_rotary_pos_emb`` maps it one to one onto the packed
   tokens (THD case where ``freqs.size(0) == cu_seqlens[-1]``).
3. **Transformer.** A megatron-core ``TransformerBlock`` of pre-norm layers: LayerNorm (eps 1e-6),
   bidirectional self-attention with biases, quick_gelu MLP with biases. Attention is restricted to
   one temporal slice of one item: every ``t`` of an image/video is its own THD segment of
   ``h*w`` patches (exactly as Qwen2-VL), passed as ``PackedSeqParams``.
4. **Patch merger.** LayerNorm, then every 4 consecutive patches (one 2x2 neighbourhood) are
   concatenated to ``4*width`` and go through Linear -> GELU -> Linear to ``out_hidden``.

Parallelism: the ViT is tensor-parallel like the LLM (same TP group; column-parallel qkv/fc1,
row-parallel proj/fc2, also in the merger), but

* **never sequence-parallel**: its token count is whatever the images give, not a multiple of TP,
  and the encoder is cheap next to the LLM;
* **never split over pipeline stages**: it lives whole on the first stage. megatron-core decides
  how many layers a ``TransformerBlock`` builds, and their global numbers, from
  ``config.pipeline_model_parallel_size`` (``get_num_layers_to_build`` and
  ``get_transformer_layer_offset`` in 0.16.1). A ViT config that inherited the LLM's PP=2 would
  get ``depth/2`` layers per stage and, on the second stage, layer numbers starting at
  ``depth/2 + 1``. So the ViT's own ``TransformerConfig`` always says PP=1 (and no virtual
  pipeline), and the layer list is spelled out explicitly in the block spec; ``VisionEncoder``
  refuses a config that says otherwise.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config.schema import OmniConfig, VisionConfig
from .attention import VarlenSDPAttention, packed_seq_params
from .specs import SPTorchNorm, resolve_transformer_impl

VISION_NORM_EPS = 1e-6
"""LayerNorm epsilon of every ViT norm and the merger's ln_q (Qwen2-VL)."""

ROTARY_THETA = 10000.0
"""Base of the ViT's 2-D rotary frequencies (Qwen2-VL)."""


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``, the activation of Qwen2-VL's ViT MLP (defined here rather than
    imported from megatron-core, whose copy is wrapped in ``torch.compile``)."""
    return x * torch.sigmoid(1.702 * x)


# --- configuration ------------------------------------------------------------------------------

def vision_out_hidden(cfg: OmniConfig) -> int:
    """Width of the merger output: ``model.vision.merger_hidden_size`` or the LLM hidden size."""
    return cfg.model.vision.merger_hidden_size or cfg.model.llm.hidden_size


def vision_ffn_hidden_size(vision: VisionConfig) -> int:
    return int(vision.hidden_size * vision.mlp_ratio)


def _vision_config(vision: VisionConfig, tensor_model_parallel_size: int = 1,
                   params_dtype: torch.dtype = torch.float32,
                   recompute_granularity: Optional[str] = None, **overrides) -> TransformerConfig:
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision_ffn_hidden_size(vision),
        num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads,
        kv_channels=vision.hidden_size // vision.num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=VISION_NORM_EPS,
        gated_linear_unit=False,
        activation_func=quick_gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_model_parallel_size,
        # The whole ViT lives on one pipeline stage; see the module docstring.
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1,
        sequence_parallel=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
        deallocate_pipeline_outputs=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def vision_transformer_config(cfg: OmniConfig, **overrides) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` of the ViT of ``cfg``.

    Same tensor parallelism and dtype as the LLM; pipeline size 1, no virtual pipeline, no
    sequence or context parallelism whatever the LLM uses (the ViT runs whole on the first stage).
    No FP8 either: the patch count is arbitrary, FP8 GEMMs want multiples of 16.
    """
    dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32  # on the CPU too
    return _vision_config(cfg.model.vision, cfg.parallel.tensor_model_parallel_size, dtype,
                          cfg.training.recompute_granularity, **overrides)


# --- specs --------------------------------------------------------------------------------------

def vision_layer_spec(impl: str) -> ModuleSpec:
    """One ViT layer: megatron-core TransformerLayer with bidirectional attention.

    ``local``: megatron-core SelfAttention/MLP with Column/RowParallelLinear, our ``SPTorchNorm``
    (LayerNorm via ``config.normalization``) and ``VarlenSDPAttention``. ``transformer_engine``:
    megatron-core's TE layer (LayerNorm fused into linear_qkv/linear_fc1, TE THD attention).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if impl == "transformer_engine":
        spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec())
    elif impl == "local":
        spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(normalization="LayerNorm"))
        spec.submodules.input_layernorm = SPTorchNorm
        spec.submodules.pre_mlp_layernorm = SPTorchNorm
        spec.submodules.self_attention.submodules.core_attention = VarlenSDPAttention
    else:
        raise ValueError(f"unknown transformer_impl {impl!r}; use local or transformer_engine")
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params or {}, attn_mask_type=AttnMaskType.no_mask)
    return spec


def vision_block_spec(config: TransformerConfig, impl: str) -> TransformerBlockSubmodules:
    """All ``config.num_layers`` ViT layers, spelled out (never ``get_num_layers_to_build``, which
    would divide them over the pipeline stages of the LLM); no final norm (the merger has one)."""
    layer = vision_layer_spec(impl)
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=None)


# --- grid helpers -------------------------------------------------------------------------------

def _grid_list(grid_thw: Union[torch.Tensor, Sequence[Sequence[int]]]
               ) -> list[tuple[int, int, int]]:
    if isinstance(grid_thw, torch.Tensor):
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be [num_items, 3], got shape {tuple(grid_thw.shape)}")
        rows = grid_thw.tolist()
    else:
        rows = [list(r) for r in grid_thw]
    out = []
    for r in rows:
        if len(r) != 3 or min(r) < 1:
            raise ValueError(f"grid_thw rows must be 3 positive ints (t, h, w), got {r}")
        out.append((int(r[0]), int(r[1]), int(r[2])))
    return out


def vision_cu_seqlens(grid_thw, device=None) -> torch.Tensor:
    """int32 segment boundaries: one segment of ``h*w`` patches per temporal slice per item."""
    lens = [h * w for t, h, w in _grid_list(grid_thw) for _ in range(t)]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
    return cu.to(device) if device is not None else cu


def vision_rotary_positions(grid_thw, merge: int = 2, device=None) -> torch.Tensor:
    """``[N, 2]`` (row, column) of every patch, in the ``(t, h/m, w/m, m, m)`` patch order."""
    out = []
    for t, h, w in _grid_list(grid_thw):
        if h % merge or w % merge:
            raise ValueError(f"grid ({t}, {h}, {w}): h and w must be multiples of the spatial "
                             f"merge size {merge}")
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # (h/m, m_h, w/m, m_w) -> (h/m, w/m, m_h, m_w), flattened
        pos = torch.stack([rows.permute(0, 2, 1, 3).reshape(-1),
                           cols.permute(0, 2, 1, 3).reshape(-1)], dim=-1)
        out.append(pos.repeat(t, 1))
    pos = torch.cat(out, 0)
    return pos.to(device) if device is not None else pos


def vision_rotary_freqs(positions: torch.Tensor, head_dim: int,
                        theta: float = ROTARY_THETA) -> torch.Tensor:
    """megatron-core rotary table ``[N, 1, 1, head_dim]`` (fp32) for (row, column) positions.

    ``head_dim/4`` frequencies ``theta^(-2i/(head_dim/2))``; the first half of the rotary pairs
    turns with the row, the second with the column; non-interleaved layout, so the table is
    duplicated along the last dimension (megatron's ``_rotate_half`` convention). Computed in
    every forward from scratch (cheap), so a bf16 cast of the module can never round it.
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary needs head_dim % 4 == 0, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32,
                                            device=positions.device) / half)
    pos = positions.float()
    freqs = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:2] * inv_freq], dim=-1)  # [N, head_dim/2]
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


# --- modules ------------------------------------------------------------------------------------

class PatchMerger(MegatronModule):
    """LayerNorm -> 2x2 patches concatenated -> Linear(4w, 4w) -> GELU -> Linear(4w, out).

    Column- then row-parallel over TP; the output is complete on every TP rank.
    """

    def __init__(self, config: TransformerConfig, width: int, out_hidden: int, merge: int = 2):
        super().__init__(config=config)
        self.group = merge * merge
        self.merged = width * self.group
        self.ln_q = torch.nn.LayerNorm(width, eps=VISION_NORM_EPS, dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.merged, self.merged, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.merged, out_hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, width]`` -> ``[N / 4, out_hidden]``."""
        if x.shape[0] % self.group:
            raise ValueError(f"{x.shape[0]} patches do not form groups of {self.group}")
        # Megatron's parallel linears expect [s, b, h]; b = 1.
        x = self.ln_q(x).reshape(-1, 1, self.merged)
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)
        x, _ = self.linear_fc2(x)
        return x.squeeze(1)


class VisionEncoder(MegatronModule):
    """Qwen2-VL ViT + patch merger (see the module docstring).

    Args:
        vision: the ``model.vision`` section, or a whole ``OmniConfig`` (then ``out_hidden``,
            ``config`` and ``transformer_impl`` default to what that config says).
        out_hidden: merger output width (``vision_out_hidden(cfg)``).
        config: the ViT ``TransformerConfig`` (``vision_transformer_config(cfg)``); None builds
            one for ``vision`` with the TP size of the current megatron parallel state, fp32.
        transformer_impl: 'local', 'transformer_engine' or 'auto' (resolved here).

    State-dict names: ``patch_embed.weight`` ``[width, C, T, p, p]``,
    ``transformer.layers.N.*`` (megatron-core layer names), ``merger.ln_q.*``,
    ``merger.linear_fc1.*``, ``merger.linear_fc2.*``. Its weight map
    (:mod:`megatron_omni.models.weight_maps.vision`) maps them to and from transformers' Qwen2-VL
    vision tower.
    """

    def __init__(self, vision: Union[VisionConfig, OmniConfig], out_hidden: Optional[int] = None,
                 config: Optional[TransformerConfig] = None,
                 transformer_impl: Optional[str] = None):
        if isinstance(vision, OmniConfig):
            cfg = vision
            vision = cfg.model.vision
            out_hidden = out_hidden or vision_out_hidden(cfg)
            config = config or vision_transformer_config(cfg)
            transformer_impl = transformer_impl or cfg.model.transformer_impl
        if out_hidden is None:
            out_hidden = vision.merger_hidden_size
        if out_hidden is None:
            raise ValueError("VisionEncoder needs out_hidden (or model.vision.merger_hidden_size)")
        if config is None:
            from megatron.core import parallel_state as ps

            config = _vision_config(vision, ps.get_tensor_model_parallel_world_size())
        if config.pipeline_model_parallel_size != 1 or \
                config.virtual_pipeline_model_parallel_size is not None:
            raise ValueError(
                "the ViT config must have pipeline_model_parallel_size=1 and no virtual pipeline "
                "(megatron-core would split the ViT layers over the LLM's stages); build it with "
                "vision_transformer_config(cfg)")
        if config.sequence_parallel:
            raise ValueError("the ViT does not run sequence-parallel; build its config with "
                             "vision_transformer_config(cfg)")
        if config.num_layers != vision.depth or config.hidden_size != vision.hidden_size:
            raise ValueError(f"config ({config.num_layers} layers, width {config.hidden_size}) "
                             f"does not match model.vision (depth {vision.depth}, width "
                             f"{vision.hidden_size})")
        super().__init__(config=config)
        self.vision = vision
        self.out_hidden = out_hidden
        self.transformer_impl = resolve_transformer_impl(transformer_impl or "auto")
        self.head_dim = vision.hidden_size // vision.num_heads
        self.patch_dim = (vision.in_channels * vision.temporal_patch_size * vision.patch_size
                          * vision.patch_size)
        kernel = (vision.temporal_patch_size, vision.patch_size, vision.patch_size)
        # A Conv3d module only to hold the weight in its checkpoint shape; computed as a matmul.
        self.patch_embed = torch.nn.Conv3d(vision.in_channels, vision.hidden_size, kernel,
                                           stride=kernel, bias=False, dtype=config.params_dtype)
        self.transformer = TransformerBlock(
            config=config, spec=vision_block_spec(config, self.transformer_impl),
            post_layer_norm=False, pre_process=True, post_process=True)
        self.merger = PatchMerger(config, vision.hidden_size, out_hidden,
                                  vision.spatial_merge_size)

    def set_input_tensor(self, input_tensor) -> None:
        """The ViT always starts from pixels on the first stage; nothing comes from a pipeline
        neighbour."""

    def forward(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``pixel_patches [N, C*T*p*p]`` (items concatenated in ``grid_thw`` order, each in the
        2x2-merge-contiguous patch order) -> merged features ``[N/4, out_hidden]``."""
        grid = _grid_list(grid_thw)
        n = sum(t * h * w for t, h, w in grid)
        if pixel_patches.dim() != 2 or pixel_patches.shape[1] != self.patch_dim:
            raise ValueError(f"pixel_patches must be [N, {self.patch_dim}], got "
                             f"{tuple(pixel_patches.shape)}")
        if pixel_patches.shape[0] != n:
            raise ValueError(f"grid_thw {grid} covers {n} patches but pixel_patches has "
                             f"{pixel_patches.shape[0]}")
        device = pixel_patches.device
        weight = self.patch_embed.weight
        x = F.linear(pixel_patches.to(weight.dtype), weight.reshape(weight.shape[0], -1))
        freqs = vision_rotary_freqs(
            vision_rotary_positions(grid, self.vision.spatial_merge_size, device), self.head_dim)
        params = packed_seq_params(vision_cu_seqlens(grid, device))
        x = self.transformer(x.unsqueeze(1), attention_mask=None, rotary_pos_emb=freqs,
                             packed_seq_params=params)
        return self.merger(x.squeeze(1))

    def load_full_state_dict(self, full: dict, strict: bool = True) -> None:
        """Load this TP rank's part of a full (TP=1) state dict in local-spec names (the split
        rule of the ViT's weight map, :mod:`.weight_maps.vision`)."""
        from megatron.core import parallel_state as ps

        from .weight_maps.sharding import to_te_layout
        from .weight_maps.vision import shard_vision_state_dict

        local = shard_vision_state_dict(full, ps.get_tensor_model_parallel_rank(),
                                        ps.get_tensor_model_parallel_world_size())
        if self.transformer_impl == "transformer_engine":
            local = to_te_layout(local)
        from .llm import load_local_state

        load_local_state(self, local, strict, what="vision state dict", shown=8)


def build_vision_encoder(cfg: OmniConfig, config: Optional[TransformerConfig] = None
                         ) -> VisionEncoder:
    """The ViT of ``cfg`` (after ``parallel.runtime.initialize``; build it on the first stage)."""
    return VisionEncoder(cfg, config=config)


# --- FLOPs --------------------------------------------------------------------------------------

def vision_flops(grid_thw, cfg: Union[VisionConfig, OmniConfig],
                 out_hidden: Optional[int] = None) -> int:
    """Forward FLOPs of the ViT + merger on these patches (matmuls only, 2*m*n*k each).

    Counted: patch embedding (a ``[N, C*T*p*p] x [C*T*p*p, w]`` matmul), per layer the qkv and
    output projections, the attention scores and the attention-weighted values (per segment of
    ``L`` patches: ``2*L*L*w`` each), the two MLP matmuls, and the merger's two matmuls. Norms,
    activations, softmax and rotary are not counted (they are not matmuls). Backward is about
    twice this; the training step's MFU multiplies by 3 (by 4 with full recompute).
    """
    if isinstance(cfg, OmniConfig):
        out_hidden = out_hidden or vision_out_hidden(cfg)
        cfg = cfg.model.vision
    out_hidden = out_hidden or cfg.merger_hidden_size
    if out_hidden is None:
        raise ValueError("vision_flops needs out_hidden (or model.vision.merger_hidden_size)")
    from ..training.flops import vit_forward_flops  # the one FLOP formula of the ViT

    return int(round(vit_forward_flops(cfg, _grid_list(grid_thw), out_hidden).total))
