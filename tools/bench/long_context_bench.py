"""Long-context benchmark: context parallelism (CP) of the two-stream input (docs/bench/long-context.md).

    python -m tools.bench.long_context_bench                       # CPU: L = 2048 and 4096
    python -m tools.bench.long_context_bench --lengths 2048 --steps 2
    python -m tools.bench.long_context_bench --device cuda         # GPU: flex, needs 2 GPUs

Per sequence length three cases of one forward + backward of one micro-batch through BD3Model
(no optimizer, so the attention and activations are what differ):
    cp1             one rank, the model's own attention
    cp2             CP = 2: zig-zag chunks, the clean keys/values all-gathered
                    (cp_comm_type 'all_gather', megatron_bd3/model/context_parallel.py)
    cp2_p2p         CP = 2: the same chunks, the clean keys/values sent around the ring
                    (cp_comm_type 'p2p', megatron_bd3/model/ring_attention.py)
    cp2_allgather   CP = 2, the baseline without the BD3 structure: every rank all-gathers the
                    queries, keys and values of both streams and runs the dense [2L, 2L] mask over
                    all 2L queries (the approach that pays CP times the attention FLOPs), then
                    keeps its own rows. Built here as a swapped core-attention leaf of the layer
                    spec; its exchange goes through the same counted all-gather as cp2.
Measured per rank (the larger of the two ranks is reported): peak memory of the step (CPU: the
growth of the peak RSS over the RSS before the first step; CUDA: max_memory_allocated), the median
step time (wall, and the process's CPU time: with one thread per process it is the step's own
work, less disturbed by other load than the wall time), and the bytes this rank sent per step (ExchangeMeter: (CP - 1) x the local payload of
each all-gather / reduce-scatter; each ring message's payload). The FLOP table is computed from training/flops.py.

Each case runs in its own torchrun launch (gloo on CPU, nccl on CUDA). Results:
runs/bench/long_context.json (with the machine, versions and the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CASES = ("cp1", "cp2", "cp2_p2p", "cp2_allgather")

# The benchmark network: small enough for two CPU cores at 2L = 8192 tokens, attention-heavy.
MODEL = dict(num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
             vocab_size=512, block_size=16, micro_batch_size=1)


# ---------------------------------------------------------------------------------- the worker


def _baseline_attention_class():
    """BD3CoreAttention whose context-parallel path all-gathers everything (the cp2_allgather
    baseline of the module docstring)."""
    import torch.nn.functional as F

    from megatron_bd3.model.attention import BD3CoreAttention
    from megatron_bd3.model.context_parallel import gather_clean_key_values
    from megatron_bd3.model.masks import training_attention_mask

    class AllGatherEverythingAttention(BD3CoreAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            layout = self.cp_layout
            if attention_mask is not None or layout is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias, packed_seq_params)
            n, L = layout.local_length, layout.seq_length

            def gather(local):  # [n or 2n, b, h, d] this rank's rows -> [L or 2L] global
                halves = [local[:n]] if local.size(0) == n else [local[:n], local[n:]]
                return torch.cat([gather_clean_key_values(h, layout, self.cp_group)
                                  for h in halves])

            q, k, v = gather(query), gather(key), gather(value)  # [2L, b, heads, d]
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
            mask = training_attention_mask(L, layout.block_size, "sdpa", q.device)[: q.size(0)]
            out = F.scaled_dot_product_attention(
                q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                attn_mask=mask, scale=self.softmax_scale,
            ).permute(2, 0, 1, 3)  # [2L, b, np, hn], every query of every rank
            rows = [layout.local(out[:L], dim=0)]
            if out.size(0) == 2 * L:
                rows.append(layout.local(out[L:], dim=0))
            out = torch.cat(rows).contiguous()  # [n or 2n, b, np, hn], this rank's queries
            return out.view(out.size(0), out.size(1), self.hidden_size_per_partition)

    return AllGatherEverythingAttention


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    from megatron_bd3.model import (
        BD3Config,
        BD3LossInputs,
        BD3Model,
        get_bd3_layer_spec,
        loss_func,
        reference_architecture,
    )
    from megatron_bd3.model.context_parallel import exchange_meter
    from megatron_bd3.parallel import (
        ParallelConfig,
        cpu_safe_config_overrides,
        destroy_parallel,
        initialize_parallel,
    )

    cuda = args.device == "cuda"
    cp = 1 if args.case == "cp1" else 2
    info = initialize_parallel(ParallelConfig(context_parallel_size=cp, seed=1))
    L, m = args.seq_length, MODEL
    settings = reference_architecture(dropout=0.0)
    settings.update(cpu_safe_config_overrides())
    config = BD3Config(**settings, seq_length=L, block_size=m["block_size"],
                       vocab_size=m["vocab_size"], mask_token_id=m["vocab_size"] - 1,
                       num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                       num_attention_heads=m["num_attention_heads"],
                       ffn_hidden_size=m["ffn_hidden_size"], context_parallel_size=cp,
                       cp_comm_type="p2p" if args.case == "cp2_p2p" else "all_gather",
                       attention_kernel="flex" if cuda else "sdpa")
    spec = get_bd3_layer_spec(config)
    if args.case == "cp2_allgather":
        spec.submodules.self_attention.submodules.core_attention = _baseline_attention_class()
    torch.manual_seed(1)
    model = BD3Model(config, transformer_layer_spec=spec)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    model.to(device)

    generator = torch.Generator().manual_seed(2)
    b = m["micro_batch_size"]
    x_0 = torch.randint(0, m["vocab_size"] - 1, (b, L), generator=generator)
    masked = torch.rand(b, L, generator=generator) < 0.5
    x_t = torch.where(masked, torch.full_like(x_0, m["vocab_size"] - 1), x_0)
    weight = 1.0 + torch.rand(b, L, generator=generator)
    x_0, x_t, masked, weight = (t.to(device) for t in (x_0, x_t, masked, weight))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        token_loss = model(x_t, x_0, BD3LossInputs(masked, weight))
        loss_sum, num_tokens, report = loss_func(None, token_loss, cp)
        (loss_sum / num_tokens).backward()
        return report["lm loss"]

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _current_rss_bytes()
    walls, cpus, sent, report = [], [], None, None
    for index in range(1 + args.steps):  # the first step warms up (and builds the masks)
        exchange_meter.reset()
        start, start_cpu = time.perf_counter(), time.process_time()
        report = step()
        if cuda:
            torch.cuda.synchronize()
        if index:
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
        sent = exchange_meter.forward_bytes + exchange_meter.backward_bytes
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    total = report.double().cpu()
    if cp > 1:
        torch.distributed.all_reduce(total)
    walls.sort()
    cpus.sort()
    print("RESULT " + json.dumps({
        "case": args.case, "seq_length": L, "rank": info.rank, "cp": cp,
        "peak_memory_bytes": int(peak), "step_seconds": walls[len(walls) // 2],
        "step_cpu_seconds": cpus[len(cpus) // 2],
        "bytes_sent_per_step": int(sent), "loss": float(total[0] / total[1]),
    }), flush=True)
    destroy_parallel()


# ------------------------------------------------------------------------------ the launcher


def attention_flops(seq_length: int, cp: int) -> dict[str, float]:
    """Attention matmul FLOPs (forward + backward, 3x forward) of one sequence, summed over the
    CP ranks, for the benchmark network: our scheme (the mask's density, whatever CP) against
    the dense-mask approach (every rank computes all [2L, 2L] scores)."""
    from megatron_bd3.training.flops import matmul_flops

    m = MODEL
    common = dict(num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                  ffn_hidden_size=m["ffn_hidden_size"],
                  num_attention_heads=m["num_attention_heads"], num_query_groups=None,
                  vocab_size=m["vocab_size"], stream_length=2 * seq_length,
                  logit_positions=seq_length)

    def attention_only(density: float) -> float:
        return 3.0 * (matmul_flops(**common, density=density) - matmul_flops(**common, density=0))

    density = 0.25 + m["block_size"] / (4.0 * seq_length)
    return {"ours": attention_only(density), "dense_mask": cp * attention_only(1.0),
            "model_total_ours": 3.0 * matmul_flops(**common, density=density)}


def run_case(case: str, seq_length: int, steps: int, device: str) -> list[dict]:
    nproc = 1 if case == "cp1" else 2
    env = dict(os.environ, DS_ACCELERATOR="cpu" if device == "cpu" else "cuda",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT),
                                                      os.environ.get("PYTHONPATH")) if p))
    with tempfile.TemporaryDirectory(prefix="long-context-") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", f"--log-dir={logs}",
               "--redirects=3", "-m", "tools.bench.long_context_bench", "--worker",
               "--case", case, "--seq-length", str(seq_length), "--steps", str(steps),
               "--device", device]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        outputs = "".join(p.read_text() for p in sorted(Path(logs).glob("*/attempt_*/*/*.log")))
    results = [json.loads(line[len("RESULT "):]) for line in outputs.splitlines()
               if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(results) != nproc:
        raise RuntimeError(f"{case} L={seq_length} failed:\n{proc.stderr[-3000:]}\n"
                           f"{outputs[-3000:]}")
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--output", default="runs/bench/long_context.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--seq-length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    from tools.bench import common

    record = {"machine": common.machine(), "versions": common.versions(), "model": MODEL,
              "command": " ".join(sys.argv), "load_before": os.getloadavg(), "rows": []}
    print("| L | case | peak memory MiB/rank | step s | step CPU s | MiB sent/step/rank | loss |")
    print("|---|---|---|---|---|---|---|")
    for seq_length in args.lengths:
        for case in args.cases:
            results = run_case(case, seq_length, args.steps, args.device)
            row = {
                "seq_length": seq_length, "case": case,
                "peak_memory_bytes": max(r["peak_memory_bytes"] for r in results),
                "step_seconds": max(r["step_seconds"] for r in results),
                "step_cpu_seconds": max(r["step_cpu_seconds"] for r in results),
                "bytes_sent_per_step": max(r["bytes_sent_per_step"] for r in results),
                "loss": results[0]["loss"], "ranks": results, "load": os.getloadavg()[0],
            }
            record["rows"].append(row)
            print(f"| {seq_length} | {case} | {row['peak_memory_bytes'] / 2**20:.0f} | "
                  f"{row['step_seconds']:.2f} | {row['step_cpu_seconds']:.2f} | "
                  f"{row['bytes_sent_per_step'] / 2**20:.1f} | "
                  f"{row['loss']:.5f} |", flush=True)
        record.setdefault("flops", {})[seq_length] = attention_flops(seq_length, 2)
    record["load_after"] = os.getloadavg()
    print("\nattention FLOPs per sequence (forward + backward, all ranks), CP = 2:")
    for seq_length, flops in record["flops"].items():
        print(f"  L = {seq_length}: ours {flops['ours']:.3e}, dense-mask approach "
              f"{flops['dense_mask']:.3e} ({flops['dense_mask'] / flops['ours']:.2f}x); "
              f"whole model (ours) {flops['model_total_ours']:.3e}")
    output = REPO_ROOT / args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
