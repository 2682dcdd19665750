"""The config layer: one run config -> one megatron BD3Config that carries the network and the
noise, and the noise settings read from that config alone."""

import pytest
import torch

from megatron_bd3.training.batches import NoiseSettings
from megatron_bd3.training.config import ConfigError, ParallelSection, load_config
from megatron_bd3.training.model_config import build_model_config, model_identity

VOCAB, MASK = 300, 4


def build(data, **kwargs):
    config = load_config(data=data)
    return config, build_model_config(config, vocab_size=VOCAB, mask_token_id=MASK,
                                      precision="fp32", **kwargs)


def test_training_keys_reach_the_model_config_and_the_noise_settings():
    _, mc = build({
        "model": {"seq_length": 16, "block_size": 4},
        "training": {"noise_schedule": "linear", "ignore_bos": False, "resample": False,
                     "antithetic_sampling": False, "clip_eps_min": 0.3, "clip_eps_max": 0.8},
    })
    assert (mc.seq_length, mc.block_size, mc.vocab_size, mc.mask_token_id) == (16, 4, VOCAB, MASK)
    assert (mc.clip_min, mc.clip_max) == (0.3, 0.8)
    assert NoiseSettings.from_model_config(mc) == NoiseSettings(
        block_size=4, mask_token_id=MASK, schedule="linear", ignore_bos=False, resample=False,
        antithetic=False, fixed_t=None)


@pytest.mark.parametrize("preset, block_size, fixed_t, stream", [
    ("ar", 1, 1.0, 32), ("mdlm", 16, None, 16), ("bd3", 4, None, 32)])
def test_presets(preset, block_size, fixed_t, stream):
    _, mc = build({"model": {"preset": preset, "seq_length": 16,
                             "block_size": 4 if preset == "bd3" else None}})
    assert (mc.block_size, mc.fixed_t, mc.stream_length) == (block_size, fixed_t, stream)
    assert NoiseSettings.from_model_config(mc).fixed_t == fixed_t


def test_architecture_refinements_are_typed_keys():
    _, reference = build({"model": {}})
    assert (reference.output_layer_bias, reference.share_embeddings_and_output_weights,
            reference.layernorm_epsilon, reference.rotary_base) == (True, False, 1e-5, 10000)
    _, refined = build({"model": {"tie_embeddings": True, "output_layer_bias": False,
                                  "layernorm_epsilon": 1e-6, "rotary_base": 500000,
                                  "init_method_std": 0.01}})
    assert refined.share_embeddings_and_output_weights and not refined.output_layer_bias
    assert (refined.layernorm_epsilon, refined.rotary_base, refined.init_method_std) == (
        1e-6, 500000, 0.01)
    with pytest.raises(ValueError, match="unknown key 'model.extra'"):
        load_config(data={"model": {"extra": {"init_method_std": 0.01}}})


def test_parallel_section_can_be_replaced_and_errors_name_the_run_config():
    config, mc = build({"model": {"num_query_groups": 2},
                        "parallel": {"tensor_model_parallel_size": 2}},
                       parallel=ParallelSection())
    assert config.parallel.tensor_model_parallel_size == 2  # the run config is not changed
    assert mc.tensor_model_parallel_size == 1
    identity = model_identity(config, mc, "abc")
    assert identity["num_query_groups"] == 2 and identity["tokenizer_fingerprint"] == "abc"
    with pytest.raises(ValueError, match=r"<dict>: model section: .*noise_schedule"):
        build({"training": {"noise_schedule": "no-such-schedule"}})


def test_rng_keys_reach_the_model_config():
    _, keyed = build({"model": {}, "training": {"seed": 7}})
    assert (keyed.dropout_rng, keyed.init_rng, keyed.init_seed) == ("keyed", "keyed", 7)
    _, torch_rng = build({"model": {"dropout_rng": "torch", "init_rng": "torch"}})
    assert (torch_rng.dropout_rng, torch_rng.init_rng) == ("torch", "torch")
    # recompute reruns layers outside the keyed forward: refused with keyed dropout on, by the
    # run config already (one bd3-train line)
    with pytest.raises(ConfigError, match=r"model.recompute full with model.dropout_rng keyed"):
        build({"model": {"recompute": "full", "dropout": 0.1}})
    build({"model": {"recompute": "full", "dropout": 0.1, "dropout_rng": "torch"}})
    build({"model": {"recompute": "full", "dropout": 0.0}})


def test_context_parallel_comm_reaches_the_model_config():
    # 'auto' is the ring on this CPU (run configs have no attention dropout)
    expected = {"all_gather": "all_gather", "p2p": "p2p", "auto": "p2p"}
    for comm, resolved in expected.items():
        if comm == "auto" and torch.cuda.is_available():
            resolved = "all_gather"
        _, mc = build({"model": {"seq_length": 32, "block_size": 4, "dropout": 0.0},
                       "parallel": {"context_parallel_size": 2, "context_parallel_comm": comm}})
        assert (mc.context_parallel_size, mc.cp_comm_type) == (2, resolved)
