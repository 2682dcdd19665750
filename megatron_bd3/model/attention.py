"""BD3CoreAttention: the block-diffusion core attention, a drop-in for megatron's
DotProductAttention in the `core_attention` leaf of a layer spec.

Same constructor and call contract as megatron-core 0.16.1's DotProductAttention:
    BD3CoreAttention(config, layer_number, attn_mask_type, attention_type,
                     attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                     pg_collection=None)
    forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
            packed_seq_params=None)
    q: [sq, b, np, hn], k/v: [sk, b, ng, hn] (per-partition heads / query groups)  ->  [sq, b, np*hn]

The attention contract (masks are True = may attend, see masks.py):
    attention_mask=None    the model's own attention, as the config describes it (AttentionPlan,
                           fixed at construction): the BD3 training mask over [x_t ; x_0] (2L
                           tokens), or full attention over x_t alone for the single-stream B = L
                           model. BD3Model passes None (or the document ids below, with
                           config.document_mask). Kernel, from the config and the device:
                             flex                    FlexAttention with the cached BlockMask
                             sdpa, CPU, no dropout   block_attention (the same attention block by
                                                     block, no dense 2L × 2L work), when
                                                     config.cpu_block_attention
                             sdpa otherwise          SDPA with the dense mask in two calls (x_t
                                                     queries × 2L keys, x_0 queries × x_0 keys)
                             single stream           SDPA without a mask
                           With only the L x_t queries given (the last layer of a training
                           forward, see self_attention.py) only the x_t rows are computed.
    an integer tensor      per-token document ids [b, L] (config.document_mask, docs/method.md
                           §1.4): the model's own attention as above, restricted to pairs of
                           tokens of the same document, on every kernel path (flex: the
                           block-diffusion and same-document mask_mods and-ed into a per-batch
                           BlockMask; dense: the two SDPA masks and-ed per sequence; CPU
                           block-structured: per-sequence chunk masks). Required with
                           config.document_mask, refused without it.
    a bool tensor          a caller's own mask: scaled_dot_product_attention with it, as given
    a BlockMask            a caller's own mask: FlexAttention with it
    AttentionPattern.CAUSAL  query i attends to keys <= i: SDPA with is_causal
Nothing is recognised by identity: the same values passed as a tensor run as a caller's mask.
Context parallelism (config.context_parallel_size > 1, model/context_parallel.py): the model's
own attention gets this rank's rows [x_t ; x_0] (2L / CP). With cp_comm_type 'all_gather' it
all-gathers the clean keys/values of every rank and runs the same kernels with the rank's own
mask (block kernel over the rank's chunks, a per-rank BlockMask, or SDPA with the per-rank dense
mask); with 'p2p' the clean keys/values go around the CP ring (model/ring_attention.py, its own
per-chunk kernels whatever attention_kernel says). Document ids stay the global [b, L] on every
rank; each path compares them at the global positions of its queries and keys. Keyed attention
dropout keys each probability by those global positions too (all-gather only: the ring has no
attention dropout).
FlexAttention on CPU has no backward, so a CPU flex call that would need gradients raises here,
before autograd fails deep inside the backward pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from megatron_bd3.model import block_attention
from megatron_bd3.model.config import CP_COMM_TYPES
from megatron_bd3.model.context_parallel import (
    ContextParallelLayout,
    dense_rank_mask,
    flex_rank_mask,
    gather_clean_key_values,
)
from megatron_bd3.model.keyed_dropout import keyed_attention_dropout
from megatron_bd3.model.masks import (
    AttentionMask,
    AttentionPattern,
    document_attention_masks,
    is_document_ids,
    split_training_mask,
    training_attention_mask,
)
from megatron_bd3.model.ring_attention import ring_attention

logger = logging.getLogger(__name__)

_compiled_flex_attention = None


@dataclass(frozen=True)
class AttentionPlan:
    """How BD3CoreAttention computes the model's own attention (attention_mask=None).

    Fixed by the config when the module is built; only the CPU block-structured path also
    depends on the call (the device of the queries, and whether dropout is active).

    pattern: 'block_diffusion' (the training mask over [x_t ; x_0], 2L tokens) or
             'bidirectional' (every query attends to every key: x_t alone, B = L).
    kernel:  'flex' or 'sdpa' (config.resolved_attention_kernel).
    cpu_block_attention: run the sdpa block-diffusion pattern block by block on CPU
             (config.cpu_block_attention).
    document_mask: the model's own attention is restricted to documents; the caller passes the
             per-token document ids (config.document_mask).
    """

    pattern: Literal["block_diffusion", "bidirectional"]
    kernel: Literal["flex", "sdpa"]
    cpu_block_attention: bool
    seq_length: int
    block_size: int
    document_mask: bool = False
    context_parallel_size: int = 1

    @classmethod
    def from_config(cls, config: TransformerConfig) -> AttentionPlan:
        """The plan of a BD3Config (a plain TransformerConfig gets sdpa, no own pattern)."""
        single_stream = getattr(config, "single_stream", False)
        return cls(
            pattern="bidirectional" if single_stream else "block_diffusion",
            kernel=getattr(config, "resolved_attention_kernel", "sdpa"),
            cpu_block_attention=getattr(config, "cpu_block_attention", True),
            seq_length=getattr(config, "seq_length", 0),
            block_size=getattr(config, "block_size", 0),
            document_mask=getattr(config, "document_mask", False),
            context_parallel_size=config.context_parallel_size,
        )

    @property
    def stream_length(self) -> int:
        """Tokens of the model's own input on this rank: 2L (two streams), or L (single stream);
        2L / CP under context parallelism."""
        if self.pattern == "bidirectional":
            return self.seq_length
        return 2 * self.seq_length // self.context_parallel_size

    @property
    def local_length(self) -> int:
        """x_t positions on this rank: L, or L / CP under context parallelism."""
        return self.seq_length // self.context_parallel_size


def _flex_attention_fn(compile_flex: bool):
    """flex_attention, compiled once per process when asked (FlexAttention is only fast compiled;
    eager flex materialises the scores and exists for correctness checks)."""
    global _compiled_flex_attention
    if not compile_flex:
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    return _compiled_flex_attention


class BD3CoreAttention(MegatronModule):
    """Core attention with an arbitrary (block-diffusion) mask: FlexAttention or SDPA.

    Tensor parallel: heads are split across TP ranks by the surrounding SelfAttention; this
    module sees np = heads/TP query heads and ng = query_groups/TP key/value heads.
    Grouped-query attention: kv heads are expanded to the query heads (as DotProductAttention).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        cp_size = config.context_parallel_size
        if pg_collection is None:
            required = ["tp", "cp"] if cp_size > 1 else ["tp"]
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=required)
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp

        tp_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)

        # apply_query_key_layer_scaling only moves a factor between the scores and the fp32
        # softmax in megatron's kernel; the net scale is the same, so it is ignored here.
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        self.softmax_scale = softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

        self.plan = AttentionPlan.from_config(config)
        self.keyed_dropout = getattr(config, "dropout_rng", "torch") == "keyed"
        # Context parallelism (model/context_parallel.py): this rank's positions of both streams.
        self.cp_layout = None
        if cp_size > 1:  # BD3Config refuses the layouts CP cannot cut (single stream, L)
            self.cp_layout = ContextParallelLayout(
                config.seq_length, config.block_size, cp_size, pg_collection.cp.rank()
            )
            self.cp_group = pg_collection.cp
            # megatron's TransformerLayer passes config.cp_comm_type when CP > 1
            if cp_comm_type is None:
                cp_comm_type = getattr(config, "cp_comm_type", None)
            if cp_comm_type not in CP_COMM_TYPES:
                raise ValueError(
                    f"BD3CoreAttention's cp_comm_type {cp_comm_type!r} is not one of "
                    f"{CP_COMM_TYPES}"
                )
        self.cp_comm_type = cp_comm_type
        if getattr(config, "attention_kernel", None) == "auto" and layer_number <= 1:
            logger.info(
                "attention_kernel 'auto' resolved to %r (CUDA available: %s, attention_dropout %s)",
                self.plan.kernel,
                torch.cuda.is_available(),
                self.dropout_p,
            )
        if self.cp_layout is not None and layer_number <= 1:
            logger.info(
                "context parallel %d: clean keys/values exchanged by %r (CUDA available: %s, "
                "attention_dropout %s)",
                cp_size, self.cp_comm_type, torch.cuda.is_available(), self.dropout_p,
            )
        compile_flex = getattr(config, "compile_flex", None)
        self.compile_flex = torch.cuda.is_available() if compile_flex is None else compile_flex
        self._validated_masks: set[tuple[int, tuple[int, ...]]] = set()

    # ---------------------------------------------------------------------------------------------

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: AttentionMask | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Attention over [sq, b, np, hn] queries and [sk, b, ng, hn] keys/values -> [sq, b, hp].

        attention_mask: None for the model's own attention (self.plan), else the caller's own
        mask (bool tensor, BlockMask, or AttentionPattern.CAUSAL); see the module docstring."""
        if packed_seq_params is not None:
            raise ValueError("BD3CoreAttention does not support packed sequences (THD format)")
        if attention_bias is not None:
            raise ValueError("BD3CoreAttention does not support an additive attention_bias")
        document_ids = self._document_ids(attention_mask, query.size(1))
        if document_ids is not None:
            attention_mask = None  # the model's own attention, restricted to documents

        if attention_mask is None and self.cp_layout is not None and self.cp_comm_type == "p2p":
            # the clean keys/values around the CP ring (model/ring_attention.py)
            self._check_own_shapes(query.size(0), key.size(0))
            context = ring_attention(
                query, key, value, self.cp_layout, self.cp_group, self.softmax_scale,
                document_ids=document_ids,
            )  # [sq, b, np, hn]
            return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)
        if attention_mask is None and self.cp_layout is not None:
            # [n or 2n, b, np, hn] queries, [2n, b, ng, hn] local keys -> [n + L, b, ng, hn]
            key, value = self._exchange_clean_key_values(query, key, value)

        # Grouped-query attention: [sk, b, ng, hn] -> [sk, b, np, hn].
        heads_per_group = (
            self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        )
        if heads_per_group > 1:
            key = key.repeat_interleave(heads_per_group, dim=2)
            value = value.repeat_interleave(heads_per_group, dim=2)

        if attention_mask is None and self._use_block_attention(query, key):
            spans = self.cp_layout.spans if self.cp_layout is not None else None
            context = block_attention.block_diffusion_attention(
                query, key, value, self.plan.seq_length, self.plan.block_size, self.softmax_scale,
                document_ids=document_ids,
                spans=spans,
            )  # [sq, b, np, hn]
            return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)

        # megatron is sequence-first; both kernels want [b, np, s, hn].
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)

        if attention_mask is None:
            context = self._own_attention(q, k, v, document_ids)
        elif isinstance(attention_mask, BlockMask):
            context = self._flex(q, k, v, attention_mask)
        elif attention_mask is AttentionPattern.CAUSAL:
            if q.size(2) != k.size(2):
                raise ValueError(
                    f"AttentionPattern.CAUSAL needs as many queries as keys, got {q.size(2)} "
                    f"queries × {k.size(2)} keys; pass a bool mask (True = may attend) instead"
                )
            context = self._sdpa_call(q, k, v, None, is_causal=True)
        elif isinstance(attention_mask, torch.Tensor):
            context = self._sdpa_given_mask(q, k, v, attention_mask)
        else:
            raise TypeError(
                "BD3CoreAttention's attention_mask must be None (the model's own attention), a "
                "bool tensor (True = may attend), a BlockMask or AttentionPattern.CAUSAL; got "
                f"{type(attention_mask).__name__}"
            )

        # [b, np, sq, hn] -> [sq, b, np, hn] -> [sq, b, hp]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)

    # -- the model's own attention (attention_mask=None) ----------------------------------------

    def _document_ids(self, attention_mask, batch: int) -> torch.Tensor | None:
        """The per-token document ids when the mask slot holds them; checks that they are given
        exactly when the plan asks for them (config.document_mask)."""
        if is_document_ids(attention_mask):
            if not self.plan.document_mask:
                raise ValueError(
                    "BD3CoreAttention got per-token document ids but config.document_mask is off; "
                    "set document_mask=True (data.document_mask in a run config)"
                )
            if tuple(attention_mask.shape) != (batch, self.plan.seq_length):
                raise ValueError(
                    f"document ids must be [batch, seq_length] = [{batch}, "
                    f"{self.plan.seq_length}], got {list(attention_mask.shape)}"
                )
            return attention_mask
        if attention_mask is None and self.plan.document_mask:
            raise ValueError(
                "config.document_mask is on but BD3CoreAttention got no document ids: pass the "
                "[b, L] per-token document ids as attention_mask (BD3Model does, from its "
                "document_ids argument)"
            )
        return None

    def _exchange_clean_key_values(self, query, key, value):
        """Context parallelism: this rank's keys/values [x_t (n) ; x_0 (n)] -> [x_t (n) ; x_0 of
        all L positions], the clean rows all-gathered (K and V in one message) over the CP
        group; the noisy rows stay local (model/context_parallel.py)."""
        n = self.plan.local_length
        self._check_own_shapes(query.size(0), key.size(0))
        clean = torch.cat([key[n:], value[n:]], dim=-1)  # [n, b, ng, 2 hn]
        clean = gather_clean_key_values(clean, self.cp_layout, self.cp_group)  # [L, b, ng, 2 hn]
        clean_key, clean_value = clean.chunk(2, dim=-1)
        key = torch.cat([key[:n], clean_key], dim=0)  # [n + L, b, ng, hn]
        value = torch.cat([value[:n], clean_value], dim=0)
        return key, value

    def _check_own_shapes(self, sq: int, sk: int) -> None:
        plan = self.plan
        n = plan.stream_length
        if self.cp_layout is not None and sk == plan.local_length + plan.seq_length:
            sk = n  # the clean keys of every rank have been gathered (_exchange_clean_key_values)
        # The block-diffusion pattern also takes the L x_t queries alone (x_t-only last layer).
        queries = (n,) if plan.pattern == "bidirectional" else (n, plan.local_length)
        if not plan.seq_length or sk != n or sq not in queries:
            what = (
                f"the full attention over L = {n} tokens (single stream)"
                if plan.pattern == "bidirectional"
                else f"the training mask over 2L = {n} tokens"
                + (" on this context-parallel rank" if self.cp_layout is not None else "")
            )
            raise ValueError(
                f"BD3CoreAttention got attention_mask=None for {sq} queries × {sk} keys; None "
                f"stands only for the model's own attention, {what}. Pass an explicit bool mask "
                "(True = may attend) for any other input"
            )

    def _use_block_attention(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        """The block-diffusion pattern with sdpa on CPU without attention dropout: the
        block-structured kernel (unless config.cpu_block_attention is off)."""
        plan = self.plan
        if plan.pattern != "block_diffusion" or plan.kernel != "sdpa":
            return False
        self._check_own_shapes(query.size(0), key.size(0))
        dropout = self.dropout_p if self.training else 0.0
        return plan.cpu_block_attention and dropout == 0.0 and block_attention.supports(query)

    def _own_attention(self, q, k, v, document_ids=None) -> torch.Tensor:
        """[b, np, sq, hn] -> [b, np, sq, hn] under the plan's pattern (not block-structured),
        restricted to documents when `document_ids` [b, L] are given."""
        plan = self.plan
        self._check_own_shapes(q.size(2), k.size(2))
        if plan.pattern == "bidirectional":
            # x_t alone, one block: every query attends to every key, no mask needed.
            if document_ids is None:
                return self._sdpa_call(q, k, v, None)
            (same_document,) = document_attention_masks(
                document_ids, plan.seq_length, plan.block_size, "bidirectional"
            )
            return self._sdpa_call(q, k, v, same_document)
        if self.cp_layout is not None:
            return self._context_parallel_attention(q, k, v, document_ids)
        if plan.kernel == "flex":
            if q.size(2) != k.size(2):
                raise ValueError(
                    "the x_t-only last layer needs attention_kernel 'sdpa'; flex runs all 2L "
                    "queries"
                )
            if document_ids is None:
                block_mask = training_attention_mask(
                    plan.seq_length, plan.block_size, "flex", q.device
                )
            else:
                block_mask = document_attention_masks(
                    document_ids, plan.seq_length, plan.block_size, "flex"
                )
            return self._flex(q, k, v, block_mask)
        # The clean queries never attend to noisy keys: run them against the clean keys only
        # (3L² scores instead of 4L²; the result is identical). With only the x_t queries given
        # (last layer of a training forward), only the first call is needed.
        seq_length = plan.seq_length
        if document_ids is None:
            noisy_rows, clean_block = split_training_mask(seq_length, plan.block_size, q.device)
        else:  # [b, 1, L, 2L] and [b, 1, L, L]
            noisy_rows, clean_block = document_attention_masks(
                document_ids, seq_length, plan.block_size, "sdpa"
            )
        noisy = self._sdpa_call(q[:, :, :seq_length], k, v, noisy_rows)
        if q.size(2) == seq_length:
            return noisy  # [b, np, L, hn]
        clean = self._sdpa_call(
            q[:, :, seq_length:], k[:, :, seq_length:], v[:, :, seq_length:], clean_block,
            offset=seq_length,
        )
        return torch.cat([noisy, clean], dim=2)  # [b, np, 2L, hn]

    def _context_parallel_attention(self, q, k, v, document_ids=None) -> torch.Tensor:
        """This rank's queries [b, np, n or 2n, hn] against [its n noisy keys ; all L clean keys]
        under the rank's mask (context_parallel.dense_rank_mask / flex_rank_mask), restricted to
        documents when the global `document_ids` [b, L] are given (document_attention_masks
        with the layout). Keyed attention dropout keys the probabilities by the global stream
        indices of these queries and keys (query_key_indices)."""
        layout, queries, plan = self.cp_layout, q.size(2), self.plan
        if plan.kernel == "flex":
            if document_ids is None:
                block_mask = flex_rank_mask(layout, queries, q.device)
            else:  # a BlockMask of all 2n queries (flex never runs the x_t-only last layer)
                block_mask = document_attention_masks(
                    document_ids, plan.seq_length, plan.block_size, "flex", layout
                )
            return self._flex(q, k, v, block_mask)
        n = layout.local_length
        if document_ids is None:
            mask = dense_rank_mask(layout, queries, q.device)  # [n or 2n, n + L]
            noisy_rows, clean_block = mask[:n], mask[n:, n:]
        else:  # [b, 1, n, n + L] and [b, 1, n, L]
            noisy_rows, clean_block = document_attention_masks(
                document_ids, plan.seq_length, plan.block_size, "sdpa", layout
            )
        query_ids, key_ids = layout.query_key_indices(2 * n)
        noisy = self._sdpa_call(q[:, :, :n], k, v, noisy_rows, indices=(query_ids[:n], key_ids))
        if queries == n:
            return noisy  # [b, np, n, hn]
        # The clean queries never attend to noisy keys: clean keys only.
        clean = self._sdpa_call(
            q[:, :, n:], k[:, :, n:], v[:, :, n:], clean_block,
            indices=(query_ids[n:], key_ids[n:]),
        )
        return torch.cat([noisy, clean], dim=2)  # [b, np, 2n, hn]

    # -- a caller's own mask ----------------------------------------------------------------------

    def _sdpa_given_mask(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype != torch.bool:
            raise TypeError(
                f"BD3CoreAttention expects a bool mask (True = may attend), got dtype {mask.dtype}"
            )
        self._check_every_query_attends(mask)
        return self._sdpa_call(q, k, v, mask)

    def _sdpa_call(
        self,
        q,
        k,
        v,
        mask: torch.Tensor | None,
        is_causal: bool = False,
        offset: int = 0,
        indices: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """SDPA over [b, np, s, hn]; `offset`: stream position of the first query and key (the
        clean half runs as its own call from L), which keys the keyed attention dropout;
        `indices`: the stream positions of the queries [sq] and keys [sk] instead, when they are
        not one run (a context-parallel rank's)."""
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and self.keyed_dropout:
            return self._keyed_dropout_attention(
                q, k, v, mask, is_causal, offset, dropout_p, indices
            )
        if dropout_p > 0.0:
            # Per-TP-rank dropout stream, as megatron's attention dropout: each rank holds
            # different heads, so their dropout masks must be independent. (DotProductAttention
            # skips the fork under sequence parallel; here the heads are split either way.)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=self.softmax_scale,
                )
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.softmax_scale
        )

    def _keyed_dropout_attention(
        self, q, k, v, mask, is_causal: bool, offset: int, p: float, indices=None
    ):
        """Attention with keyed dropout on its probabilities (keyed_dropout.py): SDPA takes no
        mask of ours, so the probabilities are materialised, [b, np, sq, sk]. Only
        attention_dropout > 0 with dropout_rng 'keyed' takes this path."""
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.softmax_scale  # [b, np, sq, sk]
        if is_causal:
            mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        first_head = self.tp_group.rank() * self.num_attention_heads_per_partition
        query_ids, key_ids = indices if indices is not None else (None, None)
        probs = keyed_attention_dropout(
            probs, p, self.layer_number, first_head, offset, offset, query_ids, key_ids
        )
        return torch.matmul(probs, v)  # [b, np, sq, hn]

    def _flex(self, q, k, v, block_mask: BlockMask) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
        )
        if q.device.type == "cpu" and needs_grad:
            raise RuntimeError(
                "FlexAttention has no backward on CPU. Train on CPU with attention_kernel='sdpa' "
                "(or 'auto'), or run this forward under torch.no_grad()"
            )
        if self.training and self.dropout_p > 0.0:
            raise RuntimeError(
                "FlexAttention has no attention dropout; use attention_kernel='sdpa'"
            )
        flex = _flex_attention_fn(self.compile_flex)
        return flex(q, k, v, block_mask=block_mask, scale=self.softmax_scale)

    def _check_every_query_attends(self, mask: torch.Tensor) -> None:
        """A query row with no allowed key makes SDPA return NaN. It is also the signature of a
        megatron-convention mask (True = masked out) passed by mistake: the last row of an
        inverted causal mask is all False. Checked once per mask tensor (it syncs the device)."""
        signature = (mask.data_ptr(), tuple(mask.shape))
        if signature in self._validated_masks:
            return
        if not bool(mask.any(dim=-1).all()):
            raise ValueError(
                "attention_mask has a query that may attend to no key. BD3CoreAttention masks are "
                "True = may attend (SDPA/flex convention), the opposite of megatron-core's "
                "True = masked out; convert with `~mask`"
            )
        if len(self._validated_masks) > 64:
            self._validated_masks.clear()
        self._validated_masks.add(signature)
