"""The BD3-LM network as a plain pre-LN transformer, torch only (docs/method.md §1.3, §4.1, §8.1).

The reference backbone is a DiT with adaLN modulation, but with time conditioning off every adaLN
term is a learned constant, so it is exactly this network with the constants folded into the
LayerNorm weight/bias and into the rows of the attention-output and MLP-output projections
(``reference_format.py`` converts both ways). Per layer::

    h   = x + out(Attn(RoPE(qkv(LN1(x)))))
    x'  = h + fc2(GELU_tanh(fc1(LN2(h))))
    logits = output(LN_final(x))

Weights (``model.safetensors``, fp32), shapes with d = hidden, h = heads, g = query groups,
hd = d / h, V = vocab, f = ffn hidden:

    embedding.weight                     [V, d]
    layers.{i}.attn_norm.weight/.bias    [d]        LayerNorm, eps from config, computed in fp32
    layers.{i}.attn.qkv.weight           [(h+2g)*hd, d]  rows ordered q | k | v, then head, hd
    layers.{i}.attn.qkv.bias             [(h+2g)*hd]     only if qkv_bias
    layers.{i}.attn.out.weight           [d, h*hd]       (.bias [d] only if attn_out_bias)
    layers.{i}.mlp_norm.weight/.bias     [d]
    layers.{i}.mlp.fc1.weight/.bias      [f, d] / [f]    (bias only if mlp_bias)
    layers.{i}.mlp.fc2.weight/.bias      [d, f] / [d]
    final_norm.weight/.bias              [d]
    output.weight/.bias                  [V, d] / [V]    (weight absent if tie_embeddings,
                                                          bias only if output_bias)

Three entry points, all sharing one layer implementation:

* ``forward(tokens, positions, attn_mask)``: one pass over a sequence with an explicit mask;
* ``forward_train(x_t, x_0)``: the two-stream training pass over ``[x_t ; x_0]`` with the
  block-diffusion mask, returning the logits of the x_t half;
* ``forward_cached(...)``: the sampler's pass over a few new tokens against a preallocated
  :class:`KVCache` that it writes in place.

CPU fp32 inference (no autograd) runs the linear layers on weight copies packed once for oneDNN
(:class:`Linear`): the weights' memory twice, for up to 2.5x faster few-row matmuls;
``set_packed_inference(False)`` turns it off.

Rotary positions: the cache stores keys already rotated at the position they were written with.
RoPE makes q.k depend only on the position difference, so rotating every key and query at its
absolute position gives the same attention as the reference, which re-indexes positions relative
to the window start and re-rotates its (pre-RoPE) cache on every call. The cos/sin tables are
computed in float64 so that large absolute positions (long generations) lose no precision.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megatron_bd3.diffusion import block_diffusion_mask

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

__all__ = ["NetworkConfig", "BD3Network", "KVCache", "CONFIG_FILE", "WEIGHTS_FILE"]


@dataclass
class NetworkConfig:
    """Everything needed to build the network and to sample from it (``config.json``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    seq_length: int  # training context L: also the sliding window at sampling
    block_size: int
    mask_token_id: int
    rotary_base: float = 10000.0
    layernorm_eps: float = 1e-5
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = True
    output_bias: bool = True
    tie_embeddings: bool = False
    sampling_eps_min: float = 1e-3  # learned clip range of the masking rate (docs/method.md §2.4)
    sampling_eps_max: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # sha256 of the tokenizer the model was trained with (BD3Tokenizer.fingerprint): samplers,
    # evaluation and converters refuse another tokenizer
    tokenizer_fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = _FIELD_TYPES[field.name]
            if value is None and field.default is None:
                continue
            if not _is_instance(value, expected):
                raise ValueError(
                    f"config field {field.name} must be {expected.__name__}, got {value!r}"
                )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_query_groups",
                     "ffn_hidden_size", "seq_length", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.num_heads % self.num_query_groups:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.seq_length % self.block_size:
            raise ValueError(
                f"seq_length {self.seq_length} is not a multiple of block_size {self.block_size}"
            )
        for name in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"config field {name} {value} is outside the vocabulary [0, {self.vocab_size})"
                )
        if not 0.0 <= self.sampling_eps_min <= self.sampling_eps_max <= 1.0:
            raise ValueError(
                f"sampling_eps_min {self.sampling_eps_min} / sampling_eps_max "
                f"{self.sampling_eps_max} must satisfy 0 <= min <= max <= 1"
            )
        if self.rotary_base <= 0 or self.layernorm_eps <= 0:
            raise ValueError("rotary_base and layernorm_eps must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> NetworkConfig:
        """Strict: an unknown or missing required field is an error naming it."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}; known: {sorted(known)}")
        required = [
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        ]
        if required:
            raise ValueError(f"{source}: missing required config field(s) {required}")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> NetworkConfig:
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a standalone model directory needs it)")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(values, source=str(path))


def _is_instance(value, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


_FIELD_TYPES = {
    f.name: {"int": int, "float": float, "bool": bool, "int | None": int, "str | None": str}[f.type]
    for f in dataclasses.fields(NetworkConfig)
}


class KVCache:
    """Preallocated rotated keys and values of every layer, written in place.

    ``keys[i]`` / ``values[i]`` are ``[batch, num_query_groups, capacity, head_dim]``. The owner
    (the sampler) decides which slot each token goes to; the network only writes and reads.
    """

    def __init__(self, config: NetworkConfig, batch_size: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch_size, config.num_query_groups, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device)
                     for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device)
                       for _ in range(config.num_layers)]
        self.capacity = capacity

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (finished samples leave the batch); one copy per call."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class _CacheWrite:
    """Where one call writes its keys/values: ``slots [b, s]`` of ``cache``, then attention reads
    slots ``[0, kv_len)``."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, kv_len: int) -> None:
        self.cache = cache
        self.batch_index = torch.arange(slots.shape[0], device=slots.device)[:, None]  # [b, 1]
        self.slots = slots
        self.kv_len = kv_len
        # The common batched case: every row writes the same run of consecutive slots, so the
        # write is a slice copy instead of a scattered index_put.
        first = slots[0]
        consecutive = bool((first[1:] - first[:-1] == 1).all()) and bool((slots == first).all())
        self.span = (int(first[0]), int(first[-1]) + 1) if consecutive else None

    def write(self, store: torch.Tensor, new: torch.Tensor) -> None:
        """Write ``new [b, s, g, hd]`` into ``store [b, g, capacity, hd]`` at the call's slots."""
        if self.span is not None:
            store[:, :, self.span[0]:self.span[1]] = new.transpose(1, 2)
        else:
            store[self.batch_index, :, self.slots] = new


def _onednn_packing_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


ONEDNN_PACKING = _onednn_packing_available()


PACKED_MAX_ROWS = 128


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose CPU fp32 inference runs oneDNN on a
    copy of the weight packed once into oneDNN's blocked layout.

    torch's CPU ``F.linear`` goes to MKL, which re-packs the weight on every call; with the few
    rows a sampling call feeds (16 per sample and block) that packing dominates: measured on a
    2-core Zen 3, 17 x 512 -> 32768 ran at 42 GFLOP/s against 107 with the weight packed once,
    and a 33M-parameter model sampled 1.4x faster at batch 1. From a few hundred rows on MKL's
    own packing pays for itself and plain ``F.linear`` is 5-20% faster (same machine, weights
    larger than the cache), so inputs of more than ``PACKED_MAX_ROWS`` rows take it. The packed
    copy (as large as the weight) is made on first use without autograd and remade when the
    weight changes (its version counter or storage). ``packed=False`` on the module,
    training/grad mode, non-CPU or non-fp32 tensors, a torch without oneDNN, or a weight created
    under ``torch.inference_mode`` (it has no version counter, so a change to it could not be
    seen) give plain ``F.linear``. Results equal ``F.linear`` up to float summation order.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.packed = True
        self._packs: dict = {}  # row range -> ((weight version, storage), packed weight)

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]``, or only the output features ``rows`` (a slice)."""
        weight, bias = self.weight, self.bias
        if rows is not None:
            weight, bias = weight[rows], None if bias is None else bias[rows]
        if not self._use_packed(x):
            return F.linear(x, weight, bias)
        key = None if rows is None else (rows.start, rows.stop)
        version = (self.weight._version, self.weight.data_ptr())
        entry = self._packs.get(key)
        if entry is None or entry[0] != version:
            # the batch-size hint only picks oneDNN's blocking; 16 suits every case measured
            entry = (version, torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 16))
            self._packs[key] = entry
        return torch.ops.mkldnn._linear_pointwise(x, entry[1], bias, "none", [], "")

    def _use_packed(self, x: torch.Tensor) -> bool:
        return (self.packed and ONEDNN_PACKING and not torch.is_grad_enabled()
                and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]
                and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and self.weight.device.type == "cpu"
                and not self.weight.is_inference())

    def release_packed(self) -> None:
        """Drop the packed copies (they are rebuilt on the next packed call)."""
        self._packs.clear()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the NeoX/rotate-half layout: ``x·cos + rotate_half(x)·sin`` with
    ``rotate_half(x1, x2) = (-x2, x1)``. ``signed_sin`` is ``(-sin, sin)`` over the two halves,
    so rotate_half becomes a swap of the halves (one roll, no negation or concatenation)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, always computed in fp32 (the reference's choice)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention with RoPE on q and k and an explicit mask."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_groups = config.num_query_groups
        self.head_dim = config.head_dim
        qkv_rows = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.qkv = Linear(config.hidden_size, qkv_rows, bias=config.qkv_bias)
        self.out = Linear(self.num_heads * self.head_dim, config.hidden_size,
                          bias=config.attn_out_bias)

    def forward(self, x, cos, sin, attn_mask, cache_write=None, layer=0, query_index=None):
        """``x [b, s, d]``; ``cos``/``sin`` ``[b|1, s, 1, hd]`` (``sin`` signed, see
        :func:`apply_rotary`); ``attn_mask`` bool ``[b|1, 1, s_q, s_kv]`` (True = may attend).
        ``query_index [b, r]``: only these rows are queries (keys/values are still made for all
        ``s`` tokens, and only the queries' rows are projected to q). Returns ``[b, s_q, d]``."""
        b, s, _ = x.shape
        h, g, hd = self.num_heads, self.num_groups, self.head_dim
        if query_index is None:
            qkv = self.qkv(x).view(b, s, h + 2 * g, hd)
            q, k = apply_rotary(qkv[:, :, :h + g], cos, sin).split([h, g], dim=2)
            v = qkv[:, :, h + g:]
        else:
            # Keys and values for every row, a query only for the selected rows.
            # qkv's output rows are ordered q | k | v
            kv = self.qkv(x, rows=slice(h * hd, None)).view(b, s, 2 * g, hd)
            k, v = apply_rotary(kv[:, :, :g], cos, sin), kv[:, :, g:]
            x, cos, sin = (_gather_rows(t, query_index) for t in (x, cos, sin))
            q = apply_rotary(self.qkv(x, rows=slice(0, h * hd)).view(b, -1, h, hd), cos, sin)
        q = q.transpose(1, 2)  # [b, h, s_q, hd]
        if cache_write is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [b, g, s, hd]
        else:
            cache = cache_write.cache
            cache_write.write(cache.keys[layer], k)
            cache_write.write(cache.values[layer], v)
            keys = cache.keys[layer][:, :, : cache_write.kv_len]  # [b, g, kv_len, hd]
            values = cache.values[layer][:, :, : cache_write.kv_len]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=attn_mask, scale=1.0 / math.sqrt(self.head_dim),
            enable_gqa=self.num_groups != self.num_heads,
        )  # [b, h, s_q, hd]
        return self.out(out.transpose(1, 2).reshape(b, q.shape[2], -1))


