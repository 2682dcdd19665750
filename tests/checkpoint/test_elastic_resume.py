"""Elastic resume: a run continues on another layout from its checkpoint (docs/training.md §7).

The reference is one uninterrupted run: DP=2, ZeRO-1, 4 layers, dropout 0, 12 steps, a
checkpoint every 2 steps, validation with the clip search (EMA weights) every 4 steps. A chain of
resumed runs, each training 2 steps from the previous one's checkpoint, moves it through the
layouts:

    step 2   DP 2 -> 1                          (2 processes -> 1)
    step 4   DP 1 -> PP 2 x VPP 2, ZeRO-1 -> 0  (torch's AdamW on the parameters themselves)
    step 6   PP 2 x VPP 2 -> TP 2, ZeRO-0 -> 1
    step 8   TP 2 -> CP 2                       (context parallel: zig-zag halves of both streams)
    step 10  CP 2 -> DP 2, ZeRO-1 -> ZeRO-3

Every resumed step must log the reference's loss and learning rate, every validation its NLL
(EMA weights) and clip range, and the optimizer state the chain saves at steps 4 and 12 must be
the reference's (Adam moments, fp32 weights, step count), as must the data position. Loaded
onto TP=2 and saved again without a step, the state is bit for bit what was saved. Dropout is
off: the per-rank RNG streams cannot follow a layout change and are re-derived (the diffusion
noise and the data order are keyed by seed, step and position, so they do not depend on them).
"""

import re
from pathlib import Path

import pytest
import torch

from megatron_bd3.paths import shipped_config
from tests.dist_launcher import run_distributed
from tests.training.tiny_run import (
    prepare_tiny_data,
    read_metrics,
    run_trainer,
    tiny_config,
    val_records,
    write_config,
)

TRAIN_ITERS = 12
RESAVE = Path(__file__).parent / "workers" / "resave.py"
ZERO0, ZERO1, ZERO3 = (str(shipped_config(f"deepspeed/zero{s}.json")) for s in (0, 1, 3))
# (name, processes, config sections) of each leg; leg i resumes at step 2 * (i + 1)
# (validation.micro_batch_size keeps the validation batch at 4 sequences: micro x DP x PP)
LEGS = [
    ("dp1", 1, {"validation": {"micro_batch_size": 4}}),
    ("pp2_vpp2_zero0", 2, {"parallel": {"pipeline_model_parallel_size": 2,
                                        "virtual_pipeline_model_parallel_size": 2},
                           "deepspeed": {"config": ZERO0}}),
    ("tp2", 2, {"parallel": {"tensor_model_parallel_size": 2},
                "validation": {"micro_batch_size": 4}}),
    ("cp2", 2, {"parallel": {"context_parallel_size": 2},
                "validation": {"micro_batch_size": 4}}),
    ("dp2_zero3", 2, {"deepspeed": {"config": ZERO3}}),
]
# fp32 on CPU: the layouts sum gradients and activations in different orders. Measured (2-core
# AMD EPYC, torch 2.13 CPU): the DP 2 -> 1 and PP x VPP legs' losses bit-identical, the TP 2 and
# ZeRO-3 legs' 2e-8 relative, validation NLL within 4e-8; the saved states 1.4e-6 (step 4) and
# 7e-6 (step 10), max over tensors relative to each tensor's max.
LOSS_TOLERANCE = 1e-6
STATE_TOLERANCE = 1e-4


def config(manifest, run_dir, **sections):
    merged = {
        "model": {"num_layers": 4},  # divisible by PP x VPP = 4
        "training": {"train_iters": TRAIN_ITERS},
        "checkpoint": {"interval": 2},
        "validation": {"interval": 4, "micro_batch_size": 2},
        "deepspeed": {"config": ZERO1},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return tiny_config(manifest, run_dir, **merged)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(manifest, reference run dir, [(leg name, run dir, log)])."""
    base = tmp_path_factory.mktemp("elastic")
    manifest = prepare_tiny_data(base)
    reference = base / "reference"
    run_trainer(write_config(reference / "cfg.yaml", config(manifest, reference)), 2,
                "--resume", "none")
    legs, source = [], reference / "ckpt" / "step_00000002"
    for index, (name, nproc, sections) in enumerate(LEGS):
        run_dir = base / name
        cfg = write_config(run_dir / "cfg.yaml", config(manifest, run_dir, **sections))
        extra = ["--stop-after", "2"] if index < len(LEGS) - 1 else []
        log = run_trainer(cfg, nproc, "--resume", str(source), *extra, timeout=180)
        legs.append((name, run_dir, log))
        source = run_dir / "ckpt" / f"step_{2 * (index + 2):08d}"
    return manifest, reference, legs


def load_reshardable(checkpoint: Path, tmp_path: Path) -> tuple[dict, dict]:
    """A checkpoint's reshardable/ state read back without a process group: (every tensor, whole,
    by its global key; the common values)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{checkpoint.parent.parent.name}_{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "reshardable", out)
    common = torch.load(checkpoint / "reshardable" / "common.pt", weights_only=False)["common"]
    return torch.load(out, weights_only=False), common


