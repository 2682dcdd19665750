"""The model's speed paths against brute force written here, independently of the code under test.

Covered: block-structured training attention (block_attention.py), the rotary embedding
(rope.py), the whole training loss and every parameter gradient of the optimized forward (x_t-only
last layer, masked-only vocabulary projection, fused SUBS cross-entropy, short self-attention
forward), the single-stream B = L model against the two-stream one, each fast-path switch of
BD3Config (it changes the path taken, not the loss or a gradient), and the attention contract
(None = the model's own attention from the config; a caller's own mask is used as given; the
causal pattern equals an explicit causal mask).

Tolerances: fp32 kernels against float64 brute force, 1e-5 (absolute and relative) for values;
gradients 1e-5 absolute + 1e-4 relative (summed over many products in fp32).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from megatron_bd3.model import (
    AttentionPattern,
    AttentionPlan,
    BD3Config,
    BD3CoreAttention,
    BD3LossInputs,
    BD3Model,
    block_attention,
    loss_func,
    mdlm_config,
    self_attention,
    training_attention_mask,
)
from megatron_bd3.model.block_attention import block_diffusion_attention, chunk_rows
from megatron_bd3.model.rope import apply_rotary
from tests.model.helpers import (
    MASK_ID,
    VOCAB_SIZE,
    random_batch,
    reference_bd3_mask,
    single_stream_logits,
    tiny_overrides,
)

TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)


# -- block-structured attention ---------------------------------------------------------------------


def masked_softmax_attention(q, k, v, allowed, scale):
    """[s, b, h, d] queries/keys/values, allowed [sq, sk] -> [sq, b, h, d], in float64."""
    scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize(
    "seq_length, block_size, chunk",
    [(16, 4, None), (16, 4, 4), (24, 4, 16), (48, 4, None), (16, 1, None), (16, 1, 4),
     (16, 16, None), (32, 8, 8), (64, 16, None)],
)
@pytest.mark.parametrize("x_t_only", [False, True])
def test_block_attention_matches_masked_softmax(seq_length, block_size, chunk, x_t_only):
    L = seq_length
    gen = torch.Generator().manual_seed(L * 100 + block_size)
    q, k, v = (torch.randn(2 * L, 2, 3, 8, generator=gen, requires_grad=True) for _ in range(3))
    rows = L if x_t_only else 2 * L
    allowed = reference_bd3_mask(L, block_size)[:rows]
    expected = masked_softmax_attention(q[:rows], k, v, allowed, 0.3)
    out = block_diffusion_attention(q[:rows], k, v, L, block_size, 0.3, chunk)
    torch.testing.assert_close(out.double(), expected, **TOL)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    got = torch.autograd.grad(out, (q, k, v), grad.float())
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), **GRAD_TOL, msg=f"d{name}")


def test_chunk_rows_never_give_small_blocks_more_work():
    def computed_scores(L, B):  # what the kernel calls compute, per head, both streams
        C = chunk_rows(L, B)
        chunks = [(s, min(C, L - s)) for s in range(0, L, C)]
        x_t = sum(rows * (s + (0 if rows == B else rows) + rows) for s, rows in chunks)
        x_0 = sum(rows * (s + rows) for s, rows in chunks)
        return x_t + x_0

    for L in (256, 512, 1024):
        for B in (1, 2, 4, 8, 16, 32):
            C = chunk_rows(L, B)
            assert C % B == 0 and C >= B and C % 16 == 0
        assert computed_scores(L, 4) <= computed_scores(L, 16) < 0.42 * 3 * L * L  # vs dense


# -- rotary embedding -------------------------------------------------------------------------------


def test_rotary_matches_complex_multiplication():
    gen = torch.Generator().manual_seed(0)
    s, d, rot = 6, 8, 6  # rotary over the first 6 channels, 2 passed through
    x = torch.randn(s, 2, 3, d, generator=gen, dtype=torch.float64, requires_grad=True)
    angles = torch.rand(s, 1, 1, rot // 2, generator=gen, dtype=torch.float64) * 6
    out = apply_rotary(x, angles.cos(), angles.sin())
    # Rotate-half pairs (x_i, x_{i + rot/2}) as complex numbers times e^{i angle}.
    z = torch.complex(x[..., : rot // 2], x[..., rot // 2 : rot]) * torch.polar(
        torch.ones_like(angles), angles
    )
    expected = torch.cat([z.real, z.imag, x[..., rot:]], dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(
        lambda t: apply_rotary(t, angles.cos(), angles.sin()), (x,), eps=1e-6, atol=1e-8
    )


# -- the whole training loss and its gradients ------------------------------------------------------


def _rope(x, positions):
    """x [b, s, heads, d], rotate-half RoPE, base 10000 over the whole head."""
    d = x.shape[-1]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=x.dtype) / d)
    angles = positions.to(x.dtype)[:, None] * inv_freq[None, :]  # [s, d/2]
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def brute_force_nelbo(params, config: BD3Config, batch, two_stream: bool):
    """The BD3 training loss from megatron-layout weights, by hand in float64 (docs/method.md §1-§2):
    pre-LN layers, per-head [q; k; v] rows, RoPE at positions [0..L-1] per stream, the block-
    diffusion mask over [x_t ; x_0] (or x_t alone with full attention), SUBS, NELBO."""
    L, heads, layers = config.seq_length, config.num_attention_heads, config.num_layers
    p = {name: t.double() for name, t in params.items()}
    tokens = torch.cat([batch["x_t"], batch["x_0"]], 1) if two_stream else batch["x_t"]
    positions = torch.arange(L).repeat(2 if two_stream else 1)
    allowed = reference_bd3_mask(L, config.block_size) if two_stream else torch.ones(L, L).bool()
    x = p["embedding.word_embeddings.weight"][tokens]  # [b, s, h]
    b, s, h = x.shape
    hd = h // heads

    def norm(t, name):
        return F.layer_norm(t, (h,), p[name + ".weight"], p[name + ".bias"], eps=1e-5)

    for i in range(layers):
        m = f"decoder.layers.{i}."
        qkv = norm(x, m + "input_layernorm") @ p[m + "self_attention.linear_qkv.weight"].T
        q, k, v = qkv.view(b, s, heads, 3, hd).unbind(3)  # megatron rows: per head [q; k; v]
        q, k = _rope(q, positions), _rope(k, positions)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attention = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, h)
        x = x + attention @ p[m + "self_attention.linear_proj.weight"].T
        y = norm(x, m + "pre_mlp_layernorm") @ p[m + "mlp.linear_fc1.weight"].T
        y = F.gelu(y + p[m + "mlp.linear_fc1.bias"], approximate="tanh")
        x = x + y @ p[m + "mlp.linear_fc2.weight"].T + p[m + "mlp.linear_fc2.bias"]
    x = norm(x, "decoder.final_layernorm")[:, :L]
    logits = x @ p["output_layer.weight"].T + p["output_layer.bias"]  # [b, L, V_pad]
    logits[..., MASK_ID] = -1e6  # SUBS zero-masking
    logits[..., VOCAB_SIZE:] = -1e6  # padded rows
    log_p = logits.log_softmax(-1).gather(-1, batch["x_0"][..., None])[..., 0]
    counted = batch["masked"] & (batch["loss_mask"] != 0)
    terms = -batch["loss_weight"].double() * log_p * batch["loss_mask"].double()
    return torch.where(counted, terms, torch.zeros_like(terms)).sum() / batch["loss_mask"].sum()



def assert_brute_force(model, config, batch, loss, grads) -> None:
    """`loss` and `grads` of `model` equal the float64 brute-force two-stream NELBO and its
    gradients on `batch`."""
    params = {name: p.detach().double().requires_grad_() for name, p in model.named_parameters()}
    expected = brute_force_nelbo(params, config, batch, two_stream=True)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), **TOL)
    for name, param in params.items():
        torch.testing.assert_close(grads[name].double(), param.grad, **GRAD_TOL, msg=name)


def model_loss_and_grads(model: BD3Model, batch):
    model.zero_grad(set_to_none=True)
    inputs = BD3LossInputs(batch["masked"], batch["loss_weight"], batch["loss_mask"])
    loss_sum, num_tokens, _ = loss_func(batch["loss_mask"], model(batch["x_t"], batch["x_0"], inputs))
    loss = loss_sum / num_tokens
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "seq_length, block_size",
    [(48, 4), (16, 1), (32, 16)],  # L = 48, B = 4: two attention chunks of 24 rows
)
def test_training_loss_and_every_gradient_match_brute_force(single_rank, seq_length, block_size):
    config = BD3Config(**tiny_overrides(seq_length=seq_length, block_size=block_size))
    torch.manual_seed(21)
    model = BD3Model(config).train()
    batch = random_batch(2, seed=22, seq_length=seq_length)
    loss, grads = model_loss_and_grads(model, batch)
    assert_brute_force(model, config, batch, loss, grads)


def test_single_stream_mdlm_equals_two_stream_for_the_same_noise(single_rank):
    overrides = tiny_overrides()
    for key in ("seq_length", "block_size", "vocab_size", "mask_token_id"):
        overrides.pop(key)
    size = {k: overrides.pop(k) for k in ("num_layers", "hidden_size", "num_attention_heads")}
    common = dict(seq_length=16, vocab_size=VOCAB_SIZE, mask_token_id=MASK_ID, **size)
    single = mdlm_config(**common, **overrides)
    two = mdlm_config(**common, single_stream_mdlm=False, **overrides)
    assert single.single_stream and single.stream_length == 16
    assert not two.single_stream and two.stream_length == 32
    torch.manual_seed(23)
    single_model = BD3Model(single).train()
    two_model = BD3Model(two).train()
    two_model.load_state_dict(single_model.state_dict())
    batch = random_batch(2, seed=24)
    loss, grads = model_loss_and_grads(single_model, batch)
    two_loss, two_grads = model_loss_and_grads(two_model, batch)
    torch.testing.assert_close(loss, two_loss, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, two_grads[name], **GRAD_TOL, msg=name)
    # And both against the brute-force MDLM loss (x_t alone, full attention).
    params = {n: p.detach().double().requires_grad_() for n, p in single_model.named_parameters()}
    torch.testing.assert_close(
        loss.double(), brute_force_nelbo(params, single, batch, two_stream=False), **TOL
    )
    with torch.no_grad():
        assert single_model.forward_hidden(batch["x_t"], batch["x_0"]).shape[0] == 16


def test_last_layer_computes_x_t_rows_only_for_the_loss(single_rank):
    config = BD3Config(**tiny_overrides())
    torch.manual_seed(25)
    model = BD3Model(config).eval()
    rows = []
    hook = model.decoder.layers[-1].register_forward_hook(
        lambda module, args, output: rows.append(output[0].size(0))
    )
    batch = random_batch(2, seed=26)
    inputs = BD3LossInputs(batch["masked"], batch["loss_weight"])
    with torch.no_grad():
        model(batch["x_t"], batch["x_0"], inputs)
        model.forward_hidden(batch["x_t"], batch["x_0"])
    hook.remove()
    assert rows == [config.seq_length, 2 * config.seq_length]


# -- fast-path switches ----------------------------------------------------------------------------


class _Calls:
    """Wraps a function and counts its calls."""

    def __init__(self, fn) -> None:
        self.fn, self.count = fn, 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


def _path_probe(model: BD3Model, monkeypatch):
    """Counters of what one training step runs: block-structured attention calls, one-pass RoPE
    calls, the last layer's output rows, and the rows the output layer projects."""
    block = _Calls(block_attention.block_diffusion_attention)
    rope = _Calls(self_attention.apply_rotary)
    monkeypatch.setattr(block_attention, "block_diffusion_attention", block)
    monkeypatch.setattr(self_attention, "apply_rotary", rope)
    seen: dict[str, list[int]] = {"last_layer_rows": [], "projected_rows": []}
    model.decoder.layers[-1].register_forward_hook(
        lambda module, args, output: seen["last_layer_rows"].append(output[0].size(0))
    )
    model.output_layer.register_forward_hook(
        lambda module, args, output: seen["projected_rows"].append(args[0].shape[0] * args[0].shape[1])
    )
    return block, rope, seen


