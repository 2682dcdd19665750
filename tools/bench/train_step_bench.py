"""Training-step time and memory of BD3, MDLM and AR on CPU, in the reference's configurations.

    python -m tools.bench.train_step_bench                       # L 256/512, B 4/16, MDLM, AR
    python -m tools.bench.train_step_bench --lengths 512 --passes 1 --no-memory
    python -m tools.bench.train_step_bench --profile --lengths 512   # + where the time goes

The configurations are those in which the reference's step was timed (docs/bench/vs-reference.md):
4 layers, hidden 256, 4 heads, vocab 8192 (incl. [MASK]), batch 2, fp32, dropout 0.1, AdamW,
random weights, 2 threads, median of 10 steps after 3 warm-ups. Cases:
    bd3-L{L}-B{B}  BD3Model, two streams [x_t ; x_0] (2L tokens), block size B
    mdlm-L{L}      BD3Model with B = L: one stream of L tokens (single_stream_mdlm)
    mdlm2-L{L}     the same with the two-stream input (2L tokens), only with --two-stream-mdlm
    ar-L{L}        the plain causal path: the same network over x_0 alone (L tokens) under a
                   causal mask (SDPA is_causal), next-token cross-entropy. Not the `ar` preset
                   (B = 1 with t = 1, which trains on 2L tokens like any BD3 model).

Each step goes through the real training path: the trainer's noise (megatron_bd3.training.
batches.make_batch -> megatron_bd3.diffusion.noise_batch), megatron-core's forward_backward_func
with megatron_bd3.model.forward_step (SUBS + NELBO) and the trainer's optimizer step
(megatron_bd3.training.step.train_step with its DeepSpeed stepper: ZeRO-0 JSON, torch AdamW,
gradient clipping 1.0), one rank, in-process. The AR case uses the same machinery with a
next-token forward_step defined here.

Timing: all cases are built in ONE process and stepped round-robin (one step of every case per
round), so ratios such as BD3 ÷ AR compare steps taken under the same background load; each
figure is the median over --steps rounds after --warmup steps of every case. Each round takes
the cases in its own seeded random order, so no case always runs right after the same other one
(with a rotated fixed order, bd3-L512-B4 always followed ar-L256 and came out 2-5% slower than
B16 in 3 of 4 passes, which a 3-case rerun in either order did not reproduce: 0.98-0.99). Wall
and CPU time (process_time, both threads) are recorded; per phase: noise, forward (+ NELBO),
backward (+ loss reduction), optimizer (DeepSpeed step incl. clipping). --passes repeats the
whole measurement in a fresh process.

On a shared machine a step is either undisturbed (the process gets its cores: CPU time ≈
threads × wall) or badly disturbed: when another process takes a core, libgomp's default
spin-waiting makes every parallel op wait for the descheduled thread and a 0.45 s step takes
4-10 s. So next to the plain medians the summary gives the medians over the undisturbed steps
(CPU time >= 0.75 × threads × wall), with their count, and ratios over rounds in which both steps
were undisturbed. --spincount sets GOMP_SPINCOUNT in the workers (e.g. 100000: spin briefly,
then sleep), which removes most of the disturbance at no measurable cost on an idle machine. Memory: each case once more in a fresh process of its
own, peak RSS (ru_maxrss, imports included) after a few steps, and the RSS after the imports.
FLOPs: counted per step from the shapes (what the kernels execute; see step_flops), compared
with a measured 2048³ fp32 matmul rate on the same threads.

--without NAME ... switches speed-ups of megatron_bd3.model off in the worker processes (each is
a BD3Config field, set to False in every case's config) to measure what each one buys; all four
off is the model as it was before them:
    block_attention  cpu_block_attention: the training mask as SDPA with the dense mask in two
                     calls
    x_t_last_layer   x_t_only_last_layer: the last layer computes the x_0 queries too
    short_forward    short_self_attention_forward: megatron's SelfAttention.forward (its RoPE;
                     implies x_t_last_layer)
    masked_logits    masked_only_logits: all L x_t positions projected onto the vocabulary,
                     megatron's vocab-parallel cross-entropy
(MDLM on the two-stream input is the case mdlm2, --two-stream-mdlm.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

LAYERS, HIDDEN, HEADS, VOCAB, FFN = 4, 256, 4, 8192, 1024
MASK_ID = VOCAB - 1
BATCH = 2
DROPOUT = 0.1
LR = 3e-4
# The reference's figures (reference-bench.md), seconds / GiB, for the report table.
REFERENCE = {
    "bd3-L256-B4": 0.54, "bd3-L256-B16": 0.59, "mdlm2-L256": 0.58, "mdlm-L256": 0.31,
    "ar-L256": 0.30, "bd3-L512-B4": 1.41, "bd3-L512-B16": 1.41, "mdlm2-L512": 1.40,
    "mdlm-L512": 0.81, "ar-L512": 0.61,
}
REFERENCE_RSS = {"bd3-L256": 0.90, "ar-L256": 0.70, "bd3-L512": 1.05, "ar-L512": 0.78}


@dataclass(frozen=True)
class Case:
    kind: str  # "bd3" | "mdlm" | "mdlm2" | "ar"
    seq_length: int
    block_size: int

    @property
    def name(self) -> str:
        if self.kind == "bd3":
            return f"bd3-L{self.seq_length}-B{self.block_size}"
        return f"{self.kind}-L{self.seq_length}"

    @property
    def tokens(self) -> int:
        """Tokens through the network per sequence."""
        return 2 * self.seq_length if self.kind in ("bd3", "mdlm2") else self.seq_length


def plan(lengths: list[int], blocks: list[int], two_stream_mdlm: bool) -> list[Case]:
    cases = []
    for L in lengths:
        cases += [Case("bd3", L, B) for B in blocks]
        cases.append(Case("mdlm", L, L))
        if two_stream_mdlm:
            cases.append(Case("mdlm2", L, L))
        cases.append(Case("ar", L, L))
    return cases


def parse_case(name: str) -> Case:
    parts = name.split("-")
    kind, L = parts[0], int(parts[1][1:])
    B = int(parts[2][1:]) if kind == "bd3" else L
    return Case(kind, L, B)


# --without name -> the BD3Config switch it turns off (see the module docstring).
ABLATIONS = {
    "block_attention": "cpu_block_attention",
    "x_t_last_layer": "x_t_only_last_layer",
    "short_forward": "short_self_attention_forward",
    "masked_logits": "masked_only_logits",
}


def ablation_overrides(names: list[str]) -> dict[str, bool]:
    """BD3Config overrides that switch the named speed-ups off."""
    unknown = [name for name in names if name not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation {unknown[0]!r}; choose from {tuple(ABLATIONS)}")
    return {ABLATIONS[name]: False for name in names}


# -- building one case -------------------------------------------------------------------------


def model_config(case: Case, without: list[str] = ()):
    from megatron_bd3.model import bd3_config, mdlm_config, reference_architecture
    from megatron_bd3.parallel import cpu_safe_config_overrides

    overrides = {**reference_architecture(dropout=DROPOUT), **cpu_safe_config_overrides()}
    overrides.update(attention_kernel="sdpa", ffn_hidden_size=FFN)
    overrides.update(ablation_overrides(list(without)))
    size = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                vocab_size=VOCAB, mask_token_id=MASK_ID, seq_length=case.seq_length)
    if case.kind == "mdlm":
        return mdlm_config(**size, **overrides)
    if case.kind == "mdlm2":
        return mdlm_config(**size, single_stream_mdlm=False, **overrides)
    # AR reads only the network: the block size of its config is never used.
    return bd3_config(block_size=case.block_size, **size, **overrides)


def causal_lm_logits(model, tokens, attention_mask=None):
    """Logits [L, b, vocab_size] (TP = 1) of one causal pass over `tokens` [b, L] (positions
    0 .. L-1) through a single-stage BD3Model's modules: the plain AR network the benches compare
    BD3 with. The decoder gets `attention_mask` as the caller's own mask, by default
    AttentionPattern.CAUSAL (SDPA with is_causal, no mask tensor; not a tensor, so no activation
    recompute)."""
    from megatron_bd3.model import AttentionPattern

    if attention_mask is None:
        attention_mask = AttentionPattern.CAUSAL
    L = tokens.size(1)
    hidden = model.embedding(input_ids=tokens, position_ids=None)  # [L, b, h]
    rotary = model.rotary_pos_emb(L).to(tokens.device) if model.rotary_pos_emb else None
    hidden = model.decoder(
        hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary
    )  # [L, b, h], final norm applied
    weight = None
    if model.share_embeddings_and_output_weights:
        weight = model.shared_embedding_or_output_weight()
    logits, _ = model.output_layer(hidden, weight=weight)  # [L, b, V_pad]
    return logits[..., : model.vocab_size]  # a view; padded rows cut off


def ar_forward_step(data_iterator, model):
    """Next-token cross-entropy of a causal pass over x_0 (L tokens): the plain AR step."""
    import torch
    import torch.nn.functional as F

    from megatron_bd3.model import loss_func

    x_0 = next(data_iterator)["x_0"]
    b, L = x_0.shape
    # [L, b, V] as the output layer returns it: take the cross-entropy in that order, so the
    # logits are not copied.
    logits = causal_lm_logits(model, x_0)
    # Position i predicts token i+1; the last position has no target (weight 0 below).
    targets = torch.cat([x_0[:, 1:], x_0[:, :1]], dim=1).t()  # [L, b]
    nll = F.cross_entropy(logits.reshape(L * b, -1), targets.reshape(-1), reduction="none")
    nll = nll.view(L, b).t()  # [b, L]
    loss_mask = torch.ones(b, L)
    loss_mask[:, -1] = 0.0
    return nll * loss_mask, partial(loss_func, loss_mask)


class _Clock:
    """(wall, cpu) marks taken by the step's hooks."""

    def __init__(self) -> None:
        self.marks: dict[str, tuple[float, float]] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = (time.perf_counter(), time.process_time())

    def span(self, start: str, end: str) -> tuple[float, float]:
        (w0, c0), (w1, c1) = self.marks[start], self.marks[end]
        return w1 - w0, c1 - c0


