"""Convert between the standalone network and the reference BD3LM Hugging Face layout (torch only).

The reference (kuleshov-group/bd3lms, ``models/hf``; docs/method.md §8.1) stores a DiT backbone with
adaLN modulation under keys ``backbone.*`` plus ``config.json`` with ``model_type: "bd3lm"``.
With time conditioning off, the conditioning vector is a constant,
``c = SiLU(sigma_map(0))`` (sigma_map = Linear(256, cond) -> SiLU -> Linear(cond, cond) on the
sinusoidal features of sigma = 0: cos half then sin half, max_period 10000, i.e. 128 ones then
128 zeros), so every modulation ``adaLN_modulation(c)`` is a constant vector per layer:

* ``mod(LN_ref(x), shift, scale) = norm(x) * w_ref * (1 + scale) + shift`` is our LayerNorm with
  weight ``w_ref * (1 + scale)`` and bias ``shift`` (the reference LayerNorm has no bias);
* ``gate * attn_out(a)`` and ``gate * mlp.2(m)`` fold the gate into the output rows (and bias).

Import folds the constants (in float64, then fp32). Export writes ``adaLN_modulation.weight = 0``
and puts the constants in its bias: ``shift = our LayerNorm bias``, ``gate = 1``. Our LayerNorm
weight goes into the reference norm weight with ``scale = 0`` (not ``norm weight = 1, scale =
w - 1``: ``1 + (w - 1)`` is not ``w`` in floating point unless ``0.5 <= w <= 2``), so export then
import gives back the identical tensors, bit for bit. ``sigma_map`` is exported as zeros (its
output is multiplied by the zero adaLN weights). The reference's persistent buffers
``backbone.rotary_emb.inv_freq`` and ``sampling_eps_min/max`` are written too and accepted (and
checked) on import; the learned clip range is taken from them (docs/method.md §7, pitfall 7).

Only the reference architecture converts: multi-head attention (no GQA), no qkv/attn_out bias,
MLP biases, output bias, ffn = 4 * hidden, untied embeddings, rotary base 10000, eps 1e-5.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megatron_bd3.standalone.model import BD3Network, NetworkConfig, tensor_set_problems

__all__ = [
    "FREQUENCY_EMBEDDING_SIZE",
    "export_reference",
    "import_reference",
    "load_reference",
    "reference_conditioning",
    "save_reference",
    "timestep_features",
]

FREQUENCY_EMBEDDING_SIZE = 256
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_REQUIRED_CONFIG = ("block_size", "vocab_size", "model_length", "hidden_dim", "cond_dim",
                    "n_blocks", "n_heads")


def timestep_features(sigma: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE,
                      max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``sigma [n]`` -> ``[n, dim]``: cos half, then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = sigma.to(torch.float64)[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


def reference_conditioning(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The constant ``c = SiLU(sigma_map(0))`` ``[cond]`` (float64) of a reference checkpoint."""
    silu = torch.nn.functional.silu
    features = timestep_features(torch.zeros(1))[0]
    hidden = silu(_f64(tensors["backbone.sigma_map.mlp.0.weight"]) @ features
                  + _f64(tensors["backbone.sigma_map.mlp.0.bias"]))
    return silu(_f64(tensors["backbone.sigma_map.mlp.2.weight"]) @ hidden
                + _f64(tensors["backbone.sigma_map.mlp.2.bias"]))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _reference_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    # Computed as the reference's Rotary buffer is (float32).
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def _check_exportable(config: NetworkConfig) -> None:
    problems = []
    if config.num_query_groups != config.num_heads:
        problems.append(f"num_query_groups {config.num_query_groups} != num_heads "
                        f"{config.num_heads} (the reference has no GQA)")
    if config.ffn_hidden_size != 4 * config.hidden_size:
        problems.append(f"ffn_hidden_size {config.ffn_hidden_size} != 4 * hidden_size")
    for name, wanted in (("qkv_bias", False), ("attn_out_bias", False), ("mlp_bias", True),
                         ("output_bias", True), ("tie_embeddings", False)):
        if getattr(config, name) != wanted:
            problems.append(f"{name} must be {wanted}")
    if config.rotary_base != 10000.0:
        problems.append(f"rotary_base {config.rotary_base} != 10000")
    if config.layernorm_eps != 1e-5:
        problems.append(f"layernorm_eps {config.layernorm_eps} != 1e-5")
    if problems:
        raise ValueError("model is not exportable to the reference layout: " + "; ".join(problems))


