"""GPU figures: compiled FlexAttention vs dense SDPA, and BD3 / MDLM / AR training steps of the
paper's 125M-parameter configuration (12 layers, 768 wide, 12 heads, GPT-2 vocabulary + [MASK]).

    python -m tools.bench.gpu_bench --json runs/bench/gpu.json
    python -m tools.bench.gpu_bench --device cpu --quick     # smoke run of the script itself

Parts:
    ceilings   bf16 matmul rate (8192^3) and device-to-device copy bandwidth, measured
    attention  BD3CoreAttention on the two-stream training mask (2L tokens, 12 heads x 64, bf16):
               flex (compiled FlexAttention BlockMask) and sdpa (dense bool mask, run as two
               calls), forward + backward time, and each one's error against a float64
               computation of the masked softmax from the dense mask
    step       forward + backward of the 125M model in bf16, micro-batch --batch: BD3 with
               B = 4 and 16 (flex; B = 16 also with sdpa), MDLM (single L-token stream) and AR
               (L tokens, causal SDPA); time, peak memory, and MFU = model FLOPs of the step
               (megatron_bd3.training.flops: 2L stream for BD3, attention charged by mask density)
               / time / the bf16 table peak. BD3 B = 16 also at 2L = 4096 tokens (L = 2048) for
               the memory ratio. No optimizer here: the trainer's own console line gives the MFU
               of whole steps (docs/bench/gpu.md).

Timing: CUDA events around each call, median of --repeats after --warmup calls (the first
calls compile FlexAttention). Without CUDA the script runs the same code on CPU (sdpa only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

HEADS, HEAD_DIM, BLOCK = 12, 64, 16
MODEL = dict(num_layers=12, hidden_size=768, num_attention_heads=12, vocab_size=50258)
QUICK_MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=2, vocab_size=512)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one call of `fn` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- ceilings -----------------------------------------------------------------------------------


def bench_ceilings(device: torch.device, quick: bool) -> dict[str, float]:
    n = 1024 if quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = time_call(lambda: a @ b, device, 3, 10)
    x = torch.randn(256 * 2**20 // 4 if not quick else 2**20, device=device)
    y = torch.empty_like(x)
    copy_s = time_call(lambda: y.copy_(x), device, 3, 10)
    return {"matmul_tflops": 2 * n**3 / seconds / 1e12,
            "copy_gb_s": 2 * x.numel() * 4 / copy_s / 1e9}


# -- attention ----------------------------------------------------------------------------------


def _reference_attention(q, k, v, mask) -> torch.Tensor:
    """float64 softmax(QK^T / sqrt(d)) V under the dense bool mask; q/k/v [s, b, h, d]."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
    scores = q @ k.transpose(-1, -2) / HEAD_DIM**0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v  # [b, h, s, d]
    return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)  # [s, b, h*d]