class _TimedStepper:
    """The trainer's stepper with its step() timed (everything else passes through)."""

    def __init__(self, inner, clock: _Clock) -> None:
        self._inner, self._clock = inner, clock

    def step(self, lr: float):
        self._clock.mark("optimizer_start")
        norm = self._inner.step(lr)
        self._clock.mark("optimizer_end")
        return norm

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class Runner:
    """One case: model, DeepSpeed stepper, batches; `step()` runs and times one training step."""

    def __init__(self, case: Case, seed: int = 0, without: list[str] = ()) -> None:
        import torch

        from megatron_bd3.model import build_bd3_model, forward_step
        from megatron_bd3.paths import shipped_config
        from megatron_bd3.training.batches import NoiseSettings
        from megatron_bd3.training.deepspeed_engine import (
            load_deepspeed_json,
            resolve_deepspeed_config,
        )
        from megatron_bd3.training.parallelize import build_deepspeed_stepper

        self.case, self.seed = case, seed
        self.config = model_config(case, without)
        torch.manual_seed(seed)
        self.model = build_bd3_model(self.config)
        ds_config = resolve_deepspeed_config(
            load_deepspeed_json(shipped_config("deepspeed/zero0.json")),
            micro_batch_size=BATCH, gradient_accumulation_steps=1, data_parallel_size=1, lr=LR,
            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_grad=1.0, precision="fp32",
            torch_adam=True,
        )
        self.clock = _Clock()
        stepper = build_deepspeed_stepper([self.model], ds_config, model_config=self.config)
        self.stepper = _TimedStepper(stepper, self.clock)
        inner = ar_forward_step if case.kind == "ar" else forward_step
        self.forward_step = self._timed(inner)
        self.seq_length = case.seq_length if case.kind == "ar" else self.config.stream_length
        self.noise = NoiseSettings(
            block_size=self.config.block_size, mask_token_id=MASK_ID, schedule="loglinear",
            ignore_bos=False, resample=False, antithetic=True, fixed_t=None,
        )
        self.step_index = 0
        self.masked_positions: list[int] = []

    def _timed(self, inner):
        def forward_step(data_iterator, model):
            self.clock.mark("forward_start")
            output = inner(data_iterator, model)
            self.clock.mark("forward_end")
            return output

        return forward_step

    def _batch(self) -> dict[str, Any]:
        import torch

        from megatron_bd3.diffusion import ClipRange
        from megatron_bd3.training.batches import make_batch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.step_index)
        tokens = torch.randint(0, MASK_ID, (BATCH, self.case.seq_length), generator=generator)
        loader_batch = {"tokens": tokens, "global_batch_position": torch.arange(BATCH)}
        if self.case.kind == "ar":
            return {"x_0": tokens}
        return make_batch(
            loader_batch, settings=self.noise, clip_range=ClipRange(1e-3, 1.0), seed=self.seed,
            step=self.step_index, global_batch_size=BATCH,
        )

    def step(self) -> dict[str, float]:
        from megatron_bd3.training.step import train_step

        clock = self.clock
        clock.mark("start")
        batch = self._batch()
        clock.mark("noise_end")
        train_step(
            self.stepper, self.forward_step, [batch], lr=LR, seq_length=self.seq_length,
            micro_batch_size=BATCH,
        )
        clock.mark("end")
        self.step_index += 1
        if "masked" in batch:
            self.masked_positions.append(int(batch["masked"].sum()))
        timing = {}
        for phase, (start, end) in {
            "step": ("start", "end"),
            "noise": ("start", "noise_end"),
            "forward": ("forward_start", "forward_end"),
            "backward": ("forward_end", "optimizer_start"),
            "optimizer": ("optimizer_start", "optimizer_end"),
        }.items():
            timing[f"{phase}_wall"], timing[f"{phase}_cpu"] = clock.span(start, end)
        return timing


