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
@pytest.mark.parametrize("tp, nproc", [(1, 2), (2, 4)])
def test_context_parallel_matches_single_rank(tp, nproc):
    """CP = 2 (and CP = 2 x TP = 2 with sequence parallel): loss, every gradient and the logits
    of each rank's positions equal CP = 1, on the block, dense SDPA and flex (forward) kernels;
    the exchanged bytes equal the formula. The same with keyed dropout 0.1 (embedding, hidden,
    attention probabilities) and with document masks (+ per-document RoPE positions), each
    against its own CP = 1 run."""
    output = run_distributed(WORKERS / "context_parallel.py", nproc, str(tp))
    phases = ("block", "recompute_full_block", "dense_sdpa", "flex", "dropout_dense_sdpa",
              "documents_block",
              "documents_dense_sdpa", "documents_flex")
    for rank in range(nproc):
        for phase in phases:
            assert f"CP OK tp{tp}_cp2_{phase} rank={rank}" in output


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
