"""The layout-independent training state: what lets a run resume onto another layout.

A resume onto a different DP size, TP, PP/VPP or ZeRO stage (an *elastic* resume) cannot use the
optimizer's own checkpoint, which is partitioned by the layout that wrote it. So every checkpoint
also holds `reshardable/`, a megatron-core dist_checkpointing save of, per trainable parameter:

    optimizer.<key>.<param key>   the optimizer state (fp32 master weights `fp32_param`, Adam's
                                  `exp_avg`, `exp_avg_sq`) of this rank's TP/PP shard of the
                                  parameter, whole over data parallel (ZeRO partitions joined)
    <component>.value.<param key> a component sharded like the parameters (the EMA shadows)
    common                        the optimizer's replicated values (Adam's step count) and the
                                  sharded components' (EMA decay and update count)

Each tensor is described by the model's own `sharded_state_dict()` entry for its parameter
(`make_sharded_optimizer_tensor`: same global offsets, TP partition dim and replica ids), so
dist_checkpointing reshards it to any TP/PP/VPP layout, like the weights in `model/`. Joining and
splitting the ZeRO partitions of the optimizer state is DeepSpeed's own tensor-fragment API (the
Stepper's `full_optimizer_state` / `load_full_optimizer_state`); the EMA, which keeps its ZeRO-3
shadows in DeepSpeed's partition layout, joins and splits them itself (training.ema).

DeepSpeed's universal checkpoints (ds_to_universal + load_universal_checkpoint) would do the ZeRO
part too, but they do not fit these models: they name a parameter by its module path inside one
rank's engine, which megatron-core's pipeline stages share (every stage has a `decoder.layers.0`,
the global layer number lives only in the sharded_state_dict), they have no ZeRO-0 fp32 path, and
they need an offline conversion pass over the whole checkpoint.

How the other components follow a layout change is declared by each component as
`layout_rule` (see RESHARDING_RULES); the trainer's state, the clip range and the data position
are the same on every rank, the RNG streams are per rank and cannot follow (they are re-derived).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Where the layout-independent training state lives inside a checkpoint directory.
RESHARDABLE_DIR = "reshardable"

# How a component's state follows a layout change, declared as its `layout_rule` attribute:
#   replicated  the same on every rank: rank 0's copy loads into any layout
#   sharded     sharded like the parameters: full_tensors() / load_full_tensors(), carried here
#   per_rank    cannot follow a layout change: rederive(step) re-derives it deterministically
RESHARDING_RULES = ("replicated", "sharded", "per_rank")


def layout_rule(name: str, component: Any) -> str:
    rule = getattr(component, "layout_rule", None)
    if rule not in RESHARDING_RULES:
        raise TypeError(
            f"component {name!r} ({type(component).__name__}) declares no layout_rule (one of "
            f"{RESHARDING_RULES}); it cannot follow a layout change"
        )
    return rule


def describe_layout(layout: dict[str, Any]) -> str:
    vpp = f" VPP {layout['vpp']}" if layout.get("vpp") else ""
    cp = f" CP {layout['cp']}" if layout.get("cp", 1) != 1 else ""
    zero = layout.get("zero_stage")
    optimizer = f"ZeRO-{zero}" if zero is not None else str(layout.get("optimizer_backend"))
    return (f"TP {layout.get('tp')} PP {layout.get('pp')}{vpp}{cp} DP {layout.get('dp')} "
            f"{optimizer}")


def parameter_shards(chunks: list[torch.nn.Module]) -> dict[str, tuple[torch.nn.Parameter, Any]]:
    """name -> (parameter, its ShardedTensor in the chunk's sharded_state_dict) for every
    trainable parameter; names as training.parallelize.iterate_named_parameters gives them
    (`chunk<i>.` prefix with several chunks). Under ZeRO-3 call inside
    `stepper.gathered_parameters()` (the shards take their shapes from the parameters)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    out: dict[str, tuple[torch.nn.Parameter, Any]] = {}
    for index, chunk in enumerate(chunks):
        prefix = f"chunk{index}." if len(chunks) > 1 else ""
        # megatron builds the sharded state with keep_vars=True: each entry holds the Parameter
        by_param = {id(sh.data): sh for sh in nested_values(chunk.sharded_state_dict())
                    if hasattr(sh, "data")}
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) not in by_param:
                raise RuntimeError(f"parameter {prefix}{name} has no entry in the model's "
                                   "sharded_state_dict(); it cannot be resharded")
            out[prefix + name] = (param, by_param[id(param)])
    return out


