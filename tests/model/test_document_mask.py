"""Document masking (docs/method.md §1.4) against masks built here from the definition.

The brute-force mask is written independently of megatron_bd3: the block-diffusion part from
block matrices (helpers.reference_bd3_mask), the document part by comparing document ids token
by token in a Python loop, and the attention as an explicit softmax per sequence and head.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_bd3.model import BD3Config, BD3CoreAttention, BD3LossInputs, BD3Model
from megatron_bd3.model.block_attention import block_diffusion_attention
from tests.model.helpers import MASK_ID, VOCAB_SIZE, reference_bd3_mask, tiny_overrides

HEADS, HEAD_DIM = 4, 8


def random_layout(batch: int, seq_length: int, seed: int) -> torch.Tensor:
    """[b, L] document ids: row 0 one document, row 1 one per token, the rest random runs."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(seq_length, dtype=torch.long), torch.arange(seq_length)]
    for _ in range(batch - 2):
        ids, current = [], 0
        while len(ids) < seq_length:
            length = int(torch.randint(1, seq_length // 2 + 1, (1,), generator=gen))
            ids += [current] * length
            current += 1
        rows.append(torch.tensor(ids[:seq_length]))
    return torch.stack(rows[:batch])


def brute_force_mask(document_ids: torch.Tensor, block_size: int, streams: int = 2):
    """[b, s, s] True = may attend: block diffusion (two streams) or everything (one stream),
    and the same document for token q mod L and token k mod L."""
    batch, seq_length = document_ids.shape
    n = streams * seq_length
    base = reference_bd3_mask(seq_length, block_size) if streams == 2 else torch.ones(n, n).bool()
    base = base.tolist()
    allowed = []
    for ids in document_ids.tolist():
        allowed.append([
            [base[q][k] and ids[q % seq_length] == ids[k % seq_length] for k in range(n)]
            for q in range(n)
        ])
    return torch.tensor(allowed, dtype=torch.bool)


def brute_force_attention(q, k, v, allowed):
    """q [sq, b, h, d], k/v [sk, b, h, d], allowed [b, sq', sk] (the first sq query rows)."""
    sq, batch = q.shape[:2]
    out = []
    for b in range(batch):
        heads = []
        for h in range(q.size(2)):
            scores = q[:, b, h] @ k[:, b, h].T / math.sqrt(q.size(-1))
            scores = scores.masked_fill(~allowed[b, :sq], float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, b, h])
        out.append(torch.stack(heads, dim=1))  # [sq, h, d]
    return torch.stack(out, dim=1).reshape(sq, batch, -1)  # [sq, b, h*d]


def core_attention(**extra) -> BD3CoreAttention:
    config = BD3Config(**tiny_overrides(num_query_groups=HEADS, document_mask=True, **extra))
    return BD3CoreAttention(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.arbitrary,
        attention_type="self",
    )


def random_qkv(seq: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(seq, batch, HEADS, HEAD_DIM, generator=gen) for _ in range(3)]


def check_against_brute_force(attention, document_ids, block_size, queries, streams=2):
    """Forward (and, when not flex, every input gradient) against the brute force."""
    batch, seq_length = document_ids.shape
    q, k, v = random_qkv(streams * seq_length, batch, seed=int(document_ids.sum()))
    q = q[:queries]
    allowed = brute_force_mask(document_ids, block_size, streams)
    expected_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = brute_force_attention(*expected_inputs, allowed)
    if attention.plan.kernel == "flex":  # FlexAttention has no CPU backward: forward only
        with torch.no_grad():
            out = attention(q, k, v, document_ids)
        expected = brute_force_attention(q, k, v, allowed)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        return
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, document_ids)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(inputs, expected_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


PATHS = {
    "block-structured": dict(attention_kernel="sdpa", cpu_block_attention=True),
    "dense": dict(attention_kernel="sdpa", cpu_block_attention=False),
    "flex": dict(attention_kernel="flex"),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seq_length, block_size", [(64, 4), (16, 1), (32, 8)])
def test_every_kernel_path_equals_the_brute_force_mask(single_rank, path, seq_length, block_size):
    # L = 64, B = 4: two chunks of 32 rows in the block-structured kernel.
    attention = core_attention(seq_length=seq_length, block_size=block_size, **PATHS[path])
    document_ids = random_layout(4, seq_length, seed=seq_length + block_size)
    check_against_brute_force(attention, document_ids, block_size, 2 * seq_length)
    if path != "flex":  # the x_t queries alone (the model's last layer)
        check_against_brute_force(attention, document_ids, block_size, seq_length)


@pytest.mark.parametrize("chunk", [4, 8])
def test_block_kernel_chunks_with_documents(chunk):
    # chunk = B: single-block chunks (no x_0 tile of their own); chunk = 2B: the tile is gathered.
    seq_length, block_size = 24, 4
    document_ids = random_layout(3, seq_length, seed=chunk)
    q, k, v = random_qkv(2 * seq_length, 3, seed=chunk)
    allowed = brute_force_mask(document_ids, block_size)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_diffusion_attention(
        *inputs, seq_length, block_size, 1 / math.sqrt(HEAD_DIM), chunk=chunk,
        document_ids=document_ids,
    )
    expected_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = brute_force_attention(*expected_inputs, allowed)
    torch.testing.assert_close(out.flatten(2), expected, atol=1e-5, rtol=1e-5)
    out.flatten(2).sum().backward()
    expected.sum().backward()
    for got, want in zip(inputs, expected_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_single_stream_model_attends_within_documents(single_rank):
    attention = core_attention(seq_length=16, block_size=16)
    assert attention.plan.pattern == "bidirectional"
    document_ids = random_layout(3, 16, seed=5)
    check_against_brute_force(attention, document_ids, 16, 16, streams=1)


def test_document_ids_are_required_exactly_with_document_mask(single_rank):
    with_documents = core_attention()
    q, k, v = random_qkv(32, 2, seed=0)
    with pytest.raises(ValueError, match="document_mask is on but BD3CoreAttention got no"):
        with_documents(q, k, v, None)
    with pytest.raises(ValueError, match=r"document ids must be \[batch, seq_length\]"):
        with_documents(q, k, v, torch.zeros(2, 8, dtype=torch.long))
    plain = BD3CoreAttention(
        config=BD3Config(**tiny_overrides(num_query_groups=HEADS)), layer_number=1,
        attn_mask_type=AttnMaskType.arbitrary, attention_type="self",
    )
    with pytest.raises(ValueError, match="config.document_mask is off"):
        plain(q, k, v, torch.zeros(2, 16, dtype=torch.long))


def test_config_refuses_position_reset_without_document_mask():
    with pytest.raises(ValueError, match="document_position_reset needs document_mask"):
        BD3Config(**tiny_overrides(document_position_reset=True))
    with pytest.raises(ValueError, match="needs position_embedding_type 'rope'"):
        BD3Config(**tiny_overrides(document_mask=True, document_position_reset=True,
                                   position_embedding_type="none"))


# -- a packed batch gives each document the loss it gets alone ----------------------------------

SEQ, BLOCK = 32, 4


def packed_case(seed: int):
    """One packed sequence of three documents (lengths 10, 13, 9: the second starts mid-block)
    with random clean tokens, masking and weights."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [10, 13, 9]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    x_0 = torch.randint(0, MASK_ID, (1, SEQ), generator=gen)
    masked = torch.rand(1, SEQ, generator=gen) < 0.5
    x_t = torch.where(masked, torch.full_like(x_0, MASK_ID), x_0)
    loss_weight = 1.0 + torch.rand(1, SEQ, generator=gen)
    return lengths, document_ids, x_0, x_t, masked, loss_weight


def alone_case(start: int, length: int, x_0, x_t, masked, loss_weight, seed: int):
    """The document at [start, start + length) in a sequence of its own: it keeps its offset
    within a diffusion block (start mod B), the rest of the sequence is other, random documents.
    x_t, the masking and the weights of the document's tokens are copied from the packed case
    (the noise is keyed by position, so drawing it again would give other noise)."""
    gen = torch.Generator().manual_seed(seed)
    offset = start % BLOCK
    span = slice(offset, offset + length)
    alone = {
        "x_0": torch.randint(0, MASK_ID, (1, SEQ), generator=gen),
        "masked": torch.rand(1, SEQ, generator=gen) < 0.5,
        "loss_weight": torch.ones(1, SEQ),
    }
    alone["x_t"] = torch.where(alone["masked"], torch.full_like(alone["x_0"], MASK_ID),
                               alone["x_0"])
    for key, packed in (("x_0", x_0), ("x_t", x_t), ("masked", masked),
                        ("loss_weight", loss_weight)):
        alone[key][:, span] = packed[:, start:start + length]
    ids = torch.full((1, SEQ), 2)
    ids[:, :offset] = 0
    ids[:, span] = 1
    return alone, ids, span


def token_loss(model, x_0, x_t, masked, loss_weight, document_ids):
    inputs = BD3LossInputs(masked=masked, loss_weight=loss_weight)
    with torch.no_grad():
        return model(x_t, x_0, inputs, document_ids=document_ids)  # [1, L]


@pytest.mark.parametrize("position_reset", [False, True])
@pytest.mark.parametrize("path", ["block-structured", "dense"])
def test_packed_documents_get_the_loss_they_get_alone(single_rank, position_reset, path):
    config = BD3Config(**tiny_overrides(
        seq_length=SEQ, block_size=BLOCK, document_mask=True,
        document_position_reset=position_reset, **PATHS[path],
    ))
    torch.manual_seed(31)
    model = BD3Model(config).eval()
    lengths, document_ids, x_0, x_t, masked, loss_weight = packed_case(seed=32)
    packed = token_loss(model, x_0, x_t, masked, loss_weight, document_ids)
    start = 0
    for index, length in enumerate(lengths):
        alone, ids, span = alone_case(start, length, x_0, x_t, masked, loss_weight, seed=index)
        expected = token_loss(model, alone["x_0"], alone["x_t"], alone["masked"],
                              alone["loss_weight"], ids)
        assert bool(masked[:, start:start + length].any())
        # RoPE depends only on position differences, so without the reset the shift of the
        # document by a multiple of B changes nothing beyond rounding either.
        torch.testing.assert_close(packed[:, start:start + length], expected[:, span],
                                   atol=1e-5, rtol=1e-5)
        start += length


def test_without_document_mask_packed_documents_see_each_other(single_rank):
    # The same comparison fails without document masking: the test above can fail.
    config = BD3Config(**tiny_overrides(seq_length=SEQ, block_size=BLOCK))
    torch.manual_seed(31)
    model = BD3Model(config).eval()
    lengths, _, x_0, x_t, masked, loss_weight = packed_case(seed=32)
    packed = token_loss(model, x_0, x_t, masked, loss_weight, None)
    start = lengths[0]
    alone, _, span = alone_case(start, lengths[1], x_0, x_t, masked, loss_weight, seed=1)
    expected = token_loss(model, alone["x_0"], alone["x_t"], alone["masked"],
                          alone["loss_weight"], None)
    assert not torch.allclose(packed[:, start:start + lengths[1]], expected[:, span], atol=1e-3)


def test_position_reset_restarts_rope_at_each_document(single_rank):
    config = BD3Config(**tiny_overrides(document_mask=True, document_position_reset=True))
    model = BD3Model(config)
    document_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [3] * 16])
    table = model.rotary_pos_emb(16)[:, 0, 0]  # [L, d], positions 0..L-1
    angles = model._training_rotary(torch.device("cpu"), document_ids)  # [2L, b, 1, d]
    expected_positions = [list(range(5)) + list(range(7)) + list(range(4)), list(range(16))]
    for b, positions in enumerate(expected_positions):
        for stream in range(2):
            torch.testing.assert_close(angles[stream * 16:(stream + 1) * 16, b, 0],
                                       table[positions])


def test_model_refuses_document_ids_it_was_not_configured_for(single_rank):
    batch = dict(x_t=torch.zeros(1, 16, dtype=torch.long), x_0=torch.zeros(1, 16, dtype=torch.long))
    plain = BD3Model(BD3Config(**tiny_overrides()))
    with pytest.raises(ValueError, match="config.document_mask is off"):
        plain(**batch, document_ids=torch.zeros(1, 16, dtype=torch.long))
    documents = BD3Model(BD3Config(**tiny_overrides(document_mask=True)))
    with pytest.raises(ValueError, match="needs document_ids"):
        documents(**batch)
    with pytest.raises(ValueError, match="integer tensor"):
        documents(**batch, document_ids=torch.zeros(1, 16))
    assert VOCAB_SIZE > MASK_ID


def test_document_ids_pass_activation_recompute(single_rank):
    # The ids ride in the attention-mask slot as a tensor, so megatron's checkpoint saves them.
    lengths, document_ids, x_0, x_t, masked, loss_weight = packed_case(seed=33)
    document_ids = document_ids.repeat(2, 1)
    x_0, x_t, masked, loss_weight = (t.repeat(2, 1) for t in (x_0, x_t, masked, loss_weight))
    results = []
    for extra in ({}, dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=1),
                  dict(recompute_granularity="selective", recompute_modules=["core_attn"])):
        config = BD3Config(**tiny_overrides(seq_length=SEQ, block_size=BLOCK, document_mask=True,
                                            document_position_reset=True, **extra))
        torch.manual_seed(34)
        model = BD3Model(config).train()
        inputs = BD3LossInputs(masked=masked, loss_weight=loss_weight)
        model(x_t, x_0, inputs, document_ids=document_ids).sum().backward()
        results.append({n: p.grad for n, p in model.named_parameters()})
    for other in results[1:]:
        for name, grad in results[0].items():
            torch.testing.assert_close(other[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_per_batch_masks_follow_new_and_edited_ids(single_rank):
    # The kernels build their document masks once per batch of ids and reuse them across layers;
    # another ids tensor, or the same one edited in place, must not reuse stale masks.
    for path in ("block-structured", "dense"):
        attention = core_attention(seq_length=32, block_size=4, **PATHS[path])
        document_ids = random_layout(3, 32, seed=40)
        check_against_brute_force(attention, document_ids, 4, 64)
        document_ids[:, 5:] += 1  # in place: a new boundary at token 5
        check_against_brute_force(attention, document_ids, 4, 64)
        check_against_brute_force(attention, random_layout(3, 32, seed=41), 4, 64)


# -- context parallelism: one rank's attention with documents ------------------------------------


@pytest.mark.parametrize("seq_length, block_size, cp", [(32, 4, 2), (48, 4, 3), (32, 8, 2)])
def test_context_parallel_rank_attention_with_documents(seq_length, block_size, cp):
    """Each CP rank's attention with documents (its queries [x_t ; x_0] at its positions against
    [its noisy keys ; all clean keys], global ids [b, L]) equals the brute-force softmax under
    the rows and columns of those global indices, for random document layouts: the block kernel
    with spans (values and gradients, also x_t queries alone), the dense masks the core
    attention uses, and flex (forward)."""
    from torch.nn.attention.flex_attention import flex_attention

    from megatron_bd3.model.context_parallel import ContextParallelLayout
    from megatron_bd3.model.masks import document_attention_masks

    L, batch = seq_length, 4
    document_ids = random_layout(batch, L, seed=L + block_size + cp)
    allowed_full = brute_force_mask(document_ids, block_size)  # [b, 2L, 2L]
    scale = 1 / math.sqrt(HEAD_DIM)
    for rank in range(cp):
        layout = ContextParallelLayout(L, block_size, cp, rank)
        n = L // cp
        chunk = L // (2 * cp)
        positions = torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                               torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)])
        query_rows = torch.cat([positions, positions + L])
        key_rows = torch.cat([positions, torch.arange(L, 2 * L)])
        allowed = allowed_full[:, query_rows][:, :, key_rows]  # [b, 2n, n + L]
        q, k, v = random_qkv(2 * n + L, batch, seed=rank)
        q, k, v = q[: 2 * n], k[: n + L], v[: n + L]

        # the dense masks of the core attention's SDPA path
        noisy_rows, clean_block = document_attention_masks(
            document_ids, L, block_size, "sdpa", layout
        )
        assert torch.equal(noisy_rows[:, 0], allowed[:, :n])
        assert torch.equal(clean_block[:, 0], allowed[:, n:, n:])
        assert not bool(allowed[:, n:, :n].any())  # clean queries never see noisy keys

        # the block kernel with the rank's spans, both streams and x_t queries alone
        for queries in (2 * n, n):
            inputs = [t.clone().requires_grad_() for t in (q[:queries], k, v)]
            expected_inputs = [t.clone().requires_grad_() for t in (q[:queries], k, v)]
            expected = brute_force_attention(*expected_inputs, allowed)  # [queries, b, h*d]
            out = block_diffusion_attention(
                *inputs, L, block_size, scale, document_ids=document_ids, spans=layout.spans
            ).flatten(2)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            grad = torch.randn_like(out)
            got = torch.autograd.grad(out, inputs, grad)
            wanted = torch.autograd.grad(expected, expected_inputs, grad)
            for name, g, w in zip("qkv", got, wanted, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"rank {rank} d{name}")

        # flex with the rank's BlockMask (CPU: forward only)
        block_mask = document_attention_masks(document_ids, L, block_size, "flex", layout)
        with torch.no_grad():
            out = flex_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)),
                                 block_mask=block_mask, scale=scale)
        out = out.permute(2, 0, 1, 3).flatten(2)
        expected = brute_force_attention(q, k, v, allowed)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
