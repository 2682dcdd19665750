"""Worker (2 ranks): megatron's pipeline schedules with forward_step/loss_func against PP=1.

Phase 1 (PP=1, both ranks replicate): forward_backward_no_pipelining over 4 micro-batches gives
the reference per-micro-batch "lm loss" reports and gradients of a 4-layer model.
Phase 2 (PP=2, 1F1B) and Phase 3 (PP=2 × VPP=2, interleaved): the PP=1 weights are placed on the
stages by the layer layout written below, the same micro-batches run through
get_forward_backward_func(), and losses (last stage) and every stage's gradients must match.
Prints "PP OK <phase> ..." per phase.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_bd3.model import BD3Config, build_bd3_model, forward_step
from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel
from tests.model.helpers import random_batch, tiny_overrides

NUM_LAYERS, MICRO_BATCHES, MICRO_BATCH_SIZE = 4, 4, 2
TOL = dict(atol=1e-5, rtol=1e-4)


def config(pp: int, vpp: int | None) -> BD3Config:
    return BD3Config(
        **tiny_overrides(
            num_layers=NUM_LAYERS,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
        )
    )


def run_schedule(chunks, batches, cfg):
    for chunk in chunks:
        chunk.zero_grad()
    iterators = [iter(batches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=MICRO_BATCHES,
        seq_length=cfg.stream_length,  # stages exchange the two-stream hidden states (2L)
        micro_batch_size=MICRO_BATCH_SIZE,
    )
    return [entry["lm loss"] for entry in losses]


def global_layer(pp_rank: int, pp: int, vp_stage: int, local: int, per_chunk: int) -> int:
    """Megatron's layer placement: chunk (vp_stage, pp_rank) holds a contiguous run of layers,
    chunks ordered vp-major: vp0pp0, vp0pp1, ..., vp1pp0, ..."""
    return (vp_stage * pp + pp_rank) * per_chunk + local


def main() -> None:
    batches = [random_batch(MICRO_BATCH_SIZE, seed=100 + i) for i in range(MICRO_BATCHES)]

    initialize_parallel(ParallelConfig(seed=11))
    cfg = config(1, None)
    torch.manual_seed(11)
    reference = build_bd3_model(cfg)
    full_state = {k: v.clone() for k, v in reference.state_dict().items() if v is not None}
    ref_losses = run_schedule([reference], batches, cfg)
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    destroy_parallel()

    for pp, vpp, phase in ((2, None, "pp2_1f1b"), (2, 2, "pp2_vpp2_interleaved")):
        info = initialize_parallel(
            ParallelConfig(
                pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp
            )
        )
        cfg = config(pp, vpp)
        stages = vpp or 1
        per_chunk = NUM_LAYERS // (pp * stages)
        chunks = [build_bd3_model(cfg, vp_stage=v if vpp else None) for v in range(stages)]
        names = []  # (chunk, local name, reference name)
        for vp_stage, chunk in enumerate(chunks):
            state = {}
            for name in chunk.state_dict():
                match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
                if match:
                    g = global_layer(info.pp_rank, pp, vp_stage, int(match[1]), per_chunk)
                    ref_name = f"decoder.layers.{g}.{match[2]}"
                else:
                    ref_name = name
                if ref_name in full_state:
                    state[name] = full_state[ref_name]
                    names.append((vp_stage, name, ref_name))
            chunk.load_state_dict(state, strict=True)
        losses = run_schedule(chunks, batches, cfg)

        if parallel_state.is_pipeline_last_stage():
            assert len(losses) == MICRO_BATCHES
            for got, want in zip(losses, ref_losses, strict=True):
                torch.testing.assert_close(got, want, **TOL)
        else:
            assert losses == []
        worst = 0.0
        params = [dict(chunk.named_parameters()) for chunk in chunks]
        for vp_stage, name, ref_name in names:
            if name not in params[vp_stage]:
                continue
            grad = params[vp_stage][name].grad
            assert grad is not None and bool(grad.abs().sum() > 0), f"{phase} {name}: no gradient"
            torch.testing.assert_close(grad, ref_grads[ref_name], **TOL, msg=f"{phase} {ref_name}")
            worst = max(worst, (grad - ref_grads[ref_name]).abs().max().item())
        print(f"PP OK {phase} rank={info.rank} params={len(names)} max_grad_diff={worst:.2e}")
        destroy_parallel()


if __name__ == "__main__":
    main()
