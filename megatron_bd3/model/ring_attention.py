"""Ring exchange of the clean keys/values for context parallelism (cp_comm_type 'p2p';
docs/training.md "Context parallelism"; the layout is model/context_parallel.py).

The all-gather exchange (context_parallel.gather_clean_key_values) hands every rank all L clean
keys/values of a layer at once, and autograd keeps that [L, b, ng, 2·hn] tensor for the
backward: the saved activations of attention grow with L, not L / c. Here the clean keys/values
travel around the CP ring instead (rank r sends to r + 1 and receives from r − 1):

    step 0      this rank's queries against its own keys [noisy (n) ; clean (n)]
    step i ≥ 1  against the clean keys/values of rank r − i, received from r − 1 while step
                i − 1 computes (and passed on to r + 1 for its step i + 1)

Each step gives a partial attention output and its log-sum-exp per query row; they are merged
as an online softmax (out = Σ_i e^{lse_i − lse} · out_i, lse = log Σ_i e^{lse_i}), which is the
softmax over all of a row's keys up to summation order.

Skipping. Between two ranks' chunks the mask is all or nothing: a query chunk sees a clean chunk
of another rank entirely when that chunk lies earlier, not at all when it lies later. With the
zig-zag layout rank r's late chunk (2c − 1 − r) sees both chunks of every other rank, its early
chunk (r) only the early chunks of lower ranks; so every step with another rank has two of its
four (query chunk, key chunk) pairs per stream, and the two that the mask excludes are skipped.
Pairs inside the rank's own chunks (step 0) are partly allowed; they are cut into tiles of
`block_attention.chunk_rows` query rows, each computed over the key range it can see.

Backward (a custom autograd.Function): it saves only this rank's query, key and value, the
output and the log-sum-exp, so the memory per layer stays O(L / c). It circulates the clean
keys/values around the ring again; at each step the gradient of a pair is the kernel's backward
with the final output and log-sum-exp (P = e^{S − lse}, D = rowsum(dO ∘ O)), which is exact for
a row whose keys are split across calls. The key/value gradient of another rank's chunk travels
with that chunk to the next rank, which adds its own part, and reaches its owner after the last
step. Per layer and micro-batch a rank sends (c − 1) · x bytes forward and 2 · (c − 1) · x
backward (the keys/values again, and their gradients), x = (L / c) · b · ng · 2·hn · bytes per
element (`ExchangeMeter` counts them); the all-gather path sends (c − 1) · x each way.

Kernels: on CPU (float32/bfloat16) each pair is one call of torch's CPU flash-attention kernel
and its backward (as block_attention.py), with the pair's additive mask; elsewhere the same math
in plain torch (matmul, logsumexp) over tiles of query rows. With document ids [b, L] (global
positions) each pair's mask is also restricted to keys of the query's document. No attention
dropout (BD3Config refuses it with 'p2p').

Messages: every step posts one `batch_isend_irecv` with all of its sends to the next rank and
the matching receives from the previous one (forward: the next chunk; backward: the next chunk
and the gradient of the last one), in the same order on every rank. So the ring matches on
backends that pair point-to-point messages by order, and no send waits on a receive its
neighbour would post only after its own send completes (NCCL may block a lone send until the
receive exists). Checked on gloo only: no machine with two GPUs was available.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_bd3.diffusion import block_diffusion_allowed
from megatron_bd3.model import block_attention
from megatron_bd3.model.block_attention import _flash_backward, _flash_forward, _with_documents
from megatron_bd3.model.context_parallel import ContextParallelLayout, exchange_meter
from megatron_bd3.model.masks import PerBatchCache

_NEG_INF = float("-inf")
# Query rows per matmul of the plain-torch path (bounds its [b, np, rows, keys] scores).
_MATH_ROWS = 256


@dataclass(frozen=True)
class _Pair:
    """One kernel call: query rows `queries` (local rows) against key rows `keys` (rows of the
    step's key tensor)."""

    queries: slice
    keys: slice
    mask: Tensor | None  # additive [rows, keys], 0 = may attend; None: every pair allowed
    empty_rows: Tensor | None  # [rows] bool: rows that see no key of this call
    query_tokens: Tensor  # [rows] global position of each query row (for document ids)
    key_tokens: Tensor  # [keys]


@functools.lru_cache(maxsize=64)
def _step_pairs(
    layout: ContextParallelLayout, source: int, queries: int, dtype: torch.dtype,
    device: torch.device,
) -> tuple[_Pair, ...]:
    """The calls of the step whose keys are rank `source`'s: its own [noisy ; clean] keys when
    source is this rank, its clean keys otherwise. The mask is the training-mask predicate at the
    global indices (docs/method.md §1.1: x_t position p is p, x_0 position p is L + p)."""
    L, B, m = layout.seq_length, layout.block_size, layout.chunk_length
    positions = layout.positions
    query_index = positions if queries == layout.local_length else torch.cat(
        [positions, positions + L]
    )
    if source == layout.rank:
        key_index = torch.cat([positions, positions + L])
    else:
        key_index = layout.positions_of(source) + L
    tile = block_attention.chunk_rows(m, B)
    pairs = []
    for q0 in range(0, query_index.numel(), m):  # one chunk of one stream at a time
        for k0 in range(0, key_index.numel(), m):
            q_rows, k_rows = query_index[q0 : q0 + m], key_index[k0 : k0 + m]
            allowed = block_diffusion_allowed(q_rows[:, None], k_rows[None, :], L, B)
            if not allowed.any():
                continue  # a pair the mask excludes entirely: no compute
            if allowed.all():
                pairs.append(_pair(q0, k0, allowed, q_rows, k_rows, L, dtype, device))
                continue
            for t in range(0, m, tile):
                rows = allowed[t : t + tile]
                columns = rows.any(dim=0).nonzero()
                if not columns.numel():
                    continue
                lo, hi = int(columns[0]), int(columns[-1]) + 1
                pairs.append(
                    _pair(q0 + t, k0 + lo, rows[:, lo:hi], q_rows[t : t + tile], k_rows[lo:hi],
                          L, dtype, device)
                )
    return tuple(pairs)


def _pair(q0, k0, allowed, q_rows, k_rows, L, dtype, device) -> _Pair:
    rows, keys = allowed.shape
    mask = None
    if not bool(allowed.all()):
        mask = torch.zeros(rows, keys, dtype=dtype).masked_fill(~allowed, _NEG_INF).to(device)
    empty = ~allowed.any(dim=1)
    return _Pair(
        slice(q0, q0 + rows), slice(k0, k0 + keys), mask,
        empty.to(device) if bool(empty.any()) else None, (q_rows % L).to(device),
        (k_rows % L).to(device),
    )


_document_pair_masks = PerBatchCache()  # {step key: masks of its calls} of the last batch


def _step_masks(
    pairs: tuple[_Pair, ...], document_ids: Tensor | None, key: tuple, dtype: torch.dtype
) -> list[tuple[Tensor | None, Tensor | None]]:
    """(additive mask or None, rows with no allowed key or None) of each call of a step; with
    documents built once per batch for every layer's forward and backward (masks.PerBatchCache;
    `key` names the step: layout, source rank, queries, dtype, device)."""
    if document_ids is None:
        return [(pair.mask, pair.empty_rows) for pair in pairs]
    steps = _document_pair_masks.get(document_ids, key[0], dict)
    if key not in steps:
        steps[key] = [_pair_mask(pair, document_ids, dtype) for pair in pairs]
    return steps[key]


def _pair_mask(pair: _Pair, document_ids: Tensor, dtype: torch.dtype):
    """(additive mask [b, 1, rows, keys], rows with no allowed key [b, 1, rows]) of a call,
    limited to keys of the query's document."""
    mask = pair.mask
    if mask is None:
        mask = pair.query_tokens.new_zeros(
            (pair.query_tokens.numel(), pair.key_tokens.numel()), dtype=dtype
        )
    mask = _with_documents(mask, document_ids, pair.query_tokens, pair.key_tokens)
    # [b, 1, rows, keys]
    return mask, (mask == _NEG_INF).all(dim=-1)  # [b, 1, rows]


# ---------------------------------------------------------------------------------- kernels


def _attend(q, k, v, mask, empty_rows, scale) -> tuple[Tensor, Tensor]:
    """[b, np, rows, hn] queries against [b, np, keys, hn] -> (output [b, np, rows, hn],
    log-sum-exp [b, np, rows] float32, -inf for a row that sees no key)."""
    if block_attention.supports(q):
        out, lse = _flash_forward(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        lse = lse.float()
    else:
        out, lse = _math_forward(q, k, v, mask, scale)
    if empty_rows is not None:
        # the CPU kernel reports 0 (not -inf) for a row whose keys are all masked
        lse = lse.masked_fill(empty_rows.to(lse.device), _NEG_INF)
        out = out.masked_fill(empty_rows.to(out.device)[..., None], 0.0)
    return out, lse


def _attend_backward(grad, q, k, v, out, lse, mask, scale) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of one call given the *final* output and log-sum-exp of its query rows."""
    if block_attention.supports(q):
        return _flash_backward(
            grad, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale
        )[:3]
    return _math_backward(grad, q, k, v, out, lse, mask, scale)


def _scores(q, k, mask, scale) -> Tensor:
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # [b, np, rows, keys]
    return scores if mask is None else scores + mask.float()


def _math_forward(q, k, v, mask, scale):
    outs, lses = [], []
    for r in range(0, q.size(2), _MATH_ROWS):
        rows = slice(r, r + _MATH_ROWS)
        scores = _scores(q[:, :, rows], k, None if mask is None else mask[..., rows, :], scale)
        lse = torch.logsumexp(scores, dim=-1)  # [b, np, rows]
        probs = torch.exp(scores - lse.masked_fill(lse == _NEG_INF, 0.0)[..., None])
        outs.append(torch.matmul(probs, v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _math_backward(grad, q, k, v, out, lse, mask, scale):
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for r in range(0, q.size(2), _MATH_ROWS):
        rows = slice(r, r + _MATH_ROWS)
        scores = _scores(q[:, :, rows], k, None if mask is None else mask[..., rows, :], scale)
        probs = torch.exp(scores - lse[:, :, rows, None])  # the final softmax's share
        g = grad[:, :, rows].float()
        dv += torch.matmul(probs.transpose(-2, -1), g)
        delta = (g * out[:, :, rows].float()).sum(dim=-1, keepdim=True)
        d_scores = probs * (torch.matmul(g, v.float().transpose(-2, -1)) - delta) * scale
        dq[:, :, rows] = torch.matmul(d_scores, k.float()).to(q.dtype)
        dk += torch.matmul(d_scores.transpose(-2, -1), q[:, :, rows].float())
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _merge(out: Tensor, lse: Tensor, rows: slice, part_out: Tensor, part_lse: Tensor) -> None:
    """Online softmax: fold one call's (output, lse) of query `rows` into the running float32
    output [b, np, sq, hn] and lse [b, np, sq], in place."""
    old = lse[:, :, rows]
    new = torch.logaddexp(old, part_lse)
    safe = new.masked_fill(new == _NEG_INF, 0.0)  # rows that have seen no key yet
    out[:, :, rows] = (
        out[:, :, rows] * torch.exp(old - safe)[..., None]
        + part_out.float() * torch.exp(part_lse - safe)[..., None]
    )
    lse[:, :, rows] = new


# ------------------------------------------------------------------------------------ ring


class _Ring:
    """Point-to-point messages to the next CP rank and from the previous one. Every exchange is
    one `batch_isend_irecv` holding each send to the next rank together with the matching
    receives from the previous one, so no rank's send waits on a receive that its neighbour
    posts only later (NCCL may block a lone send until its receive exists)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        size, rank = group.size(), group.rank()
        self.next, self.previous = (rank + 1) % size, (rank - 1) % size

    def exchange(self, sends: list[Tensor]) -> tuple[list[Tensor], list]:
        """Send `sends` to the next rank and receive as many tensors of the same shapes from the
        previous one, in that order (asynchronous: wait on the returned works)."""
        received = [torch.empty_like(tensor) for tensor in sends]
        ops = [dist.P2POp(dist.isend, t, group=self.group, group_peer=self.next) for t in sends]
        ops += [
            dist.P2POp(dist.irecv, t, group=self.group, group_peer=self.previous)
            for t in received
        ]
        return received, (dist.batch_isend_irecv(ops) if ops else [])


def _wait(works) -> None:
    for work in works:
        work.wait()


def _bhsd(x: Tensor) -> Tensor:
    """[s, b, heads, d] -> [b, heads, s, d] view."""
    return x.permute(1, 2, 0, 3)


def _expand(x: Tensor, heads_per_group: int) -> Tensor:
    """[s, b, ng, d] -> [s, b, np, d] (grouped-query attention, as the caller's repeat)."""
    return x.repeat_interleave(heads_per_group, dim=2) if heads_per_group > 1 else x


def _reduce_heads(x: Tensor, heads_per_group: int) -> Tensor:
    """[s, b, np, d] gradient -> [s, b, ng, d]: the sum over each group's query heads."""
    if heads_per_group == 1:
        return x
    s, b, heads, d = x.shape
    return x.view(s, b, heads // heads_per_group, heads_per_group, d).sum(dim=3)


class _RingAttention(torch.autograd.Function):
    # query [sq, b, np, hn] (sq = 2n or n), key/value [2n, b, ng, hn]: [x_t (n) ; x_0 (n)] rows
    # of this rank's positions.
    @staticmethod
    def forward(ctx, query, key, value, document_ids, layout, group, scale):
        n, size, rank = layout.local_length, layout.size, layout.rank
        ring, hn = _Ring(group), key.size(-1)
        groups = query.size(2) // key.size(2)
        q = _bhsd(query)
        sq, b, heads = query.shape[:3]
        out = query.new_zeros((b, heads, sq, hn), dtype=torch.float32)  # running output
        lse = out.new_full(out.shape[:3], _NEG_INF)  # [b, np, sq]
        clean = torch.cat([key[n:], value[n:]], dim=-1).contiguous()  # [n, b, ng, 2 hn]
        for step in range(size):
            source = (rank - step) % size
            works = []
            if step + 1 < size:
                (received,), works = ring.exchange([clean])
                exchange_meter.forward_bytes += clean.numel() * clean.element_size()
            if step == 0:
                k, v = _bhsd(_expand(key, groups)), _bhsd(_expand(value, groups))
            else:
                k = _bhsd(_expand(clean[..., :hn], groups))
                v = _bhsd(_expand(clean[..., hn:], groups))
            step_key = (layout, source, query.size(0), query.dtype, query.device)
            pairs = _step_pairs(*step_key)
            for pair, (mask, empty) in zip(
                pairs, _step_masks(pairs, document_ids, step_key, query.dtype), strict=True
            ):
                part_out, part_lse = _attend(
                    q[:, :, pair.queries], k[:, :, pair.keys], v[:, :, pair.keys], mask, empty,
                    scale,
                )
                _merge(out, lse, pair.queries, part_out, part_lse)
            _wait(works)
            if step + 1 < size:
                clean = received
        exchange_meter.calls += 1
        out = out.to(query.dtype).permute(2, 0, 1, 3).contiguous()  # [sq, b, np, hn]
        ctx.save_for_backward(query, key, value, out, lse, document_ids)
        ctx.layout, ctx.group, ctx.scale = layout, group, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, document_ids = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        n, size, rank = layout.local_length, layout.size, layout.rank
        ring, hn = _Ring(ctx.group), key.size(-1)
        groups = query.size(2) // key.size(2)
        q, o, g = _bhsd(query), _bhsd(out), _bhsd(grad_out.contiguous())
        d_query = torch.zeros_like(query, dtype=torch.float32)  # [sq, b, np, hn]
        dq = _bhsd(d_query)
        clean = torch.cat([key[n:], value[n:]], dim=-1).contiguous()  # [n, b, ng, 2 hn]
        d_local = None  # [2n, b, ng, 2 hn]: gradient of this rank's own key/value rows
        outgoing = None  # the key/value gradient of the last step's chunk, for the next rank
        for step in range(size):
            source = (rank - step) % size
            # One batch per step, in this order on every rank: the next chunk of clean keys/values
            # (for step + 1), then the gradient of the chunk of the last step, which the next rank
            # holds now; from the previous rank the same two, the second being its part of the
            # gradient of the chunk held here now.
            sends = [clean] if step + 1 < size else []
            if outgoing is not None:
                sends.append(outgoing)
            received, works = ring.exchange(sends)
            for tensor in sends:
                exchange_meter.backward_bytes += tensor.numel() * tensor.element_size()
            if step == 0:
                k, v = _expand(key, groups), _expand(value, groups)
            else:
                k, v = _expand(clean[..., :hn], groups), _expand(clean[..., hn:], groups)
            d_kv = query.new_zeros((k.size(0), *k.shape[1:-1], 2 * hn), dtype=torch.float32)
            dk, dv = _bhsd(d_kv[..., :hn]), _bhsd(d_kv[..., hn:])
            k, v = _bhsd(k), _bhsd(v)
            step_key = (layout, source, query.size(0), query.dtype, query.device)
            pairs = _step_pairs(*step_key)
            for pair, (mask, _) in zip(
                pairs, _step_masks(pairs, document_ids, step_key, query.dtype), strict=True
            ):
                rows, keys = pair.queries, pair.keys
                part_dq, part_dk, part_dv = _attend_backward(
                    g[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], o[:, :, rows],
                    lse[:, :, rows], mask, scale,
                )
                dq[:, :, rows] += part_dq
                dk[:, :, keys] += part_dk
                dv[:, :, keys] += part_dv
            d_kv = _reduce_heads(d_kv, groups)  # [rows, b, ng, 2 hn]
            _wait(works)
            if step == 0:
                d_local = d_kv
            else:
                if outgoing is not None:  # the previous rank's part of this chunk's gradient
                    d_kv += received[-1].float()
                outgoing = d_kv.to(clean.dtype)
            if step + 1 < size:
                clean = received[0]
        if size > 1:  # the last chunk's gradient goes to its owner, the next rank; this rank's
            # own clean chunk comes back from the previous one, summed around the ring
            (own,), works = ring.exchange([outgoing])
            exchange_meter.backward_bytes += outgoing.numel() * outgoing.element_size()
            _wait(works)
            d_local[n:] += own.float()
        d_key = d_local[..., :hn].to(key.dtype)
        d_value = d_local[..., hn:].to(value.dtype)
        return d_query.to(query.dtype), d_key, d_value, None, None, None, None


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: ContextParallelLayout,
    group: dist.ProcessGroup,
    softmax_scale: float,
    document_ids: Tensor | None = None,
) -> Tensor:
    """This rank's BD3 training attention under context parallelism, the clean keys/values
    exchanged around the ring (module docstring).

    Args:
        query: [2n, b, np, hn] (x_t then x_0 rows of this rank's n = L / c positions, local
            order) or [n, b, np, hn] (x_t rows only).
        key, value: [2n, b, ng, hn], x_t then x_0 rows of the same positions (ng query groups;
            np must be a multiple of ng).
        layout: this rank's ContextParallelLayout; group: the CP process group (rank order =
            layout.rank).
        softmax_scale: the score scale.
        document_ids: optional [b, L] per-token document ids over all L global positions.

    Returns:
        [sq, b, np, hn], in the query's row order.
    """
    n = layout.local_length
    if key.size(0) != 2 * n or value.size(0) != 2 * n or query.size(0) not in (n, 2 * n):
        raise ValueError(
            f"ring_attention needs 2n = {2 * n} keys/values and n or 2n queries (n = {n} local "
            f"positions); got {query.size(0)} queries, {key.size(0)} keys, {value.size(0)} values"
        )
    if group.size() != layout.size or group.rank() != layout.rank:
        raise ValueError(
            f"ring_attention: the group (rank {group.rank()} of {group.size()}) is not the "
            f"layout's (rank {layout.rank} of {layout.size})"
        )
    return _RingAttention.apply(query, key, value, document_ids, layout, group, softmax_scale)
