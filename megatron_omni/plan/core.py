"""The plan of one layout: per-stage memory and step time (:func:`plan`), in named steps."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..config.schema import ConfigError, OmniConfig
from ..config.validate import llm_layers_per_stage, padded_vocab_size, validate
from ..training.flops import (
    ForwardFlops,
    audio_llm_tokens,
    llm_forward_flops,
    omni_row_flops,
    projector_forward_flops,
    sanm_forward_flops,
    training_passes,
    vision_llm_tokens,
    vit_forward_flops,
)
from .counts import llm_layer_params, model_params, projector_params, sanm_params, vit_params
from .hardware import (
    ADAM_STATE_BYTES,
    COMPUTE_EFFICIENCY,
    FIXED_OVERHEAD_GIB,
    FP8_WEIGHT_CACHE_BYTES,
    FRAGMENTATION,
    GPUS,
    INTERCONNECTS,
    TP_EXPOSED_FRACTION,
    GiB,
    GPUSpec,
)
from .inputs import Layout, Workload
from .memory import (
    Numerics,
    _sanm_frame_bytes,
    _vit_patch_bytes,
    inflight_counts,
    llm_layer_activation_bytes,
)
from .schedule import Links, stage_times, step_seconds


@dataclass
class StagePlan:
    """One pipeline rank's per-GPU memory (bytes) and work per micro-batch."""

    rank: int
    llm_layers: int
    has_encoders: bool
    has_embedding: bool
    has_lm_head: bool
    params: int
    weights: float
    gradients: float
    optimizer: float
    fp8_weight_cache: float
    activations: float
    inflight: list
    transient: float
    overhead: float
    flops_per_micro_batch: float
    """Hardware FLOPs one GPU of this stage runs per micro-batch (recomputation included)."""
    trained_params: float = 0.0
    """Parameters on one GPU of this stage that train (what the DP collectives move)."""
    sixteen_bit_flops: float = 0.0
    """The part of ``flops_per_micro_batch`` that runs in 16-bit even in an FP8 run: the LLM's
    attention products (Transformer Engine's FP8 covers the linear layers; dot-product attention
    stays bf16) and the encoders (no FP8)."""
    times: dict = field(default_factory=dict)
    """Seconds per micro-batch (compute, tp, cp, p2p, cross_entropy) and per step (dp,
    optimizer) of this stage; empty where no step time is estimated."""

    @property
    def micro_batch_time(self) -> float:
        t = self.times
        return sum(t.get(k, 0.0) for k in ("compute", "tp", "cp", "p2p", "cross_entropy"))

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.fp8_weight_cache
                + self.activations + self.transient + self.overhead)

    def as_dict(self) -> dict:
        g = lambda x: round(x / GiB, 3)  # noqa: E731
        return {"rank": self.rank, "llm_layers": self.llm_layers,
                "encoders": self.has_encoders, "embedding": self.has_embedding,
                "lm_head": self.has_lm_head, "params_per_gpu": self.params,
                "weights_gib": g(self.weights), "gradients_gib": g(self.gradients),
                "optimizer_gib": g(self.optimizer),
                "fp8_weight_cache_gib": g(self.fp8_weight_cache),
                "activations_gib": g(self.activations), "inflight_per_chunk": list(self.inflight),
                "transient_gib": g(self.transient), "overhead_gib": g(self.overhead),
                "total_gib": g(self.total),
                "tflops_per_micro_batch": round(self.flops_per_micro_batch / 1e12, 4),
                "seconds": {k: round(v, 6) for k, v in self.times.items()}}


