"""Speed and memory of the BD3 core attention kernels and of a BD3 vs AR training step.

    python -m tools.bench.model_bench                 # everything, prints markdown tables
    python -m tools.bench.model_bench --part attention --lengths 256 512
    python -m tools.bench.model_bench --part step

Part "attention": one core-attention call over the two-stream sequence (2L tokens, B = 16,
8 heads × 64) for L in --lengths and batch in --batches, with
    flex      BD3CoreAttention + FlexAttention BlockMask (compiled; on CPU forward only, because
              FlexAttention has no CPU backward; compile time reported separately)
    sdpa      BD3CoreAttention's own attention (attention_mask=None) with attention_kernel
              'sdpa', forward + backward: block by block on CPU (block_attention.py), else the
              dense mask in two calls that skip the all-False clean-query × noisy-key quadrant
    sdpa_dense  the same mask handed over as a caller's own bool mask: one SDPA call over the
              full 2L × 2L, to show what the structured paths save
    megatron  megatron-core's DotProductAttention with the same mask inverted to its convention
              (True = masked out), forward + backward
Part "step": one optimizer-free training step (forward + backward) of the same BD3Model weights
    BD3  two streams [x_t ; x_0] (2L tokens) under the BD3 mask, SUBS + NELBO loss, with
         --step-kernel (auto: flex with CUDA, sdpa on CPU)
    AR   one stream of L tokens under a dense causal mask (SDPA; the caller's own mask through
         the decoder, tools.bench.train_step_bench.causal_lm_logits), next-token cross-entropy
and their ratio.

Timing: the fastest wall time of --repeats runs after one warm-up run (the machine is shared,
so the minimum is the least load-dependent statistic; BD3 and AR steps are interleaved so both
see the same background load). Memory: peak resident set size
of the process above its level before the run, sampled every millisecond by a thread (CPU has no
allocator high-water mark; glibc is told to unmap freed tensor buffers so RSS follows live
memory); with CUDA, torch.cuda.max_memory_allocated is used instead.
Combinations whose estimated time per run exceeds --max-seconds (extrapolated as L² from the
shortest measured length), or whose megatron score matrices would exceed --max-gib, are skipped
and listed as such.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BLOCK_SIZE = 16
HEADS, HEAD_DIM = 8, 64


# -- measurement ------------------------------------------------------------------------------------


def _return_freed_memory_to_the_os() -> None:
    """Make RSS follow live tensor memory: glibc otherwise raises its mmap threshold after the
    first large free and keeps later tensors in the heap, where freed memory stays resident and
    a second run shows no growth at all. A fixed 128 KiB threshold mmaps every tensor buffer and
    unmaps it on free."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the starting level during a `with` block (bytes)."""

    def __enter__(self) -> PeakMemory:
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def measure(*runs: Callable[[], None], repeats: int) -> list[tuple[float, float, float]]:
    """[(fastest wall seconds, fastest process CPU seconds, peak MiB)] per run, after one
    warm-up call each. Several runs are interleaved (a, b, a, b, ...) so that they see the same
    background load. CPU time (all threads of this process) is the load-independent measure of
    work on a shared machine; wall time is what a user waits."""
    for run in runs:
        run()
    walls: list[list[float]] = [[] for _ in runs]
    cpus: list[list[float]] = [[] for _ in runs]
    peaks = [0.0 for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            with PeakMemory() as memory:
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                walls[i].append(time.perf_counter() - start)
                cpus[i].append(time.process_time() - start_cpu)
            peaks[i] = max(peaks[i], memory.mib)
    return [(min(w), min(c), p) for w, c, p in zip(walls, cpus, peaks, strict=True)]


# -- part 1: core attention -------------------------------------------------------------------------


def _attention_config(seq_length: int, kernel: str):
    from megatron_bd3.model import BD3Config
    from megatron_bd3.parallel import cpu_safe_config_overrides

    return BD3Config(
        seq_length=seq_length,
        block_size=BLOCK_SIZE,
        vocab_size=128,
        mask_token_id=127,
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        attention_kernel=kernel,
        attention_dropout=0.0,
        compile_flex=True,
        **cpu_safe_config_overrides(),
    )


def _attention_case(kernel: str, seq_length: int, batch: int, device: torch.device):
    """Returns (run, mode): a closure doing one call (and backward unless forward-only)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_bd3.model import BD3CoreAttention, to_megatron_mask, training_attention_mask

    config = _attention_config(seq_length, "flex" if kernel == "flex" else "sdpa")
    cls = DotProductAttention if kernel == "megatron" else BD3CoreAttention
    module = cls(
        config=config,
        layer_number=1,
        attn_mask_type=AttnMaskType.arbitrary,
        attention_type="self",
    ).to(device)
    # flex / sdpa: the core attention's own attention (None); the other two get the dense mask.
    mask = None
    if kernel in ("megatron", "sdpa_dense"):
        mask = training_attention_mask(seq_length, BLOCK_SIZE, "sdpa", device)
    if kernel == "megatron":
        mask = to_megatron_mask(mask)
    forward_only = kernel == "flex" and device.type == "cpu"
    s = 2 * seq_length
    q, k, v = (
        torch.randn(s, batch, HEADS, HEAD_DIM, device=device, requires_grad=not forward_only)
        for _ in range(3)
    )

    def run() -> None:
        if forward_only:
            with torch.no_grad():
                module(q, k, v, mask)
        else:
            module(q, k, v, mask).sum().backward()

    return run, "fwd" if forward_only else "fwd+bwd"


def bench_attention(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for kernel in args.kernels:
        for batch in args.batches:
            base: tuple[int, float] | None = None  # (L, seconds) of the shortest measured run
            for seq_length in sorted(args.lengths):
                row = dict(kernel=kernel, L=seq_length, batch=batch)
                s = 2 * seq_length
                score_gib = batch * HEADS * s * s * 4 / 2**30
                estimate = base[1] * (seq_length / base[0]) ** 2 if base else 0.0
                if kernel == "megatron" and 4 * score_gib > args.max_gib:
                    row.update(skipped=f"4 score buffers ≈ {4 * score_gib:.1f} GiB")
                elif estimate > args.max_seconds:
                    row.update(skipped=f"estimated {estimate:.0f} s per run")
                else:
                    compile_s = None
                    start = time.perf_counter()
                    run, mode = _attention_case(kernel, seq_length, batch, device)
                    if kernel == "flex":
                        run()  # first call compiles for this shape
                        compile_s = time.perf_counter() - start
                    [(seconds, _, mib)] = measure(run, repeats=args.repeats)
                    base = base or (seq_length, seconds)
                    row.update(mode=mode, ms=seconds * 1e3, peak_mib=mib, compile_s=compile_s)
                rows.append(row)
                print(_attention_line(row), flush=True)
    return rows


def _attention_line(row: dict[str, Any]) -> str:
    head = f"| {row['kernel']} | {row['L']} | {row['batch']} |"
    if "skipped" in row:
        return f"{head} – | skipped ({row['skipped']}) | – | – |"
    compile_s = f"{row['compile_s']:.1f}" if row.get("compile_s") else "–"
    return f"{head} {row['mode']} | {row['ms']:.1f} | {row['peak_mib']:.0f} | {compile_s} |"


# -- part 2: BD3 step vs AR step --------------------------------------------------------------------


def _step_model(shape: dict[str, int], seq_length: int, device: torch.device, kernel: str):
    from megatron_bd3.model import BD3Model, bd3_config, reference_architecture
    from megatron_bd3.parallel import cpu_safe_config_overrides

    config = bd3_config(
        seq_length=seq_length,
        block_size=BLOCK_SIZE,
        mask_token_id=shape["vocab"] - 1,
        vocab_size=shape["vocab"],
        num_layers=shape["layers"],
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        attention_kernel=kernel,
        **{**reference_architecture(dropout=0.0), **cpu_safe_config_overrides()},
    )
    torch.manual_seed(0)
    return BD3Model(config).to(device).train()


def _step_cases(model, batch: int, device: torch.device):
    from megatron_bd3.diffusion import noise_batch
    from megatron_bd3.model import BD3LossInputs, loss_func
    from tools.bench.train_step_bench import causal_lm_logits

    config = model.config
    L = config.seq_length
    x_0 = torch.randint(0, config.vocab_size - 1, (batch, L), device=device)
    noised = noise_batch(
        x_0, torch.arange(batch), batch, 0, 0, config.block_size, config.mask_token_id
    )
    inputs = BD3LossInputs(noised.masked, noised.loss_weight)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=device))

    def bd3_step() -> None:
        model.zero_grad(set_to_none=True)
        loss_sum, num_tokens, _ = loss_func(None, model(noised.x_t, x_0, inputs))
        (loss_sum / num_tokens).backward()

    def ar_step() -> None:
        model.zero_grad(set_to_none=True)
        logits = causal_lm_logits(model, x_0, causal).transpose(0, 1)  # [b, L, V]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x_0[:, 1:].reshape(-1)
        )
        loss.backward()

    return bd3_step, ar_step


STEP_SHAPES = {
    "small": dict(layers=4, hidden=256, heads=4, vocab=4096),
    "reference": dict(layers=12, hidden=768, heads=12, vocab=50258),
}


def bench_step(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    plan = [("small", L, args.step_batch) for L in args.step_lengths]
    plan += [("reference", L, 1) for L in args.reference_lengths]
    for shape_name, seq_length, batch in plan:
        model = _step_model(STEP_SHAPES[shape_name], seq_length, device, args.step_kernel)
        bd3_step, ar_step = _step_cases(model, batch, device)
        (bd3_s, bd3_cpu, bd3_mib), (ar_s, ar_cpu, ar_mib) = measure(
            bd3_step, ar_step, repeats=args.repeats
        )
        row = dict(shape=shape_name, L=seq_length, batch=batch, bd3_ms=bd3_s * 1e3)
        row.update(ar_ms=ar_s * 1e3, ratio=bd3_s / ar_s, cpu_ratio=bd3_cpu / ar_cpu)
        row.update(bd3_cpu_ms=bd3_cpu * 1e3, ar_cpu_ms=ar_cpu * 1e3)
        row.update(bd3_mib=bd3_mib, ar_mib=ar_mib)
        rows.append(row)
        print(
            f"| {shape_name} | {seq_length} | {batch} | {row['bd3_ms']:.0f} | {row['ar_ms']:.0f} | "
            f"{row['ratio']:.2f} | {row['bd3_cpu_ms']:.0f} | {row['ar_cpu_ms']:.0f} | "
            f"{row['cpu_ratio']:.2f} | {bd3_mib:.0f} | {ar_mib:.0f} |",
            flush=True,
        )
        del model
    return rows


# -- driver ------------------------------------------------------------------------------------------


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {gpu}, load average {load:.2f} at start"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "attention", "step"), default="all")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=("flex", "sdpa", "sdpa_dense", "megatron"),
        default=["flex", "sdpa", "megatron"],
    )
    parser.add_argument("--step-lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--step-batch", type=int, default=4)
    parser.add_argument(
        "--step-kernel",
        choices=("auto", "flex", "sdpa"),
        default="auto",
        help="BD3 step kernel; auto = flex with CUDA, sdpa on CPU (flex cannot train on CPU)",
    )
    parser.add_argument("--reference-lengths", type=int, nargs="*", default=[512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=12.0)
    parser.add_argument("--max-gib", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from megatron.core import __version__ as megatron_version

    from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    _return_freed_memory_to_the_os()
    info = initialize_parallel(ParallelConfig(seed=0), environ={})
    device = info.device
    print(f"machine: {_machine()}")
    print(
        f"torch {torch.__version__}, megatron-core {megatron_version}, "
        f"python {platform.python_version()}, threads {torch.get_num_threads()}"
    )
    started = time.perf_counter()
    try:
        if args.part in ("all", "attention"):
            print("\n| kernel | L | batch | mode | ms | peak MiB | compile s |")
            print("|---|---|---|---|---|---|---|")
            bench_attention(args, device)
        if args.part in ("all", "step"):
            print(
                "\n| model | L | batch | BD3 wall ms | AR wall ms | wall BD3/AR | BD3 CPU ms "
                "| AR CPU ms | CPU BD3/AR | BD3 MiB | AR MiB |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            bench_step(args, device)
    finally:
        destroy_parallel()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