def bench_attention(device: torch.device, lengths: list[int], batch: int, warmup: int,
                    repeats: int) -> list[dict[str, Any]]:
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_bd3.diffusion import block_diffusion_mask
    from megatron_bd3.model import BD3Config, BD3CoreAttention
    from megatron_bd3.parallel import cpu_safe_config_overrides

    kernels = ["flex", "sdpa"] if device.type == "cuda" else ["sdpa"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for L in lengths:
        s = 2 * L
        q, k, v = (torch.randn(s, batch, HEADS, HEAD_DIM, device=device, dtype=dtype)
                   for _ in range(3))
        reference = _reference_attention(q, k, v, block_diffusion_mask(L, BLOCK, device=device))
        for kernel in kernels:
            config = BD3Config(
                seq_length=L, block_size=BLOCK, vocab_size=128, mask_token_id=127, num_layers=1,
                hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, attention_kernel=kernel,
                attention_dropout=0.0, compile_flex=kernel == "flex", bf16=dtype == torch.bfloat16,
                params_dtype=dtype, **cpu_safe_config_overrides())
            module = BD3CoreAttention(config=config, layer_number=1,
                                      attn_mask_type=AttnMaskType.arbitrary,
                                      attention_type="self").to(device)
            mask = None  # the module's own attention: the training mask of its config
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            with torch.no_grad():
                out = module(q, k, v, mask)
            error = ((out.double() - reference).norm() / reference.norm()).item()
            compile_start = time.perf_counter()
            module(qg, kg, vg, mask).sum().backward()  # the first call compiles flex
            _sync(device)
            compile_s = time.perf_counter() - compile_start
            reset_peak(device)
            def call(module=module, q=qg, k=kg, v=vg, mask=mask) -> None:
                module(q, k, v, mask).sum().backward()

            seconds = time_call(call, device, warmup, repeats)
            row = dict(kernel=kernel, L=L, tokens=s, batch=batch, fwd_bwd_ms=seconds * 1e3,
                       rel_error=error, first_call_s=compile_s, peak_gib=peak_gib(device))
            rows.append(row)
            print(f"| {kernel} | {L} | {s} | {batch} | {row['fwd_bwd_ms']:.2f} | {error:.2e} | "
                  f"{compile_s:.1f} | {row['peak_gib'] or 0:.2f} |", flush=True)
    return rows


# -- training step ------------------------------------------------------------------------------


def compile_layers(model) -> None:
    """torch.compile each transformer layer's forward (experiment: how much of the elementwise
    tail a compiler fuses; flex attention inside is compiled either way)."""
    for layer in model.decoder.layers:
        layer.forward = torch.compile(layer.forward)


def _model(preset: str, L: int, block: int | None, kernel: str, device: torch.device,
           shape: dict[str, int]):
    from megatron_bd3.model import BD3Model, bd3_config, mdlm_config, reference_architecture
    from megatron_bd3.parallel import cpu_safe_config_overrides

    bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    common = {**reference_architecture(dropout=0.0), **cpu_safe_config_overrides(), **shape}
    common.update(seq_length=L, mask_token_id=shape["vocab_size"] - 1, attention_kernel=kernel,
                  bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype)
    if kernel == "flex":
        common["compile_flex"] = True
    if preset == "mdlm":
        config = mdlm_config(**common)
    else:  # bd3, and the network AR runs on (its attention kernel does not matter for AR)
        config = bd3_config(block_size=block, **common)
    torch.manual_seed(0)
    # bf16 weights as the trainer's engines hold them (DeepSpeed / Float16Module cast the whole
    # module, norms included; fp32 master weights live in the optimizer, absent here).
    return BD3Model(config).to(device=device, dtype=dtype).train()


def _step(model, preset: str, batch: int, device: torch.device) -> Callable[[], None]:
    import torch.nn.functional as F

    from megatron_bd3.diffusion import noise_batch
    from megatron_bd3.model import BD3LossInputs, loss_func
    from tools.bench.train_step_bench import causal_lm_logits

    config = model.config
    L = config.seq_length
    generator = torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, config.vocab_size - 1, (batch, L), generator=generator).to(device)
    if preset == "ar":
        def ar_step() -> None:
            model.zero_grad(set_to_none=True)
            # causal pass (SDPA is_causal); [L, b, V] -> [b, L, V] view
            logits = causal_lm_logits(model, x_0).transpose(0, 1)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   x_0[:, 1:].reshape(-1))
            loss.backward()

        return ar_step
    noised = noise_batch(x_0, torch.arange(batch), batch, 0, 0, config.block_size,
                         config.mask_token_id)
    inputs = BD3LossInputs(noised.masked, noised.loss_weight)

    def bd3_step() -> None:
        model.zero_grad(set_to_none=True)
        loss_sum, num_tokens, _ = loss_func(None, model(noised.x_t, x_0, inputs))
        (loss_sum / num_tokens).backward()

    return bd3_step


def step_flops(model, preset: str, batch: int) -> float:
    """Training matmul FLOPs of one step (3 x forward): megatron_bd3.training.flops for the BD3 /
    MDLM model config; the plain causal AR pass (L tokens, mask density (L + 1) / 2L, logits at
    all L positions) through the same per-layer terms (flops.matmul_flops)."""
    from megatron_bd3.training.flops import matmul_flops, training_flops_per_sequence

    config = model.config
    if preset != "ar":
        return batch * training_flops_per_sequence(config)
    t = config.seq_length
    return batch * 3.0 * matmul_flops(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups, vocab_size=config.vocab_size,
        stream_length=t, density=(t + 1) / (2.0 * t), logit_positions=t)


