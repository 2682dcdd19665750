"""The exact tensor mapping between a TP=1 megatron BD3Model state dict and the standalone
BD3Network state dict (torch only; both directions).

Both sides are the same pre-LN transformer (docs/method.md §8.1), so the mapping is a renaming plus
two layout changes:

* **Vocabulary padding.** megatron's embedding and output layer have ``padded_vocab_size`` rows
  (vocab_size rounded up for TP, BD3Config.padded_vocab_size); the rows past ``vocab_size`` never
  receive probability. Export keeps rows ``[0, vocab_size)``; import pads with zero rows.
* **qkv rows.** megatron's ``linear_qkv`` is interleaved per query group: for group ``j`` of
  ``g`` (``p = heads / g`` query heads per group) the rows are ``[q_{jp}, ..., q_{jp+p-1}, k_j,
  v_j]``, each ``head_dim`` rows (attention.py ``get_query_key_value_tensors``: ``[sq, b, ng,
  (np/ng + 2) * hn]``). The standalone network (and the reference) orders rows ``(q | k | v,
  head, head_dim)``: all query heads, then all key groups, then all value groups. Query head
  ``i`` belongs to group ``i // p`` on both sides, so the permutation is exact for GQA and MHA.

Key table (``i`` = layer; ``megatron <-> standalone``)::

    embedding.word_embeddings.weight [Vp, d]            embedding.weight [V, d]
    decoder.layers.i.input_layernorm.{weight,bias}       layers.i.attn_norm.{weight,bias}
    decoder.layers.i.self_attention.linear_qkv.weight    layers.i.attn.qkv.weight   (permuted)
    decoder.layers.i.self_attention.linear_qkv.bias      layers.i.attn.qkv.bias     (permuted)
    decoder.layers.i.self_attention.linear_proj.weight   layers.i.attn.out.weight
    decoder.layers.i.self_attention.linear_proj.bias     layers.i.attn.out.bias
    decoder.layers.i.pre_mlp_layernorm.{weight,bias}     layers.i.mlp_norm.{weight,bias}
    decoder.layers.i.mlp.linear_fc1.{weight,bias}        layers.i.mlp.fc1.{weight,bias}
    decoder.layers.i.mlp.linear_fc2.{weight,bias}        layers.i.mlp.fc2.{weight,bias}
    decoder.final_layernorm.{weight,bias}                final_norm.{weight,bias}
    output_layer.weight [Vp, d]                          output.weight [V, d]   (untied only)
    output_layer.bias [Vp]                               output.bias [V]  (untied)
                                                         output_bias [V]  (tied embeddings)

Biases exist only where the config says so (qkv_bias, attn_out_bias, mlp_bias, output_bias).
With Transformer Engine layer specs megatron fuses the two pre-norms into the following linear
(``self_attention.linear_qkv.layer_norm_{weight,bias}``, ``mlp.linear_fc1.layer_norm_*``); those
names are accepted as aliases on export. ``*._extra_state`` entries (megatron/TE module metadata,
no weights) are ignored. Anything else missing, unexpected or mis-shaped is an error that names
every offending tensor.
"""

from __future__ import annotations

import torch

from megatron_bd3.standalone.model import NetworkConfig, tensor_set_problems

__all__ = [
    "MappingError",
    "megatron_shapes",
    "megatron_to_standalone",
    "qkv_megatron_to_standalone",
    "qkv_standalone_to_megatron",
    "standalone_shapes",
    "standalone_to_megatron",
]

EXTRA_STATE_SUFFIX = "._extra_state"
# Transformer Engine fuses each pre-norm into the linear after it; megatron's local spec maps its
# own names to these in dist checkpoints (gpt_layer_specs.py sharded_state_dict_keys_map).
TE_NORM_ALIASES = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class MappingError(ValueError):
    """A state dict does not match the model it is converted for; the message names the tensors."""


# ------------------------------------------------------------------------------------ qkv layout


def _qkv_split(config: NetworkConfig) -> tuple[int, int, int]:
    heads, groups = config.num_heads, config.num_query_groups
    return groups, heads // groups, config.head_dim


