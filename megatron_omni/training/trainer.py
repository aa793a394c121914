"""The training loop: build, (resume), step over modality groups, balance, log, checkpoint.

Everything heavy lives elsewhere and is only wired here: the model (``models/omni.py``), one step
over modality groups (``training/step.py``), the balance math (``training/balance.py``),
optimizer/scheduler/DDP (``training/optimizer.py``), checkpoints (``training/checkpoint.py``),
data (``data/loaders.py``), FLOPs (``training/flops.py``) and logging (``training/logging.py``).

Data sources: anything with ``next(modality) -> batch``, ``save_state()``, ``restore_state()``
and ``val_batches(modality, n) -> list[batch]`` works; :class:`EnergonData` adapts
``data.loaders.OmniLoaders`` (the real pipeline).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from ..config.schema import ConfigError, OmniConfig
from ..config.validate import validate
from . import checkpoint as ckpt
from . import resume, signals
from .balance import DynamicBalancer, PlateauDetector, read_step_balance_file
from .logging import StepStats, TrainLogger, gpu_memory_stats
from .step import StepResult, run_group_step

log = logging.getLogger(__name__)


class DataSource(Protocol):
    def next(self, modality: str) -> dict: ...

    def val_batches(self, modality: str, n: int) -> list[dict]: ...

    def save_state(self) -> dict: ...

    def restore_state(self, state: dict) -> None: ...


class NanLossError(RuntimeError):
    """Too many steps in a row had a NaN/Inf loss."""


def to_model_batch(b: dict) -> dict:
    """A loader batch ``[mb, T]`` as one THD row ``[1, mb*T]`` (cu_seqlens already span it)."""
    out = dict(b)
    if b["tokens"].shape[0] > 1:
        for k in ("tokens", "labels", "loss_mask"):
            out[k] = b[k].reshape(1, -1)
        pos = b["position_ids"]
        out["position_ids"] = pos.reshape(pos.shape[0], 1, -1) if pos.dim() == 3 else \
            pos.reshape(1, -1)
    if out["position_ids"].dim() == 2:
        out["position_ids"] = out["position_ids"].unsqueeze(0).expand(3, -1, -1)
    if out.get("vision_grid_thw") is not None and len(out["vision_grid_thw"]) == 0:
        out["vision_grid_thw"] = None
        out["vision_patches"] = None
    if out.get("audio_waveforms") is not None and len(out["audio_waveforms"]) == 0:
        out["audio_waveforms"] = None
    from ..parallel.device import compute_device

    device = compute_device()
    for k in ("tokens", "labels", "loss_mask", "position_ids", "vision_patches"):
        if isinstance(out.get(k), torch.Tensor):
            out[k] = out[k].to(device, non_blocking=True)
    # THD attention (TE/cuDNN) reads the segment boundaries on the device, as int32; the longest
    # segment is taken from the host copy (no device synchronisation per micro-batch).
    cu = out["cu_seqlens"]
    out["max_seqlen"] = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    out["cu_seqlens"] = cu.to(device=device, dtype=torch.int32)
    if out.get("audio_waveforms") is not None:
        out["audio_waveforms"] = [w.to(device) for w in out["audio_waveforms"]]
    return out


HOST_SIDE_INPUTS = ("vision_grid_thw",)
"""Batch tensors that stay on the host on purpose: the grid is read with ``.tolist()`` to size
the ViT's segments (a device copy would only add a synchronisation)."""


