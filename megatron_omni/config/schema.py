"""Configuration dataclasses for megatron-omni.

Every field carries a docstring right under it (the convention of megatron-core's
``TransformerConfig``): that text is what ``python -m megatron_omni.config --explain`` prints.
Field-local checks live in ``__post_init__``; checks that combine sections (heads vs tensor
parallelism, layers vs pipeline stages, ...) live in :mod:`megatron_omni.config.validate`, which
runs before any process group is created.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """An invalid configuration. The message says which field to change and how."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class LLMConfig:
    """The shared decoder-only LLM (Llama-3 architecture with M-RoPE)."""

    num_layers: int = 2
    """Number of transformer layers (32 for Llama-3.1-8B, 80 for Llama-3.3-70B)."""

    hidden_size: int = 64
    """Model width (4096 for 8B, 8192 for 70B)."""

    ffn_hidden_size: int = 192
    """SwiGLU intermediate width (14336 for 8B, 28672 for 70B)."""

    num_attention_heads: int = 4
    """Query heads (32 for 8B, 64 for 70B)."""

    num_query_groups: int = 2
    """Key/value heads for grouped-query attention (8 for both Llama-3 sizes)."""

    kv_channels: Optional[int] = None
    """Head dimension; None means hidden_size // num_attention_heads (128 for Llama-3)."""

    vocab_size: int = 512
    """Vocabulary before padding: base tokenizer + M2-omni special tokens + speech codes."""

    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the tensor-parallel size."""

    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (Llama-3 uses 1e-5)."""

    rotary_base: float = 500000.0
    """RoPE theta (5e5 for Llama-3)."""

    rope_scaling: bool = False
    """Apply Llama-3.1's llama3 frequency scaling on top of M-RoPE. Off for M2-omni: the
    authors' release runs M-RoPE with plain (unscaled) rotary frequencies, and
    ``export --format release`` refuses a checkpoint trained with scaling. The importer drops a
    Llama-3.1 checkpoint's scaling unless this is set true explicitly (docs/conversion.md)."""

    rope_scaling_factor: float = 8.0
    """Llama-3.1 scaling: factor."""

    rope_low_freq_factor: float = 1.0
    """Llama-3.1 scaling: low_freq_factor."""

    rope_high_freq_factor: float = 4.0
    """Llama-3.1 scaling: high_freq_factor."""

    rope_original_max_position: int = 8192
    """Llama-3.1 scaling: original_max_position_embeddings."""

    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    """M-RoPE split of the head_dim/2 rotary frequency pairs into (temporal, height, width);
    (16, 24, 24) for head_dim 128. Must sum to kv_channels // 2."""

    max_position_embeddings: int = 131072
    """Longest sequence the rotary tables are built for."""

    init_method_std: float = 0.02
    """Std of the normal initialisation of weights trained from scratch."""

    untie_embeddings_and_output_weights: bool = True
    """Llama-3 uses separate input embedding and output (lm_head) matrices."""

    def __post_init__(self):
        _check(self.num_layers >= 1, "model.llm.num_layers must be >= 1")
        _check(self.hidden_size > 0 and self.ffn_hidden_size > 0, "model.llm sizes must be > 0")
        _check(
            self.num_attention_heads % self.num_query_groups == 0,
            f"model.llm.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"model.llm.num_query_groups ({self.num_query_groups}) for grouped-query attention",
        )
        if self.kv_channels is None:
            _check(
                self.hidden_size % self.num_attention_heads == 0,
                f"model.llm.hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads}); set model.llm.kv_channels",
            )
        _check(
            len(self.mrope_section) == 3,
            f"model.llm.mrope_section must have 3 entries (temporal, height, width), got "
            f"{self.mrope_section}",
        )
        _check(
            sum(self.mrope_section) == self.head_dim // 2,
            f"model.llm.mrope_section {list(self.mrope_section)} sums to {sum(self.mrope_section)}"
            f" but must sum to head_dim/2 = {self.head_dim // 2}; e.g. (16, 24, 24) for head_dim "
            f"128",
        )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    """Qwen2-VL vision transformer (NaViT) and its 2x2 patch merger."""

    enabled: bool = True
    """Build the vision encoder."""

    depth: int = 2
    """Number of ViT blocks (32 in Qwen2-VL)."""

    hidden_size: int = 32
    """ViT width (1280 in Qwen2-VL)."""

    num_heads: int = 2
    """ViT attention heads (16 in Qwen2-VL)."""

    mlp_ratio: float = 4.0
    """ViT MLP width = mlp_ratio * hidden_size."""

    patch_size: int = 14
    """Spatial patch size in pixels."""

    temporal_patch_size: int = 2
    """Frames per temporal patch (a still image is repeated to fill it)."""

    spatial_merge_size: int = 2
    """Patch merger groups spatial_merge_size^2 neighbouring patches into one LLM token."""

    in_channels: int = 3
    """Image channels."""

    merger_hidden_size: Optional[int] = None
    """Output width of the patch merger (the projector's input); None = LLM hidden size."""

    def __post_init__(self):
        _check(
            self.hidden_size % self.num_heads == 0,
            f"model.vision.hidden_size ({self.hidden_size}) must be divisible by "
            f"model.vision.num_heads ({self.num_heads})",
        )
        _check(
            (self.hidden_size // self.num_heads) % 4 == 0,
            "model.vision head dim must be a multiple of 4 (2-D rotary splits it in halves of "
            "pairs)",
        )


@dataclass
class AudioConfig:
    """SAN-M (Paraformer) audio encoder; runs in fp32."""

    enabled: bool = True
    """Build the audio encoder."""

    input_size: int = 560
    """Feature width after LFR stacking (80 mel x 7)."""

    hidden_size: int = 32
    """Encoder width (512 in Paraformer)."""

    num_heads: int = 2
    """Attention heads (4 in Paraformer)."""

    ffn_hidden_size: int = 64
    """Feed-forward width (2048 in Paraformer)."""

    num_blocks: int = 2
    """Number of SAN-M blocks including the first (50 in Paraformer)."""

    kernel_size: int = 11
    """FSMN memory block kernel."""

    sanm_shift: int = 0
    """Shift of the FSMN window (FunASR's sanm_shfit)."""

    frames_per_token: int = 3
    """Encoder frames concatenated into one LLM token (180 ms)."""

    tokens_per_clip: int = 256
    """Every clip is truncated/padded to exactly this many LLM tokens."""

    cmvn_file: Optional[str] = None
    """FunASR ``am.mvn`` with the global CMVN statistics of the pretrained encoder; None = no
    normalisation (training from scratch)."""

    def __post_init__(self):
        _check(
            self.hidden_size % self.num_heads == 0,
            f"model.audio.hidden_size ({self.hidden_size}) must be divisible by num_heads "
            f"({self.num_heads})",
        )
        _check(self.kernel_size % 2 == 1, "model.audio.kernel_size must be odd")


@dataclass
class ProjectorConfig:
    """Linear projectors from encoders into the LLM (outputs are L2-normalised)."""

    vision_depth: int = 1
    """1 = Linear; each extra depth adds (GELU, Linear). The release's `mlp_depths`."""

    audio_depth: int = 1
    """Same for the audio projector (input 3 * audio width)."""

    def __post_init__(self):
        _check(self.vision_depth >= 1 and self.audio_depth >= 1, "projector depths must be >= 1")


@dataclass
class ModelConfig:
    """The whole omni model."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    """The language model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """The vision encoder."""

    audio: AudioConfig = field(default_factory=AudioConfig)
    """The audio encoder."""

    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """The projectors."""

    speech_codebook_size: int = 4096
    """Number of discrete speech-output codes added to the vocabulary."""

    transformer_impl: str = "auto"
    """Layer implementation: 'transformer_engine' (GPU, FP8-capable, THD packed attention),
    'local' (megatron-core modules + our varlen SDPA attention; CPU), or 'auto' (TE when CUDA and
    Transformer Engine are present, else local). Asking for TE where it is missing is an error."""

    attention_backend: str = "auto"
    """Local-spec core attention for packed rows: 'sdpa' (block-diagonal causal mask) or 'auto'."""

    def __post_init__(self):
        _check(
            self.transformer_impl in ("auto", "local", "transformer_engine"),
            f"model.transformer_impl must be auto|local|transformer_engine, got "
            f"{self.transformer_impl!r}",
        )
        _check(self.speech_codebook_size >= 0, "model.speech_codebook_size must be >= 0")


@dataclass
class ParallelConfig:
    """How the model and data are split over devices (megatron-core parallel_state)."""

    tensor_model_parallel_size: int = 1
    """TP: shards every linear layer over this many devices (within a node)."""

    pipeline_model_parallel_size: int = 1
    """PP: number of pipeline stages; encoders live on the first stage."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved schedule: model chunks per pipeline stage (None = not interleaved)."""

    context_parallel_size: int = 1
    """CP: splits long sequences (needs Transformer Engine attention)."""

    sequence_parallel: bool = False
    """Shard LayerNorm/dropout activations along the sequence over the TP group."""

    first_stage_num_layers: Optional[int] = None
    """LLM layers on the first pipeline stage (it also carries the encoders, so it may get
    fewer); None = an even split."""

    backend: str = "auto"
    """torch.distributed backend: 'nccl', 'gloo' or 'auto' (NCCL when CUDA is present)."""

    distributed_timeout_minutes: int = 10
    """Timeout for collective operations."""

    def __post_init__(self):
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
        ):
            _check(getattr(self, name) >= 1, f"parallel.{name} must be >= 1")
        _check(
            self.backend in ("auto", "nccl", "gloo"),
            f"parallel.backend must be auto|nccl|gloo, got {self.backend!r}",
        )
        _check(
            self.distributed_timeout_minutes > 0,
            f"parallel.distributed_timeout_minutes must be > 0 (minutes before a collective "
            f"times out), got {self.distributed_timeout_minutes}; 10 is a good default",
        )
        if self.virtual_pipeline_model_parallel_size is not None:
            _check(
                self.pipeline_model_parallel_size > 1,
                "parallel.virtual_pipeline_model_parallel_size needs "
                "parallel.pipeline_model_parallel_size > 1; unset it or raise PP",
            )
            _check(
                self.virtual_pipeline_model_parallel_size >= 2,
                "parallel.virtual_pipeline_model_parallel_size must be >= 2 (or null)",
            )
        if self.sequence_parallel:
            _check(
                self.tensor_model_parallel_size > 1,
                "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1",
            )


