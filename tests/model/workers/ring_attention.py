"""Worker: the ring exchange (model/ring_attention.py) on c gloo ranks against a brute-force
masked softmax over the whole sequence.

Every rank draws the same global [2L] queries, keys, values and output gradient; it hands the
ring its own rows (the zig-zag positions written here from the documented layout, not read from
the model) and checks its output and its query/key/value gradients against the brute-force
attention under the reference mask (block matrices, tests/model/helpers.py), optionally
restricted to random documents. Cases: both streams and x_t queries only, grouped-query heads,
document ids. The bytes the ring sent are checked against its formula: (c - 1) x forward and
2 (c - 1) x backward, x = (L / c) b ng 2 hn 4 bytes.
float32 runs the CPU flash kernel per call, float64 the plain-torch path.
Prints "RING OK <case> rank=<r>" per case.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_bd3.model.context_parallel import ContextParallelLayout, exchange_meter
from megatron_bd3.model.ring_attention import ring_attention
from tests.model.helpers import reference_bd3_mask

# L: a multiple of 2 x CP x B for CP = 2, 3 and 4
L, B, BATCH, HEADS, HEAD_DIM, SCALE = 96, 4, 2, 4, 8, 0.35


def zig_zag_positions(rank: int, cp: int) -> torch.Tensor:
    chunk = L // (2 * cp)
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                      torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)])


def random_documents(generator: torch.Generator) -> torch.Tensor:
    """[b, L] document ids: each sequence cut at random positions (not on block edges)."""
    rows = []
    for _ in range(BATCH):
        cuts = torch.zeros(L, dtype=torch.long)
        cuts[torch.randint(1, L, (4,), generator=generator)] = 1
        rows.append(torch.cumsum(cuts, 0))
    return torch.stack(rows)


def brute_force(q, k, v, allowed):
    """[2L or L, b, h, d] queries, [2L, b, g, d] keys/values, [queries, 2L] or [b, queries, 2L]
    bool -> [queries, b, h, d], float64."""
    groups = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), k.double()) * SCALE
    allowed = allowed[:, None] if allowed.dim() == 3 else allowed
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,kbhd->qbhd", weights, v.double())


def main() -> None:
    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(cp)))
    layout = ContextParallelLayout(L, B, cp, rank)
    pos = zig_zag_positions(rank, cp)
    full_mask = reference_bd3_mask(L, B)  # [2L, 2L]
    # float32 and bfloat16 run torch's CPU flash kernel per call, float64 the plain-torch path;
    # bfloat16 also rounds the key/value gradient partials at every hop of the ring
    for case, groups, x_t_only, documents, dtype in [
        ("both_streams", 2, False, False, torch.float32),
        ("x_t_only", 4, True, False, torch.float32),
        ("documents", 1, False, True, torch.float32),
        ("documents_x_t_only", 2, True, True, torch.float32),
        ("plain_torch_documents", 2, False, True, torch.float64),
        ("bf16_documents", 2, False, True, torch.bfloat16),
    ]:
        # bf16 keeps 8 bits of mantissa: outputs and gradients of size ~1-3 are good to ~2e-2
        tolerance = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(
            atol=1e-5, rtol=1e-4)
        generator = torch.Generator().manual_seed(17)
        sq = L if x_t_only else 2 * L
        q = torch.randn(sq, BATCH, HEADS, HEAD_DIM, generator=generator)
        k, v = (torch.randn(2 * L, BATCH, HEADS // groups, HEAD_DIM, generator=generator)
                for _ in "kv")
        grad = torch.randn(sq, BATCH, HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
        allowed = full_mask[:sq]
        docs = None
        if documents:
            docs = random_documents(generator)
            token = torch.arange(2 * L) % L
            same = docs[:, token[:sq], None] == docs[:, None, token]  # [b, sq, 2L]
            allowed = allowed & same
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        expected = brute_force(q64, k64, v64, allowed)
        expected.backward(grad)

        query_rows = pos if x_t_only else torch.cat([pos, pos + L])
        key_rows = torch.cat([pos, pos + L])
        mine = [t[rows].to(dtype).requires_grad_() for t, rows in
                ((q, query_rows), (k, key_rows), (v, key_rows))]
        exchange_meter.reset()
        out = ring_attention(*mine, layout, group, SCALE, document_ids=docs)
        out.backward(grad[query_rows].to(dtype))
        torch.testing.assert_close(out.double(), expected[query_rows].detach(),
                                   **tolerance, msg=f"{case} output")
        # the key/value gradients of this rank's rows hold the contributions of every rank
        for name, got, want, rows in (("q", mine[0], q64, query_rows),
                                      ("k", mine[1], k64, key_rows),
                                      ("v", mine[2], v64, key_rows)):
            torch.testing.assert_close(got.grad.double(), want.grad[rows], **tolerance,
                                       msg=f"{case} d{name}")
        x = (L // cp) * BATCH * (HEADS // groups) * 2 * HEAD_DIM * dtype.itemsize
        sent = (exchange_meter.forward_bytes, exchange_meter.backward_bytes)
        assert sent == ((cp - 1) * x, 2 * (cp - 1) * x), f"{case}: sent {sent}, x = {x}"
        print(f"RING OK {case} cp{cp} rank={rank} bytes={sent}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