class EnergonData:
    """Adapter: ``OmniLoaders`` -> the trainer's DataSource.

    With ``data.load_once_per_mp_group`` (default) only one rank per model-parallel group (TP
    rank 0 of the first pipeline stage, ``data/mp_broadcast.py``) builds the loaders, runs their
    worker processes and decodes (deferred media included, before the broadcast); every call is
    collective over the model-parallel group and the other ranks receive what their stage needs.
    The loader state is the reader's, shared at save time so that every rank's checkpoint file
    holds it (a resume at another TP/PP layout, or with the setting switched, still finds it).
    """

    def __init__(self, cfg: OmniConfig, tokenizer):
        from megatron.core import parallel_state as ps

        from ..data.loaders import OmniLoaders

        self.feed = None
        if cfg.data.load_once_per_mp_group:
            from ..data.mp_broadcast import LoadOnceFeed

            self.feed = LoadOnceFeed()
        self.reads = self.feed is None or self.feed.is_reader
        # The DP rank is passed explicitly: every data-parallel rank must read its own slice.
        pref = cfg.alignment.preference_dataset if cfg.stage.name == "at" else None
        self.loaders = OmniLoaders(cfg.data, tokenizer, dp_rank=ps.get_data_parallel_rank(),
                                   dp_size=ps.get_data_parallel_world_size(),
                                   dp_group=ps.get_data_parallel_group(),
                                   preference_modality=pref) if self.reads else None
        self.skipped_total = 0
        self.exchange = None
        if cfg.data.dp_balance == "cost" and ps.get_data_parallel_world_size() > 1 \
                and self.reads:
            from ..data.dp_balance import CostModel, RowExchange

            self.exchange = RowExchange(CostModel.from_config(cfg),
                                        ps.get_data_parallel_group(),
                                        target=cfg.data.dp_balance_target)
        self.balanced = cfg.data.dp_balance == "cost" and ps.get_data_parallel_world_size() > 1
        from ..data.media.deferred import make_training_decoder

        # Images/videos decoded here, on this process's GPU, when the loaders defer them.
        self.decoder = make_training_decoder(cfg.data.media_backend) if self.reads else None

    def _decoded(self, b: dict, modality: str | None = None) -> dict:
        if self.decoder is None or "deferred_media" not in b:
            return b
        before = dict(b.get("skipped") or {})
        self.decoder.submit(b)
        b = self.decoder.get()
        if modality is not None:  # decode-time skips join the loader's counts
            for reason, n in b["skipped"].items():
                self.loaders[modality].skipped[reason] += n - before.get(reason, 0)
        return b

    def _read(self, modality: str, decode: bool = True) -> dict:
        b = self.loaders.next(modality)
        self.skipped_total += sum((b.get("skipped") or {}).values())
        return self._decode_counted(b, modality) if decode else b

    def _decode_counted(self, b: dict, modality: str) -> dict:
        if self.decoder is not None and "deferred_media" in b:
            n0 = sum((b.get("skipped") or {}).values())
            b = self._decoded(b, modality)
            self.skipped_total += sum(b["skipped"].values()) - n0
        return b

    def next(self, modality: str) -> dict:
        if self.feed is None:
            return self._read(modality)
        try:
            b = self._read(modality) if self.reads else None
        except Exception as e:  # noqa: BLE001 - re-raised on every rank of the group by share
            b = e
        b = self.feed.share(b)
        if not self.reads:  # the batch carries the reader's skip counts (decode included)
            self.skipped_total += sum((b.get("skipped") or {}).values())
        return b

    def next_step(self, modalities, n: int) -> dict[str, list[dict]]:
        """The ``n`` micro-batches of every modality group of one step. With
        ``data.dp_balance: cost`` the reading ranks balance them across the data-parallel ranks
        by compute cost (``data/dp_balance.py``: swapped whole, before decoding), then decode and
        hand them to their model-parallel group."""
        if not self.balanced:
            return {m: [self.next(m) for _ in range(n)] for m in modalities}
        step = None
        if self.reads:
            try:
                raw = {m: [self._read(m, decode=False) for _ in range(n)] for m in modalities}
            except Exception as e:  # noqa: BLE001 - raised on every reader by the exchange
                raw = e
            try:
                step = self.exchange.exchange(raw)
                step = {m: [self._decode_counted(b, m) for b in step[m]] for m in modalities}
            except Exception as e:  # noqa: BLE001 - re-raised on every rank of the group
                step = e
        if self.feed is None:
            if isinstance(step, BaseException):
                raise step
            return step
        if isinstance(step, BaseException):
            self.feed.share(step)  # raises, here and on the receivers
        out = {m: [self.feed.share(step[m][k] if self.reads else None) for k in range(n)]
               for m in modalities}
        # Swapped batches carry their origin's skip counts: the reader's own total is shared.
        self.skipped_total = self.feed.share_object(self.skipped_total if self.reads else None)
        return out

    def val_batches(self, modality: str, n: int) -> list[dict]:
        if self.feed is None:
            return [self._decoded(b) for b in self.loaders.val_loader(modality, limit=n)]
        got = None
        if self.reads:
            try:
                got = [self._decoded(b) for b in self.loaders.val_loader(modality, limit=n)]
            except Exception as e:  # noqa: BLE001 - re-raised on every rank by share_object
                got = e
        count = self.feed.share_object(
            (got if isinstance(got, BaseException) else len(got)) if self.reads else None)
        return [self.feed.share(got[i] if self.reads else None) for i in range(count)]

    def save_state(self) -> dict:
        state = {"loaders": self.loaders.save_state(), "skipped_total": self.skipped_total} \
            if self.reads else None
        return state if self.feed is None else self.feed.share_object(state)

    def restore_state(self, state: dict) -> None:
        if self.loaders is not None:
            self.loaders.restore_state(state["loaders"])
        self.skipped_total = state.get("skipped_total", 0)


