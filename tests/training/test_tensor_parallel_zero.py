"""TP = 2 x DP = 2 (4 ranks) with DeepSpeed ZeRO-2 and ZeRO-3 trains the same run as one process.

test_trainer_layouts covers TP = 2 with ZeRO-1 and ZeRO-3 with DP = 2 alone; here both kinds of
sharding are on at once: megatron splits each weight over the TP pair, and DeepSpeed partitions
gradients (ZeRO-2) or the TP shards themselves (ZeRO-3, persistence threshold 1000 so the weight
matrices are partitioned and the norms stay gathered) over the DP pair. Two real updates (the
first step's warm-up lr is 0), then the EMA weights are validated at the end.
"""

import pytest

from tests.training.tiny_run import (
    prepare_tiny_data,
    read_metrics,
    run_trainer,
    tiny_config,
    train_losses,
    val_records,
    write_config,
)

TRAIN_ITERS = 4
# fp32 on CPU: TP sums the row-parallel matmuls and the vocab-parallel cross-entropy in two
# halves, DP reduces the gradients in another order; observed: losses 2.1e-8 relative, grad norms
# <= 8.8e-8, validation NELBO identical.
TOLERANCE = 1e-6


def config(manifest, run_dir, data_parallel_size: int, **sections) -> dict:
    # 2 validation batches of 8 sequences at any DP size, so the validation sets are the same
    micro_batch_size = 8 // data_parallel_size
    return tiny_config(
        manifest,
        run_dir,
        schedule={"warmup_steps": 1},
        training={"train_iters": TRAIN_ITERS},
        validation={
            "at_end": True,
            "micro_batch_size": micro_batch_size,
            "clip_search": {"enabled": False},
        },
        checkpoint={"interval": 0, "save_final": False},
        **sections,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, ZeRO-1: training losses, grad norms and the final validation."""
    base = tmp_path_factory.mktemp("tp_zero")
    manifest = prepare_tiny_data(base)
    run_dir = base / "ref"
    cfg = config(manifest, run_dir, 1, deepspeed={"config": "deepspeed/zero1.json"})
    run_trainer(write_config(run_dir / "cfg.yaml", cfg), 1, "--resume", "none")
    return base, manifest, run_dir


def grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r}


@pytest.mark.distributed
@pytest.mark.parametrize(
    "ds_config, overrides",
    [
        ("deepspeed/zero2.json", {}),
        ("deepspeed/zero3.json", {"zero_optimization.stage3_param_persistence_threshold": 1000}),
    ],
    ids=["zero2", "zero3"],
)
def test_tp2_dp2_with_zero_matches_one_process(reference, ds_config, overrides):
    base, manifest, ref_dir = reference
    run_dir = base / ds_config.split("/")[1].removesuffix(".json")
    cfg = config(
        manifest,
        run_dir,
        2,
        parallel={"tensor_model_parallel_size": 2},
        deepspeed={"config": ds_config, "overrides": overrides},
    )
    out = run_trainer(write_config(run_dir / "cfg.yaml", cfg), 4, "--resume", "none")
    stage = ds_config[-6]
    assert "world 4 = TP 2 x PP 1 x DP 2" in out and f"deepspeed ZeRO-{stage}" in out, out[-3000:]

    losses, ref_losses = train_losses(run_dir), train_losses(ref_dir)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    assert losses == pytest.approx(ref_losses, rel=TOLERANCE)
    assert grad_norms(run_dir) == pytest.approx(grad_norms(ref_dir), rel=TOLERANCE)
    (val,), (ref_val,) = val_records(run_dir), val_records(ref_dir)
    assert val["val_nll"] == pytest.approx(ref_val["val_nll"], rel=TOLERANCE)
