"""What an exported model directory says about itself: the training record and the model card.

``bd3_training.json`` is written by the checkpoint -> standalone conversion from what the
checkpoint records (step, tokens seen, the data manifest by name and sha256, the learned clip
range and where it came from, EMA or raw weights) and travels with the model through every later
conversion. ``README.md`` (the model card) is generated from it, the network config and, when the
user passes one, a ``bd3-eval`` result JSON. Neither holds a path of the machine that wrote it.
Torch only (no transformers).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from megatron_bd3.standalone.model import NetworkConfig

__all__ = ["HF_LOADING", "MODEL_CARD_FILE", "STANDALONE_LOADING", "TRAINING_RECORD_FILE",
           "copy_training_record", "load_eval_report", "read_training_record", "training_record",
           "write_model_card", "write_training_record"]

TRAINING_RECORD_FILE = "bd3_training.json"
MODEL_CARD_FILE = "README.md"

# How each kind of directory is loaded (shown in its card; docs/convert.md runs the same code)
HF_LOADING = """
from transformers import AutoModelForMaskedLM, AutoTokenizer

model = AutoModelForMaskedLM.from_pretrained(MODEL_DIR, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, trust_remote_code=True)
samples = model.generate_blocks(num_samples=2, top_p=0.9, seeds=[0, 1])
print(tokenizer.batch_decode(samples))
"""
STANDALONE_LOADING = """
from megatron_bd3.standalone import BD3Network, SamplerConfig, generate

network = BD3Network.from_pretrained(MODEL_DIR)
samples = generate(network, network.config.seq_length, num_samples=2,
                   config=SamplerConfig(top_p=0.9))
"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def training_record(marker: dict[str, Any], run_config, *, use_ema: bool,
                    clip_range: tuple[float, float], clip_source: str,
                    consumed_samples: int | None, manifest_path: Path | None) -> dict[str, Any]:
    """The training facts of a checkpoint, without any local path: the data manifest is named
    by its file name and content hash (and its split counts)."""
    step = int(marker.get("step", 0))
    seq_length = int(marker["model"]["seq_length"])
    if consumed_samples is None:
        consumed_samples = step * int(run_config.training.global_batch_size)
    record: dict[str, Any] = {
        "step": step,
        "samples": consumed_samples,
        "tokens": consumed_samples * seq_length,
        "weights": "EMA" if use_ema else "raw",
        "preset": marker["model"].get("preset"),
        "architecture": marker["model"].get("architecture"),
        "trained_layout": marker.get("layout"),
        "clip_range": [float(clip_range[0]), float(clip_range[1])],
        "clip_range_source": clip_source,
        "data_manifest": None,
    }
    if manifest_path is not None and manifest_path.is_file():
        entry: dict[str, Any] = {"file": manifest_path.name, "sha256": _sha256(manifest_path)}
        try:
            manifest = json.loads(manifest_path.read_text())
            entry["splits"] = {name: {key: split.get(key) for key in
                                      ("documents", "sequences", "tokens")}
                               for name, split in manifest.get("splits", {}).items()}
        except (OSError, ValueError, AttributeError):
            pass
        record["data_manifest"] = entry
    return record


