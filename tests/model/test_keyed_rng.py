"""Keyed dropout and keyed initial weights (megatron_bd3/model/keyed_dropout.py, keyed_init.py).

The references here are brute force: one hash call per element, with the element numbering
written out from docs/training.md §5, and megatron's TP split done on index ranges with
torch.split as megatron's _initialize_affine_weight_cpu does it. That 1 process, DP, TP, SP and
PP train the same run is tested end to end in tests/training/test_trainer_layouts.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_bd3.diffusion import hash_uint32, uniform_noise
from megatron_bd3.model import BD3Config, BD3Model, forward_step
from megatron_bd3.model.keyed_dropout import (
    ATTENTION_OUTPUT,
    MLP_OUTPUT,
    STREAM_DROPOUT,
    BD3BiasDropoutAdd,
    DropoutKey,
    dropout_key_scope,
    keyed_attention_dropout,
    keyed_hidden_dropout,
)
from megatron_bd3.model.keyed_init import (
    STREAM_INIT,
    global_indices,
    init_std,
    keyed_rows,
    name_key,
)
from tests.model.helpers import SEQ_LENGTH, tiny_overrides


def reference_hidden_keep(seed, step, sample_ids, rows, hidden, site, p):
    """keep[r, j, c] for rows `rows` of the stream, one hash call per element."""
    keep = torch.zeros(len(rows), len(sample_ids), hidden, dtype=torch.bool)
    for i, row in enumerate(rows):
        for j, sample in enumerate(sample_ids):
            for c in range(hidden):
                u = uniform_noise(seed, step, torch.tensor(sample), torch.tensor(row * hidden + c),
                                  STREAM_DROPOUT, site)
                keep[i, j, c] = bool(u >= p)
    return keep


def test_hidden_dropout_masks_are_the_hash_of_each_element():
    x = torch.randn(6, 2, 4)  # [s, b, h]
    key = DropoutKey(seed=7, step=3, sample_ids=torch.tensor([5, 2]))
    with dropout_key_scope(key):
        out = keyed_hidden_dropout(x, 0.5, site=9, sequence_parallel=False)
    keep = reference_hidden_keep(7, 3, [5, 2], range(6), 4, 9, 0.5)
    assert 0 < int(keep.sum()) < keep.numel()
    torch.testing.assert_close(out, torch.where(keep, x * 2.0, torch.zeros_like(x)))


def test_a_sample_gets_its_masks_whatever_the_rest_of_its_micro_batch():
    x = torch.randn(8, 3, 16)
    with dropout_key_scope(DropoutKey(1, 4, torch.tensor([9, 0, 4]))):
        together = keyed_hidden_dropout(x, 0.3, ATTENTION_OUTPUT, False)
    with dropout_key_scope(DropoutKey(1, 4, torch.tensor([9, 0, 4]))[2:]):  # cut like a batch
        alone = keyed_hidden_dropout(x[:, 2:], 0.3, ATTENTION_OUTPUT, False)
    torch.testing.assert_close(together[:, 2:], alone, rtol=0, atol=0)
    # another step, site or seed draws another mask
    for key, site in ((DropoutKey(1, 5, torch.tensor([4])), ATTENTION_OUTPUT),
                      (DropoutKey(1, 4, torch.tensor([4])), MLP_OUTPUT),
                      (DropoutKey(2, 4, torch.tensor([4])), ATTENTION_OUTPUT)):
        with dropout_key_scope(key):
            assert not torch.equal(keyed_hidden_dropout(x[:, 2:], 0.3, site, False), alone)


def test_drop_rate_and_scaling():
    x = torch.ones(256, 4, 64)
    with dropout_key_scope(DropoutKey(0, 0, torch.arange(4))):
        out = keyed_hidden_dropout(x, 0.1, MLP_OUTPUT, False)
    dropped = float((out == 0).float().mean())
    assert abs(dropped - 0.1) < 0.006  # 65536 draws: sigma 0.0012
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.9)


def test_keyed_dropout_needs_a_key_of_the_micro_batch():
    with pytest.raises(RuntimeError, match="needs the micro-batch's DropoutKey"):
        keyed_hidden_dropout(torch.ones(2, 1, 2), 0.1, 1, False)
    with dropout_key_scope(DropoutKey(0, 0, torch.arange(3))):
        with pytest.raises(ValueError, match="3 sample ids for a micro-batch of 2 rows"):
            keyed_hidden_dropout(torch.ones(2, 2, 2), 0.1, 1, False)
    with dropout_key_scope(DropoutKey(0, 0, torch.arange(3))):
        x = torch.ones(2, 2, 2)
        assert keyed_hidden_dropout(x, 0.0, 1, False) is x  # p = 0 draws nothing


def test_scattered_rows_queries_and_keys_get_their_global_masks():
    """A context-parallel rank's rows are not one run of the stream: given their global rows
    (rows 8..11 and 20..23 of x_t, the same positions of x_0, L = 32), hidden and attention
    dropout draw the brute-force masks of those global elements (the x_t-only last layer: the
    first rows). Under sequence parallel with CP: tests/model/test_context_parallel.py."""
    L = 32
    positions = torch.cat([torch.arange(8, 12), torch.arange(20, 24)])
    stream_rows = torch.cat([positions, positions + L])  # [x_t ; x_0] at the positions
    x = torch.randn(len(stream_rows), 2, 3)
    key = DropoutKey(seed=5, step=2, sample_ids=torch.tensor([3, 0]))
    with dropout_key_scope(key):
        out = keyed_hidden_dropout(x, 0.5, ATTENTION_OUTPUT, False, stream_rows)
        x_t_only = keyed_hidden_dropout(x[:8], 0.5, ATTENTION_OUTPUT, False, stream_rows)
    keep = reference_hidden_keep(5, 2, [3, 0], stream_rows.tolist(), 3, ATTENTION_OUTPUT, 0.5)
    assert 0 < int(keep.sum()) < keep.numel()
    torch.testing.assert_close(out, torch.where(keep, x * 2.0, torch.zeros_like(x)))
    torch.testing.assert_close(x_t_only, out[:8])

    probs = torch.rand(2, 2, len(stream_rows), 4 + L)  # the rank's queries x [noisy ; clean]
    key_rows = torch.cat([positions[:4], torch.arange(L, 2 * L)])
    with dropout_key_scope(key):
        dropped = keyed_attention_dropout(probs, 0.3, 1, first_head=2, q_offset=0, k_offset=0,
                                          query_ids=stream_rows, key_ids=key_rows)
    for b, q, k in ((0, 3, 1), (1, 9, 20), (1, 15, 35)):
        for h in range(2):
            element = ((((2 + h) << 20) + int(stream_rows[q])) << 20) + int(key_rows[k])
            u = uniform_noise(5, 2, torch.tensor([3, 0][b]), torch.tensor(element),
                              STREAM_DROPOUT, 4 * 1 + 3)
            expected = probs[b, h, q, k] / 0.7 if float(u) >= 0.3 else 0.0
            assert float(dropped[b, h, q, k]) == pytest.approx(float(expected))


def test_attention_dropout_follows_global_heads_and_positions():
    probs = torch.rand(2, 4, 6, 8)  # [b, heads, sq, sk]: 4 global heads, 8 keys
    key = DropoutKey(3, 1, torch.tensor([1, 6]))
    with dropout_key_scope(key):
        full = keyed_attention_dropout(probs, 0.4, 2, first_head=0, q_offset=0, k_offset=0)
        # a TP rank holding heads 2, 3; a call whose queries and keys start at position 2
        heads = keyed_attention_dropout(probs[:, 2:], 0.4, 2, 2, 0, 0)
        shifted = keyed_attention_dropout(probs[:, :, 2:, 2:], 0.4, 2, 0, 2, 2)
    torch.testing.assert_close(heads, full[:, 2:], rtol=0, atol=0)
    torch.testing.assert_close(shifted, full[:, :, 2:, 2:], rtol=0, atol=0)
    # brute force for one entry: sample 6, head 3, query 5, key 7, layer 2
    element = (((3 << 20) + 5) << 20) + 7
    u = uniform_noise(3, 1, torch.tensor(6), torch.tensor(element), STREAM_DROPOUT, 4 * 2 + 3)
    expected = probs[1, 3, 5, 7] / 0.6 if float(u) >= 0.4 else 0.0
    assert float(full[1, 3, 5, 7]) == pytest.approx(float(expected))


def test_bias_dropout_add_keyed_is_residual_plus_keyed_dropout():
    bda = BD3BiasDropoutAdd(MLP_OUTPUT, keyed=True, sequence_parallel=False)
    bda.bind_layer(3)
    x, bias, residual = torch.randn(4, 2, 8), torch.randn(8), torch.randn(6, 2, 8)
    with dropout_key_scope(DropoutKey(0, 2, torch.tensor([0, 1]))):
        out = bda(True, False)((x, bias), residual, 0.25)
        expected = residual[:4] + keyed_hidden_dropout(x + bias, 0.25, 4 * 3 + MLP_OUTPUT, False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # eval: no dropout and no key needed (megatron's eval path adds in place: expected first)
    expected = x + bias + residual[:4]
    torch.testing.assert_close(bda(False, False)((x, bias), residual, 0.25), expected)


def megatron_split_indices(full: int, tp_size: int, rank: int, stride: int) -> torch.Tensor:
    """Indices megatron's _initialize_affine_weight_cpu gives rank `rank` of a dimension."""
    per_partition = full // tp_size
    chunks = torch.split(torch.arange(full), per_partition // stride)
    return torch.cat(chunks[rank::tp_size])


@pytest.mark.parametrize("stride", [1, 2])
def test_global_indices_are_megatrons_tp_split(stride):
    for rank in range(2):
        weight = torch.nn.Parameter(torch.empty(12, 5))
        weight.tensor_model_parallel, weight.partition_dim = True, 0
        weight.partition_stride = stride
        expected = megatron_split_indices(24, 2, rank, stride)
        torch.testing.assert_close(global_indices(weight, 0, rank, 2), expected)
        torch.testing.assert_close(global_indices(weight, 1, rank, 2), torch.arange(5))


def test_keyed_rows_are_standard_normal_and_each_row_its_own():
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    values = keyed_rows(5, name, torch.arange(400), 500)
    assert abs(float(values.mean())) < 0.01 and abs(float(values.std()) - 1.0) < 0.01
    # a rank's rows (or a padded weight with more rows) hold the same values
    torch.testing.assert_close(keyed_rows(5, name, torch.arange(100, 300), 500), values[100:300],
                               rtol=0, atol=0)
    # brute force for one row: torch's CPU generator seeded with the row's 64-bit hash
    low, high = (int(hash_uint32(5, name_key(name), torch.tensor(7), torch.tensor(word),
                                 STREAM_INIT)) for word in (0, 1))
    generator = torch.Generator().manual_seed((high << 32) | low)
    torch.testing.assert_close(values[7], torch.randn(500, generator=generator), rtol=0, atol=0)
    assert not torch.equal(keyed_rows(5, "other.weight", torch.arange(400), 500), values)
    assert not torch.equal(keyed_rows(6, name, torch.arange(400), 500), values)


def test_init_std_reads_megatrons_normal_init_and_refuses_others():
    assert init_std(functools.partial(torch.nn.init.normal_, mean=0.0, std=0.02), "x") == 0.02
    with pytest.raises(ValueError, match="init_rng 'keyed'.*init_method"):
        init_std(functools.partial(torch.nn.init.xavier_normal_), "init_method")


def build(seed: int, **extra) -> BD3Model:
    torch.manual_seed(seed)
    return BD3Model(BD3Config(**tiny_overrides(**extra)))


def test_keyed_init_ignores_the_torch_seed(single_rank):
    a = build(0, init_rng="keyed", init_seed=4)
    b = build(1, init_rng="keyed", init_seed=4)
    c = build(0, init_rng="keyed", init_seed=5)
    params = zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True)
    for (name, pa), pb, pc in params:
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    # megatron's std per kind of weight (init_method_std 0.2, 2 layers)
    fc2 = a.decoder.layers[1].mlp.linear_fc2.weight
    qkv = a.decoder.layers[0].self_attention.linear_qkv.weight
    assert float(fc2.std()) == pytest.approx(0.2 / 2.0, rel=0.05)  # 0.2 / sqrt(2 x layers)
    assert float(qkv.std()) == pytest.approx(0.2, rel=0.05)
    torch.manual_seed(0)
    torch_init = build(0)
    assert not torch.equal(torch_init.decoder.layers[0].self_attention.linear_qkv.weight, qkv)


