"""Import/export of the reference BD3LM weight layout, checked against an independent reference
forward (tests/reference_dit.py)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_bd3.standalone.reference_format import (
    export_reference,
    import_reference,
    load_reference,
    save_reference,
)
from tests.reference_dit import (
    random_reference_weights,
    reference_training_logits,
)
from tests.standalone.helpers import tiny_network

REF_CONFIG = {
    "model_type": "bd3lm", "block_size": 4, "vocab_size": 48, "model_length": 16,
    "cross_attn": True, "adaln": True, "attn_backend": "sdpa", "causal": False,
    "hidden_dim": 32, "cond_dim": 24, "n_blocks": 2, "n_heads": 4, "dropout": 0.1,
    "time_conditioning": False, "var_min": True, "sampling_eps_min": 0.3, "sampling_eps_max": 0.8,
}
TOLERANCE = 2e-5  # fp32 logits of magnitude ~1-10; the two forwards differ only by rounding


def _noisy_pair(vocab: int, mask_id: int, length: int = 16, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randint(0, vocab - 1, (batch, length), generator=g)
    x_t = torch.where(torch.rand(batch, length, generator=g) < 0.5, mask_id, x_0)
    return x_t, x_0


def test_import_matches_independent_reference_forward():
    weights = random_reference_weights(REF_CONFIG, seed=3)
    network = import_reference(weights, REF_CONFIG)
    assert network.config.mask_token_id == 47  # last id, as GPT-2 + appended [MASK]
    assert network.config.sampling_eps_min == 0.3 and network.config.sampling_eps_max == 0.8
    x_t, x_0 = _noisy_pair(48, 47)
    expected = reference_training_logits(weights, REF_CONFIG, x_t, x_0)
    with torch.no_grad():
        ours = network.forward_train(x_t, x_0)
    assert expected.abs().max() > 1.0  # non-trivial logits
    torch.testing.assert_close(ours, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_export_then_reference_forward_equals_ours():
    network = tiny_network(seed=5, num_query_groups=4, ffn_hidden_size=128)
    tensors, cfg = export_reference(network, cond_dim=16)
    assert cfg["model_type"] == "bd3lm" and cfg["model_length"] == 16 and cfg["n_heads"] == 4
    for i in range(2):
        assert torch.count_nonzero(tensors[f"backbone.blocks.{i}.adaLN_modulation.weight"]) == 0
    x_t, x_0 = _noisy_pair(64, 63)
    with torch.no_grad():
        ours = network.forward_train(x_t, x_0)
    expected = reference_training_logits(tensors, cfg, x_t, x_0)
    torch.testing.assert_close(expected, ours, atol=TOLERANCE, rtol=TOLERANCE)


def test_round_trip_is_exact(tmp_path):
    network = tiny_network(seed=6, num_query_groups=4, ffn_hidden_size=128,
                           sampling_eps_min=0.45, sampling_eps_max=0.95)
    save_reference(network, tmp_path / "ref")
    back = load_reference(tmp_path / "ref")
    assert back.config == network.config
    original, restored = network.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    saved = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert saved["sampling_eps_min"] == 0.45 and saved["time_conditioning"] is False


def test_import_then_export_keeps_the_function():
    weights = random_reference_weights(REF_CONFIG, seed=8)
    tensors, cfg = export_reference(import_reference(weights, REF_CONFIG), cond_dim=24)
    x_t, x_0 = _noisy_pair(48, 47, seed=2)
    torch.testing.assert_close(reference_training_logits(tensors, cfg, x_t, x_0),
                               reference_training_logits(weights, REF_CONFIG, x_t, x_0),
                               atol=TOLERANCE, rtol=TOLERANCE)


def test_import_errors_name_the_tensor():
    weights = random_reference_weights(REF_CONFIG)
    missing = dict(weights)
    del missing["backbone.blocks.1.mlp.0.bias"]
    with pytest.raises(ValueError, match=r"missing tensor\(s\) backbone.blocks.1.mlp.0.bias "
                                         r"\(expected shape \[128\]\)"):
        import_reference(missing, REF_CONFIG)
    extra = dict(weights, **{"backbone.blocks.0.extra": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) backbone.blocks.0.extra"):
        import_reference(extra, REF_CONFIG)
    bad = dict(weights, **{"backbone.blocks.0.attn_out.weight": torch.zeros(32, 31)})
    with pytest.raises(ValueError, match=r"backbone.blocks.0.attn_out.weight has shape \[32, 31\], "
                                         r"expected \[32, 32\]"):
        import_reference(bad, REF_CONFIG)
    bad_rope = dict(weights, **{"backbone.rotary_emb.inv_freq": torch.ones(4)})
    with pytest.raises(ValueError, match="inv_freq"):
        import_reference(bad_rope, REF_CONFIG)


def test_import_rejects_unsupported_configs():
    weights = random_reference_weights(REF_CONFIG)
    for field, value, message in (("model_type", "mdlm", "model_type"),
                                  ("time_conditioning", True, "time_conditioning"),
                                  ("causal", True, "causal")):
        with pytest.raises(ValueError, match=message):
            import_reference(weights, dict(REF_CONFIG, **{field: value}))
    config = dict(REF_CONFIG)
    del config["n_heads"]
    with pytest.raises(ValueError, match="n_heads"):
        import_reference(weights, config)


def test_export_rejects_non_reference_architectures():
    with pytest.raises(ValueError, match="num_query_groups 2 != num_heads 4"):
        export_reference(tiny_network(ffn_hidden_size=128))
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        export_reference(tiny_network(num_query_groups=4))
