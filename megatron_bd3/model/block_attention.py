"""The BD3 training attention over [x_t ; x_0] without the dense 2L × 2L work (CPU).

The training mask (docs/method.md §1.1) is dense-free in structure: x_t block b attends to its own
noisy block and to clean blocks < b; x_0 block b attends to clean blocks ≤ b. On CPU,
scaled_dot_product_attention with the dense bool mask computes every masked-out score anyway
(torch's CPU flash kernel skips no tile for an explicit mask, and at these lengths none for
is_causal either), so the cost is 3L² scores whatever the block size.

Here the queries are cut into chunks of C rows (C a multiple of B) and each chunk is one call of
torch's CPU flash-attention kernel over exactly the keys it can see, plus its own tile:
    x_t chunk j (rows jC .. jC+C-1):  keys [x_0 rows 0 .. jC+C-1 ; x_t rows jC .. jC+C-1]
        mask: x_0 keys of strictly earlier blocks, x_t keys of the same block
    x_0 chunk j:                      keys  x_0 rows 0 .. jC+C-1
        mask: x_0 keys of the same or earlier blocks
(When a chunk is a single block, C = B, its x_t rows see no x_0 row of the chunk, and the x_0
tile is left out.) The x_t chunk's keys are gathered into one buffer (2C new rows per chunk),
the x_0 chunk's keys are a prefix of the x_0 keys (a view). Work: L² + 2·C·L scores per head
instead of 3L² (0.375 of it at L = 512, C = 32), falling towards 1/3 with L; the shapes, hence
the cost, are the same for every B < C: only the mask values depend on B.

Each row's softmax runs over all of its keys in one kernel call, so the result is the dense
masked attention up to summation order. The backward calls the kernel's own backward per chunk
with the forward's output and log-sum-exp, writes dq per chunk and accumulates dk/dv into their
x_0 / x_t rows (no autograd slicing, so no full-size zero fills per slice).

With `x_t_only`, only the x_t queries are given and computed (the last layer of a training
forward: nothing reads the x_0 half's final hidden states).

With `document_ids` [b, L] (document-aware packing, docs/method.md §1.4) each chunk's mask also
forbids keys of another document: the chunk's [rows, keys] mask becomes [b, 1, rows, keys] (the
same kernel calls and key ranges). These masks are built once per batch and shared by every
layer's forward and backward (about b·L² floats, 16 MiB per sequence at L = 2048).

No attention dropout: the caller falls back to SDPA with the dense mask when it needs dropout.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from megatron_bd3.model.masks import PerBatchCache

# torch's CPU flash-attention kernel and its backward (what F.scaled_dot_product_attention
# dispatches to on CPU), called directly for the log-sum-exp and the per-chunk backward.
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Query rows per kernel call, C (rounded up to a multiple of B). Smaller chunks skip more masked
# work (about C·L scores per stream) but each call has a fixed cost, and the kernel runs
# markedly slower when the key count is not a multiple of 16. 32 rows keep every call aligned
# and the kernel within a few per cent of its one-call throughput on the CPU machines
# (docs/bench/vs-reference.md).
TARGET_CHUNK_ROWS = 32


def chunk_rows(seq_length: int, block_size: int) -> int:
    """C for (L, B): the smallest multiple of B that is >= TARGET_CHUNK_ROWS, at most L."""
    return min(seq_length, block_size * max(1, -(-TARGET_CHUNK_ROWS // block_size)))


def _visible_x_0_tile(rows: int, block_size: int) -> int:
    """x_0 rows of its own chunk that an x_t chunk of `rows` rows gathers: all of them (the
    blocks its rows may not see are masked), none when the chunk is a single block."""
    return 0 if rows == block_size else rows


def supports(query: Tensor) -> bool:
    """Whether this path can run: CPU tensors of a dtype the CPU flash kernel takes."""
    return query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=32)
def _chunks(
    spans: tuple[tuple[int, int], ...], block_size: int, chunk: int, dtype: torch.dtype
) -> tuple[tuple[int, int, int, Tensor, Tensor], ...]:
    """(start, local, rows, x_t mask, x_0 mask) per chunk; additive masks, 0 = may attend,
    -inf = not. `start` is the chunk's first global position, `local` its first local row.

    x_t chunk at `start` with `rows` queries: [rows, start + tile + rows] over the keys
    [x_0 rows 0 .. start+tile-1 ; own x_t rows] (tile = _visible_x_0_tile); x_0 chunk:
    [rows, start + rows] over the x_0 prefix. Only the chunk's own tiles hold -inf."""
    neg_inf = torch.tensor(float("-inf"), dtype=dtype)
    zero = torch.tensor(0.0, dtype=dtype)
    chunks = []
    local = 0
    for span_start, span_length in spans:
        span_end = span_start + span_length
        for start in range(span_start, span_end, chunk):
            rows = min(chunk, span_end - start)
            block = torch.arange(rows) // block_size  # block of each row within the chunk
            # x_t rows see the chunk's x_0 rows of strictly earlier blocks only.
            tile = block[: _visible_x_0_tile(rows, block_size)]
            strictly_earlier = torch.where(tile[None, :] < block[:, None], zero, neg_inf)
            own_block = torch.where(block[None, :] == block[:, None], zero, neg_inf)
            same_or_earlier = torch.where(block[None, :] <= block[:, None], zero, neg_inf)
            prefix = torch.zeros(rows, start, dtype=dtype)
            x_t_mask = torch.cat([prefix, strictly_earlier, own_block], dim=1).contiguous()
            x_0_mask = torch.cat([prefix, same_or_earlier], dim=1).contiguous()
            chunks.append((start, local + start - span_start, rows, x_t_mask, x_0_mask))
        local += span_length
    return tuple(chunks)