@pytest.mark.distributed
@pytest.mark.parametrize("index", range(len(LEGS)), ids=[leg[0] for leg in LEGS])
def test_resumed_leg_continues_the_reference(chain, index):
    _, reference, legs = chain
    name, run_dir, log = legs[index]
    resumed_at = 2 * (index + 1)
    previous = reference if index == 0 else legs[index - 1][1]
    assert f"resumed from {previous / 'ckpt' / f'step_{resumed_at:08d}'}" in log
    change = re.search(r"elastic resume: layout (.*?) -> (.*?):", log)
    assert change, log[-3000:]
    if name == "cp2":
        assert change.groups() == ("TP 2 PP 1 DP 1 ZeRO-1", "TP 1 PP 1 CP 2 DP 1 ZeRO-1")
    assert "resharded weights, optimizer state (exp_avg, exp_avg_sq, fp32_param" in log
    assert "carried trainer, clip_range, loader" in log and "re-derived rng" in log

    expected = {r["step"]: r for r in read_metrics(reference) if "loss" in r}
    got = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(got) == [resumed_at + 1, resumed_at + 2]
    for step, record in got.items():
        assert record["lr"] == expected[step]["lr"], step
        assert record["loss"] == pytest.approx(expected[step]["loss"], rel=LOSS_TOLERANCE), step
        assert record["clip"] == expected[step]["clip"], step
    ref_vals = {r["step"]: r for r in val_records(reference)}
    for val in val_records(run_dir):
        assert val["val_nll"] == pytest.approx(ref_vals[val["step"]]["val_nll"],
                                               rel=LOSS_TOLERANCE)
        assert val["clip"] == ref_vals[val["step"]]["clip"]


@pytest.mark.distributed
@pytest.mark.parametrize("leg,step", [("dp1", 4), ("dp2_zero3", 12)])
def test_optimizer_ema_and_data_position_follow_the_chain(chain, tmp_path, leg, step):
    _, reference, legs = chain
    run_dir = dict((name, run) for name, run, _ in legs)[leg]
    name = f"step_{step:08d}"
    expected, expected_common = load_reshardable(reference / "ckpt" / name, tmp_path)
    got, got_common = load_reshardable(run_dir / "ckpt" / name, tmp_path)
    tensors = set(expected)
    assert tensors == set(got)
    for prefix in ("optimizer.exp_avg.", "optimizer.exp_avg_sq.", "optimizer.fp32_param.",
                   "ema.value."):
        assert any(k.startswith(prefix) for k in tensors), prefix
    for key in sorted(tensors):
        scale = expected[key].abs().max().clamp_min(1e-30)
        rel = float((got[key] - expected[key]).abs().max() / scale)
        assert rel < STATE_TOLERANCE, (key, rel)
    assert got_common == expected_common == {"optimizer": {"step": step},
                                             "ema": {"decay": 0.9, "num_updates": step}}
    ranks_ref = torch.load(reference / "ckpt" / name / "ranks" / "rank_00000.pt",
                           weights_only=False)
    ranks_got = torch.load(run_dir / "ckpt" / name / "ranks" / "rank_00000.pt",
                           weights_only=False)
    assert ranks_got["loader"]["global_step"] == ranks_ref["loader"]["global_step"] == step
    assert ranks_got["trainer"]["step"] == step


@pytest.mark.distributed
def test_resharding_is_exact(chain, tmp_path):
    """The reference's step-2 state (DP=2, ZeRO-1) loaded onto TP=2 and saved again at once is
    bit for bit what it was: resharding moves values, it computes none."""
    manifest, reference, legs = chain
    run_dir = tmp_path / "resave"
    cfg = write_config(run_dir / "cfg.yaml", config(manifest, run_dir, **LEGS[2][2]))
    source = reference / "ckpt" / "step_00000002"
    out = run_distributed(RESAVE, 2, str(cfg), str(source), timeout=180)
    assert "elastic resume: layout TP 1 PP 1 DP 2 ZeRO-1 -> TP 2 PP 1 DP 1 ZeRO-1" in out
    expected, expected_common = load_reshardable(source, tmp_path)
    got, got_common = load_reshardable(run_dir / "ckpt" / "step_00000002", tmp_path)
    assert set(got) == set(expected) and got_common == expected_common
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
