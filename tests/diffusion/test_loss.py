"""SUBS and the NELBO against explicit per-token / per-block python loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_bd3.diffusion import (
    ClipRange,
    masked_position_log_probs,
    nelbo_from_token_nll,
    nelbo_loss,
    noise_batch,
    subs_log_probs,
    token_nll_from_logits,
)

VOCAB, MASK_ID = 12, 5


def log_prob_without_mask(logits_row, token):
    """log softmax over the vocabulary with the [MASK] entry removed, via python floats."""
    values = [float(v) for i, v in enumerate(logits_row) if i != MASK_ID]
    peak = max(values)
    log_norm = peak + math.log(sum(math.exp(v - peak) for v in values))
    return float(logits_row[token]) - log_norm


def make_batch(batch, seq_len, block_size, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randint(0, VOCAB - 1, (batch, seq_len), generator=g)
    x_0[x_0 >= MASK_ID] += 1  # data never holds [MASK]
    logits = torch.randn(batch, seq_len, VOCAB, generator=g, dtype=torch.float64) * 3
    noised = noise_batch(
        x_0,
        torch.arange(batch),
        batch,
        seed=seed,
        step=1,
        block_size=block_size,
        mask_token_id=MASK_ID,
        **kwargs,
    )
    return x_0, logits, noised


def test_subs_log_probs_against_definition():
    x_0, logits, noised = make_batch(2, 8, 4)
    log_probs = subs_log_probs(logits, noised.x_t, MASK_ID)
    for r in range(2):
        for c in range(8):
            if noised.masked[r, c]:
                for v in range(VOCAB):
                    if v == MASK_ID:
                        assert log_probs[r, c, v] < -1e5
                    else:
                        assert log_probs[r, c, v].item() == pytest.approx(
                            log_prob_without_mask(logits[r, c], v), abs=1e-9
                        )
            else:
                expected = torch.full((VOCAB,), -1e6, dtype=log_probs.dtype)
                expected[noised.x_t[r, c]] = 0.0
                assert torch.equal(log_probs[r, c], expected)


def test_masked_position_log_probs_against_definition():
    """Zero-masking alone: the SUBS row of any masked position, for every position given."""
    _, logits, _ = make_batch(2, 8, 4)
    log_probs = masked_position_log_probs(logits, MASK_ID)
    for r in range(2):
        for c in range(8):
            assert log_probs[r, c, MASK_ID] < -1e5
            for v in range(VOCAB):
                if v != MASK_ID:
                    assert log_probs[r, c, v].item() == pytest.approx(
                        log_prob_without_mask(logits[r, c], v), abs=1e-9)


def test_subs_properties():
    x_0, logits, noised = make_batch(4, 16, 4)
    log_probs = subs_log_probs(logits.float(), noised.x_t, MASK_ID)
    at_x0 = log_probs.gather(-1, x_0[..., None]).squeeze(-1)
    assert (at_x0[~noised.masked] == 0).all()  # carry-over: exactly zero
    assert (log_probs[..., MASK_ID].exp() == 0).all()  # [MASK] never predicted
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(4, 16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_nll_is_suppressed_cross_entropy(dtype):
    x_0, logits, noised = make_batch(3, 8, 2)
    logits = logits.to(dtype)
    nll = token_nll_from_logits(logits, x_0, MASK_ID)
    suppressed = logits.double().clone()
    suppressed[..., MASK_ID] = -1e6
    expected = F.cross_entropy(suppressed.transpose(1, 2), x_0, reduction="none")
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(nll.double(), expected, rtol=tol, atol=tol)
    subs = -subs_log_probs(logits, noised.x_t, MASK_ID).gather(-1, x_0[..., None]).squeeze(-1)
    torch.testing.assert_close(
        nll[noised.masked].double(), subs[noised.masked].double(), rtol=tol, atol=tol
    )


@pytest.mark.parametrize(
    "block_size,clip_kwargs",
    [
        (4, {}),
        (1, {}),
        (8, {}),
        (16, {}),
        (4, {"clip_range": ClipRange(0.3, 0.8), "resample": True}),
    ],
)
def test_loss_equals_per_block_loop(block_size, clip_kwargs):
    batch, seq_len = 3, 16
    x_0, logits, noised = make_batch(batch, seq_len, block_size, seed=block_size, **clip_kwargs)
    out = nelbo_loss(
        logits,
        x_0,
        noised.x_t,
        loss_weight=noised.loss_weight,
        mask_token_id=MASK_ID,
        block_size=block_size,
    )
    total = 0.0
    block_loss = torch.zeros(batch, seq_len // block_size, dtype=torch.float64)
    for k in range(batch):
        for b in range(seq_len // block_size):
            t_b = float(noised.t_blocks[k, b])
            block_sum = 0.0
            for pos in range(b * block_size, (b + 1) * block_size):
                if int(noised.x_t[k, pos]) == MASK_ID:
                    block_sum += (1 / t_b) * -log_prob_without_mask(logits[k, pos], x_0[k, pos])
            total += block_sum
            block_loss[k, b] = block_sum / block_size
    assert noised.masked.any()
    assert out.loss.item() == pytest.approx(total / (batch * seq_len), rel=1e-5)
    torch.testing.assert_close(out.block_loss.double(), block_loss, rtol=1e-5, atol=1e-6)
    assert out.num_tokens.item() == batch * seq_len
    assert out.token_loss.shape == (batch, seq_len)
    assert (out.token_loss[~noised.masked] == 0).all()


def test_eval_loss_mask_drops_position_zero():
    batch, seq_len, block_size = 2, 8, 4
    x_0, logits, noised = make_batch(batch, seq_len, block_size, ignore_bos=True)
    loss_mask = torch.ones(batch, seq_len)
    loss_mask[:, 0] = 0
    out = nelbo_loss(
        logits,
        x_0,
        noised.x_t,
        loss_weight=noised.loss_weight,
        mask_token_id=MASK_ID,
        block_size=block_size,
        loss_mask=loss_mask,
    )
    numerator = 0.0
    for k in range(batch):
        for pos in range(1, seq_len):
            if noised.masked[k, pos]:
                numerator += float(noised.loss_weight[k, pos]) * -log_prob_without_mask(
                    logits[k, pos], x_0[k, pos]
                )
    assert out.num_tokens.item() == batch * (seq_len - 1)
    assert out.loss.item() == pytest.approx(numerator / (batch * (seq_len - 1)), rel=1e-6)


def test_block_size_one_full_masking_is_autoregressive_cross_entropy():
    """B=1, t = 1: every token masked with weight 1, so the NELBO is the mean CE of the
    logits (over the vocabulary without [MASK]) against x_0."""
    batch, seq_len = 3, 10
    x_0, logits, noised = make_batch(batch, seq_len, 1, fixed_t=1.0)
    assert noised.masked.all()
    out = nelbo_loss(
        logits, x_0, noised.x_t, loss_weight=noised.loss_weight, mask_token_id=MASK_ID, block_size=1
    )
    keep = [v for v in range(VOCAB) if v != MASK_ID]
    targets = x_0 - (x_0 > MASK_ID).long()  # index into the vocabulary without [MASK]
    expected = F.cross_entropy(logits[..., keep].reshape(-1, VOCAB - 1), targets.reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=0)


def test_token_nll_entry_point_ignores_unmasked_values_and_has_gradients():
    x_0, logits, noised = make_batch(2, 8, 4)
    logits = logits.float().requires_grad_()
    nll = token_nll_from_logits(logits, x_0, MASK_ID)
    garbage = torch.where(noised.masked, nll, torch.full_like(nll, float("nan")))
    out = nelbo_from_token_nll(garbage, noised.masked, loss_weight=noised.loss_weight, block_size=4)
    reference = nelbo_from_token_nll(
        nll, noised.masked, loss_weight=noised.loss_weight, block_size=4
    )
    assert torch.isfinite(out.loss) and out.loss.item() == reference.loss.item()
    out.loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert (logits.grad[..., MASK_ID] == 0).all()


def test_argument_errors():
    x_0, logits, noised = make_batch(1, 8, 4)
    with pytest.raises(TypeError):
        nelbo_from_token_nll(torch.zeros(1, 8), noised.masked, noised.t_tokens, 4)
    with pytest.raises(ValueError, match="seq_len 8 is not a multiple of block_size 3"):
        nelbo_from_token_nll(
            torch.zeros(1, 8), noised.masked, loss_weight=noised.loss_weight, block_size=3
        )
    with pytest.raises(ValueError, match="mask_token_id 12"):
        token_nll_from_logits(logits, x_0, 12)
