"""Sampler throughput of the standalone BD3-LM (tokens/s, NFE), with and without the KV cache.

    python -m tools.bench.sampler_bench [--threads 2] [--json out.json] [--only NAME ...]

Models (random weights, fp32, the reference's architecture):
* ``ref``: the reference-bench model (docs: reference-bench.md): 4 layers, hidden 256, 4 heads,
  vocab 8192 (incl. [MASK]), L = 1024;
* ``30m``: 8 layers, hidden 512, 8 heads, vocab 8192, L = 1024 (33.6M parameters).
fp32 unless the case name ends in ``-bf16`` (bfloat16 weights and activations).

Cases: first-hitting with B = 16 at 256 and 1024 tokens, batch 1 and 16, cache and no cache; AR
decoding = the same network sampled with B = 1 (one token per call, KV cache). Each sample
starts from BOS (as the reference), so "tokens" counts the generated ones (length - 1). Timings
are the median of ``--repeats`` runs after one warm-up (no-cache runs longer than a minute: one
run). The load average and the process CPU time are recorded because the machine is shared.

OpenMP: on a quiet machine keep the default (spinning) threads: passive ones pay a wake-up in
each of a call's ~100 parallel regions (measured 1.4-1.8x slower). On a shared machine run with
``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1``: spinning threads on cores another process also
uses wait for a descheduled peer in every parallel region (measured: up to 80x slower).
The last lines check the issue's targets (docs/bench/sampler.md). For the batch-16 fp32 target
the bench also measures its kernel floor on this machine (tools/bench/kernel_floor.py): the same
generation's matmuls and attention calls, each timed alone, summed. A target above that floor
cannot be met by cutting overhead, only by fewer FLOPs or faster kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch

from megatron_bd3.standalone import BD3Network, NetworkConfig, SamplerConfig, generate
from tools.bench import common
from tools.bench.kernel_floor import kernel_floor

MODELS = {
    "ref": dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4),
    "30m": dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8),
}


@dataclass
class Case:
    name: str
    model: str
    length: int
    batch: int
    block_size: int = 16
    use_cache: bool = True
    dtype: str = "float32"


CASES = [
    Case("ref-256-b1-cache", "ref", 256, 1),
    Case("ref-256-b1-nocache", "ref", 256, 1, use_cache=False),
    Case("ref-256-b16-cache", "ref", 256, 16),
    Case("ref-256-b16-nocache", "ref", 256, 16, use_cache=False),
    Case("ref-256-b1-ar", "ref", 256, 1, block_size=1),
    Case("ref-256-b16-ar", "ref", 256, 16, block_size=1),
    Case("ref-1024-b1-cache", "ref", 1024, 1),
    Case("ref-1024-b1-nocache", "ref", 1024, 1, use_cache=False),
    Case("ref-1024-b16-cache", "ref", 1024, 16),
    Case("ref-1024-b1-ar", "ref", 1024, 1, block_size=1),
    Case("30m-1024-b1-cache", "30m", 1024, 1),
    Case("30m-1024-b1-nocache", "30m", 1024, 1, use_cache=False),
    Case("30m-1024-b1-ar", "30m", 1024, 1, block_size=1),
    Case("30m-1024-b16-cache", "30m", 1024, 16),
    # bfloat16 weights and activations (opt-in; AVX512-BF16 matmuls), same sampler
    Case("ref-256-b1-cache-bf16", "ref", 256, 1, dtype="bfloat16"),
    Case("ref-256-b16-cache-bf16", "ref", 256, 16, dtype="bfloat16"),
    Case("30m-1024-b1-cache-bf16", "30m", 1024, 1, dtype="bfloat16"),
]


def build(model: str) -> BD3Network:
    spec = MODELS[model]
    d = spec["hidden_size"]
    config = NetworkConfig(
        num_query_groups=spec["num_heads"], ffn_hidden_size=4 * d, seq_length=1024,
        block_size=16, mask_token_id=spec["vocab_size"] - 1, bos_token_id=0, eos_token_id=1,
        **spec,
    )
    torch.manual_seed(0)
    network = BD3Network(config).eval()
    with torch.no_grad():  # random, non-degenerate weights (the output layer is not all zero)
        for param in network.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02)
    return network


def run_case(network: BD3Network, case: Case, repeats: int) -> dict:
    config = SamplerConfig(block_size=case.block_size, use_cache=case.use_cache)
    seeds = list(range(case.batch))

    def once() -> dict:
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        samples = generate(network, case.length, num_samples=case.batch, seeds=seeds,
                           config=config)
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                "load": load, "samples": samples}

    generate(network, 2 * case.block_size + 1, num_samples=case.batch, config=config)  # warm-up
    runs = [once()]
    while runs[0]["wall"] < 60 and len(runs) < repeats:
        runs.append(once())
    wall = statistics.median(r["wall"] for r in runs)
    samples = runs[-1]["samples"]
    generated = sum(len(s.generated) for s in samples)
    return {
        **case.__dict__,
        "seconds": round(wall, 3),
        "runs": [round(r["wall"], 3) for r in runs],
        "tokens": generated,
        "tokens_per_s": round(generated / wall, 1),
        # CPU seconds of this process (all threads): less sensitive to other users' load
        "cpu_seconds": round(statistics.median(r["cpu"] for r in runs), 3),
        "nfe_per_sample": samples[0].nfe,
        "tokens_through_net_per_sample": samples[0].tokens_processed,
        "load_avg_1min": round(max(r["load"] for r in runs), 2),
    }


# Issue targets against the reference's cached sampler (reference-bench.md: 45.6 tokens/s at
# 256 tokens, batch 1, B = 16, first-hitting) and the KV cache's own speed-up.
REFERENCE_TOKENS_PER_S = 45.6
TARGETS = (
    ("ref-256-b1-cache", 3 * REFERENCE_TOKENS_PER_S, "batch 1, 256 tokens"),
    ("ref-256-b16-cache", 30 * REFERENCE_TOKENS_PER_S, "batch 16, 256 tokens, fp32"),
    ("ref-256-b16-cache-bf16", 30 * REFERENCE_TOKENS_PER_S, "batch 16, 256 tokens, bf16"),
)


FLOOR_CASES = ("ref-256-b16-cache",)


def floor_of(network: BD3Network, case: Case, measured: dict) -> dict:
    """The case's kernel floor beside its measured speed (see tools/bench/kernel_floor.py)."""
    config = SamplerConfig(block_size=case.block_size, use_cache=case.use_cache)
    floor = kernel_floor(lambda: generate(network, case.length, num_samples=case.batch,
                                          seeds=list(range(case.batch)), config=config))
    tokens = measured["tokens"]
    # attention at the matmuls' own rate: what a perfect attention kernel would leave
    matmul_rate = floor.matmul_flops / floor.matmul_seconds
    ideal = floor.matmul_seconds + floor.attention_flops / matmul_rate
    return {
        "case": case.name,
        "gflop": round(floor.flops / 1e9, 1),
        "attention_gflop": round(floor.attention_flops / 1e9, 1),
        "matmul_gflop_per_s": round(matmul_rate / 1e9, 1),
        "floor_seconds": round(floor.seconds, 3),
        "matmul_seconds": round(floor.matmul_seconds, 3),
        "attention_seconds": round(floor.attention_seconds, 3),
        "floor_tokens_per_s": round(tokens / floor.seconds, 1),
        "matmul_only_tokens_per_s": round(tokens / floor.matmul_seconds, 1),
        "attention_at_matmul_rate_tokens_per_s": round(tokens / ideal, 1),
        "measured_fraction_of_floor": round(floor.seconds / measured["seconds"], 3),
        "calls": floor.calls,
        "heaviest": floor.rows(),
    }


