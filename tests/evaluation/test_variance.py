"""Gradient variance (paper eq. 10) of bd3-eval: equal to the definition over stacked
per-minibatch gradients computed with plain autograd, the same in every layout (1 process, DP = 2,
TP = 2, PP = 2, and the converted standalone directory on DP = 2), and written by the CLI as rows
of eval.json and variance.png."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_bd3.data.corpus import default_corpus_path
from megatron_bd3.diffusion import ClipRange, noise_batch
from megatron_bd3.evaluation.data import EvalDataset
from megatron_bd3.evaluation.loss_model import MegatronLossModel, StandaloneLossModel
from megatron_bd3.evaluation.source import EvalInputError
from megatron_bd3.evaluation.variance import (
    PAPER_CLIP_RANGES,
    evaluate_variance,
    parse_clip_range,
    sweep_clip_ranges,
)
from megatron_bd3.training.batches import NoiseSettings
from tests.dist_launcher import REPO_ROOT, run_distributed

L, B = 16, 4
WORKER = REPO_ROOT / "tests" / "evaluation" / "workers" / "variance_layouts.py"
RANGES = [ClipRange(1e-3, 1.0), ClipRange(0.3, 0.8)]  # the second resamples


def dataset(n: int, vocab: int, mask: int, seed: int = 0) -> EvalDataset:
    tokens = torch.randint(0, mask, (n, L), generator=torch.Generator().manual_seed(seed))
    array = tokens.numpy()
    return EvalDataset("random", "in memory", L, n, {"sequences": n}, lambda i: array[i])


def settings(mask: int) -> NoiseSettings:
    return NoiseSettings(block_size=B, mask_token_id=mask, schedule="loglinear", ignore_bos=True,
                         resample=True, antithetic=True, fixed_t=None)


def definition(per_token_loss, params, data, mask, clip_range, *, minibatches, batch, micro,
               seed):
    """Var = 1/(M-1) sum_m ||g_m - mean g||^2 with every g_m stacked: minibatch m is rows
    [m G, (m+1) G) noised with step m; its loss is the mean over micro-batches of the per-token
    terms summed over the micro-batch and divided by b * L (every token counts)."""
    gradients, losses = [], []
    for m in range(minibatches):
        x_0 = torch.from_numpy(data.read(list(range(m * batch, (m + 1) * batch))))
        noised = noise_batch(x_0, torch.arange(batch), batch, seed, m, B, mask,
                             schedule="loglinear", clip_range=clip_range, ignore_bos=True,
                             resample=True)
        for p in params:
            p.grad = None
        total = 0.0
        for i in range(0, batch, micro):
            rows = slice(i, i + micro)
            token_loss = per_token_loss(noised.x_t[rows], x_0[rows], noised.masked[rows],
                                        noised.loss_weight[rows])  # [b, L]
            loss = token_loss.sum() / token_loss.numel() / (batch // micro)
            loss.backward()
            total += float(loss.detach())
        gradients.append(torch.cat([p.grad.reshape(-1).double() for p in params]))
        losses.append(total)
    g = torch.stack(gradients)  # [M, P]
    variance = ((g - g.mean(dim=0)) ** 2).sum() / (minibatches - 1)
    return float(variance), sum(losses) / minibatches, float(torch.tensor(losses).var())


@pytest.fixture
def tiny_megatron():
    """A single-stage tiny BD3Model in a one-rank parallel state, torn down after the test."""
    from megatron_bd3.model import BD3Config, BD3Model
    from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from tests.model.helpers import tiny_overrides

    initialize_parallel(ParallelConfig(seed=1234), environ={})
    try:
        torch.manual_seed(0)
        config = BD3Config(**tiny_overrides())
        yield BD3Model(config).eval(), config
    finally:
        destroy_parallel()


def test_megatron_gradient_variance_equals_the_definition(tiny_megatron):
    from megatron_bd3.model import BD3LossInputs
    from tests.model.helpers import MASK_ID, VOCAB_SIZE

    model, config = tiny_megatron
    data = dataset(12, VOCAB_SIZE, MASK_ID)
    rows = evaluate_variance(MegatronLossModel([model], config, reports_loss=True), data,
                             noise=settings(MASK_ID), clip_ranges=RANGES, minibatches=3,
                             global_batch_size=4, micro_batch_size=2, seed=5)
    params = [p for p in model.parameters() if p.requires_grad]

    def per_token_loss(x_t, x_0, masked, weight):
        return model(x_t, x_0, BD3LossInputs(masked=masked, loss_weight=weight))

    for row, clip_range in zip(rows, RANGES, strict=True):
        variance, loss, loss_var = definition(per_token_loss, params, data, MASK_ID, clip_range,
                                              minibatches=3, batch=4, micro=2, seed=5)
        assert row["clip_range"] == [clip_range.eps_min, clip_range.eps_max]
        assert row["grad_variance"] == pytest.approx(variance, rel=1e-6)
        assert row["loss"] == pytest.approx(loss, rel=1e-6)
        assert row["minibatch_loss_variance"] == pytest.approx(loss_var, rel=1e-5)
        assert row["loss_variance"] > 0 and row["minibatches"] == 3
    assert rows[0]["grad_variance"] != pytest.approx(rows[1]["grad_variance"], rel=1e-3)


def test_standalone_gradient_variance_equals_the_definition():
    from tests.standalone.helpers import tiny_network

    network = tiny_network(seed=3)
    vocab, mask = network.config.vocab_size, network.config.mask_token_id
    data = dataset(12, vocab, mask)
    rows = evaluate_variance(StandaloneLossModel(network), data, noise=settings(mask),
                             clip_ranges=RANGES, minibatches=4, global_batch_size=3,
                             micro_batch_size=3, seed=2)
    params = list(network.parameters())

    def per_token_loss(x_t, x_0, masked, weight):
        logits = network.forward_train(x_t, x_0).clone()  # [b, L, V]
        logits[..., mask] = -float("inf")
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, x_0[..., None])[..., 0]
        return torch.where(masked, weight * nll, torch.zeros_like(nll))

    for row, clip_range in zip(rows, RANGES, strict=True):
        variance, loss, _ = definition(per_token_loss, params, data, mask, clip_range,
                                       minibatches=4, batch=3, micro=3, seed=2)
        assert row["grad_variance"] == pytest.approx(variance, rel=1e-6)
        assert row["loss"] == pytest.approx(loss, rel=1e-6)


def test_clip_ranges_and_refusals():
    assert parse_clip_range("0,0.5") == ClipRange(1e-3, 0.5)  # U[0, x] as the paper writes it
    assert parse_clip_range("0.3,0.8") == ClipRange(0.3, 0.8)
    assert sweep_clip_ranges(ClipRange(0.5, 1.0)) == list(PAPER_CLIP_RANGES)
    assert sweep_clip_ranges(ClipRange(0.45, 0.95))[-1] == ClipRange(0.45, 0.95)
    for bad in ("0.8,0.3", "half", "0.1,0.2,0.3"):
        with pytest.raises(EvalInputError, match="--clip-ranges"):
            parse_clip_range(bad)
    data = dataset(6, 64, 63)
    common = dict(noise=settings(63), global_batch_size=4, micro_batch_size=4, seed=0)
    with pytest.raises(EvalInputError, match="holds 6"):
        evaluate_variance(None, data, clip_ranges=RANGES, minibatches=2, **common)
    with pytest.raises(EvalInputError, match=">= 2"):
        evaluate_variance(None, data, clip_ranges=RANGES, minibatches=1, **common)
    with pytest.raises(EvalInputError, match="no masked fraction"):  # B = 4: none in [0.3, 0.45]
        evaluate_variance(None, dataset(8, 64, 63), clip_ranges=[ClipRange(0.3, 0.45)],
                          minibatches=2, **common)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(evaluation text file, checkpoint root) of a 2-step run with grouped-query attention and
    EMA."""
    from tests.training.tiny_run import prepare_tiny_data, run_trainer, tiny_config, write_config

    base = tmp_path_factory.mktemp("variance")
    manifest = prepare_tiny_data(base)
    run = base / "run"
    config = tiny_config(manifest, run, model={"num_query_groups": 2},
                         training={"train_iters": 2}, checkpoint={"interval": 0},
                         validation={"at_end": False, "clip_search": {"enabled": False}})
    run_trainer(write_config(base / "cfg.yaml", config), 1, "--resume", "none")
    # a few articles wrapped to L: enough for 4 minibatches of 4, and a short likelihood pass
    text = base / "articles.txt"
    text.write_text("\n".join(default_corpus_path().read_text().splitlines()[:4]) + "\n")
    return text, run / "ckpt"


