"""Layout-invariant dropout: every mask entry is a pure function of its key (docs/training.md §5).

megatron draws dropout masks from torch generators: a data-parallel rank draws for its own
micro-batch, a pipeline stage from its own stream, a TP rank under sequence parallel from its own
fork. The same sample therefore gets other masks when the layout changes, and a run's loss curve
depends on its layout. With `dropout_rng: keyed` (BD3Config) each keep/drop decision is instead
read off megatron_bd3.diffusion's counter-based hash, the one that keys the forward-process noise
(docs/method.md §2.2), under

    (seed, step, sample = position in the global batch, STREAM_DROPOUT, site, element)

    site     4 x layer_number + kind: EMBEDDING (layer 0), ATTENTION_OUTPUT, MLP_OUTPUT (the
             bias-dropout-adds of each layer, global layer numbers from 1), ATTENTION_PROBS
    element  hidden dropout [s, b, h]: global row of the stream x h + column (under sequence
             parallel a rank's rows start at tp_rank x s_local; under context parallelism a
             rank's rows are [x_t ; x_0] at its positions, global rows p and L + p);
             attention probabilities [b, heads, sq, sk]: (global head x 2^20 + query position)
             x 2^20 + key position

so a sample gets the same masks on 1 process, DP, TP (the hidden masks are the same on every
TP rank, the attention masks follow the global head), sequence parallel, PP and context
parallelism (the rank's rows, queries and keys are keyed by their global stream positions,
given explicitly by model/context_parallel.py's layout).

The key of the micro-batch in flight (`DropoutKey`: seed, step, the rows' global-batch positions)
is made by megatron_bd3.training.batches.make_batch next to the noise, and held for the model's
forward by `dropout_key_scope` (megatron_bd3.model.step.forward_step opens it). A keyed dropout
that runs outside a scope raises instead of drawing from torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from torch import Tensor

from megatron_bd3.diffusion import uniform_noise

DROPOUT_RNGS = ("keyed", "torch")

# A stream of megatron_bd3.diffusion's hash (>= 16 is free for users other than the forward
# process, see diffusion/timesteps.py).
STREAM_DROPOUT = 16
EMBEDDING, ATTENTION_OUTPUT, MLP_OUTPUT, ATTENTION_PROBS = range(4)
_POSITION_BITS = 20  # attention-probability elements pack (head, query, key), 2^20 positions each


@dataclass(frozen=True)
class DropoutKey:
    """What keys the dropout masks of one micro-batch besides the site and the element.

    sample_ids: [b] each row's position in the global batch (the loader's
    global_batch_position), the key that makes the masks independent of the DP/micro-batch split.
    """

    seed: int
    step: int
    sample_ids: Tensor

    # A batch dict's values are moved with .to and cut into micro-batches by rows; the key
    # follows like a [b] tensor.
    def to(self, device) -> DropoutKey:
        return DropoutKey(self.seed, self.step, self.sample_ids.to(device))

    def __getitem__(self, rows) -> DropoutKey:
        return DropoutKey(self.seed, self.step, self.sample_ids[rows])


_current_key: DropoutKey | None = None


@contextlib.contextmanager
def dropout_key_scope(key: DropoutKey | None) -> Iterator[None]:
    """Hold `key` as the dropout key of the forward run inside the block (None: no key)."""
    global _current_key
    previous, _current_key = _current_key, key
    try:
        yield
    finally:
        _current_key = previous


def current_key(batch_size: int) -> DropoutKey:
    """The key of the forward in flight, checked against the micro-batch size."""
    key = _current_key
    if key is None:
        raise RuntimeError(
            "dropout_rng 'keyed' needs the micro-batch's DropoutKey: run the model through "
            "megatron_bd3.model.forward_step with a batch from megatron_bd3.training.batches."
            "make_batch, or inside dropout_key_scope(DropoutKey(seed, step, sample_ids)); or "
            "build it with dropout_rng='torch'"
        )
    if key.sample_ids.numel() != batch_size:
        raise ValueError(
            f"DropoutKey has {key.sample_ids.numel()} sample ids for a micro-batch of "
            f"{batch_size} rows"
        )
    return key


def keep_mask(key: DropoutKey, site: int, elements: Tensor, batch_dim: int, p: float) -> Tensor:
    """Bool keep-mask: True where the hash of (key, site, element) is >= p.

    `elements` holds the element numbers (int64) with a size-1 batch dimension at `batch_dim`;
    the result broadcasts it against the [b] sample ids placed on that dimension."""
    shape = [1] * elements.dim()
    shape[batch_dim] = -1
    sample_ids = key.sample_ids.to(device=elements.device, dtype=torch.int64).view(shape)
    u = uniform_noise(key.seed, key.step, sample_ids, elements, STREAM_DROPOUT, site)
    return u >= p


def keyed_hidden_dropout(
    x: Tensor, p: float, site: int, sequence_parallel: bool, stream_rows: Tensor | None = None
) -> Tensor:
    """Dropout of hidden states x [s, b, h] (sequence-first) with keyed masks; inverted scaling
    1/(1-p) as torch's. Under sequence parallel x holds this TP rank's rows of the stream.

    stream_rows: [S] the global row of the stream at each row of this rank's (TP-unsplit) input
    under context parallelism, [x_t ; x_0] at the rank's positions
    (ContextParallelLayout.stream_rows); None: rows 0 .. S-1. Either way x holds the first rows
    of it (the x_t-only last layer) or, under sequence parallel, this TP rank's slice."""
    if p == 0.0:
        return x
    rows, batch, hidden = x.shape
    key = current_key(batch)
    first_row = parallel_state.get_tensor_model_parallel_rank() * rows if sequence_parallel else 0
    if stream_rows is None:
        row_ids = torch.arange(first_row, first_row + rows, device=x.device, dtype=torch.int64)
    else:
        if first_row + rows > stream_rows.numel():
            raise ValueError(
                f"keyed dropout of rows [{first_row}, {first_row + rows}) of a stream of "
                f"{stream_rows.numel()} rows"
            )
        row_ids = stream_rows[first_row : first_row + rows].to(x.device, torch.int64)
    columns = torch.arange(hidden, device=x.device, dtype=torch.int64)
    elements = (row_ids[:, None] * hidden + columns[None, :])[:, None, :]  # [s, 1, h]
    keep = keep_mask(key, site, elements, 1, p)  # [s, b, h]
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def keyed_attention_dropout(
    probs: Tensor,
    p: float,
    layer_number: int,
    first_head: int,
    q_offset: int,
    k_offset: int,
    query_ids: Tensor | None = None,
    key_ids: Tensor | None = None,
) -> Tensor:
    """Dropout of attention probabilities [b, np, sq, sk] with keyed masks: this rank's heads
    start at global head `first_head`, queries at stream position `q_offset`, keys at
    `k_offset`. Rows that are not one run of stream positions (a context-parallel rank's
    queries and keys, ContextParallelLayout.query_key_indices) give their stream positions
    instead: query_ids [sq] and key_ids [sk] replace the offsets."""
    if p == 0.0:
        return probs
    batch, heads, sq, sk = probs.shape
    key = current_key(batch)
    device = probs.device
    head_ids = torch.arange(first_head, first_head + heads, device=device, dtype=torch.int64)
    if query_ids is None:
        q_ids = torch.arange(q_offset, q_offset + sq, device=device, dtype=torch.int64)
    else:
        q_ids = query_ids.to(device, torch.int64)
    if key_ids is None:
        k_ids = torch.arange(k_offset, k_offset + sk, device=device, dtype=torch.int64)
    else:
        k_ids = key_ids.to(device, torch.int64)
    if q_ids.numel() != sq or k_ids.numel() != sk:
        raise ValueError(
            f"keyed attention dropout of {sq} x {sk} probabilities got {q_ids.numel()} query "
            f"and {k_ids.numel()} key positions"
        )
    elements = (
        (head_ids[:, None, None] << _POSITION_BITS) + q_ids[None, :, None]
    ) << _POSITION_BITS
    elements = (elements + k_ids[None, None, :])[None]  # [1, np, sq, sk]
    site = 4 * layer_number + ATTENTION_PROBS
    keep = keep_mask(key, site, elements, 0, p)
    return probs * keep.to(probs.dtype) * (1.0 / (1.0 - p))