# -- FLOPs -----------------------------------------------------------------------------------------


def attention_entries(case: Case) -> tuple[float, float]:
    """(score entries the kernels compute, entries the mask allows) per sequence per head,
    summed over the layers."""
    from megatron_bd3.model.block_attention import chunk_rows

    L, B = case.seq_length, case.block_size
    if case.kind == "ar":
        return LAYERS * L * L, LAYERS * L * (L + 1) / 2  # SDPA is_causal skips no tile at L<768
    if case.kind == "mdlm":
        return LAYERS * L * L, LAYERS * L * L
    C = chunk_rows(L, B)
    chunks = [(s, min(C, L - s)) for s in range(0, L, C)]
    x_t = sum(rows * (s + (0 if rows == B else rows) + rows) for s, rows in chunks)
    x_0 = sum(rows * (s + rows) for s, rows in chunks)
    n = L // B
    allowed_x_t = L * B + B * B * n * (n - 1) / 2
    allowed_x_0 = B * B * n * (n + 1) / 2
    # The last layer computes the x_t queries only.
    return LAYERS * x_t + (LAYERS - 1) * x_0, LAYERS * allowed_x_t + (LAYERS - 1) * allowed_x_0


def step_flops(case: Case, masked_positions: float) -> dict[str, float]:
    """Matmul FLOPs of one training step as executed (forward; training = 3x forward, the usual
    convention: the backward of a matmul is two matmuls of the same size).

    Per sequence: qkv 2·T·h·3h on every token of every layer; attention output and MLP
    2·T'·h·h + 4·T'·h·f on the tokens whose outputs are used (the last BD3 layer only the L x_t
    rows); scores and weighted sum 4·d·heads·entries; output layer 2·h·V per projected position
    (BD3/MDLM: the masked positions only; AR: all L)."""
    L, T = case.seq_length, case.tokens
    h, f = HIDDEN, FFN
    last_rows = L if case.kind == "bd3" else T
    dense = LAYERS * 2 * T * h * 3 * h
    dense += (LAYERS - 1) * (2 * T * h * h + 4 * T * h * f) + 2 * last_rows * h * h
    dense += 4 * last_rows * h * f
    executed_entries, allowed_entries = attention_entries(case)
    attention = 4 * (h // HEADS) * HEADS * executed_entries
    projected = BATCH * L if case.kind == "ar" else masked_positions
    logits = 2 * h * VOCAB * projected
    forward = BATCH * (dense + attention) + logits
    return {
        "forward": forward,
        "training": 3 * forward,
        "attention_training": 3 * BATCH * attention,
        "attention_density": allowed_entries / executed_entries,
        "projected_positions": projected,
    }


# -- workers ----------------------------------------------------------------------------------------


def _init(threads: int) -> None:
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from megatron_bd3.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(seed=0), environ={})


