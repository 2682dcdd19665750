"""Run-config loading: YAML inheritance, typed overrides, and errors that name file and key."""

import textwrap
from pathlib import Path

import pytest

from megatron_bd3.paths import SHIPPED_CONFIGS
from megatron_bd3.training.config import ConfigError, load_config


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_base_inheritance_deep_merges_and_overrides_are_typed(tmp_path):
    write(
        tmp_path,
        "base.yaml",
        """
        model: {num_layers: 4, hidden_size: 128, num_attention_heads: 4, seq_length: 128,
                block_size: 16}
        optimizer: {lr: 3e-4}
        training: {train_iters: 100, micro_batch_size: 4, global_batch_size: 16}
    """,
    )
    child = write(
        tmp_path,
        "child.yaml",
        """
        base: base.yaml
        model: {block_size: 4}
    """,
    )
    cfg = load_config(
        child,
        [
            "training.train_iters=200",
            "optimizer.lr=1e-3",
            "optimizer.betas=[0.9, 0.98]",
            "validation.num_batches=null",
        ],
    )
    assert cfg.model.block_size == 4 and cfg.model.num_layers == 4  # merged, not replaced
    assert cfg.model.hidden_size == 128
    assert cfg.training.train_iters == 200
    assert cfg.optimizer.lr == pytest.approx(1e-3)  # "1e-3" is a YAML string; coerced
    assert isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == [0.9, 0.98]
    assert cfg.validation.num_batches is None


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "training.trian_iters=5",
            "unknown key 'training.trian_iters' (did you mean 'training.train_iters'?)",
        ),
        ("trainingx.train_iters=5", "unknown key 'trainingx'"),
        ("training.train_iters=abc", "training.train_iters: expected int, got 'abc'"),
        ("training.train_iters=1.5", "training.train_iters: expected int, got 1.5"),
        ("training.resample=3", "training.resample: expected bool, got 3"),
        ("model.preset=xyz", "model.preset: expected 'bd3' | 'ar' | 'mdlm', got 'xyz'"),
        ("optimizer.betas=0.9", "optimizer.betas: expected list of float, got 0.9"),
        ("training.train_iters", "must look like section.key=value"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(tmp_path, override, message):
    path = write(tmp_path, "run.yaml", "training: {train_iters: 10}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, [override])
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.seq_length=100", "model.block_size=16"],
            "model.seq_length 100 is not a multiple of model.block_size 16",
        ),
        (
            ["model.preset=mdlm", "model.seq_length=64", "model.block_size=16"],
            "model.preset mdlm needs model.block_size == model.seq_length (64) or null, got 16",
        ),
        (
            ["training.global_batch_size=10", "training.micro_batch_size=4"],
            "training.global_batch_size 10 is not a multiple of training.micro_batch_size 4",
        ),
        (
            ["model.hidden_size=100", "model.num_attention_heads=3"],
            "model.hidden_size 100 is not a multiple of model.num_attention_heads 3",
        ),
        (
            ["parallel.pipeline_model_parallel_size=3", "model.num_layers=4"],
            "model.num_layers 4 is not divisible by parallel.pipeline_model_parallel_size 3",
        ),
        (
            ["training.clip_eps_min=0.6", "training.clip_eps_max=0.5"],
            "training.clip_eps_min/max must satisfy 0 <= min < max <= 1",
        ),
        (
            ["optimizer.backend=megatron", "optimizer.cpu_offload=true"],
            "optimizer.cpu_offload needs optimizer.backend=deepspeed",
        ),
        (
            ["parallel.context_parallel_size=2", "model.seq_length=48", "model.block_size=8"],
            "model.seq_length must be a multiple of 2 x context_parallel_size x block_size = 32",
        ),
        (
            ["parallel.context_parallel_size=2", "model.preset=mdlm", "model.block_size=null"],
            "model.preset mdlm has one block (B = L), which cannot be cut on block edges",
        ),
        (
            ["parallel.context_parallel_size=2", "model.seq_length=32", "model.block_size=32"],
            "model.block_size = model.seq_length (32) gives one block (B = L), which cannot be "
            "cut on block edges",
        ),
        (
            ["parallel.tensor_model_parallel_size=3", "parallel.sequence_parallel=true",
             "model.num_attention_heads=3", "model.hidden_size=48", "model.seq_length=64"],
            "parallel.sequence_parallel splits 2 x model.seq_length = 128 rows over "
            "parallel.tensor_model_parallel_size 3",
        ),
        (
            ["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=3",
             "parallel.sequence_parallel=true", "model.num_attention_heads=3",
             "model.hidden_size=48", "model.seq_length=64", "model.block_size=4"],
            "parallel.sequence_parallel splits 2 x model.seq_length / "
            "parallel.context_parallel_size = 64 rows over parallel.tensor_model_parallel_size 3",
        ),
        (
            ["model.recompute=full", "model.dropout=0.1", "model.dropout_rng=keyed"],
            "model.recompute full with model.dropout_rng keyed and model.dropout 0.1 is not "
            "supported",
        ),
        (
            ["parallel.context_parallel_size=0"],
            "parallel.context_parallel_size must be >= 1, got 0",
        ),
        (
            ["parallel.context_parallel_size=2", "parallel.context_parallel_comm=ring"],
            "parallel.context_parallel_comm: expected 'auto' | 'all_gather' | 'p2p', got 'ring'",
        ),
    ],
)
def test_inconsistent_values_are_refused(tmp_path, overrides, message):
    path = write(tmp_path, "run.yaml", "{}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, overrides)
    assert message in str(excinfo.value)
    assert str(path) in str(excinfo.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "checkpoint: {intervall: 5}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(path) in str(excinfo.value)
    assert "checkpoint.intervall" in str(excinfo.value)
    assert "checkpoint.interval" in str(excinfo.value)


def test_base_cycle_and_missing_base_are_refused(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path, "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_config(tmp_path / "c.yaml")


def test_every_shipped_config_loads():
    paths = sorted(SHIPPED_CONFIGS.glob("*.yaml"))
    assert paths, "no configs shipped"
    for path in paths:
        cfg = load_config(path)
        assert cfg.optimizer.clip_grad >= 0


@pytest.mark.parametrize(
    "name, seq_length, block_size, preset, micro",
    [
        ("owt_bd3_b16.yaml", 1024, 16, "bd3", 16),
        ("owt_bd3_b8.yaml", 1024, 8, "bd3", 16),
        ("owt_bd3_b4.yaml", 1024, 4, "bd3", 16),
        ("lm1b_bd3_b16.yaml", 128, 16, "bd3", 64),
        ("lm1b_bd3_b8.yaml", 128, 8, "bd3", 64),
        ("lm1b_bd3_b4.yaml", 128, 4, "bd3", 64),
        ("owt_mdlm_pretrain.yaml", 1024, None, "mdlm", 16),
        ("owt_ar.yaml", 1024, None, "ar", 16),
        ("lm1b_mdlm.yaml", 128, None, "mdlm", 64),
        ("lm1b_ar.yaml", 128, None, "ar", 64),
    ],
)
def test_paper_recipes_carry_the_method_doc_hyperparameters(
    name, seq_length, block_size, preset, micro
):
    cfg = load_config(SHIPPED_CONFIGS / name)
    m, o, t = cfg.model, cfg.optimizer, cfg.training
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.dropout) == (12, 768, 12, 0.1)
    assert (m.preset, m.seq_length, m.block_size) == (preset, seq_length, block_size)
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.clip_grad) == (
        3e-4,
        [0.9, 0.999],
        1e-8,
        0.0,
        1.0,
    )
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay) == (2500, "constant")
    assert (t.global_batch_size, t.micro_batch_size, t.ema_decay, t.seed) == (512, micro, 0.9999, 1)
    assert cfg.checkpoint.interval == 500 and cfg.validation.interval == 10000
    search = cfg.validation.clip_search
    assert search.enabled == (preset == "bd3")
    assert (search.num_batches, search.widths, search.delta) == (
        100,
        [0.5, 0.6, 0.7, 0.8, 0.9],
        0.05,
    )
    assert t.ignore_bos == (preset == "bd3" or name == "owt_mdlm_pretrain.yaml")


def test_finetune_recipe_starts_from_the_mdlm_pretrain_ema_weights():
    pre = load_config(SHIPPED_CONFIGS / "owt_mdlm_pretrain.yaml")
    for b in (4, 8, 16):
        cfg = load_config(SHIPPED_CONFIGS / f"owt_bd3_b{b}_finetune.yaml")
        assert cfg.model.block_size == b and cfg.training.train_iters == 150_000
        assert cfg.checkpoint.init_from == str(pre.checkpoint_dir) and cfg.checkpoint.init_from_ema
    assert pre.training.train_iters == 850_000


def test_context_parallel_takes_document_masks_and_keyed_dropout(tmp_path):
    path = write(tmp_path, "run.yaml", "{}\n")
    cfg = load_config(path, ["parallel.context_parallel_size=2", "data.document_mask=true",
                             "data.document_position_reset=true", "model.dropout=0.1",
                             "model.dropout_rng=keyed"])
    assert cfg.parallel.context_parallel_size == 2 and cfg.data.document_mask