@dataclass
class DataConfig:
    """What is read and how it is packed."""

    path: Optional[str] = None
    """Directory of prepared Energon datasets (one sub-directory per modality)."""

    modalities: list[str] = field(default_factory=lambda: ["text"])
    """Modalities trained in this stage; each is one micro-batch group per optimizer step."""

    seq_length: int = 128
    """Tokens per packed row."""

    micro_batch_size: int = 1
    """Packed rows per micro-batch."""

    pure_text_ratio: float = 0.0
    """Fraction of pure-text rows mixed in (about 0.25 whenever the LLM trains)."""

    max_images_per_row: int = 16
    """Media budget of one packed row."""

    max_vision_patches_per_row: int = 16384
    """Vision patches (14-px, before merging) allowed per packed row."""

    media_backend: str = "auto"
    """Media decoding. 'cpu' / 'dali' (DALI CPU operators): in the loader workers. 'dali_gpu':
    images/videos travel encoded and are decoded in the training process by DALI on its GPU
    (data/media/deferred.py); 'deferred': the same split with whatever that process has.
    'auto': 'dali_gpu' when CUDA and DALI are both there, else worker decoding."""

    tokenizer: Optional[str] = None
    """Path of tokenizer.json or a SentencePiece model."""

    num_workers: int = 0
    """Data-loader worker processes per loader of a reading rank."""

    load_once_per_mp_group: bool = True
    """Only one rank per model-parallel group (TP rank 0 of the first pipeline stage) builds the
    loaders, runs their workers and decodes; the others receive each batch by broadcast (the
    media only on the first stage). false: every rank reads and decodes for itself."""

    dp_balance: str = "none"
    """'cost': the data-reading ranks swap whole micro-batches of a step (same modality group)
    across the data-parallel ranks so that every rank's step compute (LLM + ViT + SAN-M FLOPs
    from the batch's lengths and grids) is about equal (data/dp_balance.py); rows are unchanged.
    'none': every DP rank trains on the rows it read."""

    dp_balance_target: float = 1.01
    """With dp_balance=cost: swapping stops once the most-loaded rank is within this factor of
    the mean (1.0: as far as swaps go; a little above moves far fewer micro-batches)."""

    seed: int = 1234
    """Shuffle seed."""

    packing_buffer_size: int = 256
    """Samples the loader buffers before the packer partitions them into rows."""

    shuffle_buffer_size: int = 256
    """Samples in the loader's shuffle buffer (1 = no shuffling beyond the shard order)."""

    def __post_init__(self):
        _check(self.seq_length >= 8, "data.seq_length must be >= 8")
        _check(self.packing_buffer_size >= 1, "data.packing_buffer_size must be >= 1")
        _check(self.shuffle_buffer_size >= 1, "data.shuffle_buffer_size must be >= 1")
        _check(self.micro_batch_size >= 1, "data.micro_batch_size must be >= 1")
        _check(0.0 <= self.pure_text_ratio < 1.0, "data.pure_text_ratio must be in [0, 1)")
        _check(
            self.media_backend in ("auto", "dali", "cpu", "dali_gpu", "deferred"),
            f"data.media_backend must be auto|dali|cpu|dali_gpu|deferred, got "
            f"{self.media_backend!r}",
        )
        _check(self.dp_balance in ("none", "cost"),
               f"data.dp_balance must be none|cost, got {self.dp_balance!r}")
        _check(self.dp_balance_target >= 1.0, "data.dp_balance_target must be >= 1.0")
        _check(len(self.modalities) > 0, "data.modalities must name at least one modality")
        known = {"text", "image", "video", "audio", "interleaved", "gen_audio", "gen_image"}
        bad = [m for m in self.modalities if m not in known]
        _check(not bad, f"data.modalities has unknown {bad}; known: {sorted(known)}")
        dup = sorted({m for m in self.modalities if self.modalities.count(m) > 1})
        _check(not dup, f"data.modalities names {dup} more than once; list each modality once")