def timing_worker(args: argparse.Namespace) -> dict[str, Any]:
    from tools.bench import common

    _init(args.threads)
    cases = [parse_case(name) for name in args.cases]
    peak_before = common.matmul_flops()
    runners = [Runner(case, without=args.without) for case in cases]
    for runner in runners:
        for _ in range(args.warmup):
            runner.step()
    load = [common.load_average()]
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.steps):
        order = random.Random(r).sample(runners, len(runners))
        rounds.append({runner.case.name: runner.step() for runner in order})
        load.append(common.load_average())
    peak_after = common.matmul_flops()
    profiles = {}
    if args.profile:
        for runner in runners:
            profiles[runner.case.name] = profile_case(runner, args.profile_steps)
    masked = {
        runner.case.name: common.median(runner.masked_positions) for runner in runners
    }
    return {
        "rounds": rounds,
        "load": load,
        "matmul_flops": {"before": peak_before, "after": peak_after},
        "masked_positions": masked,
        "profiles": profiles,
    }


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    from tools.bench import common

    _init(args.threads)
    import deepspeed  # noqa: F401  (everything a training process imports)

    import megatron_bd3.model  # noqa: F401
    import megatron_bd3.training.step  # noqa: F401

    imports_gib = common.peak_rss_gib()
    runner = Runner(parse_case(args.cases[0]), without=args.without)
    steps = [runner.step() for _ in range(args.steps)]
    return {
        "imports_rss_gib": imports_gib,
        "peak_rss_gib": common.peak_rss_gib(),
        "memory_run_step_wall": common.median([s["step_wall"] for s in steps[1:]]),
    }


