"""Every combination that cannot work is refused at start-up, saying what would work."""

import json

import pytest

from megatron_bd3.paths import shipped_config
from megatron_bd3.training.config import ConfigError, load_config
from megatron_bd3.training.deepspeed_engine import load_deepspeed_json, resolve_deepspeed_config
from megatron_bd3.training.optimizer import (
    Machine,
    check_combination,
    resolve_precision,
    resolve_torch_adam,
)

CPU = Machine("cpu", bf16_supported=True)
CPU_NO_BF16 = Machine("cpu", bf16_supported=False)
GPU = Machine("cuda", bf16_supported=True)


def ds(name):
    return load_deepspeed_json(shipped_config(f"deepspeed/{name}"))


def cfg(*overrides):
    return load_config(data={}, overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides, machine, json_name, world, message",
    [
        (
            ["optimizer.backend=megatron", "deepspeed.config=null"],
            CPU,
            None,
            2,
            "optimizer.backend=megatron needs CUDA",
        ),
        (
            ["parallel.pipeline_model_parallel_size=2"],
            CPU,
            "zero2.json",
            2,
            "ZeRO stage 2 with parallel.pipeline_model_parallel_size 2 cannot work",
        ),
        (
            ["parallel.pipeline_model_parallel_size=2"],
            CPU,
            "zero3.json",
            2,
            "use deepspeed/zero1.json (or zero0.json) with PP > 1",
        ),
        (
            ["parallel.pipeline_model_parallel_size=2"],
            CPU,
            "zero2_offload.json",
            2,
            "ZeRO stage 2 with parallel.pipeline_model_parallel_size 2",
        ),
        (
            ["optimizer.cpu_offload=true"],
            CPU,
            "zero2.json",
            2,
            "use deepspeed.config=deepspeed/zero2_offload.json",
        ),
        (
            ["optimizer.cpu_offload=false"],
            CPU,
            "zero2_offload.json",
            2,
            "optimizer.cpu_offload=false but",
        ),
        (
            ["optimizer.backend=megatron"],
            GPU,
            "zero1.json",
            2,
            "deepspeed.config is only used with optimizer.backend=deepspeed",
        ),
        (
            ["training.precision=bf16"],
            CPU_NO_BF16,
            "zero1.json",
            2,
            "training.precision=bf16 is not supported",
        ),
        (["training.device=cuda"], CPU, "zero1.json", 2, "no CUDA device is available"),
        (
            ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
            CPU,
            "zero2.json",
            2,
            "parallel.sequence_parallel with ZeRO stage 2 cannot work",
        ),
        (
            ["parallel.tensor_model_parallel_size=2"],
            CPU,
            "zero1.json",
            3,
            "world size 3 is not divisible by TP x PP",
        ),
        (
            ["training.global_batch_size=6", "training.micro_batch_size=2"],
            CPU,
            "zero1.json",
            2,
            "training.global_batch_size 6 is not a multiple of training.micro_batch_size 2 x "
            "data-parallel size 2",
        ),
        (
            ["deepspeed.config=null"],
            CPU,
            None,
            2,
            "optimizer.backend=deepspeed needs deepspeed.config",
        ),
    ],
)
def test_refused_combinations(overrides, machine, json_name, world, message):
    config = cfg(*overrides)
    with pytest.raises(ConfigError) as excinfo:
        check_combination(config, machine, ds(json_name) if json_name else None, world)
    assert message in str(excinfo.value)


def test_offload_on_stage_zero_and_param_offload_without_stage_three(tmp_path):
    config = cfg()
    bad = {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="offload_optimizer needs ZeRO stage 1, 2 or 3"):
        check_combination(config, CPU, bad, 2)
    bad = {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="offload_param needs ZeRO stage 3"):
        check_combination(config, CPU, bad, 2)
    bad = {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="supported with PP = 1 only"):
        check_combination(cfg("parallel.pipeline_model_parallel_size=2"), CPU, bad, 2)


@pytest.mark.parametrize(
    "overrides, json_name, world",
    [
        ([], "zero0.json", 2),
        ([], "zero1.json", 2),
        ([], "zero2.json", 2),
        ([], "zero3.json", 2),
        ([], "zero2_offload.json", 1),
        ([], "zero3_offload.json", 1),
        (["parallel.pipeline_model_parallel_size=2"], "zero1.json", 2),
        (["parallel.tensor_model_parallel_size=2"], "zero3.json", 2),
        (
            ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
            "zero1.json",
            2,
        ),
    ],
)
def test_working_combinations_are_accepted(overrides, json_name, world):
    check_combination(cfg(*overrides), CPU, ds(json_name), world)


def test_megatron_backend_is_accepted_on_gpu_and_precision_resolves_by_device():
    check_combination(cfg("optimizer.backend=megatron", "deepspeed.config=null"), GPU, None, 2)
    assert resolve_precision(cfg(), CPU) == "fp32"
    assert resolve_precision(cfg(), GPU) == "bf16"


def test_resolved_deepspeed_config_always_has_explicit_clipping_and_yaml_values():
    out = resolve_deepspeed_config(
        ds("zero2_offload.json"),
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        data_parallel_size=2,
        lr=3e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        clip_grad=0.5,
        precision="fp32",
        torch_adam=True,
    )
    assert out["gradient_clipping"] == 0.5
    assert out["optimizer"]["params"]["torch_adam"] is True
    assert out["optimizer"]["params"]["lr"] == 3e-4
    assert out["bf16"] == {"enabled": False}
    assert out["train_batch_size"] == 8 and out["gradient_accumulation_steps"] == 1
    assert out["zero_force_ds_cpu_optimizer"] is False
    json.dumps(out)
    with pytest.raises(ValueError, match="a DeepSpeed 'scheduler' is not used"):
        resolve_deepspeed_config(
            {"scheduler": {"type": "WarmupLR"}},
            micro_batch_size=1,
            gradient_accumulation_steps=1,
            data_parallel_size=1,
            lr=1.0,
            betas=(0.9, 0.9),
            eps=1e-8,
            weight_decay=0.0,
            clip_grad=1.0,
            precision="fp32",
            torch_adam=True,
        )


def test_torch_adam_is_the_default_and_runs_fused():
    """No JIT-built optimizer by default: torch AdamW on CPU and GPU, always with torch's fused
    kernel (CUDA on a GPU, the vectorised CPU one on CPU and for offloaded states)."""
    assert resolve_torch_adam(cfg(), CPU) is True
    assert resolve_torch_adam(cfg(), GPU) is True
    assert resolve_torch_adam(cfg("optimizer.torch_adam=false"), GPU) is False

    def resolved(json_name: str, device: str, torch_adam: bool = True) -> dict:
        return resolve_deepspeed_config(
            ds(json_name), micro_batch_size=1, gradient_accumulation_steps=1,
            data_parallel_size=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
            clip_grad=1.0, precision="bf16" if device == "cuda" else "fp32",
            torch_adam=torch_adam, device=device)["optimizer"]["params"]

    assert resolved("zero1.json", "cuda")["fused"] is True
    assert resolved("zero1.json", "cpu")["fused"] is True
    assert resolved("zero2_offload.json", "cuda")["fused"] is True
    assert resolved("zero2_offload.json", "cpu")["fused"] is True
    assert "fused" not in resolved("zero1.json", "cuda", torch_adam=False)
