"""2-rank worker: the omni model (ViT + SAN-M + projectors + LLM) on a packed row mixing text,
image, video and audio samples, at TP=2, PP=2 (encoders on stage 0) and TP=2 with sequence
parallelism, against a TP=PP=1 reference (same weights, plain autograd). Rank 0 writes
{layout: {loss, grad, ...}}."""

import sys

import torch

from megatron_omni.parallel.cpu_compat import import_megatron_fast

import_megatron_fast()

from dist_utils import finish_worker  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from omni_batch import omni_batch, tiny_omni_cfg  # noqa: E402

from megatron_omni.models.attention import packed_seq_params  # noqa: E402
from megatron_omni.models.llm import chunk_layer_range  # noqa: E402
from megatron_omni.models.omni import OmniModel, load_full_omni_state, omni_stage_state_dict  # noqa: E402
from megatron_omni.parallel import runtime  # noqa: E402

torch.set_num_threads(1)


def loss_of(per_token, mask):
    return (per_token.float() * mask).sum() / mask.sum()


def run(model, b):
    return model(b["tokens"], b["position_ids"], labels=b["labels"],
                 packed_seq_params=packed_seq_params(b["cu_seqlens"]),
                 vision_patches=b["vision_patches"], vision_grid_thw=b["vision_grid_thw"],
                 audio_waveforms=b["audio_waveforms"], sample_names=b["sample_names"])


def main(out_path):
    cfg = tiny_omni_cfg()
    runtime.initialize(cfg.parallel, seed=21)
    batches = [omni_batch(cfg, seed=s) for s in (1, 2)]
    ref = OmniModel(cfg)
    full = {k: v.detach().clone() for k, v in ref.state_dict().items()
            if not k.endswith("_extra_state")}
    ref_losses = []
    for b in batches:
        loss = loss_of(run(ref, b), b["loss_mask"])
        (loss / len(batches)).backward()
        ref_losses.append(loss.item())
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    results = {"ref_losses": ref_losses,
               "encoder_grad_norm": sum(g.norm().item() for n, g in ref_grads.items()
                                        if n.startswith(("vision_model.", "audio_model.")))}
    layouts = {"tp2": (2, 1, False), "pp2": (1, 2, False), "tp2_sp": (2, 1, True)}
    for name, (tp, pp, sp) in layouts.items():
        lcfg = tiny_omni_cfg(f"parallel.tensor_model_parallel_size={tp}",
                             f"parallel.pipeline_model_parallel_size={pp}",
                             f"parallel.sequence_parallel={str(sp).lower()}")
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tp, pp)
        chunk = OmniModel(lcfg)
        load_full_omni_state(chunk, full)
        chunk.config.finalize_model_grads_func = finalize_model_grads
        model = DistributedDataParallel(chunk.config,
                                        DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                        chunk)

        def forward_step(it, m):
            b = next(it)
            out = run(m, b)

            def loss_func(output):
                loss = loss_of(output, b["loss_mask"])
                return loss, {"loss": loss.detach().clone()}

            return out, loss_func

        model.zero_grad_buffer()
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1],
            micro_batch_size=1, forward_only=False)
        loss_diff, compared = 0.0, 0
        if ps.is_pipeline_last_stage():
            for j, d in enumerate(out):
                loss_diff = max(loss_diff, abs(d["loss"].item() - ref_losses[j]))
                compared += 1
        off, n = chunk_layer_range(chunk.llm)
        local_ref = omni_stage_state_dict(ref_grads, ps.get_tensor_model_parallel_rank(), tp,
                                          off, n, chunk.pre_process, chunk.post_process)
        grad_diff, enc_checked = 0.0, 0
        for pname, param in chunk.named_parameters():
            grad_diff = max(grad_diff, (param.main_grad - local_ref[pname]).abs().max().item())
            enc_checked += pname.startswith(("vision_model.", "audio_model."))
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (loss_diff, grad_diff, compared,
                                                       enc_checked))
        results[name] = {"loss": max(x[0] for x in gathered), "grad": max(x[1] for x in gathered),
                         "losses_compared": sum(x[2] for x in gathered),
                         "encoder_params_checked": sum(x[3] for x in gathered),
                         "expected_compared": len(batches) * tp}
    finish_worker(out_path, results)


if __name__ == "__main__":
    main(sys.argv[1])
