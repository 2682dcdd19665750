"""Layout-invariant initial weights (`init_rng: keyed`, docs/training.md §5).

megatron initialises a rank's weights from torch generators whose state depends on the layout:
each pipeline stage seeds its own (seed + 100 x pp_rank) and builds only its layers, and on GPU
each TP rank draws its own slice from its own stream. The same seed then gives other weights on
another layout. Here every random weight is redrawn after megatron built the model: element
(i, j) of a weight is N(0, std) from a Box-Muller pair of megatron_bd3.diffusion's counter-based
hash, keyed by

    (init_seed, hash of the global parameter name, i, j)   i, j: indices in the full weight

with the global name using global layer numbers (`decoder.layers.<layer_number - 1>...`). A rank
computes only the elements of its own TP slice, so the full tensor is never built, and padded
vocabulary rows (their number depends on TP) do not move the real rows' values.

Which weights and which std are megatron's own rule, read from the config: the word embedding
takes `embedding_init_method`; a column-parallel weight (partition_dim 0: qkv, MLP fc1, output
layer) `init_method`; a row-parallel one (partition_dim 1: attention out, MLP fc2)
`output_layer_init_method`. Each must be megatron's `init_method_normal` (a partial of
torch.nn.init.normal_ with mean 0); anything else is refused. Biases and norms keep megatron's
constant init.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re

import torch
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

from megatron_bd3.diffusion import uniform_noise

STREAM_INIT = 17  # a stream of megatron_bd3.diffusion's hash (>= 16: free for other users)
_ELEMENTS_PER_CHUNK = 1 << 22  # rows are drawn in chunks of about this many elements


def init_std(init_method, what: str) -> float:
    """The std of megatron's init_method_normal partial; ValueError for any other init."""
    if (
        isinstance(init_method, functools.partial)
        and init_method.func is torch.nn.init.normal_
        and float(init_method.keywords.get("mean", 0.0)) == 0.0
        and "std" in init_method.keywords
    ):
        return float(init_method.keywords["std"])
    raise ValueError(
        f"init_rng 'keyed' draws N(0, std) weights, but {what} is {init_method!r}, not megatron's "
        "init_method_normal; use init_rng 'torch'"
    )


def name_key(name: str) -> int:
    """A 64-bit key of a parameter name (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def keyed_normal(seed: int, name: str, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """N(0, 1) float64 [len(rows), len(columns)]: element (i, j) keyed by (seed, name, rows[i],
    columns[j]) (Box-Muller over two keyed uniforms)."""
    key = name_key(name)
    u1 = uniform_noise(seed, key, rows[:, None], columns[None, :], STREAM_INIT, 0, torch.float64)
    u2 = uniform_noise(seed, key, rows[:, None], columns[None, :], STREAM_INIT, 1, torch.float64)
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)


def global_indices(param: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Indices in the full weight of this rank's slice along `dim` (megatron's TP split:
    `partition_stride` chunks per rank, rank r taking chunks r, r + TP, ...)."""
    local = param.size(dim)
    index = torch.arange(local, dtype=torch.int64)
    if not getattr(param, "tensor_model_parallel", False) or param.partition_dim != dim:
        return index
    stride = getattr(param, "partition_stride", 1)
    chunk = local // stride
    return (tp_rank + (index // chunk) * tp_size) * chunk + index % chunk


def global_parameter_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> global name: `decoder.layers.<i>.` with i the layer's global
    index (its layer_number - 1), so a layer has one name on every pipeline layout."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    offsets = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    pattern = re.compile(r"^decoder\.layers\.(\d+)\.")
    names = {}
    for name, _ in model.named_parameters():
        names[name] = pattern.sub(lambda m: f"decoder.layers.{offsets[m.group(1)]}.", name)
    return names


@torch.no_grad()
def initialize_keyed(model: torch.nn.Module, config, tp_rank: int, tp_size: int) -> None:
    """Redraw every random weight of `model` (one BD3Model chunk) as described above."""
    names = global_parameter_names(model)
    embedding_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, VocabParallelEmbedding)
    }
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue  # biases, norms: megatron's constants
        if param.dim() != 2:
            raise ValueError(f"init_rng 'keyed' cannot initialise {name} {tuple(param.shape)}")
        if id(param) in embedding_weights:
            std = init_std(config.embedding_init_method, "embedding_init_method")
        elif getattr(param, "tensor_model_parallel", False) and param.partition_dim == 0:
            std = init_std(config.init_method, "init_method")
        elif getattr(param, "tensor_model_parallel", False) and param.partition_dim == 1:
            std = init_std(config.output_layer_init_method, "output_layer_init_method")
        else:
            raise ValueError(
                f"init_rng 'keyed' does not know how megatron initialises {name}; use init_rng "
                "'torch'"
            )
        rows = global_indices(param, 0, tp_rank, tp_size).to(param.device)
        columns = global_indices(param, 1, tp_rank, tp_size).to(param.device)
        step = max(1, _ELEMENTS_PER_CHUNK // max(1, columns.numel()))
        for start in range(0, rows.numel(), step):
            values = keyed_normal(
                config.init_seed, names[name], rows[start : start + step], columns
            )
            param[start : start + step].copy_(values * std)