def test_model_forward_with_keyed_dropout(single_rank):
    model = build(0, init_rng="keyed", dropout_rng="keyed", hidden_dropout=0.3,
                  attention_dropout=0.2, embedding_dropout=0.1).train()
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, 99, (2, SEQ_LENGTH), generator=g)
    masked = torch.rand(2, SEQ_LENGTH, generator=g) < 0.5
    batch = {"x_0": x_0, "x_t": torch.where(masked, 99, x_0), "masked": masked,
             "loss_weight": torch.full((2, SEQ_LENGTH), 2.0)}

    def loss(step: int, ids) -> torch.Tensor:
        key = DropoutKey(1, step, torch.tensor(ids))
        output, _ = forward_step(iter([{**batch, "dropout_key": key}]), model)
        return output.detach()

    first = loss(0, [0, 1])
    torch.testing.assert_close(loss(0, [0, 1]), first, rtol=0, atol=0)  # same key, same masks
    assert not torch.equal(loss(1, [0, 1]), first)  # another step
    # each sample row depends only on its own key: row 1 alone equals row 1 of the pair
    single = {k: v[1:] for k, v in batch.items()}
    key = DropoutKey(1, 0, torch.tensor([1]))
    output, _ = forward_step(iter([{**single, "dropout_key": key}]), model)
    torch.testing.assert_close(output.detach(), first[1:], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="DropoutKey"):
        forward_step(iter([batch]), model)


def test_keyed_dropout_refuses_activation_recompute():
    with pytest.raises(ValueError, match="dropout_rng 'keyed' with recompute_granularity 'full'"):
        BD3Config(**tiny_overrides(dropout_rng="keyed", hidden_dropout=0.1,
                                   recompute_granularity="full", recompute_method="uniform",
                                   recompute_num_layers=1))
    BD3Config(**tiny_overrides(dropout_rng="torch", hidden_dropout=0.1,
                               recompute_granularity="full", recompute_method="uniform",
                               recompute_num_layers=1))


def test_keyed_attention_dropout_refuses_positions_it_cannot_pack():
    # (head, query, key) are packed with 2^20 stream positions each: 2L must stay below that.
    with pytest.raises(ValueError, match="keys stream positions below 2\\^20; seq_length 524800"):
        BD3Config(**tiny_overrides(dropout_rng="keyed", attention_dropout=0.1,
                                   seq_length=524800, block_size=4))
    BD3Config(**tiny_overrides(dropout_rng="keyed", attention_dropout=0.1, seq_length=524288,
                               block_size=4))
    BD3Config(**tiny_overrides(dropout_rng="keyed", attention_dropout=0.0, seq_length=524800,
                               block_size=4))
