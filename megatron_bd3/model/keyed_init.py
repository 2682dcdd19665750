"""Layout-invariant initial weights (`init_rng: keyed`, docs/training.md §5).

megatron initialises a rank's weights from torch generators whose state depends on the layout:
each pipeline stage seeds its own (seed + 100 x pp_rank) and builds only its layers, and on GPU
each TP rank draws its own slice from its own stream. The same seed then gives other weights on
another layout. Here every random weight is redrawn after megatron built the model: row i of a
weight (all its columns, in the full tensor) is N(0, std) drawn by torch's CPU generator seeded
with megatron_bd3.diffusion's counter-based hash of

    (init_seed, hash of the global parameter name, i)

with the global name using global layer numbers (`decoder.layers.<layer_number - 1>...`). A rank
draws only the rows of its TP slice (a row-parallel weight: whole rows, then its columns), and
padded vocabulary rows (their number depends on TP) do not move the real rows' values. One
generator per row, not one hash per element: the hash costs about 40 times torch's normal_ per
element on CPU, which for a 124M-parameter model is minutes.

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
import re

import torch
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

from megatron_bd3.diffusion import hash_uint32

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


def keyed_rows(seed: int, name: str, rows: torch.Tensor, width: int) -> torch.Tensor:
    """N(0, 1) float32 [len(rows), width]: row i drawn from a CPU generator seeded with the hash
    of (seed, name, rows[i])."""
    key = name_key(name)
    rows = rows.to(torch.int64).cpu()
    low = hash_uint32(seed, key, rows, torch.zeros((), dtype=torch.int64), STREAM_INIT)
    high = hash_uint32(seed, key, rows, torch.ones((), dtype=torch.int64), STREAM_INIT)
    out = torch.empty(len(rows), width)
    generator = torch.Generator()
    for i, row_seed in enumerate(((high << 32) | low).tolist()):
        generator.manual_seed(row_seed)
        out[i].normal_(generator=generator)
    return out


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
        rows = global_indices(param, 0, tp_rank, tp_size)
        columns = global_indices(param, 1, tp_rank, tp_size)
        width = param.size(1) * (tp_size if param.partition_dim == 1 else 1)  # full row
        step = max(1, _ELEMENTS_PER_CHUNK // width)
        for start in range(0, rows.numel(), step):
            values = keyed_rows(config.init_seed, names[name], rows[start : start + step], width)
            param[start : start + step].copy_(values[:, columns] * std)