@pytest.mark.parametrize(
    "switch",
    ["cpu_block_attention", "x_t_only_last_layer", "short_self_attention_forward",
     "masked_only_logits"],
)
def test_each_fast_path_switch_changes_the_path_not_the_loss(single_rank, monkeypatch, switch):
    L, B, batch_size = 48, 4, 2
    batch = random_batch(batch_size, seed=31, seq_length=L)
    results = {}
    for on in (True, False):
        config = BD3Config(**tiny_overrides(seq_length=L, block_size=B, **{switch: on}))
        torch.manual_seed(30)
        model = BD3Model(config).train()
        with monkeypatch.context() as patch:
            block, rope, seen = _path_probe(model, patch)
            loss, grads = model_loss_and_grads(model, batch)
        results[on] = (loss, grads, block.count, rope.count, seen)
        assert_brute_force(model, config, batch, loss, grads)

    layers = 2
    masked = int(batch["masked"].sum())
    on, off = results[True], results[False]
    torch.testing.assert_close(on[0], off[0], **TOL)
    # Every switch on: block attention in each layer, RoPE on q and k in each layer, the last
    # layer on the L x_t rows, the output layer on the masked positions only.
    assert on[2:4] == (layers, 2 * layers)
    assert on[4] == {"last_layer_rows": [L], "projected_rows": [masked]}
    path_off = {
        "cpu_block_attention": (0, 2 * layers, [L], [masked]),
        "x_t_only_last_layer": (layers, 2 * layers, [2 * L], [masked]),
        "short_self_attention_forward": (layers, 0, [2 * L], [masked]),
        "masked_only_logits": (layers, 2 * layers, [L], [batch_size * L]),
    }[switch]
    assert (off[2], off[3], off[4]["last_layer_rows"], off[4]["projected_rows"]) == path_off