def export_reference(network: BD3Network, cond_dim: int = 128,
                     dropout: float = 0.1) -> tuple[dict[str, torch.Tensor], dict]:
    """Our network -> (reference state dict, reference config.json dict), fp32."""
    config = network.config
    _check_exportable(config)
    d = config.hidden_size
    ours = {name: t.detach().to(torch.float32).cpu() for name, t in network.state_dict().items()}
    ones = torch.ones(d)
    out = {
        "backbone.vocab_embed.embedding": ours["embedding.weight"],
        "backbone.sigma_map.mlp.0.weight": torch.zeros(cond_dim, FREQUENCY_EMBEDDING_SIZE),
        "backbone.sigma_map.mlp.0.bias": torch.zeros(cond_dim),
        "backbone.sigma_map.mlp.2.weight": torch.zeros(cond_dim, cond_dim),
        "backbone.sigma_map.mlp.2.bias": torch.zeros(cond_dim),
        "backbone.rotary_emb.inv_freq": _reference_inv_freq(config.head_dim),
    }
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"backbone.blocks.{i}."
        out[dst + "norm1.weight"] = ours[src + "attn_norm.weight"]
        out[dst + "attn_qkv.weight"] = ours[src + "attn.qkv.weight"]
        out[dst + "attn_out.weight"] = ours[src + "attn.out.weight"]
        out[dst + "norm2.weight"] = ours[src + "mlp_norm.weight"]
        out[dst + "mlp.0.weight"] = ours[src + "mlp.fc1.weight"]
        out[dst + "mlp.0.bias"] = ours[src + "mlp.fc1.bias"]
        out[dst + "mlp.2.weight"] = ours[src + "mlp.fc2.weight"]
        out[dst + "mlp.2.bias"] = ours[src + "mlp.fc2.bias"]
        # chunks: shift_a, scale_a, gate_a, shift_m, scale_m, gate_m
        out[dst + "adaLN_modulation.weight"] = torch.zeros(6 * d, cond_dim)
        out[dst + "adaLN_modulation.bias"] = torch.cat((
            ours[src + "attn_norm.bias"], torch.zeros(d), ones,
            ours[src + "mlp_norm.bias"], torch.zeros(d), ones))
    out["backbone.output_layer.norm_final.weight"] = ours["final_norm.weight"]
    out["backbone.output_layer.adaLN_modulation.weight"] = torch.zeros(2 * d, cond_dim)
    out["backbone.output_layer.adaLN_modulation.bias"] = torch.cat(
        (ours["final_norm.bias"], torch.zeros(d)))  # shift, scale
    out["backbone.output_layer.linear.weight"] = ours["output.weight"]
    out["backbone.output_layer.linear.bias"] = ours["output.bias"]
    out["sampling_eps_min"] = torch.tensor(float(config.sampling_eps_min))
    out["sampling_eps_max"] = torch.tensor(float(config.sampling_eps_max))
    reference_config = {
        "model_type": "bd3lm",
        "architectures": ["BD3LM"],
        "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig",
                     "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
        "block_size": config.block_size,
        "vocab_size": config.vocab_size,
        "model_length": config.seq_length,
        "cross_attn": True,
        "adaln": True,
        "attn_backend": "sdpa",
        "causal": False,
        "hidden_dim": d,
        "cond_dim": cond_dim,
        "n_blocks": config.num_layers,
        "n_heads": config.num_heads,
        "dropout": dropout,
        "time_conditioning": False,
        "var_min": True,
        "sampling_eps_min": config.sampling_eps_min,
        "sampling_eps_max": config.sampling_eps_max,
        "mask_token_id": config.mask_token_id,
        "torch_dtype": "float32",
        # the reference's release sets it: its training/eval code indexes the logits tensor
        "return_dict": False,
        "tokenizer_fingerprint": config.tokenizer_fingerprint,
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name) is not None:
            reference_config[name] = getattr(config, name)
    return {k: v.contiguous() for k, v in out.items()}, reference_config


