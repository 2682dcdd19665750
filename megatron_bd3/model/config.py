"""BD3Config: megatron-core's TransformerConfig plus the block-diffusion knobs, and named presets.

One config object flows through every module (megatron's convention), so the BD3 knobs live in
the same flat dataclass as the transformer ones instead of travelling as loose kwargs.

Presets:
    bd3_config(...)    BD3-LM with block size B (paper §1-§2)
    ar_config(...)     B = 1 with full masking (fixed_t = 1): exactly the AR next-token NLL (§2.4)
    mdlm_config(...)   B = L: one block, exactly MDLM
    reference_architecture()  the overrides that make the network match the reference DiT
                       backbone (pre-LN, LayerNorm eps 1e-5, GELU tanh, RoPE rotate-half base
                       10000 over the whole head, untied embeddings, qkv/out without bias, MLP and
                       output layer with bias; docs/method.md §8.1)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_bd3.diffusion import ClipRange, get_noise_schedule

logger = logging.getLogger(__name__)

ATTENTION_KERNELS = ("flex", "sdpa", "auto")
POSITION_EMBEDDING_TYPES = ("rope", "none")
CP_COMM_TYPES = ("all_gather", "p2p")  # the clean key/value exchange of context parallelism
_warned_cpu_flex = False  # the CPU-flex warning is logged once per process


def resolve_cp_comm_type(attention_dropout: float) -> str:
    """The context-parallel exchange 'auto' stands for, from the device and the config: the
    ring ('p2p') on CPU without attention dropout (measured there: less memory per rank and no
    slower, docs/bench/long-context.md); 'all_gather' with CUDA (the ring's GPU path is plain
    torch per tile, the all-gather's runs compiled FlexAttention; the ring is unmeasured on GPU)
    or with attention dropout (the ring has none)."""
    if torch.cuda.is_available() or attention_dropout > 0:
        return "all_gather"
    return "p2p"


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, the reference MLP activation.

    A named module-level function (not a functools.partial) so configs pickle and print cleanly.
    """
    return F.gelu(x, approximate="tanh")


@dataclass
class BD3Config(TransformerConfig):
    """TransformerConfig plus the block-diffusion knobs.

    The attention kernel is called `attention_kernel`, not `attention_backend`: megatron-core's
    TransformerConfig already has an `attention_backend` field (an AttnBackend enum that selects
    Transformer Engine kernels and sets NVTE_* environment variables in LanguageModule), and
    shadowing it with a string would silently disable that logic.
    """

    seq_length: int = 0
    """L: tokens per training sequence. The model input is the two streams [x_t ; x_0] (2L)."""

    block_size: int = 0
    """B: tokens per diffusion block; seq_length must be a multiple of it."""

    vocab_size: int = 0
    """Real vocabulary size (including the [MASK] token). Padded for TP, see padded_vocab_size."""

    mask_token_id: int = -1
    """Id of the absorbing [MASK] token m."""

    attention_kernel: Literal["flex", "sdpa", "auto"] = "auto"
    """'flex': FlexAttention with the sparse BlockMask (compiled on GPU; forward only on CPU).
    'sdpa': scaled_dot_product_attention with the dense bool mask built from the same predicate.
    'auto': flex when CUDA is available and attention_dropout is 0, sdpa otherwise (logged)."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities. Megatron defaults to 0.1; BD3 to 0.0, because the
    reference has none and FlexAttention cannot apply it."""

    compile_flex: bool | None = None
    """torch.compile flex_attention. None: compile on CUDA only (eager flex on CPU)."""

    noise_schedule: str = "loglinear"
    """Noise schedule name, resolved by megatron_bd3.diffusion.get_noise_schedule."""

    clip_min: float = 1e-3
    """β: lower end of the (clipped) time range t ~ U[β, ω]; (1e-3, 1) is the unclipped ELBO."""

    clip_max: float = 1.0
    """ω: upper end of the time range."""

    fixed_t: float | None = None
    """Use this t for every block instead of sampling it (1.0 = full masking, the AR preset)."""

    ignore_bos: bool = False
    """Position 0 is never masked and not counted in evaluation (reference bd3lm/mdlm configs)."""

    antithetic_sampling: bool = True
    """Stratify the per-block times t over the global batch (docs/method.md §2.2 item 2)."""

    resample: bool = True
    """Redraw a block's mask while its masked fraction leaves the clip range (§2.2 item 4)."""

    share_embeddings_and_output_weights: bool = False
    """Tie the input embedding and the output projection (the reference does not)."""

    output_layer_bias: bool = False
    """Bias on the output projection (the reference has one)."""

    reference_bias_layout: bool = False
    """qkv and attention-out projections without bias, MLP fc1/fc2 with bias (the reference).
    Requires add_bias_linear=False and add_qkv_bias=False; the MLP biases come from the spec."""

    embedding_dropout: float | None = None
    """Dropout after the token embedding. None: hidden_dropout (megatron's behaviour); the
    reference applies none."""

    dropout_rng: Literal["keyed", "torch"] = "torch"
    """Where dropout masks come from. 'torch': megatron's generators (a mask depends on the rank
    and the micro-batch split). 'keyed': a hash of (seed, step, global-batch position, layer,
    site, element), the same on every layout (keyed_dropout.py); the forward needs the
    micro-batch's DropoutKey (megatron_bd3.model.forward_step holds it)."""

    init_rng: Literal["keyed", "torch"] = "torch"
    """Where the initial weights come from. 'torch': megatron's init (per-stage seeds under PP,
    per-TP-rank streams on GPU). 'keyed': each random weight drawn element by element from a hash
    of (init_seed, its global parameter name, its global index), then cut to this rank's TP
    slice: the same weights on every layout (keyed_init.py)."""

    init_seed: int = 0
    """Seed of the keyed initialisation (the run's training.seed)."""

    make_vocab_size_divisible_by: int = 128
    """The embedding/output rows are padded to a multiple of this × TP size (megatron's rule)."""

    position_embedding_type: Literal["rope", "none"] = "rope"
    """RoPE over positions [0..L-1, 0..L-1] (both streams share positions), or none."""

    rotary_base: int = 10000
    """RoPE base."""

    rotary_percent: float = 1.0
    """Fraction of the head dim that is rotated (1.0 = whole head, the reference)."""

    single_stream_mdlm: bool = True
    """With B = L, train on the x_t stream alone (L tokens) instead of [x_t ; x_0] (2L). When
    B = L the x_t half attends to no x_0 token (its only block has no earlier clean blocks), so
    the x_0 stream cannot change the loss and is skipped: same loss, half the tokens. False
    keeps the two-stream input (for checking that equality)."""

    document_mask: bool = False
    """Document-aware packing (docs/method.md §1.4): attention never crosses a document boundary
    inside a packed sequence, in both streams, on top of the block-diffusion mask. The model's
    forward then needs `document_ids` [b, L] (from the data loader). Off: the reference's plain
    wrapping, where a sequence attends across the documents packed into it."""

    document_position_reset: bool = False
    """With document_mask: RoPE positions restart at 0 at the start of every document of a
    packed sequence (x_t and x_0 copies still share a position). Off: positions 0..L-1. With
    RoPE alone this shifts both positions of every attended pair equally, so the scores are the
    same up to rounding (docs/method.md §1.4)."""

    cp_comm_type: str = "auto"
    """How context parallelism exchanges the clean stream's keys/values (megatron's field, one
    value for every layer). 'p2p': around the CP ring, merged by log-sum-exp, the backward saving
    only this rank's tensors (model/ring_attention.py; no attention dropout). 'all_gather': one
    all-gather per layer, the backward a reduce-scatter, the attention on the configured kernel
    (model/context_parallel.py). 'auto' (the default) is replaced at construction by
    `resolve_cp_comm_type`, so megatron only ever sees one of the two. docs/training.md
    "Context parallelism" compares them."""

    # -- fast paths: each computes the same loss and gradients (up to summation order, tested in
    # tests/model/test_fast_paths.py) for less work; off only to measure what it buys
    # (tools/bench/train_step_bench.py --without) or to check the equality.

    cpu_block_attention: bool = True
    """On CPU, with the sdpa kernel and no active attention dropout, compute the model's own
    block-diffusion attention block by block (block_attention.py: L² + 2·C·L scores per head
    instead of 3L²). False: SDPA with the dense mask in two calls, as on GPU."""

    x_t_only_last_layer: bool = True
    """In the two-stream training forward the last layer computes only the L x_t queries (and
    runs its output projection, residual and MLP on those rows): nothing reads the x_0 half of
    its output. Applies with the sdpa kernel, without sequence parallelism and with
    short_self_attention_forward; forward_hidden still returns all 2L rows."""

    short_self_attention_forward: bool = True
    """BD3SelfAttention runs its short forward (qkv, one-pass RoPE, core attention, projection)
    for the model's plain calls. False: megatron's SelfAttention.forward for every call (its
    RoPE), which also turns x_t_only_last_layer off."""

    masked_only_logits: bool = True
    """Project only the masked x_t positions onto the vocabulary for the loss, and at TP = 1 take
    SUBS + cross-entropy as one masked fill and one fused cross-entropy. False: all L x_t
    positions, an out-of-place SUBS fill and megatron's vocab-parallel cross-entropy."""

    def __post_init__(self) -> None:
        if self.cp_comm_type == "auto":
            self.cp_comm_type = resolve_cp_comm_type(self.attention_dropout)
        super().__post_init__()
        self._validate_bd3()
        self._validate_context_parallel_exchange()

    # -- validation -------------------------------------------------------------------------------

    def _validate_context_parallel_exchange(self) -> None:
        """cp_comm_type: one of the two exchanges; the ring has no attention dropout."""
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(
                f"BD3Config.cp_comm_type {self.cp_comm_type!r} is not one of "
                f"{CP_COMM_TYPES + ('auto',)} "
                "(the BD3 context-parallel exchanges; parallel.context_parallel_comm in a run "
                "config)"
            )
        cp = self.context_parallel_size
        if cp > 1 and self.cp_comm_type == "p2p" and self.attention_dropout > 0:
            raise ValueError(
                f"context_parallel_size {cp} with cp_comm_type 'p2p' has no attention dropout "
                f"(attention_dropout {self.attention_dropout}); set it to 0 or use "
                "cp_comm_type 'all_gather'"
            )

    def _validate_bd3(self) -> None:
        if self.seq_length <= 0:
            raise ValueError(f"BD3Config.seq_length must be positive, got {self.seq_length}")
        if self.block_size <= 0:
            raise ValueError(f"BD3Config.block_size must be positive, got {self.block_size}")
        if self.seq_length % self.block_size != 0:
            raise ValueError(
                f"seq_length {self.seq_length} is not a multiple of block_size {self.block_size}"
            )
        if self.vocab_size <= 0:
            raise ValueError(f"BD3Config.vocab_size must be positive, got {self.vocab_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"BD3Config.mask_token_id {self.mask_token_id} must be a token id in "
                f"[0, vocab_size={self.vocab_size})"
            )
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(
                f"BD3Config.attention_kernel {self.attention_kernel!r} is not one of "
                f"{ATTENTION_KERNELS}"
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"BD3Config.position_embedding_type {self.position_embedding_type!r} is not one "
                f"of {POSITION_EMBEDDING_TYPES}"
            )
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(
                f"BD3Config.rotary_percent must be in (0, 1], got {self.rotary_percent}"
            )
        self._validate_noise_schedule()
        if self.fixed_t is not None and not 0.0 < self.fixed_t <= 1.0:
            raise ValueError(f"BD3Config.fixed_t must be in (0, 1], got {self.fixed_t}")
        if self.make_vocab_size_divisible_by <= 0:
            raise ValueError(
                "BD3Config.make_vocab_size_divisible_by must be positive, got "
                f"{self.make_vocab_size_divisible_by}"
            )
        if self.embedding_dropout is not None and not 0.0 <= self.embedding_dropout < 1.0:
            raise ValueError(
                f"BD3Config.embedding_dropout must be in [0, 1), got {self.embedding_dropout}"
            )
        self._validate_keyed_rng()
        cp = self.context_parallel_size
        if cp > 1:
            # model/context_parallel.py: 2·CP chunks of whole blocks, both streams on every rank
            if self.single_stream:
                raise ValueError(
                    f"context_parallel_size {cp} needs the two-stream input; the single-stream "
                    "B = L model (single_stream_mdlm) has one block, which cannot be cut on block "
                    "edges: set single_stream_mdlm=False or context_parallel_size 1"
                )
            if self.seq_length % (2 * cp * self.block_size):
                raise ValueError(
                    f"context_parallel_size {cp} cuts seq_length {self.seq_length} into {2 * cp} "
                    f"chunks of whole blocks; seq_length must be a multiple of 2 x "
                    f"context_parallel_size x block_size = {2 * cp * self.block_size}"
                )
        local_stream = self.stream_length // cp
        if self.sequence_parallel and local_stream % self.tensor_model_parallel_size:
            name, kind = ("L", "single-stream") if self.single_stream else ("2L", "two-stream")
            name = name if cp == 1 else f"{name}/CP"
            raise ValueError(
                f"sequence_parallel splits the {name} = {local_stream} {kind} tokens over "
                f"tensor_model_parallel_size {self.tensor_model_parallel_size}; {name} must be a "
                "multiple of it"
            )
        if self.document_position_reset and not self.document_mask:
            raise ValueError(
                "document_position_reset needs document_mask (positions restart per document "
                "only when attention is per document)"
            )
        if self.document_position_reset and self.position_embedding_type != "rope":
            raise ValueError(
                f"document_position_reset needs position_embedding_type 'rope', got "
                f"{self.position_embedding_type!r}"
            )
        if self.softmax_type != "vanilla":
            raise ValueError(
                f"softmax_type {self.softmax_type!r} is not supported by the BD3 core attention; "
                "use 'vanilla'"
            )
        if self.window_size is not None:
            raise ValueError("window_size (sliding-window attention) is not supported by BD3")
        if self.multi_latent_attention:
            raise ValueError("multi_latent_attention is not supported by BD3")
        if self.mtp_num_layers is not None:
            raise ValueError("mtp_num_layers (multi-token prediction) is not supported by BD3")
        if self.reference_bias_layout and (self.add_bias_linear or self.add_qkv_bias):
            raise ValueError(
                "reference_bias_layout=True puts biases on the MLP only; set add_bias_linear=False "
                f"and add_qkv_bias=False (got add_bias_linear={self.add_bias_linear}, "
                f"add_qkv_bias={self.add_qkv_bias})"
            )
        if (
            self.share_embeddings_and_output_weights
            and self.pipeline_model_parallel_size > 1
            and not torch.cuda.is_available()
        ):
            raise ValueError(
                "share_embeddings_and_output_weights with pipeline_model_parallel_size "
                f"{self.pipeline_model_parallel_size} needs CUDA: megatron's LanguageModule syncs "
                "the tied copy with `weight.data.cuda()`; untie the embeddings on CPU"
            )
        kernel = self.resolved_attention_kernel
        if kernel == "flex" and self.attention_dropout > 0.0:
            raise ValueError(
                f"attention_kernel 'flex' has no attention dropout (attention_dropout="
                f"{self.attention_dropout}); set attention_dropout=0.0 or use 'sdpa'"
            )
        global _warned_cpu_flex
        if (
            self.attention_kernel == "flex"
            and not torch.cuda.is_available()
            and not _warned_cpu_flex
        ):
            _warned_cpu_flex = True
            logger.warning(
                "attention_kernel='flex' without CUDA: FlexAttention on CPU is forward-only, so "
                "training will raise; use 'sdpa' (or 'auto') to train on CPU"
            )

    def _validate_keyed_rng(self) -> None:
        for name in ("dropout_rng", "init_rng"):
            if getattr(self, name) not in ("keyed", "torch"):
                raise ValueError(
                    f"BD3Config.{name} {getattr(self, name)!r} is not one of ('keyed', 'torch')"
                )
        if self.dropout_rng != "keyed":
            return
        # megatron's activation recompute reruns the layers (full) or the core attention
        # (selective) during backward, outside the forward that holds the micro-batch's key.
        full = self.recompute_granularity == "full"
        if (full and (self.hidden_dropout > 0 or self.attention_dropout > 0)) or (
            self.recompute_granularity == "selective" and self.attention_dropout > 0
        ):
            raise ValueError(
                f"dropout_rng 'keyed' with recompute_granularity {self.recompute_granularity!r} "
                "and dropout on is not supported: the recomputation runs during backward, "
                "outside the forward that holds the micro-batch's dropout key; use "
                "dropout_rng 'torch' or turn recompute off"
            )
        # keyed attention dropout packs (head, query, key) with 2^20 stream positions each
        if self.attention_dropout > 0 and 2 * self.seq_length > 2**20:
            raise ValueError(
                f"dropout_rng 'keyed' with attention_dropout keys stream positions below 2^20; "
                f"seq_length {self.seq_length} gives {2 * self.seq_length} positions: use "
                "dropout_rng 'torch' or attention_dropout 0"
            )

    def _validate_noise_schedule(self) -> None:
        try:
            get_noise_schedule(self.noise_schedule)
        except ValueError as exc:
            raise ValueError(f"BD3Config.noise_schedule: {exc}") from exc
        try:
            ClipRange(self.clip_min, self.clip_max)
        except ValueError as exc:
            raise ValueError(
                f"BD3Config clip range (clip_min={self.clip_min}, clip_max={self.clip_max}): {exc}"
            ) from exc

    # -- derived quantities -----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """N_b = L / B."""
        return self.seq_length // self.block_size

    @property
    def clip_range(self) -> ClipRange:
        """The sampled-time range [clip_min, clip_max] as megatron_bd3.diffusion.ClipRange."""
        return ClipRange(self.clip_min, self.clip_max)

    @property
    def single_stream(self) -> bool:
        """True when training runs on x_t alone: B = L with single_stream_mdlm (exactly MDLM)."""
        return self.block_size == self.seq_length and self.single_stream_mdlm

    @property
    def stream_length(self) -> int:
        """Tokens the transformer sees per sequence in training: 2L ([x_t ; x_0]), or L for the
        single-stream B = L model.

        Pass this as `seq_length` to megatron's forward_backward_func: pipeline stages exchange
        hidden states of this length.
        """
        return self.seq_length if self.single_stream else 2 * self.seq_length

    @property
    def resolved_attention_kernel(self) -> str:
        """'flex' or 'sdpa' ('auto': flex with CUDA and no attention dropout, else sdpa)."""
        if self.attention_kernel == "auto":
            use_flex = torch.cuda.is_available() and self.attention_dropout == 0.0
            return "flex" if use_flex else "sdpa"
        return self.attention_kernel

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding/output matrices: vocab_size rounded up to a multiple of
        make_vocab_size_divisible_by × tensor_model_parallel_size (megatron's padding rule).
        The padded rows never receive probability: their logits are masked to -1e6 in the loss
        and cut off in forward_logits."""
        multiple = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


# -- presets ----------------------------------------------------------------------------------------


def reference_architecture(dropout: float = 0.1) -> dict[str, Any]:
    """Overrides that make a BD3Config match the reference DiT backbone exactly (docs/method.md §8.1).

    The reference block is pre-LN with adaLN modulation; with time conditioning off the
    modulation is constant, so it folds into LayerNorm weight/bias and the out-projection rows.
    What remains is: LayerNorm (with bias after folding) eps 1e-5, qkv and attention-out without
    bias, MLP 4d with biases and GELU(tanh), RoPE rotate-half base 10000 over the whole head,
    softmax scale 1/sqrt(head_dim), untied embeddings, output layer with bias, dropout after the
    attention-out and MLP (not on attention probabilities, not on the embedding).
    """
    return dict(
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        layernorm_zero_centered_gamma=False,
        activation_func=gelu_tanh,
        gated_linear_unit=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        reference_bias_layout=True,
        output_layer_bias=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        rotary_interleaved=False,
        apply_query_key_layer_scaling=False,
        hidden_dropout=dropout,
        attention_dropout=0.0,
        embedding_dropout=0.0,
    )


def bd3_config(
    *,
    seq_length: int,
    block_size: int,
    vocab_size: int,
    mask_token_id: int,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    **overrides: Any,
) -> BD3Config:
    """A BD3-LM with block size B = block_size. Any BD3Config/TransformerConfig field can be
    overridden, e.g. `**reference_architecture()`, parallel sizes, or the CPU-safe overrides of
    megatron_bd3.parallel."""
    return BD3Config(
        seq_length=seq_length,
        block_size=block_size,
        vocab_size=vocab_size,
        mask_token_id=mask_token_id,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        **overrides,
    )


def ar_config(
    *,
    seq_length: int,
    vocab_size: int,
    mask_token_id: int,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    **overrides: Any,
) -> BD3Config:
    """B = 1 with full masking (fixed_t = 1, so every x_t token is [MASK]).

    Each noisy token then sees only itself (a [MASK]) and the clean tokens before it, and its
    loss weight is 1: the NELBO is exactly the AR next-token NLL (docs/method.md §1.1, §2.4).
    """
    overrides.setdefault("fixed_t", 1.0)
    return bd3_config(
        seq_length=seq_length,
        block_size=1,
        vocab_size=vocab_size,
        mask_token_id=mask_token_id,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        **overrides,
    )


def mdlm_config(
    *,
    seq_length: int,
    vocab_size: int,
    mask_token_id: int,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    **overrides: Any,
) -> BD3Config:
    """B = L: a single block, so the noisy half attends bidirectionally to itself and to no clean
    token — exactly MDLM. The model then trains on x_t alone (L tokens, `single_stream_mdlm`);
    pass single_stream_mdlm=False for the (equal-loss) two-stream input."""
    return bd3_config(
        seq_length=seq_length,
        block_size=seq_length,
        vocab_size=vocab_size,
        mask_token_id=mask_token_id,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        **overrides,
    )


def reference_owt_config(block_size: int, **overrides: Any) -> BD3Config:
    """The released OWT BD3-LM architecture (12 layers, 768 wide, 12 heads, L = 1024, GPT-2
    vocab + [MASK] = 50258, [MASK] = 50257), reference-exact."""
    settings: dict[str, Any] = dict(
        seq_length=1024,
        block_size=block_size,
        vocab_size=50258,
        mask_token_id=50257,
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        ignore_bos=True,
    )
    settings.update(reference_architecture())
    settings.update(overrides)
    return BD3Config(**settings)