@dataclass
class Plan:
    """Result of :func:`plan`."""

    model: str
    gpu: GPUSpec
    precision: str
    impl: str
    layout: Layout
    workload: Workload
    params: dict
    stages: list
    row_flops: dict
    model_flops_per_step: float
    assumed_mfu: Optional[float]
    step_time: Optional[float]
    bubble_fraction: float
    warnings: list
    mix: list = field(default_factory=list)
    """With :func:`plan_mix`: (weight, label) of every row type averaged into the step time."""

    @property
    def peak_stage(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def peak_bytes(self) -> float:
        return self.peak_stage.total

    @property
    def fits(self) -> Optional[bool]:
        if self.gpu.memory_bytes is None:
            return None
        return self.peak_bytes <= self.gpu.memory_bytes

    @property
    def stage_imbalance(self) -> float:
        """Slowest stage's work over the mean stage's (1.0 = balanced pipeline)."""
        work = [s.flops_per_micro_batch for s in self.stages]
        mean = sum(work) / len(work)
        return max(work) / mean if mean else 1.0

    @property
    def tokens_per_step(self) -> int:
        return self.layout.global_batch * self.workload.seq_length

    @property
    def tokens_per_s_per_gpu(self) -> Optional[float]:
        if not self.step_time:
            return None
        return self.tokens_per_step / self.step_time / self.layout.num_gpus

    @property
    def tflops_per_gpu(self) -> Optional[float]:
        if not self.step_time:
            return None
        return self.model_flops_per_step / self.step_time / self.layout.num_gpus / 1e12

    @property
    def mfu(self) -> Optional[float]:
        if not self.step_time or self.precision not in self.gpu.peak:
            return None
        return self.tflops_per_gpu * 1e12 / self.gpu.peak[self.precision]

    def as_dict(self) -> dict:
        lay = asdict(self.layout)
        lay.update(num_gpus=self.layout.num_gpus, num_micro_batches=self.layout.num_micro_batches)
        peak = self.peak_stage
        opt = lambda x, n=3: None if x is None else round(x, n)  # noqa: E731
        return {
            "model": self.model,
            "params": self.params,
            "gpu": {"key": self.gpu.key, "name": self.gpu.name,
                    "memory_gib": opt(self.gpu.memory_bytes and self.gpu.memory_bytes / GiB),
                    "peak_tflops": opt(self.gpu.peak.get(self.precision, 0) / 1e12 or None)},
            "precision": self.precision,
            "impl": self.impl,
            "layout": lay,
            "workload": {**asdict(self.workload), "seqlens": self.workload.seqlens()},
            "memory": {"stages": [s.as_dict() for s in self.stages],
                       "peak_stage": peak.rank, "peak_gib": round(peak.total / GiB, 3),
                       "fits": self.fits},
            "throughput": {
                "row_flops": self.row_flops,
                "model_flops_per_step": self.model_flops_per_step,
                "assumed_mfu": self.assumed_mfu,
                "bubble_fraction": round(self.bubble_fraction, 5),
                "stage_imbalance": round(self.stage_imbalance, 4),
                "step_time_s": opt(self.step_time, 4),
                "tokens_per_s_per_gpu": opt(self.tokens_per_s_per_gpu, 1),
                "model_tflops_per_gpu": opt(self.tflops_per_gpu, 1),
                "mfu": opt(self.mfu, 4)},
            "assumptions": {"fixed_overhead_gib": FIXED_OVERHEAD_GIB,
                            "fragmentation": FRAGMENTATION,
                            "fp8_weight_cache_bytes": FP8_WEIGHT_CACHE_BYTES,
                            "compute_efficiency": COMPUTE_EFFICIENCY,
                            "tp_exposed_fraction": TP_EXPOSED_FRACTION},
            "warnings": list(self.warnings),
        }


def _resolved_cfg(cfg: OmniConfig, layout: Layout, workload: Workload, precision: str,
                  impl: str) -> OmniConfig:
    """A copy of ``cfg`` that says what the layout says, for :func:`validate`."""
    c = copy.deepcopy(cfg)
    p, t, d = c.parallel, c.training, c.data
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = layout.tp, layout.pp
    p.virtual_pipeline_model_parallel_size, p.context_parallel_size = layout.vpp, layout.cp
    p.sequence_parallel = bool(layout.sequence_parallel)
    p.first_stage_num_layers = layout.first_stage_num_layers
    t.fp8 = "hybrid" if precision == "fp8" else None
    t.bf16 = precision != "fp32"
    t.use_distributed_optimizer = layout.distributed_optimizer
    t.recompute_granularity = layout.recompute
    t.num_micro_batches = layout.num_micro_batches
    d.modalities = ["text"]
    d.seq_length, d.micro_batch_size = workload.seq_length, layout.micro_batch_size
    c.model.transformer_impl = "transformer_engine" if impl == "te" else "local"
    return c


def _stage_layers(cfg: OmniConfig, layout: Layout) -> list[list[int]]:
    """LLM layers per (rank, chunk)."""
    per_rank = llm_layers_per_stage(cfg.model.llm.num_layers, layout.pp,
                                    layout.first_stage_num_layers, layout.vpp)
    v = layout.vpp or 1
    return [[n // v] * v for n in per_rank]



# ------------------------------------------------------------------------------------------------
# plan(), step by step
# ------------------------------------------------------------------------------------------------

def _device(gpu: str, precision: str, impl: Optional[str],
            memory_gib: Optional[float]) -> tuple[GPUSpec, str]:
    """The GPU spec (with a memory override) and the layer profile; refuses impossible pairs."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)}")
    spec = GPUS[gpu]
    if memory_gib is not None:
        spec = GPUSpec(spec.key, f"{spec.name} ({memory_gib:g} GiB)", int(memory_gib * GiB),
                       spec.peak)
    on_cpu = gpu == "cpu"
    impl = impl or ("local" if on_cpu else "te")
    if precision == "fp8" and impl != "te":
        raise ConfigError("fp8 needs the Transformer Engine profile (impl te)")
    if precision == "fp8" and "fp8" not in spec.peak and not on_cpu:
        raise ConfigError(f"{spec.name} has no FP8 tensor cores; use bf16")
    return spec, impl


def _check_media(cfg: OmniConfig, workload: Workload) -> None:
    """The row must hold its media's LLM tokens, and the model must have their encoders."""
    m_cfg = cfg.model
    grids, frames = workload.vision_grids, workload.audio_frames
    media_tokens = 0
    if grids:
        if not m_cfg.vision.enabled:
            raise ConfigError("the workload has images/videos but model.vision.enabled is false")
        media_tokens += vision_llm_tokens(m_cfg.vision, list(grids)) + 2 * len(grids)
    if frames:
        if not m_cfg.audio.enabled:
            raise ConfigError("the workload has audio but model.audio.enabled is false")
        media_tokens += (m_cfg.audio.tokens_per_clip + 2) * len(frames)
    if media_tokens > workload.seq_length:
        raise ConfigError(f"the row's media take {media_tokens} LLM tokens, more than the "
                          f"sequence length {workload.seq_length}")


@dataclass(frozen=True)
class _Parts:
    """Parameter counts of the model's parts at TP=1 (the vocabulary padded for TP)."""

    vocab: int
    hidden: int
    layer_matmul: int
    layer_norms: int
    biggest_layer_weight: int
    vit_tp: int
    vit_rep: int
    merger_out: int
    vision_projector: int
    audio_projector: int
    sanm: int

    @classmethod
    def of(cls, cfg: OmniConfig, tp: int) -> "_Parts":
        m_cfg, llm = cfg.model, cfg.model.llm
        h = llm.hidden_size
        lin, norms = llm_layer_params(cfg)
        vit_tp, vit_rep = vit_params(cfg)
        out_hidden = m_cfg.vision.merger_hidden_size or h
        return cls(
            vocab=padded_vocab_size(llm.vocab_size, llm.make_vocab_size_divisible_by, tp),
            hidden=h, layer_matmul=lin, layer_norms=norms,
            biggest_layer_weight=h * max(2 * llm.ffn_hidden_size,
                                         (llm.num_attention_heads + 2 * llm.num_query_groups)
                                         * llm.head_dim),
            vit_tp=vit_tp, vit_rep=vit_rep, merger_out=out_hidden,
            vision_projector=projector_params(out_hidden, h, m_cfg.projector.vision_depth)
            if m_cfg.vision.enabled else 0,
            audio_projector=projector_params(m_cfg.audio.frames_per_token
                                             * m_cfg.audio.hidden_size, h,
                                             m_cfg.projector.audio_depth)
            if m_cfg.audio.enabled else 0,
            sanm=sanm_params(cfg))


@dataclass(frozen=True)
class _Activations:
    """Activation bytes: per token of an LLM layer (kept / whole / kept without recompute), of
    the LM head and logits; per micro-batch of the encoders (first chunk of the first stage)."""

    kept_layer: float
    whole_layer: float
    kept_plain: float
    head: float
    logits: float
    encoders: float
    vit_block_transient: float
    needs_llm: bool


def _activations(cfg: OmniConfig, num: Numerics, impl: str, layout: Layout, workload: Workload,
                 parts: _Parts, flash_attention: bool) -> _Activations:
    m_cfg, st = cfg.model, cfg.stage
    tp, sp, mb = layout.tp, bool(layout.sequence_parallel), layout.micro_batch_size
    seqlens = workload.seqlens()
    grids, frames = list(workload.vision_grids), list(workload.audio_frames)
    h, vp = parts.hidden, parts.vocab
    train_vit, train_aud, train_proj = st.train_vision, st.train_audio, st.train_projectors
    kept_layer, whole_layer = llm_layer_activation_bytes(
        cfg, num, impl, tp, sp, layout.recompute, seqlens, flash_attention)
    kept_plain = llm_layer_activation_bytes(cfg, num, impl, tp, sp, None, seqlens,
                                            flash_attention)[0]
    if impl == "te":
        head_act = 2.0 * h * num.act / (tp if sp else 1)
    else:
        head_act = (3.0 * h + 1) * num.act / (tp if sp else 1)
    logits_act = vp / tp * (4.0 + (num.act if num.act < 4 else 0))
    enc_act = 0.0  # per micro-batch, first chunk of rank 0
    vit_block_transient = 0.0
    if grids and train_vit:
        kept, block = _vit_patch_bytes(cfg, num, impl, tp, layout.recompute, flash_attention,
                                       grids)
        patches = sum(t * hh * ww for t, hh, ww in grids)
        enc_act += kept * patches * mb
        if layout.recompute == "full":
            vit_block_transient = block * patches * mb
    if grids and (train_vit or train_proj):
        vis_tokens = vision_llm_tokens(m_cfg.vision, grids)
        enc_act += (parts.merger_out + 2 * (m_cfg.projector.vision_depth - 1) * h + h) \
            * num.act * vis_tokens * mb
    if frames and train_aud:
        enc_act += _sanm_frame_bytes(cfg) * sum(frames) * mb
    if frames and (train_aud or train_proj):
        aud_tokens = sum(audio_llm_tokens(m_cfg.audio, t) for t in frames)
        enc_act += (m_cfg.audio.frames_per_token * m_cfg.audio.hidden_size + 2 * h) \
            * num.act * aud_tokens * mb
    needs_llm = bool(st.train_llm or ((grids or frames)
                                      and (train_proj or train_vit or train_aud)))
    return _Activations(kept_layer, whole_layer, kept_plain, head_act, logits_act, enc_act,
                        vit_block_transient, needs_llm)


@dataclass(frozen=True)
class _Flops:
    """Hardware FLOPs per row: one LLM layer (recomputed as the layout says / not), the LM head,
    the encoders + projectors (ViT already / t), and one layer's attention products."""

    layer: float
    layer_plain: float
    head: float
    encoders: float
    attention: float
    """The score and value products of one LLM layer (training, recomputation included)."""
    attention_plain: float
    """The same without recomputation."""


def _flops(cfg: OmniConfig, layout: Layout, workload: Workload, parts: _Parts) -> _Flops:
    m_cfg, llm, st = cfg.model, cfg.model.llm, cfg.stage
    grids, frames = list(workload.vision_grids), list(workload.audio_frames)
    h, vp, tp, out_hidden = parts.hidden, parts.vocab, layout.tp, parts.merger_out
    train_vit, train_aud, train_proj = st.train_vision, st.train_audio, st.train_projectors
    upstream = bool((grids and (train_vit or train_proj)) or (frames and (train_aud or train_proj)))
    llm_passes = training_passes(st.train_llm, upstream)
    one_layer = llm_forward_flops(llm, workload.seqlens(), vp, num_layers=1, lm_head=False)
    head = ForwardFlops(other=2.0 * workload.seq_length * h * vp).training(llm_passes)
    enc = 0.0
    if grids:
        enc += vit_forward_flops(m_cfg.vision, grids, out_hidden).training(
            training_passes(train_vit, False), layout.recompute) / tp
        enc += projector_forward_flops(out_hidden, h, m_cfg.projector.vision_depth,
                                       vision_llm_tokens(m_cfg.vision, grids)) \
            * training_passes(train_proj, train_vit)
    if frames:
        enc += sanm_forward_flops(m_cfg.audio, frames).training(
            training_passes(train_aud, False))
        enc += projector_forward_flops(
            m_cfg.audio.frames_per_token * m_cfg.audio.hidden_size, h, m_cfg.projector.audio_depth,
            sum(audio_llm_tokens(m_cfg.audio, t) for t in frames)) \
            * training_passes(train_proj, train_aud)
    attention = ForwardFlops(layers_attention=one_layer.layers_attention).training(
        llm_passes, layout.recompute)
    attention_plain = ForwardFlops(layers_attention=one_layer.layers_attention).training(
        llm_passes, None)
    return _Flops(one_layer.training(llm_passes, layout.recompute),
                  one_layer.training(llm_passes, None), head, enc, attention, attention_plain)


def _chunk_cost(n: int, block: Optional[int], full_cost: float, plain_cost: float) -> float:
    """n layers of one model chunk, the first ``block`` (``recompute_num_layers``) fully
    recomputed; all of them with ``block=None``."""
    if block is None:
        return n * full_cost
    k = min(block, n)
    return k * full_cost + (n - k) * plain_cost


def _stage(cfg: OmniConfig, layout: Layout, r: int, chunk_layers: list[int], tokens: float,
           num: Numerics, impl: str, precision: str, on_cpu: bool, parts: _Parts,
           acts: _Activations, flops_: _Flops) -> StagePlan:
    """Memory (states, in-flight activations, transients, overhead) and FLOPs per micro-batch
    of pipeline rank ``r`` (``tokens``: LLM tokens of one micro-batch on one GPU)."""
    m_cfg, llm, st = cfg.model, cfg.model.llm, cfg.stage
    tp, pp, cp, v = layout.tp, layout.pp, layout.cp, layout.vpp or 1
    shard = layout.dp * cp if layout.distributed_optimizer else 1
    mb = layout.micro_batch_size
    h, vp, lin, norms = parts.hidden, parts.vocab, parts.layer_matmul, parts.layer_norms
    block = layout.recompute_num_layers
    train_llm = st.train_llm
    first, last = r == 0, r == pp - 1
    n_layers = sum(chunk_layers)
    has_enc = first and (m_cfg.vision.enabled or m_cfg.audio.enabled)

    def state_bytes(n: float, trains: bool, fp32_param: bool = False) -> tuple[float, float, float]:
        pb = 4 if fp32_param else num.param
        if not trains:
            return n * pb, 0.0, 0.0
        gb = 4 if fp32_param else num.grad
        master = 0 if pb == 4 else num.master
        return n * pb, n * gb, n * (master + ADAM_STATE_BYTES) / shard

    # Memory of the states.
    groups = [(n_layers * lin / tp, train_llm, False), (n_layers * norms, train_llm, False)]
    if first:
        groups.append((vp * h / tp, train_llm, False))
    if last and (llm.untie_embeddings_and_output_weights or pp > 1):
        groups.append((vp * h / tp, train_llm, False))
    if last:
        groups.append((h, train_llm, False))
    if first and m_cfg.vision.enabled:
        groups += [(parts.vit_tp / tp + parts.vit_rep, st.train_vision, False),
                   (parts.vision_projector, st.train_projectors, False)]
    if first and m_cfg.audio.enabled:
        groups += [(parts.sanm, st.train_audio, True),
                   (parts.audio_projector, st.train_projectors, False)]
    weights = grads = optim = 0.0
    params = trained = 0.0
    for n, trains, fp32_param in groups:
        wb, gb, ob = state_bytes(n, trains, fp32_param)
        weights, grads, optim, params = weights + wb, grads + gb, optim + ob, params + n
        trained += n if trains else 0.0
    fp8_cache = n_layers * lin / tp * FP8_WEIGHT_CACHE_BYTES if precision == "fp8" else 0.0

    # Activations: per chunk bytes x the schedule's in-flight counts.
    chunk_bytes = []
    for c, n in enumerate(chunk_layers):
        b = _chunk_cost(n, block, acts.kept_layer, acts.kept_plain) * tokens \
            if acts.needs_llm else 0.0
        if first and c == 0:
            b += acts.encoders
        if last and c == v - 1:
            b += (acts.head + acts.logits) * tokens
        chunk_bytes.append(b)
    best, best_counts = 0.0, ()
    for counts in inflight_counts(pp, layout.vpp, layout.num_micro_batches, r):
        val = sum(k * b for k, b in zip(counts, chunk_bytes))
        if val >= best:
            best, best_counts = val, counts
    # Transients.
    transient = 0.0
    if layout.recompute == "full" and acts.needs_llm and n_layers:
        transient += acts.whole_layer * tokens
    if first:
        transient += acts.vit_block_transient
    if impl == "te":
        if first and train_llm:
            transient += vp * h / tp * num.param
    else:
        biggest = max([vp * h / tp if (first or last) else 0.0,
                       parts.biggest_layer_weight / tp if n_layers else 0.0])
        if train_llm:
            transient += biggest * num.grad
    overhead = 0.0 if on_cpu else FIXED_OVERHEAD_GIB * GiB + FRAGMENTATION * (best + transient)

    flops = sum(_chunk_cost(n, block, flops_.layer, flops_.layer_plain)
                for n in chunk_layers) / (tp * cp) * mb
    if last:
        flops += flops_.head / (tp * cp) * mb
    sixteen = sum(_chunk_cost(n, block, flops_.attention, flops_.attention_plain)
                  for n in chunk_layers) / (tp * cp) * mb
    if has_enc:
        flops += flops_.encoders * mb
        sixteen += flops_.encoders * mb
    return StagePlan(r, n_layers, has_enc, first, last, int(params), weights, grads, optim,
                     fp8_cache, best, list(best_counts), transient, overhead, flops, trained,
                     sixteen)



def _stage_times(cfg: OmniConfig, layout: Layout, workload: Workload, stages: list[StagePlan],
                 layers: list[list[int]], tokens: float, gpu: str, num: Numerics,
                 parts: _Parts, flops_: _Flops, rate: float, rate16: float,
                 tp_exposed: Optional[float]) -> None:
    """Fills every stage's ``times`` (:func:`schedule.stage_times`): its FLOPs at ``rate``
    FLOP/s, the 16-bit part (:attr:`StagePlan.sixteen_bit_flops`) at ``rate16``."""
    llm, vision = cfg.model.llm, cfg.model.vision
    net = INTERCONNECTS.get(gpu, INTERCONNECTS["h100"])
    f_tp = TP_EXPOSED_FRACTION if tp_exposed is None else tp_exposed
    links = Links.of(net, layout.tp, layout.cp, layout.dp * layout.cp, layout.pp)
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    grids = workload.vision_grids
    patches = sum(t * hh * ww for t, hh, ww in grids) * layout.micro_batch_size
    for s_ in stages:
        s_.times = stage_times(
            (s_.flops_per_micro_batch - s_.sixteen_bit_flops) / rate
            + s_.sixteen_bit_flops / rate16, s_.llm_layers, layers[s_.rank], s_.rank,
            s_.has_lm_head, s_.trained_params, layout, tokens, parts.hidden,
            llm.num_attention_heads * llm.head_dim, llm.num_query_groups * llm.head_dim,
            flops_.attention * layout.micro_batch_size / (layout.tp * layout.cp) / rate16,
            parts.vocab, net, links, f_tp, num.grad,
            num.param, shard, layout.recompute_num_layers,
            vit_patches=patches if (s_.has_encoders and grids) else 0.0,
            vit_hidden=vision.hidden_size, vit_depth=vision.depth)


def _warnings(result: Plan) -> None:
    """Appends the fit verdict and the too-few-micro-batches warning to ``result.warnings``."""
    spec, layout, warnings = result.gpu, result.layout, result.warnings
    if spec.memory_bytes is not None:
        peak = result.peak_stage
        cap = spec.memory_bytes
        if peak.total > cap:
            warnings.append(
                f"DOES NOT FIT: pipeline stage {peak.rank} needs {peak.total / GiB:.1f} GiB per "
                f"GPU, more than the {cap / GiB:.1f} GiB of an {spec.name} (over by "
                f"{(peak.total - cap) / GiB:.1f} GiB). Try more TP/PP, recompute=full, the "
                f"distributed optimizer with more DP, or --suggest.")
        elif peak.total > 0.92 * cap:
            warnings.append(f"tight: stage {peak.rank} uses {peak.total / cap:.0%} of GPU memory; "
                            f"the estimate is not exact, leave some headroom")
    pp, m = layout.pp, layout.num_micro_batches
    if pp > 1 and m < pp:
        warnings.append(f"only {m} micro-batches for {pp} pipeline stages: most of the pipeline "
                        f"idles; raise the global batch")


def plan(cfg: OmniConfig, layout: Layout, workload: Optional[Workload] = None, gpu: str = "h100",
         precision: str = "bf16", impl: Optional[str] = None, assumed_mfu: Optional[float] = None,
         flash_attention: bool = True, model_name: str = "custom", check: bool = True,
         memory_gib: Optional[float] = None, tp_exposed: Optional[float] = None,
         trainable: bool = True) -> Plan:
    """Per-GPU memory of every pipeline stage and the estimated step time of ``layout``.

    ``gpu='cpu'`` with ``precision='fp32'`` is the CPU mode: fp32 weights/activations, plain
    ``torch.optim.Adam`` (no master copy, not distributed), the local layer profile and no CUDA
    overhead; it exists so the estimate can be checked against a real CPU step.
    ``trainable=False`` plans a layout megatron-core runs but this project cannot train yet
    (context parallelism; used for the published calibration rows).

    Steps: the device and inputs (:func:`_device`, :func:`validate`, :func:`_check_media`); the
    parts' parameter counts (:class:`_Parts`), activation bytes (:func:`_activations`) and FLOPs
    (:func:`_flops`); each pipeline stage's memory and work (:func:`_stage`); each stage's time
    per micro-batch (:func:`_stage_times`) and the step (:func:`schedule.step_seconds`); the
    warnings (:func:`_warnings`).
    """
    spec, impl = _device(gpu, precision, impl, memory_gib)
    workload = workload or Workload(cfg.data.seq_length)
    if check:
        validate(_resolved_cfg(cfg, layout, workload, precision, impl), world_size=layout.num_gpus,
                 training=trainable)
    if workload.seq_length % layout.cp:
        raise ConfigError(f"seq length {workload.seq_length} is not divisible by CP={layout.cp}")
    _check_media(cfg, workload)

    grad_fp32 = bool(getattr(cfg.training, "grad_reduce_in_fp32", True))
    num = Numerics.of(precision, grad_fp32)
    tokens = workload.seq_length / layout.cp * layout.micro_batch_size
    parts = _Parts.of(cfg, layout.tp)
    acts = _activations(cfg, num, impl, layout, workload, parts, flash_attention)
    flops_ = _flops(cfg, layout, workload, parts)
    layers = _stage_layers(cfg, layout)
    stages = [_stage(cfg, layout, r, layers[r], tokens, num, impl, precision, gpu == "cpu",
                     parts, acts, flops_) for r in range(layout.pp)]

    # Throughput.
    row = omni_row_flops(cfg, workload.seqlens(), list(workload.vision_grids),
                         list(workload.audio_frames), vocab_size=parts.vocab)
    model_flops = row.total * layout.global_batch
    bubble = (layout.pp - 1) / ((layout.vpp or 1) * layout.num_micro_batches)
    step_time = None
    mfu_used = None
    if precision in spec.peak:
        mfu_used = assumed_mfu if assumed_mfu is not None \
            else COMPUTE_EFFICIENCY.get(precision, 0.35)
        rate = spec.peak[precision] * mfu_used
        rate16 = rate
        if precision == "fp8":
            rate16 = spec.peak["bf16"] * (assumed_mfu if assumed_mfu is not None
                                          else COMPUTE_EFFICIENCY["bf16"])
        _stage_times(cfg, layout, workload, stages, layers, tokens, gpu, num, parts, flops_,
                     rate, rate16, tp_exposed)
        step_time = step_seconds(layout, stages)

    result = Plan(model_name, spec, precision, impl, layout, workload, model_params(cfg), stages,
                  row.as_dict(), model_flops, mfu_used, step_time, bubble, [])
    _warnings(result)
    return result