def test_attention_plan_comes_from_the_config():
    two_stream = BD3Config(**tiny_overrides())
    plan = AttentionPlan.from_config(two_stream)
    assert (plan.pattern, plan.kernel, plan.cpu_block_attention) == ("block_diffusion", "sdpa", True)
    assert plan.stream_length == 2 * two_stream.seq_length
    single = BD3Config(**tiny_overrides(block_size=16, attention_kernel="flex"))
    plan = AttentionPlan.from_config(single)
    assert (plan.pattern, plan.kernel, plan.stream_length) == ("bidirectional", "flex", 16)
    off = AttentionPlan.from_config(BD3Config(**tiny_overrides(cpu_block_attention=False)))
    assert not off.cpu_block_attention


# -- the attention contract: None = the model's own attention, anything else as given -----------


def _core_attention(**extra) -> BD3CoreAttention:
    config = BD3Config(**tiny_overrides(**extra))
    return BD3CoreAttention(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.arbitrary,
        attention_type="self",
    ).eval()


def test_a_callers_mask_is_used_as_given(single_rank, monkeypatch):
    attention = _core_attention()  # L = 16, B = 4: its own attention is the 32-token BD3 mask
    gen = torch.Generator().manual_seed(40)
    q, k, v = (torch.randn(32, 2, 4, 8, generator=gen) for _ in range(3))
    block = _Calls(block_attention.block_diffusion_attention)
    monkeypatch.setattr(block_attention, "block_diffusion_attention", block)
    own = attention(q, k, v, None)
    assert block.count == 1  # the model's own attention: block-structured on CPU
    torch.testing.assert_close(
        own.view(32, 2, 4, 8).double(),
        masked_softmax_attention(q, k, v, reference_bd3_mask(16, 4), 8**-0.5),
        **TOL,
    )
    # The cached training mask handed over as a tensor is a caller's mask like any other: one
    # dense SDPA call (no identity check routes it to a structured kernel), same values.
    cached = training_attention_mask(16, 4, "sdpa", "cpu")
    torch.testing.assert_close(attention(q, k, v, cached), own, **TOL)
    assert block.count == 1
    # Any other mask of the same shape is honoured, not replaced by the model's own.
    allowed = torch.rand(32, 32, generator=gen) < 0.3
    allowed |= torch.eye(32, dtype=torch.bool)
    expected = masked_softmax_attention(q, k, v, allowed, 8**-0.5)
    torch.testing.assert_close(attention(q, k, v, allowed).view(32, 2, 4, 8).double(), expected, **TOL)


