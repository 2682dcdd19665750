"""Bring megatron parallel state up in several layouts in one torchrun launch and check each.

Usage: torchrun --nproc_per_node N layout_worker.py PHASE [PHASE ...]
Phases (see PHASES): the world is split as named; data parallel takes what is left.

Per phase, on every rank:
  - ParallelInfo and megatron's TP/DP/PP groups equal a layout computed here by hand from
    megatron's default order tp-cp-ep-dp-pp (rank = tp + TP*(cp + CP*(dp + DP*pp)));
  - an all-reduce over the TP, DP, PP and CP groups returns the sum of the hand-computed members;
  - the tracker's tensor-parallel stream equals a generator seeded seed+100*pp+2718+tp, differs
    between TP peers, agrees across DP peers; the default stream is restored after the fork;
  - sequence parallel (tp phases): Column->RowParallelLinear forward/backward match a dense
    reference (exercises mappings, layers' SP backward and GlobalMemoryBuffer on CPU);
  - pipeline (pp phases): megatron's 1F1B / interleaved schedule on a toy tanh chain gives the
    losses and weight gradients of the same chain run here without pipelining;
  - destroy_parallel() twice, then the next phase initialises again in the same process.
Prints "PHASE <name> OK rank <r>" per phase.
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.distributed as dist

from megatron_bd3.parallel import (
    ParallelConfig,
    all_reduce_host,
    cpu_compat_active,
    cpu_safe_config_overrides,
    destroy_parallel,
    initialize_parallel,
    parallel_info,
)

PHASES = {
    "tp2": dict(tensor_model_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
    "pp2vpp2": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    "tp2pp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    "tp2dp2": dict(tensor_model_parallel_size=2),
    "cp2": dict(context_parallel_size=2),
}
SEED = 1234


def expected_layout(rank: int, world: int, tp: int, pp: int, cp: int = 1) -> dict:
    """Coordinates and group members for megatron's default order tp-cp-ep-dp-pp (ep = 1)."""
    dp = world // (tp * pp * cp)

    def to_rank(t, c, d, p):
        return t + tp * (c + cp * (d + dp * p))

    coords = {}
    for t, c, d, p in itertools.product(range(tp), range(cp), range(dp), range(pp)):
        coords[to_rank(t, c, d, p)] = (t, c, d, p)
    t, c, d, p = coords[rank]
    return dict(
        tp_rank=t,
        cp_rank=c,
        dp_rank=d,
        pp_rank=p,
        tp_size=tp,
        dp_size=dp,
        pp_size=pp,
        tp_group=sorted(to_rank(i, c, d, p) for i in range(tp)),
        dp_group=sorted(to_rank(t, c, i, p) for i in range(dp)),
        pp_group=sorted(to_rank(t, c, d, i) for i in range(pp)),
        cp_group=sorted(to_rank(t, i, d, p) for i in range(cp)),
        cp_size=cp,
    )


def check_layout(info, cfg: ParallelConfig) -> dict:
    from megatron.core import parallel_state as ps

    want = expected_layout(
        info.rank,
        info.world_size,
        cfg.tensor_model_parallel_size,
        cfg.pipeline_model_parallel_size,
        cfg.context_parallel_size,
    )
    got = {k: getattr(info, k) for k in ("tp_rank", "cp_rank", "dp_rank", "pp_rank")}
    got.update(
        tp_size=info.tp_size, dp_size=info.dp_size, pp_size=info.pp_size, cp_size=info.cp_size
    )
    got["tp_group"] = dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())
    got["dp_group"] = dist.get_process_group_ranks(ps.get_data_parallel_group())
    got["pp_group"] = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    got["cp_group"] = dist.get_process_group_ranks(ps.get_context_parallel_group())
    got = {k: sorted(v) if isinstance(v, list) else v for k, v in got.items()}
    assert got == want, f"rank {info.rank}: layout {got} != expected {want}"
    assert info.device == torch.device("cpu") and info.backend == "gloo"
    assert info.seed == SEED + 100 * info.pp_rank
    assert parallel_info() == info
    for name, group in (
        ("tp_group", ps.get_tensor_model_parallel_group()),
        ("dp_group", ps.get_data_parallel_group()),
        ("pp_group", ps.get_pipeline_model_parallel_group()),
        ("cp_group", ps.get_context_parallel_group()),
    ):
        value = torch.tensor([float(info.rank)])
        dist.all_reduce(value, group=group)
        assert value.item() == sum(want[name]), f"{name} all-reduce {value.item()} != {want[name]}"
        # the host-side helper the trainer uses for loss sums: in place, float64, same result
        host = torch.tensor([float(info.rank), 1.0], dtype=torch.float64)
        assert all_reduce_host(host, group=group) is host
        assert host.tolist() == [sum(want[name]), len(want[name])], f"{name}: {host.tolist()}"
    return want