def _expected_reference_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, v, cond = cfg["hidden_dim"], cfg["vocab_size"], cfg["cond_dim"]
    adaln = cfg.get("adaln", True)
    shapes: dict[str, tuple[int, ...]] = {"backbone.vocab_embed.embedding": (v, d)}
    if adaln:
        shapes.update({
            "backbone.sigma_map.mlp.0.weight": (cond, FREQUENCY_EMBEDDING_SIZE),
            "backbone.sigma_map.mlp.0.bias": (cond,),
            "backbone.sigma_map.mlp.2.weight": (cond, cond),
            "backbone.sigma_map.mlp.2.bias": (cond,),
        })
    for i in range(cfg["n_blocks"]):
        p = f"backbone.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (d,), p + "attn_qkv.weight": (3 * d, d),
            p + "attn_out.weight": (d, d), p + "norm2.weight": (d,),
            p + "mlp.0.weight": (4 * d, d), p + "mlp.0.bias": (4 * d,),
            p + "mlp.2.weight": (d, 4 * d), p + "mlp.2.bias": (d,),
        })
        if adaln:
            shapes[p + "adaLN_modulation.weight"] = (6 * d, cond)
            shapes[p + "adaLN_modulation.bias"] = (6 * d,)
    shapes["backbone.output_layer.norm_final.weight"] = (d,)
    if adaln:
        shapes["backbone.output_layer.adaLN_modulation.weight"] = (2 * d, cond)
        shapes["backbone.output_layer.adaLN_modulation.bias"] = (2 * d,)
    shapes["backbone.output_layer.linear.weight"] = (v, d)
    shapes["backbone.output_layer.linear.bias"] = (v,)
    return shapes


def _clip_value(tensors: dict, cfg: dict, name: str, default: float) -> float:
    """The learned clip bound: the checkpoint buffer wins over config.json (which may hold a
    stale default); the config's float64 value is kept when the fp32 buffer is that value."""
    configured = float(cfg.get(name, default))
    if name not in tensors:
        return configured
    buffered = tensors[name].to(torch.float32)
    if torch.equal(buffered, torch.tensor(configured, dtype=torch.float32)):
        return configured
    return float(buffered)


_OPTIONAL_KEYS = {"backbone.rotary_emb.inv_freq", "sampling_eps_min", "sampling_eps_max"}


