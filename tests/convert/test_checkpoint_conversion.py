"""Trainer checkpoints saved at TP=2 and PP=2 convert to standalone models that compute the same
logits as the megatron model did in its own layout; the conversion chains are exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from megatron_bd3.checkpoint.atomic import read_marker
from megatron_bd3.cli.convert import main as convert_main
from megatron_bd3.convert.reference_dit import reference_training_logits
from megatron_bd3.convert.trainer_checkpoint import checkpoint_to_standalone
from megatron_bd3.data import load_tokenizer
from megatron_bd3.standalone.model import BD3Network
from tests.convert.conftest import VOCAB_SIZE
from tests.dist_launcher import run_distributed

pytestmark = pytest.mark.distributed

# fp32; the megatron layouts and the standalone network sum in different orders (seen: ~3e-7)
LOGIT_TOLERANCE = 1e-5
INIT_FROM_WORKER = Path(__file__).parent / "workers" / "init_from.py"


def standalone_logits(directory: Path, record: dict) -> torch.Tensor:
    network = BD3Network.from_pretrained(directory)
    with torch.no_grad():
        return network.forward_train(record["x_t"], record["x_0"])


def run_config_tokenizer(record: dict):
    return load_tokenizer(yaml.safe_load(Path(record["config"]).read_text())["data"]["tokenizer"])


def assert_same_files(a: Path, b: Path) -> None:
    """Bit-exact tensors and identical config.json."""
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(left) == sorted(right)
    for key in left:
        assert torch.equal(left[key], right[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text())


@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_checkpoint_converts_to_the_logits_of_its_layout(trained, tmp_path, name):
    record = trained[name]
    assert record["layout"]["tp" if name == "tp2" else "pp"] == 2
    # the EMA and raw weights are different models, so choosing between them is tested
    assert (record["raw"] - record["ema"]).abs().max() > 1e-2
    outputs = {}
    for weights, use_ema in (("raw", False), ("ema", True), ("default", None)):
        out = tmp_path / weights
        result = checkpoint_to_standalone(record["run_dir"], out, use_ema=use_ema)
        assert result.parity and all(report.ok for report in result.parity)
        outputs[weights] = out
    for weights in ("raw", "ema"):
        diff = (standalone_logits(outputs[weights], record) - record[weights]).abs().max()
        assert diff < LOGIT_TOLERANCE, (weights, float(diff))
    assert_same_files(outputs["default"], outputs["ema"])  # EMA by default when present

    config = BD3Network.from_pretrained(outputs["ema"]).config
    assert config.vocab_size == VOCAB_SIZE
    assert (config.num_query_groups, config.tie_embeddings) == (
        (2, True) if name == "tp2" else (4, False))
    # the learned clip range comes from the trainer state, not the run config's initial range
    assert [config.sampling_eps_min, config.sampling_eps_max] == record["clip_range"]
    assert record["clip_range"] != [1e-3, 1.0]
    run_tokenizer = run_config_tokenizer(record)
    copied = load_tokenizer(outputs["ema"])
    assert copied.fingerprint() == run_tokenizer.fingerprint()
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id, config.mask_token_id) \
        == (run_tokenizer.bos_id, run_tokenizer.eos_id, run_tokenizer.pad_id, run_tokenizer.mask_id)


def test_reference_round_trip_through_the_cli_is_exact(trained, tmp_path):
    record = trained["pp2"]
    ours, reference, back = tmp_path / "ours", tmp_path / "reference", tmp_path / "back"
    assert convert_main(["--checkpoint", str(record["run_dir"]), "--to", "standalone",
                         "--output", str(ours)]) == 0
    assert convert_main(["--standalone", str(ours), "--to", "reference",
                         "--output", str(reference)]) == 0
    assert convert_main(["--reference", str(reference), "--to", "standalone",
                         "--output", str(back)]) == 0
    assert_same_files(ours, back)
    # the reference network, evaluated from the exported adaLN weights, is the megatron model
    tensors = load_file(str(reference / "model.safetensors"))
    reference_config = json.loads((reference / "config.json").read_text())
    assert reference_config["model_type"] == "bd3lm"
    with torch.no_grad():
        logits = reference_training_logits(tensors, reference_config, record["x_t"],
                                           record["x_0"])
    assert (logits - record["ema"]).abs().max() < LOGIT_TOLERANCE
    assert tensors["sampling_eps_min"].item() == record["clip_range"][0]


def test_standalone_to_checkpoint_and_back_is_bit_exact(trained, tmp_path):
    record = trained["tp2"]  # tied embeddings, GQA, padded vocabulary
    ours, checkpoint, back = tmp_path / "ours", tmp_path / "ckpt", tmp_path / "back"
    assert convert_main(["--checkpoint", str(record["run_dir"]), "--to", "standalone",
                         "--output", str(ours)]) == 0
    assert convert_main(["--standalone", str(ours), "--to", "checkpoint", "--config",
                         str(record["config"]), "--output", str(checkpoint)]) == 0
    assert (checkpoint / "latest").read_text().strip() == "step_00000000"
    marker = read_marker(checkpoint / "step_00000000")
    original = read_marker(Path(record["checkpoint"]))
    assert marker["layout_independent"] and marker["has_ema"] and marker["weights_only"]
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "mask_token_id", "tokenizer_fingerprint"):
        assert marker["model"][key] == original["model"][key], key
    assert convert_main(["--checkpoint", str(checkpoint), "--to", "standalone",
                         "--output", str(back)]) == 0
    assert_same_files(ours, back)
    assert load_tokenizer(back).fingerprint() == load_tokenizer(ours).fingerprint()


def test_trainer_starts_from_a_converted_checkpoint(trained, tmp_path):
    """init_from the original PP=2 checkpoint and from checkpoint -> standalone -> checkpoint:
    the real trainer's first loss (initial weights, same data and noise) is identical."""
    record = trained["pp2"]
    ours, checkpoint = tmp_path / "ours", tmp_path / "ckpt"
    assert convert_main(["--checkpoint", str(record["run_dir"]), "--to", "standalone",
                         "--output", str(ours)]) == 0
    assert convert_main(["--standalone", str(ours), "--to", "checkpoint", "--config",
                         str(record["config"]), "--output", str(checkpoint),
                         "parallel.pipeline_model_parallel_size=1"]) == 0
    out = run_distributed(INIT_FROM_WORKER, 1, str(record["config"]), str(tmp_path / "runs"),
                          f"original={record['checkpoint']}", f"converted={checkpoint}",
                          timeout=120)
    losses = dict(re.findall(r"LOSS (\S+) (\S+)", out))
    assert set(losses) == {"original", "converted"}, out[-3000:]
    assert float(losses["original"]) == float(losses["converted"])
    assert "initialised weights from" in out
