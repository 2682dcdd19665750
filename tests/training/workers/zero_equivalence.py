"""DP ranks x DeepSpeed ZeRO-{0,1,2,3} (and ZeRO-2 + CPU offload) vs one process, plain torch.

Every rank trains a tiny MLP for a few steps through the trainer's own step path (megatron's
forward_backward_func with several micro-batches, then the DeepSpeed stepper), using the shipped
JSON files. The reference is written here independently: one process, the whole global batch at
once, torch.optim.AdamW, torch's clip_grad_norm_. Prints one RESULT line per JSON file.
"""

import sys

import torch
import torch.distributed as dist
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig

from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel
from megatron_bd3.training.deepspeed_engine import load_deepspeed_json, resolve_deepspeed_config
from megatron_bd3.training.parallelize import build_deepspeed_stepper
from megatron_bd3.training.step import train_step

GLOBAL_BATCH, MICRO, STEPS, LR, WD, CLIP = 8, 2, 3, 1e-2, 0.1, 0.05


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 32)
        self.fc2 = torch.nn.Linear(32, 4)
        # megatron's schedules read the model config from `.config`
        self.config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, tensor):  # megatron's schedules call it on every chunk
        pass

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, GLOBAL_BATCH, 8, generator=g), torch.randn(
        STEPS, GLOBAL_BATCH, 4, generator=g
    )


def reference():
    x, y = data()
    model = TinyMLP()
    opt = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD
    )
    norms = []
    for s in range(STEPS):
        opt.zero_grad()
        loss = ((model(x[s]) - y[s]) ** 2).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["x"])

    def loss_func(output):
        loss = ((output - batch["y"]) ** 2).mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def main():
    json_paths = sys.argv[1:]
    info = initialize_parallel(ParallelConfig())
    ref_params, ref_norms = reference()
    x, y = data()
    per_rank = GLOBAL_BATCH // info.dp_size
    num_micro = per_rank // MICRO
    for path in json_paths:
        raw = load_deepspeed_json(path)
        overrides = {"zero_optimization.stage3_param_persistence_threshold": 0}
        if raw["zero_optimization"]["stage"] != 3:
            overrides = {}
        cfg = resolve_deepspeed_config(
            raw,
            micro_batch_size=MICRO,
            gradient_accumulation_steps=num_micro,
            data_parallel_size=info.dp_size,
            lr=LR,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=WD,
            clip_grad=CLIP,
            precision="fp32",
            torch_adam=True,
            overrides=overrides,
            source=path,
        )
        stepper = build_deepspeed_stepper([TinyMLP()], cfg)
        norms = []
        for s in range(STEPS):
            lo = info.dp_rank * per_rank
            micro = [
                {
                    "x": x[s, lo + m * MICRO : lo + (m + 1) * MICRO],
                    "y": y[s, lo + m * MICRO : lo + (m + 1) * MICRO],
                }
                for m in range(num_micro)
            ]
            _, norm = train_step(
                stepper, forward_step, micro, lr=LR, seq_length=1, micro_batch_size=MICRO
            )
            norms.append(norm)
        import deepspeed

        params = dict(stepper.chunks[0].named_parameters())
        with deepspeed.zero.GatheredParameters(
            list(params.values()), enabled=stepper.zero_stage == 3
        ):
            diff = max((params[n].detach() - ref_params[n]).abs().max().item() for n in ref_params)
        norm_diff = max(abs(a - b) for a, b in zip(norms, ref_norms, strict=True))
        line = (
            f"RESULT {path} rank={info.rank} stage={stepper.zero_stage} "
            f"engine_forward={stepper.engine_forward} max_param_diff={diff:.3e} "
            f"max_norm_diff={norm_diff:.3e}"
        )
        lines = [None] * dist.get_world_size()
        dist.all_gather_object(lines, line)  # rank 0 prints all: no interleaved output
        if info.rank == 0:
            print("\n".join(lines), flush=True)
        del stepper
    destroy_parallel()


if __name__ == "__main__":
    main()