def profile_step(step: Callable[[], None], device: torch.device) -> list[str]:
    """The 20 kernels (or CPU ops) with the most self time over three steps, as table lines."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)
    print(table, flush=True)
    return table.splitlines()


def bench_steps(device: torch.device, cases: list[tuple], batch: int, shape: dict[str, int],
                warmup: int, repeats: int, peak_flops: float,
                profile: str | None = None, compiled: bool = False) -> list[dict[str, Any]]:
    rows = []
    for name, preset, L, block, kernel in cases:
        model = _model("mdlm" if preset == "mdlm" else "bd3", L, block, kernel, device, shape)
        if compiled:
            compile_layers(model)
        step = _step(model, preset, batch, device)
        compile_start = time.perf_counter()
        step()
        _sync(device)
        first_s = time.perf_counter() - compile_start
        reset_peak(device)
        seconds = time_call(step, device, warmup, repeats)
        flops = step_flops(model, preset, batch)
        row = dict(case=name, preset=preset, L=L, block_size=block, kernel=kernel, batch=batch,
                   step_ms=seconds * 1e3, first_call_s=first_s, tflop_per_step=flops / 1e12,
                   mfu=flops / seconds / peak_flops, peak_gib=peak_gib(device),
                   tokens_per_s=batch * L / seconds)
        if profile and name == profile:
            row["profile"] = profile_step(step, device)
        rows.append(row)
        print(f"| {name} | {L} | {kernel} | {row['step_ms']:.1f} | {row['tflop_per_step']:.2f} | "
              f"{100 * row['mfu']:.1f}% | {row['tokens_per_s']:.0f} | "
              f"{row['peak_gib'] or 0:.2f} | {first_s:.1f} |", flush=True)
        del model, step
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    by = {r["case"]: r for r in rows}
    out = {}
    for bd3 in ("bd3-B4-flex", "bd3-B16-flex", "bd3-B16-sdpa"):
        if bd3 in by and "ar" in by:
            out[f"{bd3} / ar"] = by[bd3]["step_ms"] / by["ar"]["step_ms"]
    if "mdlm" in by and "ar" in by:
        out["mdlm / ar"] = by["mdlm"]["step_ms"] / by["ar"]["step_ms"]
    long, short = by.get("bd3-B16-flex-L2x"), by.get("bd3-B16-flex")
    if long and short and long["peak_gib"]:
        out["peak memory 2L / L (bd3 B16 flex)"] = long["peak_gib"] / short["peak_gib"]
        out["step time 2L / L (bd3 B16 flex)"] = long["step_ms"] / short["step_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (checks the script)")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16, help="step micro-batch (sequences)")
    parser.add_argument("--attention-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--parts", nargs="+", default=["ceilings", "attention", "step"])
    parser.add_argument("--profile", default=None, metavar="CASE",
                        help="print the top kernels of one step case (e.g. bd3-B16-flex)")
    parser.add_argument("--compile-layers", action="store_true",
                        help="torch.compile each transformer layer (experiment)")
    parser.add_argument("--cases", nargs="*", default=None, help="step cases to run (names)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from megatron.core import __version__ as megatron_version

    from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_bd3.parallel.kernels import detect_fused_kernels
    from megatron_bd3.training.flops import default_peak_flops

    info = initialize_parallel(ParallelConfig(seed=0), environ={})
    device = torch.device(args.device) if args.device == "cpu" else info.device
    shape = QUICK_MODEL if args.quick else MODEL
    L = 64 if args.quick else args.length
    batch = 2 if args.quick else args.batch
    peak, peak_source = default_peak_flops(device.type, "bf16" if device.type == "cuda" else "fp32")
    meta = {"torch": torch.__version__, "megatron_core": megatron_version,
            "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "peak_flops": peak, "peak_source": peak_source,
            "kernels": {k: str(v) for k, v in detect_fused_kernels().items()}}
    print(json.dumps(meta, indent=1), flush=True)
    result: dict[str, Any] = {"meta": meta}
    try:
        if "ceilings" in args.parts:
            result["ceilings"] = bench_ceilings(device, args.quick)
            print(f"ceilings: {result['ceilings']}", flush=True)
        if "attention" in args.parts:
            print("\n| kernel | L | tokens | batch | fwd+bwd ms | rel. error vs fp64 | first call s "
                  "| peak GiB |\n|---|---|---|---|---|---|---|---|")
            lengths = [L] if args.quick else [L, 2 * L]
            result["attention"] = bench_attention(device, lengths,
                                                  2 if args.quick else args.attention_batch,
                                                  args.warmup, args.repeats)
        if "step" in args.parts:
            flex = "flex" if device.type == "cuda" else "sdpa"
            cases = [("bd3-B4-" + flex, "bd3", L, 4, flex),
                     ("bd3-B16-" + flex, "bd3", L, 16, flex),
                     ("mdlm", "mdlm", L, None, "sdpa"),
                     ("ar", "ar", L, 16, "sdpa")]
            if device.type == "cuda":
                cases.insert(2, ("bd3-B16-sdpa", "bd3", L, 16, "sdpa"))
                cases.append(("bd3-B16-flex-L2x", "bd3", 2 * L, 16, "flex"))
            print(f"\n125M-class model {shape}, micro-batch {batch}\n"
                  "| case | L | kernel | step ms | TFLOP/step | MFU | tokens/s | peak GiB "
                  "| first call s |\n|---|---|---|---|---|---|---|---|---|")
            if args.cases:
                cases = [c for c in cases if c[0] in args.cases]
            result["step"] = bench_steps(device, cases, batch, shape, args.warmup, args.repeats,
                                         peak, args.profile, args.compile_layers)
            result["ratios"] = ratios(result["step"])
            for key, value in result["ratios"].items():
                print(f"{key}: {value:.2f}")
    finally:
        destroy_parallel()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