def qkv_megatron_to_standalone(tensor: torch.Tensor, config: NetworkConfig) -> torch.Tensor:
    """megatron rows ``(group, [q x p, k, v], head_dim)`` -> standalone ``(q|k|v, head, hd)``.

    Works for the weight ``[(h + 2g) * hd, d]`` and the bias ``[(h + 2g) * hd]``."""
    groups, per_group, head_dim = _qkv_split(config)
    rest = tensor.shape[1:]
    grouped = tensor.reshape(groups, per_group + 2, head_dim, *rest)  # [g, p + 2, hd, ...]
    query = grouped[:, :per_group].reshape(groups * per_group * head_dim, *rest)  # head = j*p + s
    key = grouped[:, per_group].reshape(groups * head_dim, *rest)
    value = grouped[:, per_group + 1].reshape(groups * head_dim, *rest)
    return torch.cat((query, key, value), dim=0).contiguous()


def qkv_standalone_to_megatron(tensor: torch.Tensor, config: NetworkConfig) -> torch.Tensor:
    """Inverse of :func:`qkv_megatron_to_standalone`."""
    groups, per_group, head_dim = _qkv_split(config)
    rest = tensor.shape[1:]
    q_rows, kv_rows = groups * per_group * head_dim, groups * head_dim
    query, key, value = tensor.split((q_rows, kv_rows, kv_rows), dim=0)
    grouped = torch.cat(
        (
            query.reshape(groups, per_group, head_dim, *rest),
            key.reshape(groups, 1, head_dim, *rest),
            value.reshape(groups, 1, head_dim, *rest),
        ),
        dim=1,
    )  # [g, p + 2, hd, ...]
    return grouped.reshape(groups * (per_group + 2) * head_dim, *rest).contiguous()


# ------------------------------------------------------------------------------------ key tables


