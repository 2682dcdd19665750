"""Exponential moving average of the weights, sharded exactly like the model.

docs/method.md §4.3 / the reference `ExponentialMovingAverage` (MDLM and BD3-LM repos): after
every optimizer step the update counter n is incremented first, then

    decay_n = min(decay, (1 + n) / (10 + n))            (n = 1 on the first update)
    shadow <- shadow - (1 - decay_n) * (shadow - param)

with decay = 0.9999 and the shadow initialised to a copy of the initial weights. The warm-up rule
makes early averages follow the weights closely (decay_1 = 2/11).

Each rank keeps the shadow of the parameters it holds: its TP shard of its PP stage's layers (and,
under ZeRO-3, only its ZeRO partition, `param.ds_tensor`). Shadows are fp32 whatever the parameter
dtype. `swap_in()` puts the averages into the model for validation/export and restores the
training weights on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def _storage(param: torch.nn.Parameter) -> torch.Tensor:
    """The tensor that holds this rank's values: the ZeRO-3 partition when there is one."""
    ds_tensor = getattr(param, "ds_tensor", None)
    return ds_tensor if ds_tensor is not None else param.data


def _zero3_full(param: torch.nn.Parameter, partition: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ZeRO-3 parameter from this rank's `partition` of it (a tensor laid
    out like `param.ds_tensor`): all-gathered over the parameter's data-parallel group, DeepSpeed's
    layout (equal flat pieces in rank order, the last one padded)."""
    import torch.distributed as dist

    group = getattr(param, "ds_process_group", None)
    parts = [torch.empty_like(partition) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, partition.contiguous(), group=group)
    return torch.cat([t.reshape(-1) for t in parts])[: param.ds_numel].view(param.ds_shape)


def _zero3_partition(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` in `param.ds_tensor`'s layout (the inverse of _zero3_full)."""
    import torch.distributed as dist

    size = param.ds_tensor.numel()
    start = dist.get_rank(getattr(param, "ds_process_group", None)) * size
    flat = full.reshape(-1)[start:start + size]
    return torch.nn.functional.pad(flat, (0, size - flat.numel()))


@torch.no_grad()
def _refresh_gathered_zero3(params) -> None:
    """Re-assemble the full value of ZeRO-3 parameters that are currently gathered.

    ZeRO-3 "persistent" parameters (below stage3_param_persistence_threshold) stay gathered
    between steps and forward reads `param.data` without re-gathering; after their partition
    (`ds_tensor`) changed -- EMA swapped in or out -- the full tensor is rebuilt from the
    partitions of the parameter's data-parallel group.
    """
    for p in params:
        ds_tensor = getattr(p, "ds_tensor", None)
        if ds_tensor is None or p.data.numel() != getattr(p, "ds_numel", -1):
            continue  # not ZeRO-3, or released: the next forward gathers from ds_tensor
        p.data.copy_(_zero3_full(p, ds_tensor).view(p.data.shape).to(p.data.dtype))


_EMA_GROUP = 32  # parameters per multi-tensor EMA update


def warmup_decay(decay: float, num_updates: int) -> float:
    """The reference's decay for update number `num_updates` (1-based)."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class ExponentialMovingAverage:
    """EMA of named parameters. `params` are (name, parameter) pairs, e.g. `named_parameters()`.

    A checkpoint stores each rank's shadows (state_dict); for a resume onto another layout the
    shadows travel whole over data parallel, sharded like the parameters (`full_tensors` /
    `load_full_tensors`, checkpoint.reshard)."""

    layout_rule = "sharded"

    def __init__(self, params: Iterable[tuple[str, torch.nn.Parameter]], decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.params: dict[str, torch.nn.Parameter] = {
            name: p for name, p in params if p.requires_grad
        }
        self.shadow: dict[str, torch.Tensor] = {
            name: _storage(p).detach().to(torch.float32).clone() for name, p in self.params.items()
        }

    @torch.no_grad()
    def update(self) -> float:
        """One EMA step after an optimizer step; returns the decay that was used."""
        self.num_updates += 1
        decay = warmup_decay(self.decay, self.num_updates)
        one_minus = 1.0 - decay
        names = list(self.params)
        # shadow -= (1 - decay) * (shadow - p), as multi-tensor (foreach) kernels over groups of
        # parameters: a few launches instead of four per parameter (on a GPU the per-parameter
        # loop was launch-bound), and a bounded temporary.
        for start in range(0, len(names), _EMA_GROUP):
            group = names[start:start + _EMA_GROUP]
            shadows = [self.shadow[name] for name in group]
            values = [_storage(self.params[name]).to(torch.float32) for name in group]
            diff = torch._foreach_sub(shadows, values)
            torch._foreach_mul_(diff, one_minus)
            torch._foreach_sub_(shadows, diff)
        return decay

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model weights with the averages (for export; not reversible)."""
        for name, p in self.params.items():
            _storage(p).copy_(self.shadow[name].to(_storage(p).dtype))
        _refresh_gathered_zero3(self.params.values())

    @contextlib.contextmanager
    def swap_in(self) -> Iterator[None]:
        """Run the model with EMA weights inside the block; training weights come back after."""
        backup = {name: _storage(p).detach().clone() for name, p in self.params.items()}
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    _storage(p).copy_(backup[name])
                _refresh_gathered_zero3(self.params.values())

    @torch.no_grad()
    def full_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """({name: shadow whole over data parallel, shaped like the parameter}, the replicated
        values). Collective over data parallel under ZeRO-3."""
        full = {
            name: _zero3_full(p, self.shadow[name]) if hasattr(p, "ds_tensor")
            else self.shadow[name].clone()
            for name, p in self.params.items()
        }
        return full, {"decay": self.decay, "num_updates": self.num_updates}

    @torch.no_grad()
    def load_full_tensors(self, full: dict[str, torch.Tensor], meta: dict) -> None:
        """The inverse of full_tensors, into this run's layout."""
        if set(full) != set(self.shadow):
            raise ValueError(f"EMA state does not match the model: missing "
                             f"{sorted(set(self.shadow) - set(full))[:5]}, unexpected "
                             f"{sorted(set(full) - set(self.shadow))[:5]}")
        for name, p in self.params.items():
            value = _zero3_partition(p, full[name]) if hasattr(p, "ds_tensor") else full[name]
            self.shadow[name].copy_(value.view_as(self.shadow[name]))
        self.decay = float(meta["decay"])
        self.num_updates = int(meta["num_updates"])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {name: t.clone() for name, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, tensor in state["shadow"].items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA shadow {name}: shape {tuple(tensor.shape)} in the checkpoint, "
                    f"{tuple(self.shadow[name].shape)} in the model"
                )
            self.shadow[name].copy_(tensor)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