def check_targets(by_name: dict[str, dict], has_native_bf16: bool = True) -> list[str]:
    """One line per target whose cases ran: measured vs required, met or not."""
    lines = []
    for name, required, what in TARGETS:
        if name in by_name:
            got = by_name[name]["tokens_per_s"]
            verdict = "met" if got >= required else "NOT met"
            if "bf16" in name and not has_native_bf16:
                verdict += " (this CPU has no native bf16, AVX512-BF16 or AMX: bf16 matmuls are emulated)"
            lines.append(f"target {what}: {got:.0f} tok/s vs >= {required:.0f} "
                         f"({got / REFERENCE_TOKENS_PER_S:.1f}x the reference's 45.6): "
                         f"{verdict}")
    cached, uncached = by_name.get("30m-1024-b1-cache"), by_name.get("30m-1024-b1-nocache")
    if cached and uncached:
        ratio = uncached["seconds"] / cached["seconds"]
        lines.append(f"target KV cache >= 8x no cache (30m, 1024 tokens): {ratio:.1f}x wall: "
                     f"{'met' if ratio >= 8 else 'NOT met'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the kernel floor of the batch-16 target case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [c for c in CASES if args.only is None or c.name in args.only]
    networks: dict[str, BD3Network] = {}
    results = []
    header = (f"{'case':22s} {'tokens':>6s} {'sec':>8s} {'tok/s':>8s} {'cpu-s':>8s} "
              f"{'NFE/sample':>10s} {'net tok/sample':>14s} {'load':>5s}")
    host = common.machine()
    print(f"torch {torch.__version__}, {args.threads} threads, {host['cpu']} "
          f"({host['cpu_capability']}, native bf16: {host['native_bf16']})")
    print(header)
    for case in cases:
        key = f"{case.model}-{case.dtype}"
        if key not in networks:
            networks[key] = build(case.model).to(getattr(torch, case.dtype))
        result = run_case(networks[key], case, args.repeats)
        results.append(result)
        print(f"{case.name:22s} {result['tokens']:6d} {result['seconds']:8.2f} "
              f"{result['tokens_per_s']:8.1f} {result['cpu_seconds']:8.2f} "
              f"{result['nfe_per_sample']:10d} "
              f"{result['tokens_through_net_per_sample']:14d} {result['load_avg_1min']:5.2f}",
              flush=True)
    by_name = {r["name"]: r for r in results}
    for model, length in (("ref", 256), ("ref", 1024), ("30m", 1024)):
        cached, uncached = (by_name.get(f"{model}-{length}-b1-{k}") for k in ("cache", "nocache"))
        if cached and uncached:
            print(f"KV cache speed-up, {model} at {length} tokens, batch 1: "
                  f"{uncached['seconds'] / cached['seconds']:.1f}x wall, "
                  f"{uncached['cpu_seconds'] / cached['cpu_seconds']:.1f}x CPU time")
    floors = []
    for case in cases:
        if case.name in FLOOR_CASES and not args.no_floor:
            floor = floor_of(networks[f"{case.model}-{case.dtype}"], case, by_name[case.name])
            floors.append(floor)
            print(f"kernel floor of {case.name}: {floor['gflop']} GFLOP in {floor['calls']} "
                  f"matmul/attention calls; alone they take {floor['floor_seconds']} s "
                  f"(matmuls {floor['matmul_seconds']} s, attention "
                  f"{floor['attention_seconds']} s for {floor['attention_gflop']} GFLOP) = "
                  f"{floor['floor_tokens_per_s']:.0f} tok/s; with attention at the matmuls' "
                  f"{floor['matmul_gflop_per_s']:.0f} GFLOP/s "
                  f"{floor['attention_at_matmul_rate_tokens_per_s']:.0f} tok/s; matmuls alone "
                  f"{floor['matmul_only_tokens_per_s']:.0f} tok/s; measured "
                  f"{by_name[case.name]['tokens_per_s']:.0f} tok/s = "
                  f"{100 * floor['measured_fraction_of_floor']:.0f}% of the floor")
            for line in floor["heaviest"]:
                print("   ", line)
    targets = check_targets(by_name, host["native_bf16"])
    for line in targets:
        print(line)
    if args.json:
        meta = {**common.versions(), "threads": args.threads, "machine": host,
                "parameters": {m: n.num_parameters() for m, n in networks.items()}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "floors": floors, "targets": targets},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