@dataclass
class RunSummary:
    """What a run reports at the end."""

    first_losses: dict[str, float] = field(default_factory=dict)
    last_losses: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    steps_done: int = 0
    last_step: int = 0
    checkpoint: Optional[str] = None
    tensorboard: Optional[str] = None
    nan_steps: int = 0
    stopped_by_signal: bool = False
    loss_history: list[dict[str, float]] = field(default_factory=list)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _is_logging_rank() -> bool:
    return _rank() == torch.distributed.get_world_size() - 1


class Trainer:
    """One training stage of one run (collective: every rank constructs and runs it)."""

    def __init__(self, cfg: OmniConfig, data: Optional[DataSource] = None,
                 printer: Callable[[str], None] = print):
        self.cfg = cfg
        self.printer = printer
        self._data = data

    # ------------------------------------------------------------------------------- build
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        from ..config.validate_data import validate_data
        from ..parallel import runtime

        cfg = self.cfg
        env = runtime.dist_env_from_environ()
        validate(cfg, world_size=env.world_size)
        # Data path, splits, tokenizer vs vocabulary, seq_length vs stored token counts: all
        # checked before any process group starts (a few file reads).
        self.tokenizer = validate_data(cfg, need_data=self._data is None)
        if not torch.distributed.is_initialized() or not ps.model_parallel_is_initialized():
            runtime.initialize(cfg.parallel, seed=cfg.training.seed, env=env)
        self._run_lock = resume.lock_save_dir(cfg)  # one run per training.save
        try:
            self._build()
        except BaseException:
            self.close()  # a run that failed to start must not keep the directory locked
            raise

    def _build(self) -> None:
        from ..models.omni import build_omni_chunks, set_trainable, special_token_ids
        from .optimizer import build_optimizer, build_scheduler, wrap_ddp

        cfg = self.cfg
        self.special = special_token_ids(cfg)
        chunks = build_omni_chunks(cfg)
        st = cfg.stage
        counts = [set_trainable(c, vision=st.train_vision, audio=st.train_audio,
                                projectors=st.train_projectors, llm=st.train_llm) for c in chunks]
        lora = self._apply_lora(chunks)
        if not any(sum(c.values()) for c in counts) and not lora and _rank() == 0:
            raise ConfigError("stage.train_* leave nothing trainable (and alignment.lora_rank "
                              "is 0)")
        self.chunks = chunks
        if _rank() == 0:
            from ..models.specs import resolve_transformer_impl

            log.info("model: %s layers (model.transformer_impl=%s), %s, %d chunk(s) per pipeline "
                     "rank", resolve_transformer_impl(cfg.model.transformer_impl),
                     cfg.model.transformer_impl, "bf16" if cfg.training.bf16 else "fp32",
                     len(chunks))
        self.model = wrap_ddp(cfg, chunks)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        if self._data is None:
            self._data = EnergonData(cfg, self.tokenizer)
        self.data = self._data
        self.modalities = list(cfg.data.modalities)
        # Alignment stage: the preference pairs form one more group, trained with DPO.
        self.preference = cfg.alignment.preference_dataset if st.name == "at" else None
        self.balancer: Optional[DynamicBalancer] = None
        self.weights = {m: 1.0 for m in self.modalities}
        if st.balance == "step":
            if not st.step_balance_file:
                raise ConfigError("stage.balance=step needs stage.step_balance_file (write one "
                                  "with --calibrate-step-balance)")
            self.weights = read_step_balance_file(st.step_balance_file, self.modalities)
        elif st.balance == "dynamic":
            self.balancer = DynamicBalancer(self.modalities, window=st.balance_window,
                                            scale=st.balance_scale)
        self.step = 0
        self.nan_steps = 0
        self.nan_in_row = 0
        tb = cfg.training.tensorboard_dir
        if tb is None and cfg.training.save:
            tb = str(Path(cfg.training.save) / "tensorboard")
        self.tensorboard_dir = tb
        from ..config.loader import to_dict

        self.logger = TrainLogger(tb, enabled=_is_logging_rank(), printer=self.printer,
                                  wandb_project=cfg.training.wandb_project,
                                  wandb_run_name=cfg.training.wandb_run_name,
                                  wandb_dir=cfg.training.save, wandb_config=to_dict(cfg))
        self._resume_or_init()
        signals.install_signal_handlers()
        self.num_devices = torch.distributed.get_world_size()

    def _resume_or_init(self) -> None:
        cfg = self.cfg
        source = resume.choose_checkpoint(cfg, self.printer)
        if source is not None:
            data_ok = resume.check_data_parallel_size(cfg, source, _dp_size())
            extra = ckpt.load_checkpoint(source, self.model, self.optimizer, self.scheduler)
            self.step = int(extra["step"])
            self.nan_steps = int(extra.get("nan_steps", 0))
            if self.balancer is not None and extra.get("balancer") is not None:
                self.balancer.load_state_dict(extra["balancer"])
            if extra.get("weights") is not None and self.balancer is None:
                self.weights = dict(extra["weights"])
            local = extra.get(ckpt.RANK_LOCAL)
            if local is not None and local.get("data") is not None and data_ok:
                self.data.restore_state(local["data"])
            elif data_ok and self.step > 0:
                log.warning("rank %d: %s holds no data-loader state for this rank; its data "
                            "stream starts from the beginning", _rank(), source)
            self._mark_resume(source)
            if _is_logging_rank():
                self.printer(f" resumed from {extra[ckpt.META_KEY]['path']} at step {self.step}")
        elif cfg.stage.init_from:
            if ckpt.find_latest(cfg.stage.init_from) is None and not (
                    Path(cfg.stage.init_from) / ckpt.COMPLETE).exists():
                raise ConfigError(f"stage.init_from={cfg.stage.init_from} holds no complete "
                                  f"checkpoint; run the previous stage first or fix the path")
            allow = list(cfg.stage.init_allow_missing or [])
            if cfg.alignment.lora_rank > 0:
                allow.append(ckpt.LORA_PATTERN)  # adapters are new in this stage
            allow = allow or False
            from .lora import adapters_left_out_of_checkpoint

            with adapters_left_out_of_checkpoint():
                ckpt.load_checkpoint(cfg.stage.init_from, self.model, self.optimizer, None,
                                     weights_only=True, allow_missing=allow)
            if _is_logging_rank():
                self.printer(f" initialised weights from {cfg.stage.init_from} (fresh optimizer)")

    # ------------------------------------------------------------------------------- pieces
    def current_weights(self) -> dict[str, float]:
        if self.balancer is not None:
            return dict(self.balancer.weights)
        return dict(self.weights)

    def _step_flops(self, groups: dict[str, list[dict]]) -> float:
        from ..data.dp_balance import AUDIO_SAMPLES_PER_FRAME
        from .flops import omni_row_flops

        total = 0.0
        for batches in groups.values():
            for b in batches:
                cu = b["cu_seqlens"].tolist()
                seqlens = [e - s for s, e in zip(cu[:-1], cu[1:]) if e > s]
                grids = b["vision_grid_thw"].tolist() if b.get("vision_grid_thw") is not None \
                    else []
                waves = b.get("audio_waveforms")
                lengths = [int(w.numel()) for w in waves] if waves is not None else \
                    [int(n) for n in b.get("audio_lengths", torch.zeros(0)).tolist()]
                # later stages get no waveforms, only their lengths
                frames = [max(1, n // AUDIO_SAMPLES_PER_FRAME) for n in lengths]
                total += omni_row_flops(self.cfg, seqlens, grids, frames).total
        return total * torch.distributed.get_world_size() / max(
            1, _model_parallel_size())

    def _draw_step(self, n: int) -> dict[str, list[dict]]:
        """The step's micro-batches per modality group (balanced across DP ranks when the data
        source does that: ``EnergonData.next_step``)."""
        if hasattr(self.data, "next_step"):
            return self.data.next_step(self.modalities, n)
        return {m: [self.data.next(m) for _ in range(n)] for m in self.modalities}

    def save(self) -> Optional[Path]:
        if not self.cfg.training.save:
            return None
        extra = {"step": self.step, "nan_steps": self.nan_steps,
                 "balancer": self.balancer.state_dict() if self.balancer is not None else None,
                 "weights": self.current_weights(),
                 ckpt.RANK_LOCAL: {"data": self.data.save_state()}}
        path = ckpt.save_checkpoint(self.cfg.training.save, self.step, self.model,
                                    self.optimizer, self.scheduler, extra, self.cfg)
        if _is_logging_rank():
            self.printer(f" saved checkpoint {path}")
        return path

    def validation_segment(self) -> dict[str, float]:
        """S_i held-out micro-batches per modality, forward only, DP/PP-averaged losses."""
        groups = {m: [to_model_batch(b) for b in
                      self.data.val_batches(m, self.cfg.stage.val_micro_batches)]
                  for m in self.modalities}
        empty = [m for m, bs in groups.items() if not bs]
        if empty:
            raise ConfigError(f"no held-out validation batches for {empty}; dynamic balance needs "
                              f"a val split per modality (the *_val.jsonl files)")
        for m in self.model:
            m.eval()
        with torch.no_grad():
            res = run_group_step(self.model, groups, {m: 1.0 for m in groups}, self.special,
                                 gen_audio_weight=0.0, forward_only=True)
        for m in self.model:
            m.train()
        return {m: res.losses[m] for m in self.modalities}

    # ------------------------------------------------------------------------------- alignment
    def _apply_lora(self, chunks) -> int:
        """LoRA adapters on the LLM when ``alignment.lora_rank`` > 0 (after freezing, before
        DDP); logs their share of the LLM. Returns this rank's adapter parameter count."""
        al = self.cfg.alignment
        if al.lora_rank <= 0:
            return 0
        from .lora import apply_lora, trainable_share

        n = apply_lora(chunks, al.lora_rank, al.lora_alpha, al.lora_dropout, al.lora_targets,
                       seed=self.cfg.training.seed)
        share = trainable_share(chunks)
        self.lora_share = share
        if _is_logging_rank():
            self.printer(f" LoRA: {100 * share['share']:.1f}% of the LLM ({share['lora']:,.0f} "
                         f"adapter weights, rank {al.lora_rank}, alpha {al.lora_alpha:g}, on "
                         f"{', '.join(al.lora_targets)}); every other weight is frozen")
        return n

    def _preference_rows(self) -> int:
        tr, al = self.cfg.training, self.cfg.alignment
        return max(1, round(al.preference_ratio * len(self.modalities) * tr.num_micro_batches))

    def _at_step(self, groups: dict, weights: dict[str, float], forward_only: bool = False):
        from .dpo import run_at_step

        al = self.cfg.alignment
        groups = dict(groups)
        if self.preference not in groups:
            groups[self.preference] = [to_model_batch(self.data.next(self.preference))
                                       for _ in range(self._preference_rows())]
        total = sum(weights.get(m, 1.0) for m in self.modalities) or 1.0
        sft_w = {m: weights.get(m, 1.0) / total for m in self.modalities}
        return run_at_step(self.model, groups, self.preference, self.special,
                           beta=al.dpo_beta, sft_weight=al.sft_weight, weights=sft_w,
                           gen_audio_weight=self.cfg.stage.gen_audio_loss_weight,
                           forward_only=forward_only)

    def preference_eval(self) -> dict[str, float]:
        """DPO metrics on held-out pairs (the preference dataset's val split, at most
        ``stage.val_micro_batches`` rows per DP rank), forward only, adapters on vs off."""
        batches = [to_model_batch(b) for b in
                   self.data.val_batches(self.preference, self.cfg.stage.val_micro_batches)]
        if not batches:
            raise ConfigError(f"no held-out preference pairs ({self.preference}_val.jsonl) for "
                              f"the alignment stage's evaluation")
        for m in self.model:
            m.eval()
        with torch.no_grad():
            res = self._at_step({self.preference: batches}, {}, forward_only=True)
        for m in self.model:
            m.train()
        out = {k: v for k, v in res.metrics.items() if k.startswith("dpo/")}
        if _is_logging_rank():
            self.printer(f" held-out pairs at step {self.step}: " +
                         " | ".join(f"{k} {v:.4f}" for k, v in out.items()))
            self.logger.log_scalars({f"val/{k}": v for k, v in out.items()}, self.step)
        return out

    # ------------------------------------------------------------------------------- loop
    def train(self) -> RunSummary:
        cfg, tr = self.cfg, self.cfg.training
        summary = RunSummary(tensorboard=self.tensorboard_dir)
        started = self.step
        for m in self.model:
            m.train()
        if self.preference is not None and self.step < tr.train_iters:
            self.preference_eval_start = self.preference_eval()
        while self.step < tr.train_iters:
            t0 = time.perf_counter()
            groups = {m: [to_model_batch(b) for b in bs]
                      for m, bs in self._draw_step(tr.num_micro_batches).items()}
            weights = self.current_weights()
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            if self.preference is not None:
                res: StepResult = self._at_step(groups, weights)
            else:
                res = run_group_step(self.model, groups, weights, self.special,
                                     cfg.stage.gen_audio_loss_weight)
            grad_norm = None
            if not res.finite:
                self.nan_steps += 1
                self.nan_in_row += 1
                if _is_logging_rank():
                    self.printer(f" step {self.step + 1}: NaN/Inf loss {res.losses}; update "
                                 f"skipped ({self.nan_in_row} in a row)")
                if self.nan_in_row >= tr.max_nan_steps:
                    raise NanLossError(
                        f"{self.nan_in_row} steps in a row had a NaN/Inf loss (last: "
                        f"{res.losses}); lower training.lr, check the data, or raise "
                        f"training.max_nan_steps")
            else:
                self.nan_in_row = 0
                ok, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(increment=1)
            self.step += 1
            dt = time.perf_counter() - t0
            losses = {k: v for k, v in res.losses.items() if res.tokens.get(k, 0) > 0}
            metrics = dict(getattr(res, "metrics", {}) or {})
            if "dpo/loss" in metrics:
                losses["dpo"] = metrics["dpo/loss"]
            if not summary.first_losses:
                summary.first_losses = dict(losses)
            summary.last_losses = dict(losses)
            summary.loss_history.append(dict(losses))
            if self.step % tr.log_interval == 0 or self.step == tr.train_iters:
                tokens = sum(int(b["loss_mask"].numel()) for bs in groups.values() for b in bs)
                dp = _dp_size()
                self.logger.log_step(StepStats(
                    step=self.step, total_steps=tr.train_iters,
                    lr=self.optimizer.param_groups[0]["lr"], losses=losses, weights=weights,
                    grad_norm=grad_norm, tokens=tokens * dp, step_time=dt,
                    flops=self._step_flops(groups) if self.step % tr.log_interval == 0 else 0.0,
                    num_devices=self.num_devices,
                    skipped_samples=getattr(self.data, "skipped_total", 0),
                    nan_steps=self.nan_steps, extra=metrics, memory=gpu_memory_stats()))
                if metrics and _is_logging_rank():
                    self.printer("   " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            val = None
            if self.balancer is not None and self.step % cfg.stage.balance_interval == 0:
                val = self.validation_segment()
                self.balancer.update(val)
                self.logger.log_validation(self.step, val)
            self._append_history(losses, weights, grad_norm, val)
            if tr.save_interval and self.step % tr.save_interval == 0:
                summary.checkpoint = str(self.save())
            if signals.should_save_and_exit():
                summary.checkpoint = str(self.save())
                summary.stopped_by_signal = True
                break
            if tr.exit_interval and self.step - started >= tr.exit_interval:
                break
        if tr.save:
            final = Path(tr.save) / ckpt.step_dir_name(self.step)
            # A stage resumed at its end (a rerun) already has this checkpoint: keep it.
            summary.checkpoint = str(final) if final.exists() else str(self.save())
        if self.preference is not None and self.step > started:
            self.preference_eval_end = self.preference_eval()
        summary.weights = self.current_weights()
        summary.steps_done = self.step - started
        summary.last_step = self.step
        summary.nan_steps = self.nan_steps
        self.logger.close()
        if tr.save and _is_logging_rank():
            self._write_summary(summary, started)
        self.close()
        return summary

    def close(self) -> None:
        """Release the save directory's run lock (it is also released when the process ends)."""
        lock = getattr(self, "_run_lock", None)
        if lock is not None:
            lock.release()
            self._run_lock = None

    def _mark_resume(self, source) -> None:
        """A resume from an older checkpoint repeats steps already in ``losses.jsonl``: append
        ``{"resume": {"step": S, ...}}`` so readers keep, for each step, the LAST line (the
        lines after the marker replace those of steps > S)."""
        if not (self.cfg.training.save and _is_logging_rank()):
            return
        import json

        path = Path(self.cfg.training.save) / "losses.jsonl"
        if not path.is_file():
            return
        last = 0
        for line in path.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, TypeError, AttributeError):
                continue
        if last > self.step:
            with open(path, "a") as f:
                f.write(json.dumps({"resume": {"step": self.step, "checkpoint": str(source),
                                               "repeats_steps": [self.step + 1, last]}}) + "\n")

    def _append_history(self, losses, weights, grad_norm, val=None) -> None:
        """One JSON line per step in ``<save>/losses.jsonl`` (logging rank): the exact floats,
        for plots (``omni-plot``) and for comparing a resumed run with an uninterrupted one;
        ``val``: the validation losses of this step's balance update, if one ran."""
        if not (self.cfg.training.save and _is_logging_rank()):
            return
        import json

        path = Path(self.cfg.training.save)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "losses.jsonl", "a") as f:
            row = {"step": self.step, "losses": losses, "weights": weights,
                   "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}
            if val is not None:
                row["val"] = val
            f.write(json.dumps(row) + "\n")

    def _write_summary(self, summary: RunSummary, started: int, window: int = 5) -> None:
        """``<save>/summary.json``: per-modality loss at the start and end of the stage (means
        over ``window`` steps; a resumed stage keeps the start of its first run)."""
        import json

        path = Path(self.cfg.training.save) / "summary.json"
        prev = json.loads(path.read_text()) if path.exists() else None
        hist = summary.loss_history

        def mean_over(rows):
            keys = sorted({k for r in rows for k in r})
            return {k: sum(r[k] for r in rows if k in r) / max(1, sum(k in r for r in rows))
                    for k in keys}

        start = mean_over(hist[:window]) if hist else {}
        if prev is not None and started > 0:
            start = prev.get("start_losses", start)
        end = mean_over(hist[-window:]) if hist else (prev or {}).get("end_losses", {})
        data = {"stage": self.cfg.stage.name, "first_step": started if prev is None or
                started == 0 else prev.get("first_step", 0), "last_step": summary.last_step,
                "start_losses": start, "end_losses": end, "weights": summary.weights,
                "trained_here": bool(hist), "nan_steps": summary.nan_steps,
                "checkpoint": summary.checkpoint, "tensorboard": summary.tensorboard}
        if self.preference is not None:
            ev = (prev or {}).get("preference_eval", {})
            if started == 0 or "start" not in ev:
                ev["start"] = getattr(self, "preference_eval_start", None)
            if getattr(self, "preference_eval_end", None) is not None:
                ev["end"] = self.preference_eval_end
            data["preference_eval"] = ev
        path.write_text(json.dumps(data, indent=1))

    # ------------------------------------------------------------------------------- calibration
    def calibrate_step_balance(self, out_path: str) -> dict[str, float]:
        """Train each modality ALONE from the same starting weights until its loss plateaus
        (``PlateauDetector``: means of the last two ``stage.plateau_window``-step windows within
        ``stage.plateau_rel_tol``, or ``stage.calibration_max_steps``) at the constant peak
        ``training.lr``, record L_i* (mean of the final window), write
        w_i = alpha (1/L_i*) / sum_j (1/L_j*) to ``out_path``. Model and optimizer are reset
        between modalities; nothing is checkpointed."""
        from .balance import step_balance_weights, write_step_balance_file

        st = self.cfg.stage
        start_model = [{k: v.detach().clone() for k, v in c.state_dict().items()
                        if isinstance(v, torch.Tensor)} for c in self.chunks]
        start_opt = self.optimizer.state_dict()
        converged, steps = {}, {}
        for modality in self.modalities:
            for c, sd in zip(self.chunks, start_model):
                c.load_state_dict(sd, strict=False)
            self.optimizer.load_state_dict(start_opt)
            if hasattr(self.optimizer, "reload_model_params"):
                self.optimizer.reload_model_params()
            # Constant peak learning rate (after the state reload, which restores the
            # scheduler's warm-up lr of 0): the calibration measures where each modality
            # converges, not the stage's warm-up/decay schedule, which is not stepped here.
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.training.lr
            det = PlateauDetector(window=st.plateau_window, rel_tol=st.plateau_rel_tol)
            n, history = 0, []
            while n < st.calibration_max_steps and not det.converged:
                groups = {modality: [to_model_batch(self.data.next(modality))
                                     for _ in range(self.cfg.training.num_micro_batches)]}
                for m in self.model:
                    m.zero_grad_buffer()
                self.optimizer.zero_grad()
                res = run_group_step(self.model, groups, {modality: 1.0}, self.special,
                                     self.cfg.stage.gen_audio_loss_weight)
                if res.finite:
                    self.optimizer.step()
                det.update(res.losses[modality])
                history.append(res.losses[modality])
                n += 1
            window = history[-st.plateau_window:]
            converged[modality] = det.converged_loss if det.converged else sum(window) / len(window)
            steps[modality] = n
            if _is_logging_rank():
                self.printer(f" calibration {modality}: L* = {converged[modality]:.4f} after "
                             f"{n} steps ({'plateau' if det.converged else 'max steps'})")
        weights = step_balance_weights(converged, alpha=st.balance_alpha)
        if _rank() == 0:
            write_step_balance_file(out_path, weights, converged,
                                    meta={"steps": steps, "rule": {
                                        "window": st.plateau_window,
                                        "rel_tol": st.plateau_rel_tol,
                                        "max_steps": st.calibration_max_steps}})
        torch.distributed.barrier()
        return weights


def _dp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def _model_parallel_size() -> int:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size() *
            ps.get_pipeline_model_parallel_world_size() *
            ps.get_context_parallel_world_size())
