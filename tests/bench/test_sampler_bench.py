"""The sampler benchmark's target verdicts and the machine description they are read with."""

from __future__ import annotations

from tools.bench import common
from tools.bench.sampler_bench import REFERENCE_TOKENS_PER_S, check_targets


def result(tokens_per_s, seconds=1.0):
    return {"tokens_per_s": tokens_per_s, "seconds": seconds}


def test_each_target_is_met_exactly_at_its_threshold():
    by_name = {
        "ref-256-b1-cache": result(3 * REFERENCE_TOKENS_PER_S),
        "ref-256-b16-cache": result(30 * REFERENCE_TOKENS_PER_S - 1),
        "30m-1024-b1-cache": result(50.0, seconds=10.0),
        "30m-1024-b1-nocache": result(5.0, seconds=79.0),
    }
    lines = check_targets(by_name)
    assert len(lines) == 3
    assert lines[0].startswith("target batch 1, 256 tokens:") and lines[0].endswith(": met")
    assert "fp32" in lines[1] and lines[1].endswith("NOT met")
    assert "7.9x wall" in lines[2] and lines[2].endswith("NOT met")


def test_bf16_verdict_names_a_cpu_without_native_bf16():
    by_name = {"ref-256-b16-cache-bf16": result(100.0)}
    (native,) = check_targets(by_name, has_native_bf16=True)
    (emulated,) = check_targets(by_name, has_native_bf16=False)
    assert native.endswith("NOT met")
    assert "no native bf16" in emulated and "no native bf16" not in native


def test_machine_reports_the_vector_isa_and_bf16_support():
    host = common.machine()
    assert host["cpu_capability"] in {"DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512", "SVE256"}
    assert isinstance(host["native_bf16"], bool)
