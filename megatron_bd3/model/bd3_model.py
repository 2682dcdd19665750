"""BD3Model: the block-diffusion language model on megatron-core (a LanguageModule).

Training forward (docs/method.md §1-§2): the input is the two streams [x_t ; x_0] (2L tokens), both
carrying positions 0..L-1 for RoPE, run once through megatron's TransformerBlock under the BD3
mask (noisy block b sees itself and clean blocks < b; clean block b sees clean blocks ≤ b). Only
the x_t half reaches the output layer; the clean half exists to provide keys/values at every layer.
The loss is SUBS + NELBO: the [MASK] logit is removed, the cross-entropy against x_0 gives the
token NLL, and megatron_bd3.diffusion.nelbo_from_token_nll (the single source of the NELBO) turns
it into per-token loss terms.

Work the loss cannot see is skipped (same loss up to summation order, tested); each is a
BD3Config switch, on by default:
* the last layer computes only the x_t queries (x_t_only_last_layer, self_attention.py);
* only the masked x_t positions are projected onto the vocabulary (masked_only_logits;
  carry-over unmasking gives every other position zero loss, docs/method.md §2.2 item 7), and
  with TP = 1 SUBS + cross-entropy is one masked fill and one fused log-softmax;
* with B = L (MDLM) the x_0 stream is dropped altogether (single_stream_mdlm): the only block
  has no earlier clean blocks, so x_t never attends to x_0.

Attention contract: the model hands its TransformerBlock attention_mask=None, which every
BD3CoreAttention reads as "the model's own attention" and computes from the config (the
block-diffusion mask over [x_t ; x_0], or full attention over x_t alone; kernel from
config.attention_kernel and the device, see attention.py). With config.document_mask the model
hands its per-token document ids [b, L] in that slot instead, which every BD3CoreAttention reads
as its own attention restricted to documents (docs/method.md §1.4); with
config.document_position_reset the RoPE positions also restart at every document. A mask
reaches the core attention only when a caller runs the decoder with its own. Which rows the last layer returns is told to the
layers explicitly (BD3SelfAttention.outputs), never read off a tensor.

Randomness (BD3Config.init_rng / dropout_rng, 'keyed' in every run config): with 'keyed' the
random weights are redrawn from a hash of (init_seed, global name, index) after megatron built
them (keyed_init.py), and every dropout mask is a hash of the micro-batch's DropoutKey and global
positions (keyed_dropout.py), so 1 process and any DP/TP/SP/PP layout train the same run.

Layouts: megatron is sequence-first. Inputs are batch-first token ids [b, L]; hidden states are
[s, b, h] with s = 2L (or 2L/TP per rank under sequence parallel); loss terms are [b, L].
Attention masks are True = may attend (see masks.py), the opposite of megatron's own convention.

Vocabulary: the embedding and output layer have config.padded_vocab_size rows (vocab_size rounded
up to make_vocab_size_divisible_by × TP). Padded rows get logit -1e6 in the loss and are cut off
by forward_logits, so the model is a distribution over vocab_size tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import get_pg_rank
from torch import Tensor

from megatron_bd3.diffusion import check_document_ids, document_positions, nelbo_from_token_nll
from megatron_bd3.model.config import BD3Config
from megatron_bd3.model.context_parallel import ContextParallelLayout
from megatron_bd3.model.keyed_dropout import BD3BiasDropoutAdd, KeyedDropout
from megatron_bd3.model.keyed_init import initialize_keyed
from megatron_bd3.model.layer_spec import get_bd3_block_spec, get_bd3_layer_spec
from megatron_bd3.model.self_attention import BD3SelfAttention

# SUBS zero-masking: the [MASK] logit is pushed to -1e6 so the model never predicts [MASK]
# (reference `_subs_parameterization`); the padded vocab rows get the same treatment.
SUBS_NEG_INF = -1e6


@dataclass
class BD3LossInputs:
    """What the last pipeline stage needs besides the logits to compute the NELBO terms.

    masked:      [b, L] bool, True where x_t holds [MASK] (only these positions carry loss).
    loss_weight: [b, L] float, the per-token NELBO weight (1/t of the token's block for the
                 linear schedule), as produced by megatron_bd3.diffusion.noise_batch.
    loss_mask:   [b, L] optional 0/1, tokens counted in the loss and its denominator.
    labels:      [b, L] optional targets; None means x_0.
    """

    masked: Tensor
    loss_weight: Tensor
    loss_mask: Tensor | None = None
    labels: Tensor | None = None


class BD3Model(LanguageModule):
    """Block-diffusion LM: embedding, TransformerBlock with the BD3 spec, x_t-half output layer.

    Args:
        config: BD3Config (one config for everything).
        transformer_layer_spec: layer spec; default get_bd3_layer_spec(config).
        pre_process: this pipeline stage holds the embedding.
        post_process: this pipeline stage holds the final norm, output layer and loss.
        vp_stage: virtual pipeline stage index (interleaved schedule).
        pg_collection: process groups; default megatron's parallel_state groups.
    """

    def __init__(
        self,
        config: BD3Config,
        transformer_layer_spec: ModuleSpec | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if not isinstance(config, BD3Config):
            raise TypeError(f"BD3Model needs a BD3Config, got {type(config).__name__}")
        self.config: BD3Config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.model_type = ModelType.encoder_or_decoder  # megatron's schedules read this
        self.transformer_layer_spec = transformer_layer_spec or get_bd3_layer_spec(config)

        tp_size = self.pg_collection.tp.size()
        if tp_size != config.tensor_model_parallel_size:
            raise ValueError(
                f"config.tensor_model_parallel_size {config.tensor_model_parallel_size} does not "
                f"match the tensor-parallel group size {tp_size}"
            )
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = config.padded_vocab_size

        # Context parallelism (model/context_parallel.py): this rank holds L / CP positions of
        # both streams; inputs, RoPE positions and loss inputs are sliced to them here, and keyed
        # dropout keys the rank's rows by their global stream rows.
        self.cp_layout = None
        if config.context_parallel_size > 1:
            self.cp_layout = ContextParallelLayout(
                config.seq_length, config.block_size, config.context_parallel_size,
                self.pg_collection.cp.rank(),
            )
        self.local_length = config.seq_length // config.context_parallel_size
        stream_rows = None if self.cp_layout is None else self.cp_layout.stream_rows  # [2L/CP]

        if self.pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=self.padded_vocab_size,
                max_sequence_length=config.stream_length,
                position_embedding_type="none",  # RoPE is applied in attention, never added here
                scatter_to_sequence_parallel=True,
                tp_group=self.pg_collection.tp,
            )
            if config.embedding_dropout is not None:
                self.embedding.embedding_dropout.p = config.embedding_dropout
            if config.dropout_rng == "keyed":
                self.embedding.embedding_dropout = KeyedDropout(
                    self.embedding.embedding_dropout.p, config.sequence_parallel, stream_rows
                )

        # Every stage applies RoPE inside its attention layers, so every stage has the table.
        self.rotary_pos_emb = None
        if config.position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=config.rotary_percent,
                rotary_interleaved=config.rotary_interleaved,
                rotary_base=config.rotary_base,
                use_cpu_initialization=config.use_cpu_initialization,
                cp_group=self.pg_collection.cp,
            )

        self.decoder = TransformerBlock(
            config=config,
            spec=get_bd3_block_spec(
                config, self.transformer_layer_spec, vp_stage, get_pg_rank(self.pp_group)
            ),
            pre_process=self.pre_process,
            post_process=self.post_process,
            pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )

        if self.post_process:
            # The output layer sees the x_t half gathered from the sequence-parallel region
            # (see _x_t_logits), so it is built with sequence parallel off: its input is the full
            # [L, b, h] on every TP rank and its input-gradient is all-reduced, which is what the
            # gather's backward (a plain split) expects.
            output_config = copy.copy(config)
            output_config.sequence_parallel = False
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                self.padded_vocab_size,
                config=output_config,
                init_method=config.init_method,
                bias=config.output_layer_bias,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=self.pre_process
                and self.share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp,
            )

        for layer in self.decoder.layers:  # spec leaves are built without their layer number
            for bda in (layer.self_attn_bda, layer.mlp_bda):
                if isinstance(bda, BD3BiasDropoutAdd):
                    bda.bind_layer(layer.layer_number, stream_rows)
        if config.init_rng == "keyed":
            # before the tied output copy of the last stage is synced from the embedding
            initialize_keyed(self, config, self.pg_collection.tp.rank(), tp_size)

        if self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()

    # -- pipeline plumbing -----------------------------------------------------------------------

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """Hidden states from the previous pipeline stage (called by megatron's schedules)."""
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        if len(input_tensor) != 1:
            raise ValueError(f"BD3Model takes one input tensor, got {len(input_tensor)}")
        self.decoder.set_input_tensor(input_tensor[0])

    # -- training forward ------------------------------------------------------------------------

    def forward(
        self,
        x_t: Tensor | None,
        x_0: Tensor | None,
        loss_inputs: BD3LossInputs | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Two-stream training forward.

        Args:
            x_t: [b, L] noisy tokens (read on the first pipeline stage only).
            x_0: [b, L] clean tokens (first stage: second stream; last stage: default labels).
            loss_inputs: masks and weights for the NELBO (last stage).
            document_ids: [b, L] per-token document ids, on every pipeline stage; required with
                config.document_mask, refused without it (docs/method.md §1.4). Under context
                parallelism too the whole sequence's [b, L] (every attention compares the ids at
                global positions).

        Returns:
            last stage with loss_inputs: [b, L] per-token NELBO terms (0 where not masked),
                whose sum over the batch divided by the number of counted tokens is the loss;
            last stage without loss_inputs: [b, L, V_pad/TP] vocab-parallel x_t-half logits;
            other stages: hidden states [stream_length(/TP under sequence parallel), b, h]
                (stream_length = 2L, or L for the single-stream B = L model).
            Under context parallelism the inputs are still [b, L] (the same on every CP rank)
            and every L above is this rank's L / CP positions (self.cp_layout.positions).
        """
        hidden_states = self._run_decoder(x_t, x_0, document_ids)  # last layer: x_t rows (config)
        if not self.post_process:
            return hidden_states
        if loss_inputs is None:
            logits = self._x_t_logits(hidden_states, self.local_length)  # [L, b, V/tp]
            return logits.transpose(0, 1).contiguous()  # [b, L, V/tp]
        labels = loss_inputs.labels if loss_inputs.labels is not None else x_0
        if labels is None:
            raise ValueError("the last pipeline stage needs x_0 (or loss_inputs.labels)")
        labels, masked = self._local(labels), self._local(loss_inputs.masked)
        if self.config.masked_only_logits:
            token_nll = self._masked_token_nll(hidden_states, labels, masked)
        else:
            token_nll = self._all_positions_token_nll(hidden_states, labels)  # [b, L]
        nelbo = nelbo_from_token_nll(
            token_nll,
            masked,
            loss_weight=self._local(loss_inputs.loss_weight),
            block_size=self.config.block_size,
            loss_mask=self._local(loss_inputs.loss_mask),
        )
        return nelbo.token_loss

    def forward_logits(
        self, x_t: Tensor, x_0: Tensor, document_ids: Tensor | None = None
    ) -> Tensor:
        """x_t-half logits gathered over TP: [b, L, vocab_size] (padding cut off). Needs the
        whole model on this rank (no pipeline split)."""
        self._require_single_stage("forward_logits")
        logits = self.forward(x_t, x_0, document_ids=document_ids)  # [b, L, V/tp]
        return self._gather_vocab(logits)

    def forward_hidden(
        self, x_t: Tensor, x_0: Tensor, document_ids: Tensor | None = None
    ) -> Tensor:
        """Final-norm hidden states of both streams, [2L, b, h] (gathered under sequence
        parallel): rows [0, L) are the x_t half, [L, 2L) the x_0 half; [L, b, h] (x_t only) for
        the single-stream B = L model. For tests and analysis."""
        self._require_single_stage("forward_hidden")
        layers = [m for m in self.modules() if isinstance(m, BD3SelfAttention)]
        full_recompute = self.config.recompute_granularity == "full" and self.training
        if full_recompute and torch.is_grad_enabled() and any(m.x_t_rows_eligible for m in layers):
            # megatron recomputes the layers in backward, after forward_hidden has set them back
            # to computing the x_t rows only.
            raise RuntimeError(
                "forward_hidden reads all 2L rows and cannot be back-propagated under activation "
                "recompute; call it in eval mode or under torch.no_grad()"
            )
        for layer in layers:
            layer.outputs = "all"
        try:
            hidden_states = self._run_decoder(x_t, x_0, document_ids)
        finally:
            for layer in layers:
                layer.outputs = "x_t"
        return self._gather_sequence(hidden_states)

    # -- pieces ----------------------------------------------------------------------------------

    def _run_decoder(
        self, x_t: Tensor | None, x_0: Tensor | None, document_ids: Tensor | None = None
    ) -> Tensor:
        """The decoder over the training input: [x_t ; x_0] (2L), or x_t alone (single stream).

        The attention mask is None (or the document ids with config.document_mask): every core
        attention runs the model's own attention from the config (attention.AttentionPlan). The
        last layer returns the x_t rows only (L rows) when config.x_t_only_last_layer applies,
        unless forward_hidden asked for all rows."""
        document_ids = self._checked_document_ids(document_ids)
        L = self.config.seq_length
        single_stream = self.config.single_stream
        decoder_input = None
        if self.pre_process:
            streams = (("x_t", x_t),) if single_stream else (("x_t", x_t), ("x_0", x_0))
            for name, tokens in streams:
                if tokens is None or tokens.dim() != 2 or tokens.size(1) != L:
                    shape = None if tokens is None else tuple(tokens.shape)
                    raise ValueError(
                        f"{name} must be [batch, seq_length={L}] token ids, got {shape}"
                    )
            x_t, x_0 = self._local(x_t), self._local(x_0)  # [b, L / CP] under CP
            tokens = x_t if single_stream else torch.cat([x_t, x_0], dim=1)  # [b, 2L] or [b, L]
            decoder_input = self.embedding(input_ids=tokens, position_ids=None)  # [s, b, h]
        device = self._device()
        if document_ids is not None:
            document_ids = document_ids.to(device)
        return self.decoder(
            hidden_states=decoder_input,
            # the model's own attention (config), not a caller's mask; per-token document ids
            # restrict it to documents (config.document_mask)
            attention_mask=document_ids,
            rotary_pos_emb=self._training_rotary(device, document_ids),
        )

    def _checked_document_ids(self, document_ids: Tensor | None) -> Tensor | None:
        """The document ids exactly when config.document_mask asks for them, as [b, L]."""
        if not self.config.document_mask:
            if document_ids is not None:
                raise ValueError(
                    "BD3Model got document_ids but config.document_mask is off; set "
                    "document_mask=True (data.document_mask in a run config) or pass none"
                )
            return None
        if document_ids is None:
            raise ValueError(
                "config.document_mask is on: BD3Model needs document_ids [b, L] (the data "
                "loader's per-token document ids) on every forward"
            )
        check_document_ids(document_ids, None, self.config.seq_length)
        return document_ids

    def _training_rotary(
        self, device: torch.device, document_ids: Tensor | None = None
    ) -> Tensor | None:
        """RoPE angles of the training input: positions [0..L-1, 0..L-1] for the two streams,
        [0..L-1] for the single stream; [stream_length, 1, 1, d]. With
        config.document_position_reset, each token's position inside its document instead
        (the same in both streams): [stream_length, b, 1, d]. Under context parallelism the
        angles of this rank's global positions, twice ([2L / CP, 1 or b, 1, d]; with the reset,
        the in-document positions are counted on the global [b, L] ids, then sliced)."""
        if self.rotary_pos_emb is None:
            return None
        # get_emb, not forward: megatron's forward would cut the table for its own CP layout
        table = self.rotary_pos_emb.get_emb(self.config.seq_length).to(device)  # [L, 1, 1, d]
        if self.config.document_position_reset:
            positions = document_positions(document_ids)  # [b, L]
            table = table[:, 0, 0][positions].transpose(0, 1).unsqueeze(2)  # [L, b, 1, d]
        if self.config.single_stream:
            return table
        table = self._local(table, dim=0)  # [L / CP, 1 or b, 1, d] under CP
        return torch.cat([table, table], dim=0)  # [2L / CP, 1 or b, 1, d]

    def _x_t_logits(self, hidden_states: Tensor, keep: int) -> Tensor:
        """Output layer on the first `keep` sequence positions only: [keep, b, V/tp]."""
        hidden_states = self._gather_sequence(hidden_states)[:keep]  # [keep, b, h]
        weight = None
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        logits, _ = self.output_layer(hidden_states, weight=weight)
        return logits

    def _gather_sequence(self, hidden_states: Tensor) -> Tensor:
        """[s/tp, b, h] -> [s, b, h] under sequence parallel (identity otherwise).

        tensor_parallel_output_grad=False: whatever consumes the gathered tensor gives every TP
        rank the same, complete gradient, so the backward is a split, not a reduce-scatter."""
        if not self.config.sequence_parallel:
            return hidden_states
        return tensor_parallel.gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=False, group=self.tp_group
        )

    def _masked_token_nll(self, hidden_states: Tensor, labels: Tensor, masked: Tensor) -> Tensor:
        """-log p_θ(x_0 | x_t) at the masked x_t positions, 0 elsewhere: [b, L].

        Only masked positions carry loss (carry-over unmasking, docs/method.md §2.2 item 7), so only
        their final hidden states are projected onto the vocabulary — about half the output
        layer and cross-entropy work of projecting all L positions at t ~ U[0, 1]."""
        if masked.dtype != torch.bool or masked.shape != labels.shape:
            raise ValueError(
                f"loss_inputs.masked must be a bool [b, L] tensor like the labels "
                f"{tuple(labels.shape)}, got {masked.dtype} {tuple(masked.shape)}"
            )
        L = self.local_length
        hidden = self._gather_sequence(hidden_states)[:L]  # [L, b, h]
        rows = hidden.transpose(0, 1)[masked]  # [M, h], M = masked positions, (b, L) order
        weight = None
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        logits, _ = self.output_layer(rows.unsqueeze(1), weight=weight)  # [M, 1, V/tp]
        nll = self._subs_token_nll(logits, labels[masked].unsqueeze(1))  # [M, 1]
        return nll.new_zeros(labels.shape).masked_scatter(masked, nll.squeeze(1))  # [b, L]

    def _all_positions_token_nll(self, hidden_states: Tensor, labels: Tensor) -> Tensor:
        """-log p_θ(x_0 | x_t) at all L x_t positions: [b, L] (config.masked_only_logits off).

        Every position is projected onto the vocabulary, SUBS is an out-of-place masked fill and
        the NLL megatron's vocab-parallel cross-entropy; the NELBO ignores the unmasked
        positions. The same loss as _masked_token_nll at about twice the output-layer work: kept
        to measure what the masked-only path buys (tools/bench/train_step_bench.py --without)."""
        logits = self._x_t_logits(hidden_states, self.local_length)  # [L, b, V/tp]
        vocab_local = logits.size(-1)
        vocab_start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
        vocab_ids = torch.arange(vocab_start, vocab_start + vocab_local, device=logits.device)
        blocked = (vocab_ids == self.config.mask_token_id) | (vocab_ids >= self.vocab_size)
        logits = logits.float().masked_fill(blocked, SUBS_NEG_INF)
        nll = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous())
        return nll.t()  # [L, b] -> [b, L]

    def _subs_token_nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        """-log p_θ(label) under SUBS zero-masking: logits [s, b, V/tp], labels [s, b] -> [s, b].

        The [MASK] column (and the padded columns) get logit -1e6 before the cross-entropy."""
        vocab_local = logits.size(-1)
        tp_size = self.config.tensor_model_parallel_size
        vocab_start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
        vocab_ids = torch.arange(vocab_start, vocab_start + vocab_local, device=logits.device)
        # Only the TP rank owning the [MASK] column (and padded columns) changes anything.
        blocked = (vocab_ids == self.config.mask_token_id) | (vocab_ids >= self.vocab_size)
        if tp_size == 1:
            # One masked fill (in place: the output layer does not keep its output) and one
            # fused log-softmax + NLL, instead of megatron's vocab-parallel chain.
            if logits.dtype == torch.float32:
                logits = logits.masked_fill_(blocked, SUBS_NEG_INF)
            else:
                logits = logits.float().masked_fill_(blocked, SUBS_NEG_INF)
            nll = F.cross_entropy(
                logits.view(-1, vocab_local), labels.reshape(-1), reduction="none"
            )
            return nll.view(labels.shape)
        logits = logits.float().masked_fill(blocked, SUBS_NEG_INF)
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)

    def _gather_vocab(self, logits: Tensor) -> Tensor:
        """[..., V/tp] vocab-parallel -> [..., vocab_size] full (padding cut off). At TP = 1 a
        view of the input (no copy of the [.., V] logits, which may be a transposed view)."""
        if self.config.tensor_model_parallel_size > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(
                logits.contiguous(), group=self.tp_group
            )
        return logits[..., : self.vocab_size]

    def _local(self, tensor: Tensor | None, dim: int = 1) -> Tensor | None:
        """This rank's positions of a tensor over all L positions (identity without CP)."""
        if self.cp_layout is None or tensor is None:
            return tensor
        return self.cp_layout.local(tensor, dim=dim)

    def _require_single_stage(self, what: str) -> None:
        if not (self.pre_process and self.post_process):
            raise RuntimeError(
                f"{what} needs the whole model on this rank (pre_process and post_process); "
                "under pipeline parallelism use forward() through megatron's schedule"
            )

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def build_bd3_model(
    config: BD3Config,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    transformer_layer_spec: ModuleSpec | None = None,
) -> BD3Model:
    """megatron-style model provider: the BD3Model chunk for this rank's pipeline stage.

    pre_process/post_process default to whether this rank (and `vp_stage`, under the
    interleaved schedule) is the first/last pipeline stage. Call once per virtual stage:
    `[build_bd3_model(cfg, vp_stage=i) for i in range(vpp)]`.
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(
            ignore_virtual=False, vp_stage=vp_stage
        )
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(
            ignore_virtual=False, vp_stage=vp_stage
        )
    return BD3Model(
        config,
        transformer_layer_spec=transformer_layer_spec,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