def check_rng(info) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(6)
    default_draw = torch.rand(6)
    tp_ref = torch.rand(6, generator=torch.Generator().manual_seed(info.seed + 2718 + info.tp_rank))
    default_ref = torch.rand(6, generator=torch.Generator().manual_seed(info.seed))
    assert torch.equal(tp_draw, tp_ref), f"rank {info.rank}: TP stream {tp_draw} != {tp_ref}"
    assert torch.equal(default_draw, default_ref), f"rank {info.rank}: default stream not restored"

    draws = [torch.empty(6) for _ in range(info.world_size)]
    dist.all_gather(draws, tp_draw)
    coords = [None] * info.world_size
    dist.all_gather_object(coords, (info.tp_rank, info.pp_rank))
    for a, b in itertools.combinations(range(info.world_size), 2):
        same = torch.equal(draws[a], draws[b])
        if coords[a] == coords[b]:  # DP (and CP) peers: same tp and pp rank, same stream
            assert same, f"ranks {a} and {b} share tp and pp rank but their TP streams differ"
        elif coords[a][1] == coords[b][1]:  # TP peers of one stage draw independently
            assert not same, f"ranks {a} and {b} are TP peers but share a TP stream"


def check_sequence_parallel(info) -> None:
    """Column(SP)->Row(SP) linear pair against the dense computation, forward and backward."""
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    tp, r = info.tp_size, info.tp_rank
    s, b, h, f = 4, 2, 6, 8
    gen = torch.Generator().manual_seed(7)
    w1 = torch.randn(f, h, generator=gen)  # [f, h] column-parallel: rows split
    w2 = torch.randn(h, f, generator=gen)  # [h, f] row-parallel: columns split
    x = torch.randn(s, b, h, generator=gen)  # [s, b, h] sequence-first

    overrides = cpu_safe_config_overrides()
    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=True,
        use_cpu_initialization=overrides["use_cpu_initialization"],
        gradient_accumulation_fusion=False,
    )
    col = ColumnParallelLinear(
        h, f, config=config, init_method=torch.nn.init.zeros_, bias=False, gather_output=False
    )
    row = RowParallelLinear(
        f,
        h,
        config=config,
        init_method=torch.nn.init.zeros_,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
    )
    fs, ss = f // tp, s // tp
    with torch.no_grad():
        col.weight.copy_(w1[r * fs : (r + 1) * fs])
        row.weight.copy_(w2[:, r * fs : (r + 1) * fs])
    x_shard = x[r * ss : (r + 1) * ss].clone().requires_grad_(True)  # [s/tp, b, h]
    hidden, _ = col(x_shard)  # [s, b, f/tp]
    out, _ = row(hidden)  # [s/tp, b, h]
    (out**2).sum().backward()

    x_ref, w1_ref, w2_ref = (t.clone().requires_grad_(True) for t in (x, w1, w2))
    out_ref = (x_ref @ w1_ref.T) @ w2_ref.T  # [s, b, h]
    (out_ref**2).sum().backward()  # the sum over all ranks' shards
    assert torch.allclose(out, out_ref[r * ss : (r + 1) * ss], atol=1e-5)
    assert torch.allclose(x_shard.grad, x_ref.grad[r * ss : (r + 1) * ss], atol=1e-4)
    # Under SP, weight grads are per-rank partial sums over this rank's tokens... except that
    # the all-gathered input makes the column grad complete; row grad is complete too.
    assert torch.allclose(col.weight.grad, w1_ref.grad[r * fs : (r + 1) * fs], atol=1e-4)
    assert torch.allclose(row.weight.grad, w2_ref.grad[:, r * fs : (r + 1) * fs], atol=1e-4)
    assert ps.get_global_memory_buffer().get_tensor((3,), torch.float32, "t").device.type == "cpu"