class KeyedDropout(torch.nn.Module):
    """torch.nn.Dropout's place for the embedding dropout (LanguageModelEmbedding's
    `embedding_dropout`), with keyed masks at site EMBEDDING."""

    def __init__(
        self, p: float, sequence_parallel: bool, stream_rows: Tensor | None = None
    ) -> None:
        super().__init__()
        self.p = p
        self.sequence_parallel = sequence_parallel
        self.stream_rows = stream_rows  # see keyed_hidden_dropout (context parallelism)

    def forward(self, x: Tensor) -> Tensor:  # [s, b, h]
        if not self.training:
            return x
        return keyed_hidden_dropout(
            x, self.p, EMBEDDING, self.sequence_parallel, self.stream_rows
        )


class BD3BiasDropoutAdd:
    """The layer's bias-dropout-add leaves (`self_attn_bda`, `mlp_bda` of the layer spec).

    Called like megatron's `get_bias_dropout_add`: `bda(training, fused)(x_with_bias, residual,
    prob)`. Two things differ from megatron's:
    * the residual is cut to the rows the sublayer returned (the x_t-only last layer returns L
      of its 2L rows; self_attention.py);
    * with `keyed` the dropout of a training forward is keyed (module docstring) at site
      4 x layer_number + kind. The layer number (and, under context parallelism, the global
      stream rows of the rank, see keyed_hidden_dropout) is bound by BD3Model after the layers
      are built (`bind_layer`): a spec leaf is built without arguments.
    Eval, or dropout 0: megatron's own function.
    """

    def __init__(self, kind: int, keyed: bool, sequence_parallel: bool) -> None:
        self.kind = kind
        self.keyed = keyed
        self.sequence_parallel = sequence_parallel
        self.layer_number: int | None = None
        self.stream_rows: Tensor | None = None

    def bind_layer(self, layer_number: int, stream_rows: Tensor | None = None) -> None:
        self.layer_number = layer_number
        self.stream_rows = stream_rows

    def __call__(self, training: bool, fused: bool):
        keyed = self.keyed and training
        bias_dropout_add = self._keyed if keyed else get_bias_dropout_add(training, fused)

        def x_t_rows(x_with_bias, residual: Tensor, prob: float) -> Tensor:
            rows = x_with_bias[0].size(0)
            if residual.size(0) > rows:
                residual = residual[:rows]
            return bias_dropout_add(x_with_bias, residual, prob)

        return x_t_rows

    def _keyed(self, x_with_bias, residual: Tensor, prob: float) -> Tensor:
        if self.layer_number is None:
            raise RuntimeError("BD3BiasDropoutAdd was not bound to its layer (bind_layer)")
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
        site = 4 * self.layer_number + self.kind
        dropped = keyed_hidden_dropout(x, prob, site, self.sequence_parallel, self.stream_rows)
        return residual + dropped