class MLP(nn.Module):
    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.ffn_hidden_size, bias=config.mlp_bias)
        self.fc2 = Linear(config.ffn_hidden_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


_GELU_SCALE = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as the reference (docs/method.md §4.1).

    0.5·x·(1 + tanh(z)) = x·sigmoid(2z) with z = sqrt(2/π)·(x + 0.044715·x³): the same function,
    written through sigmoid because torch's CPU tanh is slow (fp32: 2x faster than
    ``F.gelu(approximate="tanh")`` at the same rounding error, ~5e-7). Reduced-precision inputs
    keep torch's kernel, which computes in fp32 internally.
    """
    if x.dtype not in (torch.float32, torch.float64):
        return F.gelu(x, approximate="tanh")
    # 2z = x·(S + 0.044715·S·x²), S = 2·sqrt(2/π): one temporary, updated in place
    two_z = (x * x).mul_(0.044715 * _GELU_SCALE).add_(_GELU_SCALE).mul_(x)
    return x * two_z.sigmoid_()


class TransformerLayer(nn.Module):
    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.attn_norm = LayerNorm(config.hidden_size, config.layernorm_eps)
        self.attn = Attention(config)
        self.mlp_norm = LayerNorm(config.hidden_size, config.layernorm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, cache_write=None, layer=0, query_index=None):
        residual = x if query_index is None else _gather_rows(x, query_index)
        h = residual + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache_write, layer,
                                 query_index)
        return h + self.mlp(self.mlp_norm(h))


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index [b, r]`` of ``t [b|1, s, ...]`` along dim 1 -> ``[b, r, ...]``."""
    if t.shape[0] == 1 and index.shape[0] > 1:
        t = t.expand(index.shape[0], *t.shape[1:])
    expanded = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, expanded)


