"""BD3Model on one rank: reference parity, two-stream semantics, AR/MDLM limits, loss, inference.

Tolerances (fp32 on CPU): 1e-5 absolute+relative for logits/loss comparisons between different
computation orders; 1e-6 for quantities that must be unaffected by a perturbation.
"""

from __future__ import annotations

import torch

from megatron_bd3.diffusion import sampling_mask
from megatron_bd3.model import (
    BD3Config,
    BD3LossInputs,
    BD3Model,
    ar_config,
    forward_step,
    loss_func,
    mdlm_config,
)
from tests.model.helpers import (
    BLOCK_SIZE,
    MASK_ID,
    SEQ_LENGTH,
    VOCAB_SIZE,
    block_causal_mask,
    random_batch,
    reference_bd3_mask,
    single_stream_logits,
    tiny_overrides,
)
from tests.reference_dit import fold_into_megatron, random_reference_weights, reference_forward

TOL = dict(atol=1e-5, rtol=1e-5)
EXACT = dict(atol=1e-6, rtol=0.0)


def build(seed: int = 0, config: BD3Config | None = None, **extra) -> BD3Model:
    torch.manual_seed(seed)
    return BD3Model(config or BD3Config(**tiny_overrides(**extra))).eval()


def test_reference_weights_load_exactly(single_rank):
    heads, layers = 4, 2
    model = build()
    ref_cfg = {"hidden_dim": 32, "vocab_size": VOCAB_SIZE, "cond_dim": 16, "n_blocks": layers,
               "n_heads": heads}
    ref = random_reference_weights(ref_cfg, seed=3, scale=0.2)
    folded = fold_into_megatron(ref, ref_cfg, model.padded_vocab_size)
    result = model.load_state_dict(folded, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    batch = random_batch(2, seed=5)
    tokens = torch.cat([batch["x_t"], batch["x_0"]], dim=1)
    positions = torch.arange(SEQ_LENGTH).repeat(2)
    expected = reference_forward(
        ref, ref_cfg, tokens, positions, reference_bd3_mask(SEQ_LENGTH, BLOCK_SIZE)
    )[:, :SEQ_LENGTH]
    with torch.no_grad():
        logits = model.forward_logits(batch["x_t"], batch["x_0"])
    assert logits.shape == (2, SEQ_LENGTH, VOCAB_SIZE)
    torch.testing.assert_close(logits, expected, **TOL)


def test_two_stream_with_clean_input_equals_block_causal_single_stream(single_rank):
    model = build(seed=1)
    x_0 = random_batch(2, seed=6)["x_0"]
    with torch.no_grad():
        two_stream = model.forward_logits(x_0, x_0)
        hidden = model.forward_hidden(x_0, x_0)
        single = single_stream_logits(model, x_0, block_causal_mask(SEQ_LENGTH, BLOCK_SIZE))
    torch.testing.assert_close(two_stream, single, **TOL)
    torch.testing.assert_close(hidden[:SEQ_LENGTH], hidden[SEQ_LENGTH:], **TOL)


def test_clean_half_never_sees_noise(single_rank):
    model = build(seed=2)
    batch = random_batch(2, seed=7)
    other_x_t = torch.randint(0, VOCAB_SIZE, batch["x_t"].shape)
    with torch.no_grad():
        hidden = model.forward_hidden(batch["x_t"], batch["x_0"])
        perturbed = model.forward_hidden(other_x_t, batch["x_0"])
    torch.testing.assert_close(hidden[SEQ_LENGTH:], perturbed[SEQ_LENGTH:], **EXACT)
    assert not torch.allclose(hidden[:SEQ_LENGTH], perturbed[:SEQ_LENGTH])


def test_flex_and_sdpa_agree_in_forward(single_rank):
    sdpa = build(seed=3)
    flex = build(seed=3, attention_kernel="flex")
    # With recompute the BlockMask cannot pass through megatron's checkpoint (tensors only):
    # the model hands None and the core attention rebuilds the same mask.
    flex_recompute = build(
        seed=3,
        attention_kernel="flex",
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    flex.load_state_dict(sdpa.state_dict())
    flex_recompute.load_state_dict(sdpa.state_dict())
    batch = random_batch(2, seed=8)
    with torch.no_grad():
        expected = sdpa.forward_logits(batch["x_t"], batch["x_0"])
        torch.testing.assert_close(flex.forward_logits(batch["x_t"], batch["x_0"]), expected, **TOL)
        torch.testing.assert_close(
            flex_recompute.forward_logits(batch["x_t"], batch["x_0"]), expected, **TOL
        )


def test_block_size_one_is_autoregressive(single_rank):
    overrides = tiny_overrides()
    for key in ("seq_length", "block_size", "vocab_size", "mask_token_id"):
        overrides.pop(key)
    size = {k: overrides.pop(k) for k in ("num_layers", "hidden_size", "num_attention_heads")}
    config = ar_config(
        seq_length=SEQ_LENGTH, vocab_size=VOCAB_SIZE, mask_token_id=MASK_ID, **size, **overrides
    )
    assert config.block_size == 1 and config.fixed_t == 1.0
    model = build(seed=4, config=config)
    x_0 = random_batch(1, seed=9)["x_0"]
    x_t = torch.full_like(x_0, MASK_ID)  # full masking: t ≡ 1
    with torch.no_grad():
        logits = model.forward_logits(x_t, x_0)[0]  # [L, V]
        # Perturbing clean token j may change predictions at i > j only.
        for j in (0, 5, SEQ_LENGTH - 1):
            perturbed_x_0 = x_0.clone()
            perturbed_x_0[0, j] = (x_0[0, j] + 1) % MASK_ID
            perturbed = model.forward_logits(x_t, perturbed_x_0)[0]
            torch.testing.assert_close(perturbed[: j + 1], logits[: j + 1], **EXACT)
            if j + 1 < SEQ_LENGTH:
                assert not torch.allclose(perturbed[j + 1 :], logits[j + 1 :])
        # Position i equals a causal forward over [x_0[:i] ; MASK] read at its last token.
        for i in range(SEQ_LENGTH):
            tokens = torch.cat([x_0[:, :i], torch.full((1, 1), MASK_ID)], dim=1)
            causal = torch.tril(torch.ones(i + 1, i + 1, dtype=torch.bool))
            expected = single_stream_logits(model, tokens, causal)[0, -1]
            torch.testing.assert_close(logits[i], expected, **TOL)


def test_block_size_l_is_mdlm(single_rank):
    overrides = tiny_overrides()
    for key in ("seq_length", "block_size", "vocab_size", "mask_token_id"):
        overrides.pop(key)
    size = {k: overrides.pop(k) for k in ("num_layers", "hidden_size", "num_attention_heads")}
    config = mdlm_config(
        seq_length=SEQ_LENGTH, vocab_size=VOCAB_SIZE, mask_token_id=MASK_ID, **size, **overrides
    )
    model = build(seed=5, config=config)
    batch = random_batch(2, seed=10)
    full = torch.ones(SEQ_LENGTH, SEQ_LENGTH, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_logits(batch["x_t"], batch["x_0"]),
            single_stream_logits(model, batch["x_t"], full),
            **TOL,
        )


def explicit_block_loop_nelbo(logits, batch) -> torch.Tensor:
    """Per-token NELBO by loops over sequences, blocks and tokens (docs/method.md §2.2 items 7-9)."""
    total = torch.zeros((), dtype=torch.float64)
    b, L = batch["x_0"].shape
    for row in range(b):
        for block in range(L // BLOCK_SIZE):
            for pos in range(block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE):
                if not batch["masked"][row, pos] or batch["loss_mask"][row, pos] == 0:
                    continue
                token_logits = logits[row, pos].double().clone()
                token_logits[MASK_ID] = -1e6  # SUBS zero-masking
                log_p = token_logits[batch["x_0"][row, pos]] - torch.logsumexp(token_logits, 0)
                total += -batch["loss_weight"][row, pos].double() * log_p
    return total / batch["loss_mask"].sum().double()


def test_training_loss_equals_explicit_block_loop(single_rank):
    model = build(seed=6)
    batch = random_batch(3, seed=11)
    inputs = BD3LossInputs(batch["masked"], batch["loss_weight"], batch["loss_mask"])
    token_loss = model(batch["x_t"], batch["x_0"], inputs)
    assert token_loss.shape == (3, SEQ_LENGTH)
    loss_sum, num_tokens, report = loss_func(batch["loss_mask"], token_loss)
    assert int(num_tokens) == int(batch["loss_mask"].sum())
    with torch.no_grad():
        logits = model.forward_logits(batch["x_t"], batch["x_0"])
    expected = explicit_block_loop_nelbo(logits, batch)
    torch.testing.assert_close((loss_sum / num_tokens).double(), expected, **TOL)
    torch.testing.assert_close(report["lm loss"], torch.stack([loss_sum, num_tokens.float()]))

    # forward_step feeds the same batch dict through the same path.
    output, reduce = forward_step(iter([batch]), model)
    torch.testing.assert_close(reduce(output)[0], loss_sum)


def test_prefix_recompute_inference_matches_training_noisy_block(single_rank):
    model = build(seed=7)
    batch = random_batch(2, seed=12)
    with torch.no_grad():
        training = model.forward_logits(batch["x_t"], batch["x_0"])
        for block in range(SEQ_LENGTH // BLOCK_SIZE):
            start, end = block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE
            window = torch.cat([batch["x_0"][:, :start], batch["x_t"][:, start:end]], dim=1)
            mask = sampling_mask(start, BLOCK_SIZE)
            logits = single_stream_logits(model, window, mask)
            torch.testing.assert_close(logits[:, start:end], training[:, start:end], **TOL)
        # Positions shifted by a window offset (sliding window): RoPE is relative, so equal.
        window = torch.cat([batch["x_0"][:, :4], batch["x_t"][:, 4:8]], dim=1)
        shifted = single_stream_logits(model, window, sampling_mask(4, 4), torch.arange(8) + 3)
        torch.testing.assert_close(shifted[:, 4:], training[:, 4:8], **TOL)


def _loss_and_grads(model, batch):
    model.zero_grad()
    inputs = BD3LossInputs(batch["masked"], batch["loss_weight"], batch["loss_mask"])
    loss = model(batch["x_t"], batch["x_0"], inputs).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_recompute_gives_identical_gradients(single_rank):
    batch = random_batch(2, seed=13)
    plain = build(seed=8).train()
    loss, grads = _loss_and_grads(plain, batch)
    for extra in (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    ):
        model = build(seed=8, **extra).train()
        model.load_state_dict(plain.state_dict())
        other_loss, other_grads = _loss_and_grads(model, batch)
        torch.testing.assert_close(other_loss, loss, **TOL)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, **TOL, msg=name)


def test_tied_embeddings_use_the_embedding_as_output(single_rank):
    model = build(seed=9, share_embeddings_and_output_weights=True, output_layer_bias=False)
    assert model.output_layer.weight is None
    batch = random_batch(1, seed=14)
    with torch.no_grad():
        hidden = model.forward_hidden(batch["x_t"], batch["x_0"])[:SEQ_LENGTH, 0]  # [L, h]
        logits = model.forward_logits(batch["x_t"], batch["x_0"])[0]
    expected = hidden @ model.embedding.word_embeddings.weight[:VOCAB_SIZE].T
    torch.testing.assert_close(logits, expected, **TOL)