def import_reference(tensors: dict[str, torch.Tensor], reference_config: dict,
                     mask_token_id: int | None = None, bos_token_id: int | None = None,
                     eos_token_id: int | None = None, pad_token_id: int | None = None,
                     source: str = "reference checkpoint") -> BD3Network:
    """Reference (state dict, config dict) -> our network, folding the adaLN constants.

    ``mask_token_id`` defaults to the config's ``mask_token_id`` if present, else the last id
    (GPT-2 + appended [MASK], the released OWT checkpoints). Special ids default to the config's.
    """
    cfg = dict(reference_config)
    if cfg.get("model_type") != "bd3lm":
        raise ValueError(f"{source}: model_type is {cfg.get('model_type')!r}, expected 'bd3lm'")
    missing_fields = [name for name in _REQUIRED_CONFIG if name not in cfg]
    if missing_fields:
        raise ValueError(f"{source}: config lacks field(s) {missing_fields}")
    if cfg.get("time_conditioning", False):
        raise ValueError(f"{source}: time_conditioning=True cannot be folded into constants")
    if cfg.get("causal", False):
        raise ValueError(f"{source}: causal=True (the AR baseline) is not a block diffusion model")
    if not cfg.get("cross_attn", True):
        raise ValueError(f"{source}: cross_attn=False checkpoints are not BD3-LMs")
    d, heads = cfg["hidden_dim"], cfg["n_heads"]
    adaln = cfg.get("adaln", True)

    expected = _expected_reference_shapes(cfg)
    problems = tensor_set_problems(tensors, expected, optional=_OPTIONAL_KEYS)
    if problems:
        raise ValueError(f"cannot import {source}: " + "; ".join(problems))
    if "backbone.rotary_emb.inv_freq" in tensors:
        wanted = _reference_inv_freq(d // heads)
        found = tensors["backbone.rotary_emb.inv_freq"].float()
        if found.shape != wanted.shape or not torch.allclose(found, wanted, rtol=1e-6):
            raise ValueError(f"{source}: backbone.rotary_emb.inv_freq is not the base-10000 "
                             f"table for head_dim {d // heads}")

    eps_min = _clip_value(tensors, cfg, "sampling_eps_min", 1e-3)
    eps_max = _clip_value(tensors, cfg, "sampling_eps_max", 1.0)
    vocab = cfg["vocab_size"]
    if mask_token_id is None:
        mask_token_id = cfg.get("mask_token_id", vocab - 1)
    config = NetworkConfig(
        vocab_size=vocab, hidden_size=d, num_layers=cfg["n_blocks"], num_heads=heads,
        num_query_groups=heads, ffn_hidden_size=4 * d, seq_length=cfg["model_length"],
        block_size=cfg["block_size"], mask_token_id=mask_token_id,
        sampling_eps_min=eps_min, sampling_eps_max=eps_max,
        bos_token_id=bos_token_id if bos_token_id is not None else cfg.get("bos_token_id"),
        eos_token_id=eos_token_id if eos_token_id is not None else cfg.get("eos_token_id"),
        pad_token_id=pad_token_id if pad_token_id is not None else cfg.get("pad_token_id"),
        tokenizer_fingerprint=cfg.get("tokenizer_fingerprint"),
    )

    t = {k: _f64(v) for k, v in tensors.items()}
    if adaln:
        c = reference_conditioning(tensors)
    ours: dict[str, torch.Tensor] = {"embedding.weight": t["backbone.vocab_embed.embedding"]}
    for i in range(config.num_layers):
        src, dst = f"backbone.blocks.{i}.", f"layers.{i}."
        if adaln:
            modulation = t[src + "adaLN_modulation.weight"] @ c + t[src + "adaLN_modulation.bias"]
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6)
        else:
            shift_a = shift_m = scale_a = scale_m = torch.zeros(d, dtype=torch.float64)
            gate_a = gate_m = torch.ones(d, dtype=torch.float64)
        ours[dst + "attn_norm.weight"] = t[src + "norm1.weight"] * (1 + scale_a)
        ours[dst + "attn_norm.bias"] = shift_a
        ours[dst + "attn.qkv.weight"] = t[src + "attn_qkv.weight"]
        ours[dst + "attn.out.weight"] = gate_a[:, None] * t[src + "attn_out.weight"]
        ours[dst + "mlp_norm.weight"] = t[src + "norm2.weight"] * (1 + scale_m)
        ours[dst + "mlp_norm.bias"] = shift_m
        ours[dst + "mlp.fc1.weight"] = t[src + "mlp.0.weight"]
        ours[dst + "mlp.fc1.bias"] = t[src + "mlp.0.bias"]
        ours[dst + "mlp.fc2.weight"] = gate_m[:, None] * t[src + "mlp.2.weight"]
        ours[dst + "mlp.fc2.bias"] = gate_m * t[src + "mlp.2.bias"]
    if adaln:
        modulation = (t["backbone.output_layer.adaLN_modulation.weight"] @ c
                      + t["backbone.output_layer.adaLN_modulation.bias"])
        shift, scale = modulation.chunk(2)
    else:
        shift, scale = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    ours["final_norm.weight"] = t["backbone.output_layer.norm_final.weight"] * (1 + scale)
    ours["final_norm.bias"] = shift
    ours["output.weight"] = t["backbone.output_layer.linear.weight"]
    ours["output.bias"] = t["backbone.output_layer.linear.bias"]

    network = BD3Network(config)
    network.load_state_dict_strict({k: v.to(torch.float32) for k, v in ours.items()},
                                   source=source)
    return network.eval()


def save_reference(network: BD3Network, directory: str | Path, cond_dim: int = 128,
                   dropout: float = 0.1) -> Path:
    """Write the reference ``config.json`` and ``model.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    tensors, reference_config = export_reference(network, cond_dim, dropout)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(reference_config, indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only (0600)
    return directory


def load_reference(directory: str | Path, **special_ids) -> BD3Network:
    """Read a reference checkpoint directory (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a reference checkpoint directory needs it)")
    reference_config = json.loads(config_path.read_text())
    return import_reference(load_file(str(weights_path)), reference_config,
                            source=str(directory), **special_ids)