# -- profile ---------------------------------------------------------------------------------------

CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("attention kernels", ("flash_attention",)),
    ("dropout RNG", ("aten::bernoulli",)),
    ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("copies / fills / cat", ("aten::copy_", "aten::fill_", "aten::cat", "aten::zero_",
                              "aten::index", "aten::masked_scatter", "aten::clone")),
)


def profile_case(runner: Runner, steps: int) -> dict[str, Any]:
    """Self CPU time per op category (ms per step, torch.profiler) and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step()
    events = prof.key_averages()
    buckets: dict[str, float] = {}
    top = []
    for event in events:
        ms = event.self_cpu_time_total / 1e3 / steps
        if ms <= 0:
            continue
        category = "other"
        for name, keys in CATEGORIES:
            if any(key in event.key for key in keys):
                category = name
                break
        buckets[category] = buckets.get(category, 0.0) + ms
        top.append((ms, event.key, event.count // steps))
    top.sort(reverse=True)
    return {
        "self_ms_per_step": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        "total_ms_per_step": sum(buckets.values()),
        "top_ops": [{"op": key, "ms": round(ms, 2), "calls": n} for ms, key, n in top[:15]],
    }


# -- driver ----------------------------------------------------------------------------------------


def _run_worker(mode: str, cases: list[str], args: argparse.Namespace, steps: int) -> dict:
    cmd = [sys.executable, "-m", "tools.bench.train_step_bench", "--worker", mode,
           "--threads", str(args.threads), "--steps", str(steps), "--warmup", str(args.warmup),
           "--profile-steps", str(args.profile_steps), "--cases", *cases]
    if args.without:
        cmd += ["--without", *args.without]
    if args.profile and mode == "timing":
        cmd.append("--profile")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu",
               WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    if args.spincount is not None:
        env["GOMP_SPINCOUNT"] = str(args.spincount)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} worker for {cases} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(
    cases: list[Case], passes: list[dict], memory: dict[str, dict], without: list[str],
    threads: int,
) -> dict[str, Any]:
    """Per case medians over all rounds of all passes; ratios from steps of the same round.
    FLOPs count the work of the full model (no --without); with ablations they are left out."""
    from tools.bench.common import median

    def undisturbed(step: dict[str, float]) -> bool:
        return step["step_cpu"] >= 0.75 * threads * step["step_wall"]

    rounds = [r for p in passes for r in p["rounds"]]
    masked = {c.name: median([p["masked_positions"][c.name] for p in passes]) for c in cases}
    peak = median([p["matmul_flops"][k]["median"] for p in passes for k in ("before", "after")])
    rows = {}
    for case in cases:
        steps = [r[case.name] for r in rounds]
        row = {key: median([s[key] for s in steps]) for key in steps[0]}
        quiet = [s for s in steps if undisturbed(s)]
        row["undisturbed_steps"] = f"{len(quiet)}/{len(steps)}"
        for key in ("step_wall", "step_cpu", "forward_wall", "backward_wall", "optimizer_wall"):
            row[f"{key}_undisturbed"] = median([s[key] for s in quiet])
        flops = None if without else step_flops(case, masked[case.name])
        row.update(
            case=case.name, kind=case.kind, L=case.seq_length, B=case.block_size,
            tokens_through_net=case.tokens, flops=flops, masked_positions=masked[case.name],
            matmul_peak_fraction=flops["training"] / row["step_wall"] / peak if flops else None,
            reference_s=REFERENCE.get(case.name),
            per_pass_step_wall=[
                median([r[case.name]["step_wall"] for r in p["rounds"]]) for p in passes
            ],
        )
        row.update(memory.get(case.name, {}))
        rows[case.name] = row

    def ratio(a: str, b: str, key: str = "step_wall", quiet: bool = False) -> float | None:
        if a not in rows or b not in rows:
            return None
        both = [r for r in rounds if not quiet or (undisturbed(r[a]) and undisturbed(r[b]))]
        return median([r[a][key] / r[b][key] for r in both])

    def ratios_of(a: str, b: str) -> dict[str, Any]:
        both = sum(undisturbed(r[a]) and undisturbed(r[b]) for r in rounds)
        return {
            "wall": ratio(a, b), "cpu": ratio(a, b, "step_cpu"),
            "wall_undisturbed": ratio(a, b, quiet=True), "undisturbed_rounds": both,
        }

    ratios = {}
    for L in sorted({c.seq_length for c in cases}):
        ar = f"ar-L{L}"
        for c in cases:
            if c.seq_length == L and c.kind != "ar" and ar in rows:
                ratios[f"{c.name} / {ar}"] = ratios_of(c.name, ar)
        b4, b16 = f"bd3-L{L}-B4", f"bd3-L{L}-B16"
        if b4 in rows and b16 in rows:
            ratios[f"{b4} / {b16}"] = ratios_of(b4, b16)
    return {"cases": rows, "ratios": ratios, "matmul_flops_2048": peak}


def render(summary: dict[str, Any]) -> str:
    lines = [
        "| case | tokens/seq | step s (wall) | step s (CPU) | undisturbed: step s (wall), "
        "steps | noise | fwd | bwd | opt | reference s | peak RSS GiB (imports) | GFLOP/step "
        "| % of matmul rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["cases"].values():
        rss = "–"
        if "peak_rss_gib" in row:
            rss = f"{row['peak_rss_gib']:.2f} ({row['imports_rss_gib']:.2f})"
        ref = f"{row['reference_s']:.2f}" if row["reference_s"] else "–"
        gflop, fraction = "–", "–"
        if row["flops"]:
            gflop = f"{row['flops']['training'] / 1e9:.1f}"
            fraction = f"{100 * row['matmul_peak_fraction']:.0f}%"
        lines.append(
            f"| {row['case']} | {row['tokens_through_net']} | {row['step_wall']:.3f} | "
            f"{row['step_cpu']:.3f} | {row['step_wall_undisturbed']:.3f}, "
            f"{row['undisturbed_steps']} | {row['noise_wall']:.3f} | {row['forward_wall']:.3f} | "
            f"{row['backward_wall']:.3f} | {row['optimizer_wall']:.3f} | {ref} | {rss} | "
            f"{gflop} | {fraction} |"
        )
    lines += [
        "",
        "| ratio (median over rounds) | wall | CPU | wall, undisturbed rounds (count) |",
        "|---|---|---|---|",
    ]
    for name, value in summary["ratios"].items():
        quiet = value["wall_undisturbed"]
        quiet = f"{quiet:.2f} ({value['undisturbed_rounds']})" if quiet == quiet else "–"
        lines.append(f"| {name} | {value['wall']:.2f} | {value['cpu']:.2f} | {quiet} |")
    lines.append("")
    lines.append(f"fp32 2048³ matmul rate: {summary['matmul_flops_2048'] / 1e9:.1f} GFLOP/s")
    return "\n".join(lines)


def render_profiles(passes: list[dict]) -> str:
    out = []
    for name, prof in passes[0].get("profiles", {}).items():
        buckets = ", ".join(f"{k} {v:.0f}" for k, v in prof["self_ms_per_step"].items())
        out.append(f"{name}: {prof['total_ms_per_step']:.0f} ms self CPU/step: {buckets}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tools.bench import common

    cases = args.case_list or plan(args.lengths, args.blocks, args.two_stream_mdlm)
    names = [c.name for c in cases]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": common.machine(), "versions": common.versions(), "threads": args.threads,
        "settings": {"steps": args.steps, "warmup": args.warmup, "passes": args.passes,
                     "without": args.without, "gomp_spincount": args.spincount,
                     "batch": BATCH, "layers": LAYERS, "hidden": HIDDEN, "heads": HEADS,
                     "vocab": VOCAB, "dropout": DROPOUT, "optimizer": "DeepSpeed ZeRO-0, torch "
                     "AdamW, clip 1.0"},
    }
    passes = []
    for i in range(args.passes):
        print(f"timing pass {i + 1}/{args.passes}: {', '.join(names)}", flush=True)
        passes.append(_run_worker("timing", names, args, args.steps))
    memory = {}
    if args.memory:
        for name in names:
            print(f"memory: {name}", flush=True)
            memory[name] = _run_worker("memory", [name], args, args.memory_steps)
    summary = summarize(cases, passes, memory, args.without, args.threads)
    result.update(summary)
    result["passes"] = passes
    result["load_average"] = [p["load"] for p in passes]
    result["seconds"] = time.perf_counter() - started
    print()
    print(render(summary))
    loads = [x for p in passes for x in p["load"]]
    print(f"load average during timing: {min(loads):.1f} – {max(loads):.1f} "
          f"on {os.cpu_count()} cores; {result['seconds']:.0f} s in all")
    if args.profile:
        print(render_profiles(passes))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--cases", nargs="+", default=None,
                        help="explicit case names, e.g. bd3-L512-B16 ar-L512")
    parser.add_argument("--two-stream-mdlm", action="store_true",
                        help="also time MDLM on the two-stream input (mdlm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spincount", type=int, default=None,
                        help="GOMP_SPINCOUNT for the workers (default: libgomp's own)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (rounds)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2, help="timing processes")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--without", nargs="+", default=[], choices=tuple(ABLATIONS),
                        help="switch these model speed-ups off (BD3Config fields set to False)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--json", default=str(REPO_ROOT / "runs/bench/train_step.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--worker", choices=("timing", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker = timing_worker if args.worker == "timing" else memory_worker
        print("RESULT " + json.dumps(worker(args), default=float), flush=True)
        return 0
    args.case_list = [parse_case(name) for name in args.cases] if args.cases else None
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

