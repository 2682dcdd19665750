"""Train tiny models with the real trainer in several layouts (2 ranks), save their checkpoints,
and record the megatron logits of a fixed batch computed in that layout, before any conversion.

argv: output dir, then NAME=CONFIG.yaml pairs. For each pair: Trainer(config) trains and saves
(its final checkpoint, exactly as a user run does); then the two-stream training logits of one
random (x_t, x_0) batch are computed on the trained chunks, with the raw weights and with the EMA
weights swapped in. TP layouts use BD3Model.forward_logits (gathered over TP); PP=2 sends the
first stage's hidden states to the last stage by hand. Rank 0 writes OUT/NAME.pt with
x_t, x_0, raw, ema (logits [b, L, vocab]), clip_range, checkpoint and layout.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_bd3.training.config import load_config
from megatron_bd3.training.trainer import Trainer

BATCH = 2


def fixed_batch(vocab_size: int, mask_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    x_0 = torch.randint(0, vocab_size, (BATCH, length), generator=gen)
    x_0[x_0 == mask_id] = mask_id + 1
    masked = torch.rand(BATCH, length, generator=gen) < 0.5
    return torch.where(masked, torch.full_like(x_0, mask_id), x_0), x_0


@torch.no_grad()
def logits_in_layout(trainer: Trainer, x_t: torch.Tensor, x_0: torch.Tensor):
    """[b, L, vocab] on every rank that has them (all TP ranks; the last PP stage)."""
    (model,) = trainer.stepper.chunks
    model.eval()
    if trainer.info.pp_size == 1:
        return model.forward_logits(x_t, x_0)
    from megatron.core import parallel_state

    mc = trainer.model_config
    if trainer.info.pp_rank == 0:
        hidden = model(x_t, x_0)  # [2L, b, h]
        dist.send(hidden.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    hidden = torch.empty(mc.stream_length, BATCH, mc.hidden_size)
    dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
    model.set_input_tensor(hidden)
    return model(None, x_0)[..., : mc.vocab_size]  # TP = 1: the whole (padded) vocabulary


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    for pair in sys.argv[2:]:
        name, config_path = pair.split("=", 1)
        trainer = Trainer(load_config(config_path))
        try:
            trainer.setup()
            summary = trainer.run()
            mc = trainer.model_config
            x_t, x_0 = fixed_batch(mc.vocab_size, mc.mask_token_id, mc.seq_length)
            raw = logits_in_layout(trainer, x_t, x_0)
            with trainer.ema.swap_in():
                ema = logits_in_layout(trainer, x_t, x_0)
            info = trainer.info
            record = {"raw": raw, "ema": ema}
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, record if raw is not None else None)
            if dist.get_rank() == 0:
                found = next(r for r in gathered if r is not None)
                torch.save({
                    "x_t": x_t, "x_0": x_0, "raw": found["raw"], "ema": found["ema"],
                    "clip_range": [trainer.clip.value.eps_min, trainer.clip.value.eps_max],
                    "checkpoint": summary["checkpoint"],
                    "layout": {"tp": info.tp_size, "pp": info.pp_size, "dp": info.dp_size},
                }, out / f"{name}.pt")
                print(f"SAVED {name} {summary['checkpoint']}", flush=True)
        finally:
            trainer.close()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