def read_training_record(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / TRAINING_RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def write_training_record(directory: Path, record: dict[str, Any] | None) -> None:
    if record is not None:
        (Path(directory) / TRAINING_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def copy_training_record(source: Path, destination: Path) -> dict[str, Any] | None:
    """Carry ``bd3_training.json`` from one model directory to the next; returns it."""
    record = read_training_record(source)
    write_training_record(destination, record)
    return record


def load_eval_report(path: str | Path, config: NetworkConfig) -> dict[str, Any]:
    """A ``bd3-eval`` result JSON, checked to describe this model (sizes, block size, tokenizer)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except OSError as error:
        raise OSError(f"--eval-report {path}: {error.strerror}") from None
    except ValueError as error:
        raise ValueError(f"--eval-report {path} is not valid JSON: {error}") from None
    model = report.get("model") if isinstance(report, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"--eval-report {path} has no \"model\" record; pass the eval.json "
                         "bd3-eval wrote")
    for field, ours in (("seq_length", config.seq_length), ("block_size", config.block_size),
                        ("vocab_size", config.vocab_size),
                        ("tokenizer_fingerprint", config.tokenizer_fingerprint)):
        theirs = model.get(field)
        if ours is not None and theirs is not None and theirs != ours:
            raise ValueError(f"--eval-report {path} evaluated another model: {field} {theirs!r}, "
                             f"this model has {ours!r}")
    return report


def _fmt_count(value) -> str:
    return "unknown" if value is None else f"{int(value):,}"


def model_card(config: NetworkConfig, *, layout: str, num_parameters: int,
               record: dict[str, Any] | None, eval_report: dict[str, Any] | None,
               loading: str) -> str:
    """The README.md text. ``layout``: what the directory holds (e.g. "Hugging Face, reference
    DiT layout"); ``loading``: the code that loads it."""
    c = config
    kind = ("autoregressive (B = 1)" if c.block_size == 1
            else "MDLM (B = L)" if c.block_size == c.seq_length
            else f"BD3-LM, block size {c.block_size}")
    lines = [
        "---",
        "library_name: transformers" if "Hugging Face" in layout else "library_name: torch",
        "tags:", "- block-diffusion", "- bd3-lm", "- megatron_bd3",
        "---", "",
        f"# {kind}",
        "",
        "A block diffusion language model (BD3-LM, Arriola et al., ICLR 2025): autoregressive over "
        f"blocks of {c.block_size} tokens, masked discrete diffusion within each block. Exported "
        f"by megatron_bd3 `bd3-convert` ({layout}).",
        "",
        "## Model",
        "",
        "| | |", "|---|---|",
        f"| parameters | {num_parameters:,} |",
        f"| layers, hidden size, heads (query groups) | {c.num_layers}, {c.hidden_size}, "
        f"{c.num_heads} ({c.num_query_groups}) |",
        f"| MLP hidden size | {c.ffn_hidden_size} |",
        f"| context length L | {c.seq_length} |",
        f"| block size B | {c.block_size} |",
        f"| vocabulary | {c.vocab_size} ([MASK] = {c.mask_token_id}, BOS = {c.bos_token_id}, "
        f"EOS = {c.eos_token_id}, PAD = {c.pad_token_id}) |",
        f"| learned clip range of the masking rate | [{c.sampling_eps_min:g}, "
        f"{c.sampling_eps_max:g}] |",
        f"| tokenizer fingerprint (sha256) | `{c.tokenizer_fingerprint or 'not recorded'}` |",
        "",
        "## Training",
        "",
    ]
    if record is None:
        lines.append("No training record travelled with these weights (they were not exported "
                     "from a megatron_bd3 checkpoint).")
    else:
        manifest = record.get("data_manifest")
        lines += [
            "| | |", "|---|---|",
            f"| optimizer steps | {_fmt_count(record.get('step'))} |",
            f"| sequences seen | {_fmt_count(record.get('samples'))} |",
            f"| tokens seen | {_fmt_count(record.get('tokens'))} |",
            f"| weights | {record.get('weights')} |",
            f"| preset, architecture | {record.get('preset')}, {record.get('architecture')} |",
            f"| clip range from | {record.get('clip_range_source')} |",
        ]
        if manifest is None:
            lines.append("| training data | manifest not found at export time |")
        else:
            lines.append(f"| training data manifest | `{manifest['file']}`, sha256 "
                         f"`{manifest['sha256']}` |")
            for name, split in (manifest.get("splits") or {}).items():
                lines.append(f"| split {name} | {_fmt_count(split.get('documents'))} documents, "
                             f"{_fmt_count(split.get('sequences'))} sequences, "
                             f"{_fmt_count(split.get('tokens'))} tokens |")
    if eval_report is not None:
        from megatron_bd3.evaluation.report import generation_table, likelihood_table

        lines += ["", "## Evaluation (`bd3-eval`)", ""]
        evaluated = eval_report.get("model", {})
        lines.append(f"Evaluated {evaluated.get('weights', '')} weights"
                     + (f" at step {evaluated['step']}" if evaluated.get("step") is not None
                        else "") + ".")
        if eval_report.get("likelihood"):
            lines += ["", "NELBO bound on the perplexity, with the Monte-Carlo standard error and "
                      "95% interval:", "", "```", likelihood_table(eval_report["likelihood"]),
                      "```"]
        if eval_report.get("generation"):
            lines += ["", "```", generation_table(eval_report["generation"]), "```"]
    lines += ["", "## Loading", "", "```python", loading.strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(directory: Path, network, *, hugging_face: bool, layout: str,
                     record: dict[str, Any] | None, eval_report: str | Path | None) -> Path:
    """README.md of an exported directory; ``eval_report`` a bd3-eval JSON (checked to be of
    this model) or None."""
    report = None if eval_report is None else load_eval_report(eval_report, network.config)
    loading = (HF_LOADING if hugging_face else STANDALONE_LOADING).replace("MODEL_DIR", '"."')
    layout = f"Hugging Face, {layout}" if hugging_face else layout
    path = Path(directory) / MODEL_CARD_FILE
    path.write_text(model_card(network.config, layout=layout,
                               num_parameters=network.num_parameters(), record=record,
                               eval_report=report, loading=loading))
    return path