@dataclass
class TrainingConfig:
    """Optimisation and run control."""

    train_iters: int = 10
    """Optimizer steps in this stage."""

    lr: float = 3e-4
    """Peak learning rate."""

    min_lr: float = 3e-5
    """Learning rate at the end of cosine decay."""

    lr_warmup_iters: int = 0
    """Linear warm-up steps."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.95
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Gradient-norm clip (0 disables)."""

    num_micro_batches: int = 1
    """Micro-batches per modality group per optimizer step (gradient accumulation)."""

    bf16: bool = False
    """bf16 parameters/activations (megatron-core modules, projectors, ViT; SAN-M stays fp32), on
    the GPU and on the CPU alike, so CPU tests see what a GPU run sees."""

    fp8: Optional[str] = None
    """FP8 GEMMs via Transformer Engine: None, 'hybrid' or 'e4m3' (GPU only)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer states over data-parallel ranks (megatron-core DistributedOptimizer)."""

    recompute_granularity: Optional[str] = None
    """Activation recomputation: None, 'full' or 'selective'."""

    seed: int = 1234
    """Model initialisation / dropout seed."""

    log_interval: int = 1
    """Steps between log lines."""

    save: Optional[str] = None
    """Checkpoint directory (None = no checkpoints)."""

    save_interval: int = 0
    """Steps between checkpoints (0 = only at the end / on signal)."""

    max_nan_steps: int = 5
    """Steps in a row with a NaN/Inf loss (each skipped, no update) before the run stops."""

    tensorboard_dir: Optional[str] = None
    """TensorBoard log directory (None = ``<save>/tensorboard`` when saving, else none)."""

    wandb_project: Optional[str] = None
    """Weights & Biases project: when set, the logging rank sends the TensorBoard scalars there
    too (needs ``pip install wandb``; ``WANDB_MODE=offline`` logs without a network). None = off."""

    wandb_run_name: Optional[str] = None
    """Weights & Biases run name (None = the name wandb generates); needs training.wandb_project."""

    exit_interval: Optional[int] = None
    """Stop (after saving) once this many steps ran in this process; None = run to train_iters.
    Lets a test or a time-limited job end cleanly and resume later."""

    keep_last_checkpoints: int = 2
    """Complete checkpoints kept under training.save; older ones are deleted only after a newer
    one is published (0 keeps all)."""

    load: Optional[str] = None
    """Checkpoint to resume from (optimizer, scheduler, RNG and data state included): a
    step_XXXXXXXX directory or a root whose newest complete checkpoint is used. None = resume
    from training.save when it holds one."""

    optimizer: str = "adamw"
    """'adamw' (decoupled weight decay) or 'adam' (L2 penalty added to the gradient)."""

    grad_reduce_in_fp32: bool = True
    """Accumulate and all-reduce gradients in fp32 (DDP buffers) even when params are bf16."""

    run_lock: bool = True
    """Hold an exclusive lock (flock of ``<save>/.run.lock``) for the run's life so a second run
    on the same training.save is refused; false only for file systems without flock."""

    verify_checkpoint: bool = True
    """Check every file of a checkpoint against the CRC-32 recorded at save before resuming from
    it (one read of the checkpoint on rank 0); a damaged newest checkpoint is set aside and the
    next older one used (auto-resume) or the run stops (training.load)."""

    on_dp_change: str = "refuse"
    """Resuming at another data-parallel size: 'refuse' (stop with what to do) or
    'restart_data' (the data stream starts over; samples already seen are seen again)."""

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (megatron-core DDP
    buckets; gloo runs it asynchronously on the CPU too). Correct with modality groups whose
    micro-batches skip an encoder: the model gives every trainable parameter a zero-weight
    contribution in every micro-batch (``models/omni.py``)."""

    def __post_init__(self):
        _check(self.train_iters >= 0, "training.train_iters must be >= 0")
        _check(self.lr >= 0 and self.min_lr >= 0, "training.lr and min_lr must be >= 0")
        _check(self.min_lr <= self.lr, "training.min_lr must be <= training.lr")
        _check(self.num_micro_batches >= 1, "training.num_micro_batches must be >= 1")
        _check(
            self.fp8 in (None, "hybrid", "e4m3"),
            f"training.fp8 must be null|hybrid|e4m3, got {self.fp8!r}",
        )
        _check(
            self.recompute_granularity in (None, "full", "selective"),
            "training.recompute_granularity must be null|full|selective",
        )
        _check(
            self.optimizer in ("adam", "adamw"),
            f"training.optimizer must be adam|adamw, got {self.optimizer!r}",
        )
        _check(
            self.keep_last_checkpoints >= 0,
            "training.keep_last_checkpoints must be >= 0 (0 keeps all)",
        )
        _check(
            self.on_dp_change in ("refuse", "restart_data"),
            f"training.on_dp_change must be refuse|restart_data, got {self.on_dp_change!r}",
        )
        _check(
            self.log_interval >= 1,
            f"training.log_interval must be >= 1 (steps between log lines), got "
            f"{self.log_interval}",
        )
        for name, what in (
            ("lr_warmup_iters", "0 = no warm-up"),
            ("clip_grad", "0 disables clipping"),
            ("weight_decay", "0 = none"),
            ("save_interval", "0 = save only at the end / on a signal"),
            ("max_nan_steps", "steps in a row with a NaN loss"),
        ):
            _check(
                getattr(self, name) >= 0,
                f"training.{name} must be >= 0 ({what}), got {getattr(self, name)}",
            )
        for name in ("adam_beta1", "adam_beta2"):
            _check(
                0.0 <= getattr(self, name) < 1.0,
                f"training.{name} must be in [0, 1), got {getattr(self, name)}",
            )
        _check(self.adam_eps > 0, f"training.adam_eps must be > 0, got {self.adam_eps}")
        _check(
            self.wandb_run_name is None or bool(self.wandb_project),
            "training.wandb_run_name is set but training.wandb_project is not; set the project "
            "(Weights & Biases logging is off without it)",
        )
        _check(
            self.exit_interval is None or self.exit_interval >= 1,
            f"training.exit_interval must be >= 1 or null, got {self.exit_interval}",
        )


@dataclass
class StageConfig:
    """Which training stage this is and what trains in it."""

    name: str = "custom"
    """pt1, pt2, pt3, it1, it2, it3, at or custom."""

    train_vision: bool = True
    """Vision encoder receives gradients."""

    train_audio: bool = True
    """Audio encoder receives gradients."""

    train_projectors: bool = True
    """Projectors receive gradients."""

    train_llm: bool = True
    """LLM receives gradients."""

    balance: str = "none"
    """Loss balance across modality groups: none, step (PT-3) or dynamic (IT-3)."""

    init_from: Optional[str] = None
    """Previous stage's checkpoint: weights only, fresh optimizer."""

    init_allow_missing: list[str] = field(default_factory=list)
    """Parameter-name prefixes that may be absent from ``init_from`` (parts new in this stage,
    e.g. ``audio_model.``); they keep their fresh initialisation."""

    step_balance_file: Optional[str] = None
    """Step balance (PT-3): JSON written by ``--calibrate-step-balance`` with the weights w_i."""

    balance_alpha: float = 10.0
    """Step balance: sum of the weights, w_i = alpha * (1/L_i*) / sum_j (1/L_j*)."""

    calibration_max_steps: int = 200
    """Calibration: most steps one modality trains alone before L_i* is taken anyway."""

    plateau_window: int = 10
    """Calibration plateau rule: compare the means of the last two windows of this many steps."""

    plateau_rel_tol: float = 0.02
    """Calibration plateau rule: converged when those means differ by less than this fraction."""

    balance_window: int = 5
    """Dynamic balance: H, validation segments in the slope window (weights are 1 until H)."""

    balance_scale: float = 1.0
    """Dynamic balance: f, the softmax scale of the convergence scores."""

    balance_interval: int = 10
    """Dynamic balance: optimizer steps between validation segments."""

    val_micro_batches: int = 2
    """Dynamic balance: S_i, held-out micro-batches per modality in one validation segment."""

    gen_audio_loss_weight: float = 1.0
    """Weight of the speech-output loss L_gen_a in every step."""

    def __post_init__(self):
        names = ("pt1", "pt2", "pt3", "it1", "it2", "it3", "at", "custom")
        _check(self.name in names, f"stage.name must be one of {names}, got {self.name!r}")
        _check(
            self.balance in ("none", "step", "dynamic"),
            f"stage.balance must be none|step|dynamic, got {self.balance!r}",
        )
        _check(self.balance_window >= 2, "stage.balance_window (H) must be >= 2")
        _check(self.balance_scale >= 0, "stage.balance_scale (f) must be >= 0")
        _check(
            self.balance_interval >= 1 and self.val_micro_batches >= 1,
            "stage.balance_interval and stage.val_micro_batches must be >= 1",
        )
        _check(self.balance_alpha > 0, "stage.balance_alpha must be > 0")
        _check(self.gen_audio_loss_weight >= 0, "stage.gen_audio_loss_weight must be >= 0")


