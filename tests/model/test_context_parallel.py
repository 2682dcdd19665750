"""Context parallelism of BD3Model (model/context_parallel.py) against one rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_bd3.model import BD3Config
from megatron_bd3.model.block_attention import block_diffusion_attention
from megatron_bd3.model.context_parallel import ContextParallelLayout, dense_rank_mask
from tests.dist_launcher import run_distributed
from tests.model.helpers import reference_bd3_mask, tiny_overrides

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tp, cp, comm",
    [(1, 2, "all_gather"), (2, 2, "all_gather"), (1, 2, "p2p"), (1, 4, "p2p"), (2, 2, "p2p")],
)
def test_context_parallel_matches_single_rank(tp, cp, comm):
    """CP = 2 (and CP = 2 x TP = 2 with sequence parallel; with the ring also CP = 4, a ring of
    3 steps): loss, every gradient and the logits of each rank's positions equal CP = 1; the
    exchanged bytes equal the formula. The all-gather on the block, dense SDPA and flex
    (forward) kernels, with full recompute, keyed dropout 0.1 (embedding, hidden, attention
    probabilities) and document masks (+ per-document RoPE positions); the ring ('p2p') on its
    own kernels, with full recompute, keyed dropout 0.1 on the embedding and hidden states, and
    document masks; each variant against its own CP = 1 run."""
    nproc = tp * cp
    output = run_distributed(WORKERS / "context_parallel.py", nproc, str(tp), str(cp), comm)
    phases = ("block", "recompute_full_block", "dense_sdpa", "flex", "dropout_dense_sdpa",
              "documents_block", "documents_dense_sdpa", "documents_flex")
    if comm == "p2p":
        phases = ("ring", "ring_recompute_full", "ring_hidden_dropout", "ring_documents")
    for rank in range(nproc):
        for phase in phases:
            assert f"CP OK tp{tp}_cp{cp}_{phase} rank={rank}" in output


@pytest.mark.distributed
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_matches_masked_softmax(cp):
    """The ring exchange alone on CP ranks: output and query/key/value gradients equal a
    brute-force softmax under the reference mask (both streams, x_t queries only, grouped-query
    heads, random documents; the CPU flash kernel in fp32 and bf16, and the plain-torch path);
    bytes sent equal (CP - 1) x forward and 2 (CP - 1) x backward."""
    output = run_distributed(WORKERS / "ring_attention.py", cp)
    cases = ("both_streams", "x_t_only", "documents", "documents_x_t_only",
             "plain_torch_documents", "bf16_documents")
    for rank in range(cp):
        for case in cases:
            assert f"RING OK {case} cp{cp} rank={rank}" in output


def test_refuses_unknown_exchange_and_ring_dropout():
    message = r"cp_comm_type 'a2a' is not one of \('all_gather', 'p2p', 'auto'\)"
    with pytest.raises(ValueError, match=message):
        BD3Config(**tiny_overrides(context_parallel_size=2, cp_comm_type="a2a"))
    with pytest.raises(ValueError, match="cp_comm_type 'p2p' has no attention dropout"):
        BD3Config(**tiny_overrides(context_parallel_size=2, cp_comm_type="p2p",
                                   attention_dropout=0.1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU choice of 'auto'")
def test_auto_exchange_is_the_ring_on_cpu_and_the_all_gather_with_attention_dropout():
    # 'auto' is resolved when the config is built: megatron only ever sees an explicit exchange.
    assert BD3Config(**tiny_overrides(context_parallel_size=2)).cp_comm_type == "p2p"
    with_dropout = BD3Config(**tiny_overrides(context_parallel_size=2, attention_dropout=0.1))
    assert with_dropout.cp_comm_type == "all_gather"


def test_layout_is_zig_zag_on_block_edges():
    """Every position on exactly one rank; rank r holds chunks r and 2c-1-r; the noisy-query
    work (positions summed) is the same on every rank."""
    L, B, cp = 64, 4, 4
    chunk = L // (2 * cp)
    held = []
    for rank in range(cp):
        layout = ContextParallelLayout(L, B, cp, rank)
        expected = list(range(rank * chunk, (rank + 1) * chunk)) + list(
            range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
        )
        assert layout.positions.tolist() == expected
        assert all(s % B == 0 and n % B == 0 for s, n in layout.spans)
        held.append(layout.positions)
    assert sorted(torch.cat(held).tolist()) == list(range(L))
    assert len({int(p.sum()) for p in held}) == 1
    gathered = torch.cat(held)
    assert torch.equal(gathered[ContextParallelLayout(L, B, cp, 0).global_order], torch.arange(L))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(seq_length=16, block_size=8), "multiple of 2 x context_parallel_size x block_size"),
        (dict(seq_length=16, block_size=16, single_stream_mdlm=True), "two-stream input"),
    ],
)
def test_refuses_layouts_it_cannot_cut(overrides, message):
    with pytest.raises(ValueError, match=message):
        BD3Config(**tiny_overrides(context_parallel_size=2, **overrides))


@pytest.mark.parametrize("seq_length, block_size, cp", [(32, 4, 2), (48, 4, 3), (32, 8, 2)])
@pytest.mark.parametrize("x_t_only", [False, True])
def test_rank_attention_matches_masked_softmax(seq_length, block_size, cp, x_t_only):
    """One CP rank's attention (its queries against [its noisy keys ; all clean keys]) on the
    block kernel and as the per-rank dense mask equals a brute-force softmax under the reference
    mask's rows and columns of those positions, values and gradients."""
    L = seq_length
    gen = torch.Generator().manual_seed(L + cp)
    for rank in range(cp):
        layout = ContextParallelLayout(L, block_size, cp, rank)
        pos, n = layout.positions, layout.local_length
        query_rows = pos if x_t_only else torch.cat([pos, pos + L])
        key_rows = torch.cat([pos, torch.arange(L, 2 * L)])
        allowed = reference_bd3_mask(L, block_size)[query_rows][:, key_rows]
        assert torch.equal(dense_rank_mask(layout, len(query_rows), torch.device("cpu")), allowed)
        q = torch.randn(len(query_rows), 2, 3, 8, generator=gen, requires_grad=True)
        k, v = (torch.randn(n + L, 2, 3, 8, generator=gen, requires_grad=True) for _ in "kv")
        scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), k.double()) * 0.3
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        expected = torch.einsum("bhqk,kbhd->qbhd", weights, v.double())
        out = block_diffusion_attention(q, k, v, L, block_size, 0.3, spans=layout.spans)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
        grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
        want = torch.autograd.grad(expected, (q, k, v), grad)
        got = torch.autograd.grad(out, (q, k, v), grad.float())
        for name, g, w in zip("qkv", got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_skips_the_chunk_pairs_the_mask_excludes(cp):
    """A ring step with another rank computes, per stream, exactly the (query chunk, key chunk)
    pairs whose key chunk lies earlier (two of four), each without a mask; the others are
    skipped."""
    from megatron_bd3.model.ring_attention import _step_pairs

    L, B = 16 * cp, 4
    chunk = L // (2 * cp)
    for rank in range(cp):
        layout = ContextParallelLayout(L, B, cp, rank)
        for source in set(range(cp)) - {rank}:
            pairs = _step_pairs(layout, source, 2 * layout.local_length, torch.float32,
                                torch.device("cpu"))
            computed = set()
            for pair in pairs:
                assert pair.mask is None and pair.empty_rows is None
                assert pair.queries.stop - pair.queries.start == chunk
                stream = "x_t" if pair.queries.start < layout.local_length else "x_0"
                computed.add((stream, int(pair.query_tokens[0]) // chunk,
                              int(pair.key_tokens[0]) // chunk))
            expected = {
                (stream, q, k)
                for stream in ("x_t", "x_0")
                for q in (rank, 2 * cp - 1 - rank)
                for k in (source, 2 * cp - 1 - source)
                if k < q
            }
            assert computed == expected and len(pairs) == 4