def _with_documents(
    mask: Tensor, document_ids: Tensor | None, queries: slice, keys: Tensor
) -> Tensor:
    """A chunk's additive mask [rows, k], further limited to keys of the query's document:
    [b, 1, rows, k]. `queries` are the chunk's token rows, `keys` the token index of each key
    (x_0 and x_t copies of token i both have index i). No documents: the mask unchanged."""
    if document_ids is None:
        return mask
    same = document_ids[:, queries, None] == document_ids[:, None, keys]  # [b, rows, k]
    batch = document_ids.size(0)
    return mask.expand(batch, 1, *mask.shape).masked_fill(~same[:, None], float("-inf"))


def _chunk_key_tokens(start: int, rows: int, block_size: int) -> Tensor:
    """Token index of each key of the x_t chunk at `start` (see _KeyBuffer): the x_0 prefix, then
    the chunk's own x_t rows."""
    clean = start + _visible_x_0_tile(rows, block_size)
    return torch.cat([torch.arange(clean), torch.arange(start, start + rows)])


_document_chunks = PerBatchCache()  # the chunk masks of the last batch's document ids


def _chunks_for(
    document_ids: Tensor | None,
    spans: tuple[tuple[int, int], ...],
    block_size: int,
    chunk: int,
    dtype: torch.dtype,
) -> tuple[tuple[int, int, int, Tensor, Tensor], ...]:
    """_chunks, with each mask limited to same-document keys when `document_ids` [b, L] are
    given (masks [b, 1, rows, keys]); built once per batch (masks.PerBatchCache)."""
    chunks = _chunks(spans, block_size, chunk, dtype)
    if document_ids is None:
        return chunks

    def build():
        return tuple(
            (
                start,
                local,
                rows,
                _with_documents(
                    x_t_mask, document_ids, slice(start, start + rows),
                    _chunk_key_tokens(start, rows, block_size),
                ),
                _with_documents(
                    x_0_mask, document_ids, slice(start, start + rows),
                    torch.arange(start + rows),
                ),
            )
            for start, local, rows, x_t_mask, x_0_mask in chunks
        )

    return _document_chunks.get(document_ids, (spans, block_size, chunk, dtype), build)