@dataclass
class AlignmentConfig:
    """The alignment stage (AT, ``stage.name: at``): DPO + ``sft_weight`` x SFT, LoRA on the
    LLM (training/lora.py, training/dpo.py). ``lora_rank`` > 0 switches LoRA on (any stage)."""

    lora_rank: int = 0
    """LoRA rank r; 0 = no adapters. Recipes pick r so the adapters are about 5% of the LLM."""

    lora_alpha: float = 16.0
    """LoRA alpha: the adapter output is scaled by alpha / r."""

    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""

    lora_targets: list[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    )
    """LLM decoder linears that get adapters."""

    dpo_beta: float = 0.1
    """DPO beta: L_dpo = -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)))."""

    sft_weight: float = 0.3
    """L = L_dpo + sft_weight * L_sft (M2-omni: 0.3)."""

    preference_dataset: str = "preference"
    """Dataset (under data.path) holding the preference pairs; its rows form one group."""

    preference_ratio: float = 1.0
    """Preference micro-batches per instruction micro-batch in every step (1 : 1 by default):
    each step takes training.num_micro_batches rows of every instruction modality and
    max(1, round(ratio * M * num_micro_batches)) preference rows."""

    def __post_init__(self):
        _check(self.lora_rank >= 0, "alignment.lora_rank must be >= 0 (0 = no LoRA)")
        _check(self.lora_alpha > 0, "alignment.lora_alpha must be > 0")
        _check(0.0 <= self.lora_dropout < 1.0, "alignment.lora_dropout must be in [0, 1)")
        known = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
        _check(
            bool(self.lora_targets) and all(t in known for t in self.lora_targets),
            f"alignment.lora_targets must be a non-empty subset of {list(known)}, got "
            f"{self.lora_targets}",
        )
        _check(self.dpo_beta > 0, "alignment.dpo_beta must be > 0")
        _check(self.sft_weight >= 0, "alignment.sft_weight must be >= 0")
        _check(self.preference_ratio > 0, "alignment.preference_ratio must be > 0")


@dataclass
class OmniConfig:
    """The root of a run configuration (one YAML file)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimisation and run control."""

    stage: StageConfig = field(default_factory=StageConfig)
    """Training stage."""

    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    """Alignment stage (AT): LoRA and DPO settings."""
