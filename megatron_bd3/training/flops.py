"""Model FLOPs per training step and the peak FLOP/s that MFU divides by.

Counting (matmul FLOPs, 2 per multiply-add; training = 3x forward: backward is twice the
forward; activation recompute is *not* counted, as in the usual MFU definition):

    per layer, forward, for a stream of T tokens per sequence:
        QKV projection    2 T h (h + 2 d_kv)            d_kv = query groups x head dim
        scores  QK^T      2 T^2 h  x rho                 rho = density of the attention mask
        weighted sum AV   2 T^2 h  x rho
        output proj       2 T h^2
        MLP               2 T h f x 2                    f = ffn hidden size
    logits                2 L_out h V                    only the positions that get logits

BD3 trains on the two-stream input [x_t ; x_0]: T = 2L, L_out = L (only x_t gets logits), and
the 2L x 2L block-diffusion mask has density

    rho = (L B + L^2) / (2L)^2 = 1/4 + B / (4L)

(L B entries on the noisy block diagonal, B^2 N(N-1)/2 noisy->earlier clean, B^2 N(N+1)/2
clean->clean; N = L / B). So the attention term is charged only for the entries the sparse
(FlexAttention) kernel computes. The AR preset is B = 1 of the same two-stream model
(rho = 1/4 + 1/(4L)); the single-stream MDLM (B = L, x_t alone, T = L) has rho = 1.
Context parallelism changes none of these terms: the ranks split the same work, and the clean
key/value exchange is communication (docs/training.md §4).
"""

from __future__ import annotations

import time

import torch


def attention_density(config) -> float:
    """Fraction of the T x T score matrix the mask allows: 1 for the single-stream B = L model
    (one bidirectional block), 1/4 + B / (4L) for the two-stream [x_t ; x_0] input."""
    if config.single_stream:
        return 1.0
    return 0.25 + config.block_size / (4.0 * config.seq_length)


def matmul_flops(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None,
    vocab_size: int,
    stream_length: int,
    density: float,
    logit_positions: int,
) -> float:
    """Forward matmul FLOPs of one sequence of `stream_length` tokens per layer under a mask of
    `density`, with logits at `logit_positions` positions (the module docstring's terms)."""
    h, f, t = hidden_size, ffn_hidden_size, stream_length
    d_kv = (num_query_groups or num_attention_heads) * (h // num_attention_heads)
    per_layer = (
        2 * t * h * (h + 2 * d_kv) + 2 * 2 * t * t * h * density + 2 * t * h * h
        + 2 * 2 * t * h * f
    )
    return float(num_layers * per_layer + 2 * logit_positions * h * vocab_size)


def forward_flops_per_sequence(config) -> float:
    """Forward matmul FLOPs of one sequence for a model config (a BD3Config; see the module
    docstring). The stream length and the mask follow from the config itself: 2L for every
    two-stream model (AR is B = 1, MDLM with single_stream_mdlm=False is B = L), L for the
    single-stream MDLM; logits only for the L noisy positions."""
    return matmul_flops(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups, vocab_size=config.vocab_size,
        stream_length=config.stream_length, density=attention_density(config),
        logit_positions=config.seq_length,
    )


def training_flops_per_sequence(config) -> float:
    return 3.0 * forward_flops_per_sequence(config)


# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, by a substring of the name.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12 -- set logging.peak_flops_per_device
    "A100": 312e12,
    "A6000": 155e12,
    "A5000": 111e12,
    "L40S": 362e12,
    "4090": 165e12,
    "3090": 71e12,
}


def measure_cpu_matmul_flops(size: int = 512, seconds: float = 0.3) -> float:
    """Achieved fp32 matmul FLOP/s of this process with its current torch thread count.

    The CPU "peak" used for MFU: a documented, measured stand-in, since a CPU's nominal peak
    (cores x frequency x SIMD width) is rarely reachable by torch.
    """
    generator = torch.Generator().manual_seed(0)  # never touch the training RNG streams
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2.0 * size**3 * count / elapsed


def default_peak_flops(device_type: str, precision: str) -> tuple[float, str]:
    """(peak FLOP/s per device, how it was obtained)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                if precision != "bf16":
                    return peak / 2, f"{name}: half its bf16 table peak (fp32/tf32)"
                return peak, f"{name}: bf16 table peak"
        return 100e12, f"{name}: unknown GPU, assumed 100 TFLOP/s"
    return measure_cpu_matmul_flops(), "CPU: measured fp32 512x512 matmul throughput"