def _bhsd(x: Tensor) -> Tensor:
    """[s, b, heads, d] -> the [b, heads, s, d] view the kernel takes (no copy)."""
    return x.permute(1, 2, 0, 3)


class _BlockDiffusionAttention(torch.autograd.Function):
    # Rows: query [x_t (n) ; x_0 (n)] or [x_t (n)], key/value [x_t (n) ; x_0 (L)]; n = the local
    # positions (the spans), L = every clean position (row n + p holds clean position p).
    @staticmethod
    def forward(ctx, query, key, value, document_ids, spans, block_size, chunk, scale):
        docs = document_ids  # [b, L] or None
        chunks = _chunks_for(docs, spans, block_size, chunk, query.dtype)
        n = sum(length for _, length in spans)
        out = query.new_empty(query.shape)  # [sq, b, np, hn]
        q, k, v = _bhsd(query), _bhsd(key), _bhsd(value)
        lse = []
        keys, values = _KeyBuffer(key, n, block_size, chunk), _KeyBuffer(value, n, block_size, chunk)
        for start, local, rows, x_t_mask, _ in chunks:
            span = slice(local, local + rows)
            o, lse_chunk = _flash_forward(
                q[:, :, span], keys.for_chunk(start, local, rows),
                values.for_chunk(start, local, rows), 0.0, False, attn_mask=x_t_mask, scale=scale,
            )
            out[span] = o.permute(2, 0, 1, 3)
            lse.append(lse_chunk)
        if query.size(0) == 2 * n:
            for start, local, rows, _, x_0_mask in chunks:
                span, visible = slice(n + local, n + local + rows), slice(n, n + start + rows)
                o, lse_chunk = _flash_forward(
                    q[:, :, span], k[:, :, visible], v[:, :, visible], 0.0, False,
                    attn_mask=x_0_mask, scale=scale,
                )
                out[span] = o.permute(2, 0, 1, 3)
                lse.append(lse_chunk)
        ctx.save_for_backward(query, key, value, out, docs, *lse)
        ctx.settings = (spans, n, block_size, chunk, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, docs, *lse = ctx.saved_tensors
        spans, n, block_size, chunk, scale = ctx.settings
        chunks = _chunks_for(docs, spans, block_size, chunk, query.dtype)
        q, k, v, o, g = (_bhsd(t) for t in (query, key, value, out, grad_out.contiguous()))
        d_query = torch.empty_like(query)
        d_key, d_value = torch.zeros_like(key), torch.zeros_like(value)
        keys, values = _KeyBuffer(key, n, block_size, chunk), _KeyBuffer(value, n, block_size, chunk)
        for i, (start, local, rows, x_t_mask, _) in enumerate(chunks):
            span = slice(local, local + rows)
            dq, dk, dv = _flash_backward(
                g[:, :, span], q[:, :, span], keys.for_chunk(start, local, rows),
                values.for_chunk(start, local, rows), o[:, :, span], lse[i], 0.0, False,
                attn_mask=x_t_mask, scale=scale,
            )
            d_query[span] = dq.permute(2, 0, 1, 3)
            keys.scatter_add(d_key, dk, start, local, rows)
            values.scatter_add(d_value, dv, start, local, rows)
        if query.size(0) == 2 * n:
            for i, (start, local, rows, _, x_0_mask) in enumerate(chunks, start=len(chunks)):
                span, visible = slice(n + local, n + local + rows), slice(n, n + start + rows)
                dq, dk, dv = _flash_backward(
                    g[:, :, span], q[:, :, span], k[:, :, visible], v[:, :, visible],
                    o[:, :, span], lse[i], 0.0, False, attn_mask=x_0_mask, scale=scale,
                )
                d_query[span] = dq.permute(2, 0, 1, 3)
                d_key[visible] += dk.permute(2, 0, 1, 3)
                d_value[visible] += dv.permute(2, 0, 1, 3)
        return d_query, d_key, d_value, None, None, None, None, None


class _KeyBuffer:
    """Keys (or values) of the x_t chunk at global positions [start, start + rows), local rows
    [local, local + rows): x_0 rows 0 .. start + tile - 1, then the chunk's own x_t rows
    (tile = _visible_x_0_tile). One buffer serves every chunk in order: the x_0 prefix only
    grows (chunks come in increasing position), so moving on writes the new x_0 rows over the
    previous x_t rows and the new x_t rows after them."""

    def __init__(self, source: Tensor, noisy_rows: int, block_size: int, chunk: int) -> None:
        self.source, self.n, self.B = source, noisy_rows, block_size  # [n + L, b, np, hn]
        clean_rows = source.size(0) - noisy_rows
        self.buffer = source.new_empty((clean_rows + chunk, *source.shape[1:]))
        self.filled = 0  # x_0 rows already in the buffer

    def for_chunk(self, start: int, local: int, rows: int) -> Tensor:
        n = self.n
        clean = start + _visible_x_0_tile(rows, self.B)  # x_0 rows gathered for this chunk
        if clean > self.filled:
            self.buffer[self.filled : clean] = self.source[n + self.filled : n + clean]
            self.filled = clean
        self.buffer[clean : clean + rows] = self.source[local : local + rows]
        return _bhsd(self.buffer[: clean + rows])

    def scatter_add(
        self, grad_source: Tensor, grad_keys: Tensor, start: int, local: int, rows: int
    ) -> None:
        """Add the kernel's [b, np, keys, hn] key gradient of a chunk to its x_0 and x_t rows."""
        n = self.n
        clean = start + _visible_x_0_tile(rows, self.B)
        grad_keys = grad_keys.permute(2, 0, 1, 3)  # [keys, b, np, hn]
        if clean:
            grad_source[n : n + clean] += grad_keys[:clean]
        grad_source[local : local + rows] += grad_keys[clean:]


def block_diffusion_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    seq_length: int,
    block_size: int,
    softmax_scale: float,
    chunk: int | None = None,
    document_ids: Tensor | None = None,
    spans: tuple[tuple[int, int], ...] | None = None,
) -> Tensor:
    """The BD3 training attention of [x_t ; x_0] (docs/method.md §1.1), block-structured.

    Args:
        query: [2n, b, np, hn] (both streams at the n positions of `spans`), or [n, b, np, hn]
            for the x_t queries only.
        key, value: [n + L, b, np, hn]: the x_t rows at the same n positions, then the x_0 rows
            of all L positions (kv heads already expanded to the query heads).
        seq_length, block_size: L and B.
        softmax_scale: the score scale (1/sqrt(hn) by default in the caller).
        chunk: query rows per kernel call (default chunk_rows of the shortest span, B).
        document_ids: optional [b, L] per-token document ids (docs/method.md §1.4): a query
            then attends only to keys of its own document (token indices are global, so the
            restriction holds on any spans).
        spans: the (first position, length) runs of whole blocks the n local positions are made
            of, in increasing order (a context-parallel rank's chunks, model/context_parallel.py);
            default ((0, L),): every position, query and key rows [x_t ; x_0] of 2L each.

    Returns:
        [sq, b, np, hn] attention output in the query's row order.
    """
    L = seq_length
    spans = ((0, L),) if spans is None else tuple(spans)
    n = sum(length for _, length in spans)
    if key.size(0) != n + L or value.size(0) != n + L or query.size(0) not in (n, 2 * n):
        raise ValueError(
            f"block_diffusion_attention needs n + L = {n + L} keys/values and n or 2n queries "
            f"(n = {n} local positions); got {query.size(0)} queries, {key.size(0)} keys, "
            f"{value.size(0)} values"
        )
    chunk = chunk or chunk_rows(min(length for _, length in spans), block_size)
    if chunk % block_size or any(s % block_size or m % block_size for s, m in spans):
        raise ValueError(
            f"chunk {chunk} and the spans {spans} must be made of whole blocks of {block_size}"
        )
    return _BlockDiffusionAttention.apply(
        query, key, value, document_ids, spans, block_size, chunk, softmax_scale
    )
