"""The sampling settings shared by the 2-rank worker and the single-process run it is compared
with: past the context (40 tokens, L = 16), top-p, an EOS stop."""

from __future__ import annotations

from megatron_bd3.standalone import SamplerConfig

LENGTH = 40


def sampler_config() -> SamplerConfig:
    return SamplerConfig(top_p=0.9, stop_eos_count=1)