class _Stage(torch.nn.Module):
    """One virtual pipeline stage of the toy chain: h -> tanh(h @ W)."""

    def __init__(self, config, weight: torch.Tensor, stage: int, vp_stage: int | None) -> None:
        super().__init__()
        from megatron.core.enums import ModelType

        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.weight = torch.nn.Parameter(weight.clone())
        self.stage = stage
        self.vp_stage = vp_stage
        self.input_tensor = None

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, x: torch.Tensor | None) -> torch.Tensor:
        hidden = x if self.stage == 0 else self.input_tensor  # [s, b, h]
        return torch.tanh(hidden @ self.weight)


def check_pipeline(info, cfg: ParallelConfig) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    pp, vpp = info.pp_size, cfg.virtual_pipeline_model_parallel_size or 1
    stages, s, b, h, num_mb = pp * vpp, 3, 2, 4, 4
    gen = torch.Generator().manual_seed(11)
    weights = torch.randn(stages, h, h, generator=gen) * 0.8
    data = torch.randn(num_mb, s, b, h, generator=gen)

    config = TransformerConfig(
        num_layers=stages,
        hidden_size=h,
        num_attention_heads=1,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        **cpu_safe_config_overrides(),
    )
    # Megatron's interleaving: model chunk c on pipeline rank p is virtual stage c * pp + p.
    chunks = [
        _Stage(
            config, weights[c * pp + info.pp_rank], c * pp + info.pp_rank, c if vpp > 1 else None
        )
        for c in range(vpp)
    ]

    def forward_step(data_iterator, model):
        x = next(data_iterator) if model.stage == 0 else None
        out = model(x)

        def loss_func(output):
            loss = (output**2).mean()
            # clone: megatron divides the returned loss in place (schedules.py 269)
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    iterators = [iter(data) for _ in chunks] if vpp > 1 else iter(data)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks if vpp > 1 else chunks[0],
        num_microbatches=num_mb,
        seq_length=s,
        micro_batch_size=b,
        forward_only=False,
    )

    ref_w = weights.clone().requires_grad_(True)
    ref_losses = []
    for m in range(num_mb):
        hidden = data[m]
        for k in range(stages):
            hidden = torch.tanh(hidden @ ref_w[k])
        ref_losses.append((hidden**2).mean())
    (torch.stack(ref_losses).sum() / num_mb).backward()

    if info.pp_rank == pp - 1:
        got = torch.stack([d["loss"] for d in losses])
        assert torch.allclose(got, torch.stack(ref_losses).detach(), atol=1e-6), (got, ref_losses)
    else:
        assert not losses
    for chunk in chunks:
        assert torch.allclose(chunk.weight.grad, ref_w.grad[chunk.stage], atol=1e-6), (
            f"rank {info.rank} stage {chunk.stage}: pipeline grad differs from reference"
        )


def main(phases: list[str]) -> None:
    for name in phases:
        cfg = ParallelConfig(seed=SEED, sequence_parallel=False, **PHASES[name])
        info = initialize_parallel(cfg)
        assert cpu_compat_active()
        check_layout(info, cfg)
        check_rng(info)
        if info.tp_size > 1:
            check_sequence_parallel(info)
        if info.pp_size > 1:
            check_pipeline(info, cfg)
        dist.barrier()
        destroy_parallel()
        destroy_parallel()
        assert not dist.is_initialized() and parallel_info() is None
        print(f"PHASE {name} OK rank {info.rank}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