def tensor_set_problems(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                        optional: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """What is wrong with a set of named tensors against the expected names and shapes: every
    missing, unexpected (unless in ``optional``) or mis-shaped tensor, by name. Empty if fine."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - set(optional))
    problems = []
    if missing:
        problems.append("missing tensor(s) " + ", ".join(
            f"{name} (expected shape {list(expected[name])})" for name in missing))
    if extra:
        problems.append("unexpected tensor(s) " + ", ".join(
            f"{name} (shape {list(tensors[name].shape)})" for name in extra))
    for name in sorted(set(expected) & set(tensors)):
        if tuple(tensors[name].shape) != tuple(expected[name]):
            problems.append(f"tensor {name} has shape {list(tensors[name].shape)}, "
                            f"expected {list(expected[name])}")
    return problems


class BD3Network(nn.Module):
    """The standalone BD3-LM denoiser (see the module docstring for layout and semantics)."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.final_norm = LayerNorm(config.hidden_size, config.layernorm_eps)
        if config.tie_embeddings:
            self.output = None
            self.output_bias = (nn.Parameter(torch.zeros(config.vocab_size))
                                if config.output_bias else None)
        else:
            self.output = Linear(config.hidden_size, config.vocab_size, bias=config.output_bias)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ rotary tables
    def rotary_tables(self, num_positions: int, dtype: torch.dtype, device) -> tuple:
        """cos and signed sin (see :func:`apply_rotary`) ``[P, hd]`` for positions ``0..P-1``
        (grown by doubling, computed in fp64)."""
        cached = self._rope_cache
        if (cached is None or cached[0].shape[0] < num_positions or cached[0].dtype != dtype
                or cached[0].device != torch.device(device)):
            size = max(num_positions, 2 * cached[0].shape[0] if cached is not None else 0, 64)
            hd = self.config.head_dim
            inv_freq = 1.0 / (self.config.rotary_base
                              ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            angles = torch.arange(size, dtype=torch.float64)[:, None] * inv_freq[None, :]
            cos, sin = angles.cos(), angles.sin()  # [P, hd / 2]
            self._rope_cache = (torch.cat((cos, cos), -1).to(device=device, dtype=dtype),
                                torch.cat((-sin, sin), -1).to(device=device, dtype=dtype))
        cos, sin = self._rope_cache
        return cos[:num_positions], sin[:num_positions]

    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [s]`` or ``[b, s]`` -> cos/signed sin ``[b|1, s, 1, hd]``."""
        if positions.dim() == 1:
            positions = positions[None]
        cos, sin = self.rotary_tables(int(positions.max()) + 1, dtype, positions.device)
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)

    # ------------------------------------------------------------------ core pass
    def _run(self, tokens, positions, attn_mask, cache_write=None, query_index=None):
        """Shared body. Returns logits ``[b, r, V]`` for rows ``query_index`` (all if None)."""
        x = self.embedding(tokens)  # [b, s, d]
        cos, sin = self._rope(positions, x.dtype)
        if attn_mask is not None:
            attn_mask = attn_mask if attn_mask.dim() == 3 else attn_mask[None]  # [b|1, s, kv]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            # The last layer computes queries, attention output and MLP only for the rows whose
            # logits are wanted; keys/values are still written for every token.
            rows = query_index if i == last else None
            mask = attn_mask
            if rows is not None and mask is not None:
                mask = _gather_rows(mask, rows)
            x = layer(x, cos, sin, None if mask is None else mask[:, None], cache_write, i, rows)
        return self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and output projection: ``[..., d] -> [..., V]``."""
        hidden = self.final_norm(hidden)
        if self.output is not None:
            return self.output(hidden)
        return F.linear(hidden, self.embedding.weight, self.output_bias)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None,
                query_index: torch.Tensor | None = None) -> torch.Tensor:
        """Plain pass, no cache. ``tokens [b, s]``; ``positions [s]`` or ``[b, s]`` (default
        ``0..s-1``); ``attn_mask`` bool ``[s, s]`` or ``[b, s, s]``, True = may attend (None =
        full bidirectional); ``query_index [r]`` or ``[b, r]`` selects output rows.
        Returns logits ``[b, s|r, V]``."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        if query_index is not None and query_index.dim() == 1:
            query_index = query_index[None].expand(tokens.shape[0], -1)
        return self._run(tokens, positions, attn_mask, None, query_index)

    def forward_train(self, x_t: torch.Tensor, x_0: torch.Tensor) -> torch.Tensor:
        """Two-stream training pass (docs/method.md §1): one pass over ``[x_t ; x_0]`` (``[b, 2L]``)
        with positions ``[0..L-1, 0..L-1]`` and the block-diffusion mask. Returns the x_t half's
        raw logits ``[b, L, V]`` (SUBS is applied by the loss, not here)."""
        if x_t.shape != x_0.shape or x_t.dim() != 2:
            raise ValueError(f"x_t {tuple(x_t.shape)} and x_0 {tuple(x_0.shape)} must both be "
                             "[batch, L]")
        length = x_t.shape[1]
        mask = block_diffusion_mask(length, self.config.block_size, device=x_t.device)
        positions = torch.arange(length, device=x_t.device).repeat(2)
        noisy_rows = torch.arange(length, device=x_t.device)
        return self.forward(torch.cat((x_t, x_0), dim=1), positions, mask, noisy_rows)

    def forward_cached(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       slots: torch.Tensor, attn_mask: torch.Tensor,
                       query_index: torch.Tensor | None = None) -> torch.Tensor:
        """Sampling pass over new tokens against a KV cache written in place.

        ``tokens [b, s]`` are processed with rotary ``positions [b, s]``; their keys/values are
        written to cache slots ``slots [b, s]``; attention then reads cache slots
        ``[0, kv_len)`` under ``attn_mask`` bool ``[b, s, kv_len]`` (True = may attend), so a
        token may see cached tokens and the other new tokens. Only the rows ``query_index
        [b, r]`` are projected to the vocabulary (all ``s`` if None). Returns ``[b, r, V]``.
        """
        if attn_mask.shape[-1] > cache.capacity:
            raise ValueError(f"attn_mask covers {attn_mask.shape[-1]} slots but the cache holds "
                             f"{cache.capacity}")
        write = _CacheWrite(cache, slots, attn_mask.shape[-1])
        # Most sampling calls see every cached slot; SDPA is ~20% faster without a mask.
        mask = None if bool(attn_mask.all()) else attn_mask
        return self._run(tokens, positions, mask, write, query_index)

    def set_packed_inference(self, enabled: bool) -> None:
        """Run CPU fp32 inference on oneDNN-packed weight copies (default) or on plain
        ``F.linear``; disabling frees the copies. See :class:`Linear`."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = enabled
                if not enabled:
                    module.release_packed()

    # ------------------------------------------------------------------ persistence
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (fp32) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        tensors = {name: t.detach().to(torch.float32).contiguous().cpu()
                   for name, t in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only (0600)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> BD3Network:
        """Build from ``config.json`` and load ``model.safetensors`` strictly: a missing, extra
        or mis-shaped tensor is an error naming it."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = NetworkConfig.load(directory)
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a standalone model directory needs it)")
        network = cls(config)
        network.load_state_dict_strict(load_file(str(path)), source=str(path))
        return network.to(device=device, dtype=dtype).eval()

    def load_state_dict_strict(self, tensors: dict[str, torch.Tensor], source: str = "") -> None:
        """Copy ``tensors`` in, refusing missing, unexpected or mis-shaped entries by name."""
        where = f" in {source}" if source else ""
        expected = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        problems = tensor_set_problems(tensors, expected)
        if problems:
            raise ValueError(f"cannot load weights{where}: " + "; ".join(problems))
        with torch.no_grad():
            for name, param in self.state_dict().items():
                param.copy_(tensors[name])