def _sharded_tensors(shards, tensors: dict[str, dict[str, torch.Tensor]], prefix: str):
    """{f"{prefix}.{key}": {name: ShardedTensor}} for tensors[name][key], described like the
    parameter `name`."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    out: dict[str, dict[str, Any]] = {}
    for name, per_key in tensors.items():
        for key, tensor in per_key.items():
            out.setdefault(f"{prefix}.{key}", {})[name] = make_sharded_optimizer_tensor(
                shards[name][1], tensor, prefix=f"{prefix}.{key}")
    return out


def save_reshardable(directory: Path, *, stepper, sharded_components: dict[str, Any]
                     ) -> dict[str, Any]:
    """Write the layout-independent optimizer and sharded-component state (all ranks call this);
    returns what complete.json records about it (which keys the optimizer state holds)."""
    from megatron_bd3.checkpoint.manager import save_sharded

    with stepper.gathered_parameters():
        shards = parameter_shards(stepper.chunks)
        params = {name: param for name, (param, _) in shards.items()}
        states, optimizer_common = stepper.full_optimizer_state(params)
        sharded: dict[str, Any] = _sharded_tensors(shards, states, "optimizer")
        common: dict[str, Any] = {"optimizer": optimizer_common}
        for cname, component in sharded_components.items():
            tensors, common[cname] = component.full_tensors()
            sharded.update(_sharded_tensors(
                shards, {name: {"value": t} for name, t in tensors.items()}, cname))
        keys = sorted({key for per_key in states.values() for key in per_key})
        save_sharded({"sharded": sharded, "common": common}, directory)
    return {"optimizer_keys": keys, "components": sorted(sharded_components)}


def load_reshardable(directory: Path, *, stepper, sharded_components: dict[str, Any],
                     saved: dict[str, Any]) -> None:
    """Load `reshardable/` into this run's (other) layout: the stepper's optimizer state and the
    sharded components. `saved` is complete.json's record of it (see save_reshardable)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_bd3.checkpoint.atomic import CheckpointError

    if sorted(sharded_components) != saved["components"]:
        raise CheckpointError(
            f"{directory}: the checkpoint's layout-independent state holds {saved['components']}, "
            f"this run has {sorted(sharded_components)} (e.g. training.ema_decay on in one and off "
            "in the other)")
    with stepper.gathered_parameters():
        shards = parameter_shards(stepper.chunks)

        def zeros(name):
            return torch.zeros(shards[name][1].local_shape, dtype=torch.float32,
                               device=shards[name][0].device)

        template = {name: {key: zeros(name) for key in saved["optimizer_keys"]} for name in shards}
        sharded: dict[str, Any] = _sharded_tensors(shards, template, "optimizer")
        for cname in sharded_components:
            sharded.update(_sharded_tensors(shards, {n: {"value": zeros(n)} for n in shards},
                                            cname))
        params = {name: param for name, (param, _) in shards.items()}
    try:
        loaded = dist_checkpointing.load({"sharded": sharded, "common": {}}, str(directory),
                                         strict=StrictHandling.RAISE_ALL)
    except Exception as exc:  # dist_checkpointing raises several types; name the checkpoint
        raise CheckpointError(f"{directory}: cannot load into this layout: {exc}") from exc
    values, common = loaded["sharded"], loaded["common"]
    states = {name: {key: values[f"optimizer.{key}"][name] for key in saved["optimizer_keys"]}
              for name in params}
    stepper.load_full_optimizer_state(params, states, common["optimizer"])
    for cname, component in sharded_components.items():
        component.load_full_tensors(values[f"{cname}.value"], common[cname])