OPTIONS = ["--clip-ranges", "0,1", "0.3,0.8", "--variance-minibatches", "4", "--batch-size",
           "4", "--micro-batch-size", "2", "--nelbo-samples", "1", "--no-progress"]


@pytest.mark.distributed
def test_cli_rows_plot_and_the_same_variance_in_every_layout(trained, tmp_path):
    from megatron_bd3.cli.eval import main

    data, ckpt = trained
    assert main([str(ckpt), "--data", str(data), "--output", str(tmp_path / "one"),
                 *OPTIONS]) == 0
    one = json.loads((tmp_path / "one" / "eval.json").read_text())["variance"]
    assert [r["clip_range"] for r in one] == [[1e-3, 1.0], [0.3, 0.8]]
    assert all(r["minibatches"] == 4 and r["grad_variance"] > 0 for r in one)
    assert (tmp_path / "one" / "variance.png").stat().st_size > 0

    from megatron_bd3.convert.trainer_checkpoint import checkpoint_to_standalone

    checkpoint_to_standalone(ckpt, tmp_path / "standalone")
    run_distributed(WORKER, 2, str(ckpt), str(tmp_path / "standalone"), str(data), str(tmp_path),
                    *OPTIONS, timeout=300)
    for name in ("dp2", "tp2", "pp2", "standalone_dp2"):
        result = json.loads((tmp_path / name / "eval.json").read_text())
        assert result["layout"]["world_size"] == 2
        for row, reference in zip(result["variance"], one, strict=True):
            for key in ("grad_variance", "grad_sq_norm", "loss", "loss_variance",
                        "minibatch_loss_variance"):
                assert row[key] == pytest.approx(reference[key], rel=1e-4), (name, key)
