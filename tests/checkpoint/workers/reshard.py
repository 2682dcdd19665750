"""Load one checkpoint's layout-independent weights into TP=1, TP=2 and PP=2 models (2 ranks)
and print the x_t logits / per-token NELBO terms of a fixed batch for each layout.

argv: checkpoint dir, run config yaml. Prints "RESHARD <name> max_abs_diff=<x>" lines on rank 0
comparing each layout with the TP=1 load of the same weights.
"""

import sys
from functools import partial

import torch
import torch.distributed as dist

from megatron_bd3.checkpoint import load_model_weights
from megatron_bd3.data import BD3DataLoader, load_manifest
from megatron_bd3.diffusion import ClipRange
from megatron_bd3.model import BD3LossInputs, build_bd3_model
from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel
from megatron_bd3.training.batches import NoiseSettings, make_batch
from megatron_bd3.training.config import load_config
from megatron_bd3.training.model_config import build_model_config
from megatron_bd3.training.step import eval_step


def token_loss_func(output):
    return output.sum(), torch.tensor(output.numel(), dtype=torch.int), {"token_loss": output}


def forward_step(batch, data_iterator, model):
    next(data_iterator)
    loss_inputs = BD3LossInputs(masked=batch["masked"], loss_weight=batch["loss_weight"])
    return model(batch["x_t"], batch["x_0"], loss_inputs), token_loss_func


def run_layout(ckpt, config, tp, pp, use_ema):
    info = initialize_parallel(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=5)
    )
    config.parallel.tensor_model_parallel_size = tp
    config.parallel.pipeline_model_parallel_size = pp
    manifest = load_manifest(config.data.manifest)
    tok = manifest.tokenizer
    mc = build_model_config(
        config,
        vocab_size=tok["vocab_size"],
        mask_token_id=tok["special_ids"]["mask_id"],
        precision="fp32",
    )
    model = build_bd3_model(mc)
    load_model_weights(ckpt, [model], use_ema=use_ema)
    model.eval()
    loader = BD3DataLoader(
        config.data.manifest, "validation", 2, dp_rank=0, dp_size=1, seed=0, shuffle=False
    )
    batch = make_batch(
        next(iter(loader)),
        settings=NoiseSettings(
            block_size=mc.block_size,
            mask_token_id=mc.mask_token_id,
            schedule="loglinear",
            ignore_bos=True,
            resample=False,
            antithetic=True,
            fixed_t=None,
        ),
        clip_range=ClipRange(1e-3, 1.0),
        seed=11,
        step=0,
        global_batch_size=2,
    )
    reports = eval_step(
        [model],
        partial(forward_step, batch),
        [batch],
        seq_length=mc.stream_length,
        micro_batch_size=2,
    )
    result = {}
    if reports and info.tp_rank == 0:
        result["token_loss"] = reports[0]["token_loss"].detach().clone()
    if pp == 1:
        with torch.no_grad():
            result["logits"] = model.forward_logits(batch["x_t"], batch["x_0"]).clone()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    destroy_parallel()
    merged = {}
    for part in gathered:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


def main():
    ckpt, config_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    config = load_config(config_path)
    ref = run_layout(ckpt, config, 1, 1, use_ema=False)
    ref_ema = run_layout(ckpt, config, 1, 1, use_ema=True)
    tp2 = run_layout(ckpt, config, 2, 1, use_ema=False)
    tp2_ema = run_layout(ckpt, config, 2, 1, use_ema=True)
    pp2 = run_layout(ckpt, config, 1, 2, use_ema=False)
    if dist.get_rank() == 0:

        def diff(a, b):
            return (a - b).abs().max().item()

        print(f"RESHARD tp2_logits max_abs_diff={diff(tp2['logits'], ref['logits']):.3e}")
        print(f"RESHARD tp2_loss max_abs_diff={diff(tp2['token_loss'], ref['token_loss']):.3e}")
        print(
            f"RESHARD tp2_ema_logits max_abs_diff={diff(tp2_ema['logits'], ref_ema['logits']):.3e}"
        )
        print(f"RESHARD pp2_loss max_abs_diff={diff(pp2['token_loss'], ref['token_loss']):.3e}")
        print(f"EMA_VS_RAW max_abs_diff={diff(ref_ema['logits'], ref['logits']):.3e}")
        print(f"LOGIT_SCALE {ref['logits'].abs().max().item():.3e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