def test_callers_mask_reaches_every_layer_and_keeps_all_rows(single_rank):
    """Through the decoder: a caller's mask is used in every layer, and the x_t-only last layer
    (a property of the model's own attention) never cuts the rows of a caller's pass."""
    config = BD3Config(**tiny_overrides())
    torch.manual_seed(41)
    model = BD3Model(config).eval()
    L = config.seq_length
    batch = random_batch(2, seed=42)
    rows = []
    model.decoder.layers[-1].register_forward_hook(
        lambda module, args, output: rows.append(output[0].size(0))
    )
    tokens = torch.cat([batch["x_t"], batch["x_0"]], dim=1)  # [b, 2L]
    positions = torch.arange(L).repeat(2)
    with torch.no_grad():
        given = single_stream_logits(model, tokens, reference_bd3_mask(L, 4), positions)
        training = model.forward_logits(batch["x_t"], batch["x_0"])
        # A different mask (the clean half also sees noise) changes the clean rows.
        everything = torch.ones(2 * L, 2 * L, dtype=torch.bool)
        other = single_stream_logits(model, tokens, everything, positions)
    assert rows == [2 * L, L, 2 * L]
    torch.testing.assert_close(given[:, :L], training, **TOL)
    assert not torch.allclose(other[:, :L], training, atol=1e-3)


def test_causal_pattern_equals_an_explicit_causal_mask(single_rank):
    config = BD3Config(**tiny_overrides())
    torch.manual_seed(27)
    model = BD3Model(config).eval()
    tokens = random_batch(2, seed=28)["x_0"]
    n = tokens.size(1)
    explicit_causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(
            single_stream_logits(model, tokens, AttentionPattern.CAUSAL),
            single_stream_logits(model, tokens, explicit_causal),
            **TOL,
        )
    attention = _core_attention()
    q, k, v = (torch.randn(8, 1, 4, 8) for _ in range(3))
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention(q[:4], k, v, AttentionPattern.CAUSAL)