def _layer_pairs(config: NetworkConfig, i: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(megatron key, standalone key, shape) of layer ``i``; shapes are the same on both sides."""
    d, f = config.hidden_size, config.ffn_hidden_size
    qkv_rows = (config.num_heads + 2 * config.num_query_groups) * config.head_dim
    attn_width = config.num_heads * config.head_dim
    m, s = f"decoder.layers.{i}.", f"layers.{i}."
    pairs = [
        (m + "input_layernorm.weight", s + "attn_norm.weight", (d,)),
        (m + "input_layernorm.bias", s + "attn_norm.bias", (d,)),
        (m + "self_attention.linear_qkv.weight", s + "attn.qkv.weight", (qkv_rows, d)),
        (m + "self_attention.linear_proj.weight", s + "attn.out.weight", (d, attn_width)),
        (m + "pre_mlp_layernorm.weight", s + "mlp_norm.weight", (d,)),
        (m + "pre_mlp_layernorm.bias", s + "mlp_norm.bias", (d,)),
        (m + "mlp.linear_fc1.weight", s + "mlp.fc1.weight", (f, d)),
        (m + "mlp.linear_fc2.weight", s + "mlp.fc2.weight", (d, f)),
    ]
    if config.qkv_bias:
        pairs.append((m + "self_attention.linear_qkv.bias", s + "attn.qkv.bias", (qkv_rows,)))
    if config.attn_out_bias:
        pairs.append((m + "self_attention.linear_proj.bias", s + "attn.out.bias", (d,)))
    if config.mlp_bias:
        pairs.append((m + "mlp.linear_fc1.bias", s + "mlp.fc1.bias", (f,)))
        pairs.append((m + "mlp.linear_fc2.bias", s + "mlp.fc2.bias", (d,)))
    return pairs


def _pairs(config: NetworkConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every (megatron key, standalone key, standalone shape) pair of the model."""
    d, v = config.hidden_size, config.vocab_size
    pairs = [("embedding.word_embeddings.weight", "embedding.weight", (v, d))]
    for i in range(config.num_layers):
        pairs.extend(_layer_pairs(config, i))
    pairs.append(("decoder.final_layernorm.weight", "final_norm.weight", (d,)))
    pairs.append(("decoder.final_layernorm.bias", "final_norm.bias", (d,)))
    if not config.tie_embeddings:
        pairs.append(("output_layer.weight", "output.weight", (v, d)))
    if config.output_bias:
        name = "output_bias" if config.tie_embeddings else "output.bias"
        pairs.append(("output_layer.bias", name, (v,)))
    return pairs


_VOCAB_ROWS = {"embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"}


def _megatron_shape(key: str, shape: tuple[int, ...], padded_vocab_size: int) -> tuple[int, ...]:
    return (padded_vocab_size, *shape[1:]) if key in _VOCAB_ROWS else shape


def standalone_shapes(config: NetworkConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the standalone network for ``config``, with its shape."""
    return {s: shape for _, s, shape in _pairs(config)}


def megatron_shapes(config: NetworkConfig, padded_vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the TP=1 megatron BD3Model for ``config`` (``_extra_state`` excluded)."""
    return {m: _megatron_shape(m, shape, padded_vocab_size) for m, _, shape in _pairs(config)}


# ------------------------------------------------------------------------------------ checking


def _check(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str
) -> None:
    """Raise MappingError naming every missing, unexpected or mis-shaped tensor."""
    problems = tensor_set_problems(tensors, expected)
    if problems:
        raise MappingError(f"{what}: " + "; ".join(problems))


def _canonical_megatron_names(state: dict[str, object]) -> dict[str, torch.Tensor]:
    """Drop ``_extra_state`` entries and rename Transformer Engine fused-norm keys to the local
    spec's names (refusing a state dict that has both spellings of one tensor)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(EXTRA_STATE_SUFFIX):
            continue
        name = key
        for local, fused in TE_NORM_ALIASES.items():
            marker = "." + fused
            if key.startswith("decoder.layers.") and marker in key:
                name = key.replace(marker, "." + local)
        if name in out:
            raise MappingError(f"megatron state dict has both {name} and its alias {key}")
        if not isinstance(value, torch.Tensor):
            raise MappingError(f"megatron state dict entry {key} is a {type(value).__name__}, "
                               "not a tensor")
        out[name] = value
    return out


# ------------------------------------------------------------------------------------ mapping


def megatron_to_standalone(
    state: dict[str, object], config: NetworkConfig, padded_vocab_size: int
) -> dict[str, torch.Tensor]:
    """TP=1 megatron BD3Model ``state_dict()`` -> standalone BD3Network tensors (exact copies,
    original dtype, on CPU). Strict: see :class:`MappingError`."""
    if padded_vocab_size < config.vocab_size:
        raise MappingError(f"padded_vocab_size {padded_vocab_size} is smaller than vocab_size "
                           f"{config.vocab_size}")
    tensors = _canonical_megatron_names(state)
    _check(tensors, megatron_shapes(config, padded_vocab_size), "megatron state dict")
    out: dict[str, torch.Tensor] = {}
    for m, s, _ in _pairs(config):
        tensor = tensors[m].detach().cpu()
        if m in _VOCAB_ROWS:
            tensor = tensor[: config.vocab_size]  # drop the TP padding rows
        elif m.endswith("linear_qkv.weight") or m.endswith("linear_qkv.bias"):
            tensor = qkv_megatron_to_standalone(tensor, config)
        out[s] = tensor.clone().contiguous()
    return out


def standalone_to_megatron(
    state: dict[str, torch.Tensor], config: NetworkConfig, padded_vocab_size: int
) -> dict[str, torch.Tensor]:
    """Standalone BD3Network tensors -> TP=1 megatron BD3Model state dict (no ``_extra_state``;
    load it with ``strict=False`` and check the missing keys are only those). The padding rows
    of the embedding / output layer are zero."""
    if padded_vocab_size < config.vocab_size:
        raise MappingError(f"padded_vocab_size {padded_vocab_size} is smaller than vocab_size "
                           f"{config.vocab_size}")
    _check(dict(state), standalone_shapes(config), "standalone state dict")
    out: dict[str, torch.Tensor] = {}
    for m, s, _ in _pairs(config):
        tensor = state[s].detach().cpu()
        if m in _VOCAB_ROWS:
            padded = tensor.new_zeros((padded_vocab_size, *tensor.shape[1:]))
            padded[: config.vocab_size] = tensor
            tensor = padded
        elif m.endswith("linear_qkv.weight") or m.endswith("linear_qkv.bias"):
            tensor = qkv_standalone_to_megatron(tensor, config)
        out[m] = tensor.clone().contiguous()
    return out
