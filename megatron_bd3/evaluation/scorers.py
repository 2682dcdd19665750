"""Generative perplexity and unigram entropy of generated text (docs/method.md §6.2).

A *scorer* is an autoregressive language model that judges samples: each sample's text is
re-tokenised with the scorer's own tokenizer and scored token by token. Two kinds:

* :class:`OurARScorer`: an AR model trained with this framework (``preset: ar``), from its
  standalone directory. With B = 1 and every noisy token masked, the two-stream pass is exactly
  next-token prediction (docs/method.md §1.1, "Limits").
* :class:`HFCausalLMScorer`: any *local* Hugging Face causal-LM directory (e.g. a copy of GPT-2
  Large, the paper's scorer), through ``transformers`` (the optional ``eval`` extra:
  ``pip install -e ".[eval]"``). Never a hub download: the directory must exist and is loaded with
  ``local_files_only=True``.

:func:`generative_perplexity` computes what the reference computes (its
``Metrics.record_generative_perplexity``): per sample, the scorer's token ids (the scorer's BOS
first, as the reference's decoded text starts with GPT-2's ``<|endoftext|>``), optionally cut to
``max_length`` tokens (the reference cuts to the generation length ``model.length``), scored in
windows of the scorer's context C moved by C // 2 (the first window scores all its targets, a
later one only the targets past the previous window's end), targets equal to the scorer's EOS
excluded; per-sample perplexity exp(mean NLL), reported as the mean over samples, next to the
token-weighted perplexity over all scored tokens. (The reference's "per-sample" value is per
scoring batch, per sample at its batch size 1.) A sample with no scored token has no perplexity;
it is counted in ``unscored_samples``, never silently dropped.

Only torch is imported here; ``transformers`` is imported when an HF scorer is built.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = [
    "ScorerError",
    "Scorer",
    "OurARScorer",
    "HFCausalLMScorer",
    "load_scorer",
    "GenerativePerplexity",
    "generative_perplexity",
    "score_token_ids",
    "window_targets",
    "unigram_entropy",
]

EVAL_EXTRA_HINT = 'pip install -e ".[eval]"'


class ScorerError(ValueError):
    """A scorer directory that cannot be used, with one line saying why (the CLI exits 2)."""


@runtime_checkable
class Scorer(Protocol):
    """An autoregressive model that scores text.

    ``token_nlls(ids)`` returns ``[len(ids) - 1]`` float64: entry ``j`` is
    ``-log p(ids[j + 1] | ids[: j + 1])``; ``len(ids) <= context_length``.
    """

    name: str
    context_length: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def token_nlls(self, ids: Sequence[int]) -> torch.Tensor: ...


# --------------------------------------------------------------------------- our AR scorer
class OurARScorer:
    """An AR model of this framework (``preset: ar``: block size 1, trained at t = 1).

    The network's two-stream pass reads ``[x_t ; x_0]`` with x_t all [MASK] and x_0 the window.
    With B = 1 the mask lets noisy row i see itself (a [MASK], no information) and the clean
    tokens 0 … i−1 (M_OBC: blk(k) = k < i = blk(i)), so row i's SUBS distribution is
    p(x_i | x_<i): exactly the next-token prediction the AR loss trains (docs/method.md §1.1).
    Row 0 has no context and is dropped: ``token_nlls`` returns rows 1 … n−1, i.e. target
    ``ids[j + 1]`` at entry j, the same alignment as a causal LM's logits.
    """

    def __init__(self, network, tokenizer, name: str) -> None:
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.context_length = network.config.seq_length
        self.bos_id = tokenizer.bos_id
        self.eos_id = tokenizer.eos_id
        self.mask_token_id = network.config.mask_token_id
        self.device = network.embedding.weight.device

    @classmethod
    def from_directory(cls, directory: str | Path, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> OurARScorer:
        """Load a standalone directory (``config.json`` + ``model.safetensors``) whose network
        has block size 1, with the tokenizer saved in it (``DIR`` or ``DIR/tokenizer``)."""
        from megatron_bd3.data.tokenizer import METADATA_FILE, load_tokenizer
        from megatron_bd3.standalone import BD3Network, NetworkConfig

        directory = Path(directory)
        try:
            config = NetworkConfig.load(directory)
        except (OSError, ValueError) as error:
            raise ScorerError(f"AR scorer {directory}: {error}") from None
        if config.block_size != 1:
            raise ScorerError(
                f"AR scorer {directory} has block_size {config.block_size}; an autoregressive "
                "scorer needs block_size 1 (a model trained with preset: ar)"
            )
        tokenizer_dir = next((d for d in (directory, directory / "tokenizer")
                              if (d / METADATA_FILE).is_file()), None)
        if tokenizer_dir is None:
            raise ScorerError(f"AR scorer {directory} holds no tokenizer ({METADATA_FILE} in "
                              "the directory or its tokenizer/ subdirectory)")
        try:
            network = BD3Network.from_pretrained(directory, device=device, dtype=dtype)
            tokenizer = load_tokenizer(tokenizer_dir)
        except (OSError, ValueError) as error:
            raise ScorerError(f"AR scorer {directory}: {error}") from None
        if tokenizer.vocab_size != config.vocab_size:
            raise ScorerError(f"AR scorer {directory}: its tokenizer has {tokenizer.vocab_size} "
                              f"ids but the network {config.vocab_size}")
        return cls(network, tokenizer, name=f"bd3-ar:{directory}")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    @torch.inference_mode()
    def token_nlls(self, ids: Sequence[int]) -> torch.Tensor:
        from megatron_bd3.diffusion import masked_position_log_probs

        x_0 = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # [1, n]
        x_t = torch.full_like(x_0, self.mask_token_id)
        logits = self.network.forward_train(x_t, x_0)[0]  # [n, V]; row i predicts x_0[i]
        log_probs = masked_position_log_probs(logits[1:], self.mask_token_id)  # [n-1, V]
        return -log_probs.gather(-1, x_0[0, 1:, None])[:, 0].double().cpu()


# --------------------------------------------------------------------------- HF scorer
def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ScorerError(f"the Hugging Face scorer needs transformers, which is not installed "
                          f"({error}); install the eval extra: {EVAL_EXTRA_HINT}") from None
    return transformers


class HFCausalLMScorer:
    """A local Hugging Face causal LM (``AutoModelForCausalLM``) and its tokenizer."""

    def __init__(self, model, tokenizer, name: str, context_length: int) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.context_length = context_length
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.device = next(model.parameters()).device

    @classmethod
    def from_directory(cls, directory: str | Path, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> HFCausalLMScorer:
        """Load ``directory`` (``config.json``, weights, tokenizer files) with
        ``local_files_only=True``; refuse anything that is not a complete causal LM."""
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise ScorerError(f"HF scorer {directory} is not a local model directory (no "
                              "config.json); scorers are never downloaded")
        values = _read_config(directory)
        if "model_type" not in values:
            ours = _is_standalone_config(values)
            raise ScorerError(
                f"HF scorer {directory} is not a causal language model (its config.json has no "
                "model_type" + ("; it is a megatron_bd3 standalone directory, usable as the AR "
                                "scorer if its block_size is 1)" if ours else ")"))
        transformers = _import_transformers()
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        try:
            config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ScorerError(f"HF scorer {directory}: cannot read its config "
                              f"({_first_line(error)})") from None
        causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        architectures = list(getattr(config, "architectures", None) or [])
        if (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                or not architectures or not set(architectures) & causal_classes):
            raise ScorerError(
                f"HF scorer {directory} is not a causal language model (model_type "
                f"{config.model_type!r}, architectures {architectures}); give a directory saved "
                "from an AutoModelForCausalLM class, e.g. GPT2LMHeadModel"
            )
        context = _context_length(config)
        if context is None or context < 2:
            raise ScorerError(f"HF scorer {directory}: its config gives no context length "
                              "(n_positions or max_position_embeddings)")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory,
                                                                   local_files_only=True)
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                directory, local_files_only=True, dtype=dtype, output_loading_info=True)
        except (OSError, ValueError, KeyError) as error:
            raise ScorerError(f"HF scorer {directory}: {_first_line(error)}") from None
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ScorerError(f"HF scorer {directory}: its weights lack {missing[:3]} (a "
                              "model saved without its language-model head is not a scorer)")
        return cls(model.to(device), tokenizer, name=f"hf:{directory}", context_length=context)

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS template (generative_perplexity prepends the BOS itself); special tokens
        # written in the text are still recognised, as in the reference's re-tokenisation.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def token_nlls(self, ids: Sequence[int]) -> torch.Tensor:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # [1, n]
        logits = self.model(input_ids=input_ids).logits[0]  # [n, V]; row j predicts ids[j+1]
        return F.cross_entropy(logits[:-1].float(), input_ids[0, 1:],
                               reduction="none").double().cpu()


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ScorerError(f"scorer {path} is not readable JSON ({_first_line(error)})") from None
    if not isinstance(values, dict):
        raise ScorerError(f"scorer {path} does not hold a JSON object")
    return values


def _is_standalone_config(values: dict) -> bool:
    """A megatron_bd3 standalone ``config.json`` (NetworkConfig) rather than an HF config."""
    return {"block_size", "mask_token_id", "seq_length"} <= set(values)


def _context_length(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_scorer(directory: str | Path, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> OurARScorer | HFCausalLMScorer:
    """The scorer a directory holds: a standalone directory of this framework (its
    ``config.json`` has ``block_size``, ``mask_token_id`` and ``seq_length``) is an :class:`OurARScorer`,
    anything else a Hugging Face causal LM."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ScorerError(f"scorer {directory} is not a local model directory (no config.json); "
                          "scorers are never downloaded")
    if _is_standalone_config(_read_config(directory)):
        return OurARScorer.from_directory(directory, device=device, dtype=dtype)
    return HFCausalLMScorer.from_directory(directory, device=device, dtype=dtype)


# --------------------------------------------------------------------------- the metric
def window_targets(length: int, context: int) -> list[tuple[int, int, int]]:
    """The sliding windows over a sequence of ``length`` tokens: ``(start, end, first_target)``
    per window, the window being ``ids[start:end]`` and its scored targets the positions
    ``first_target … end − 1``. Stride ``context // 2``: the first window scores every target
    (1 … end − 1), each later one only the positions past the previous window's end, so every
    position ≥ 1 is scored exactly once, with at least ``context − stride`` tokens of context
    once past the first window (the reference's windows)."""
    if context < 2:
        raise ValueError(f"scorer context {context} must be >= 2")
    if length < 2:
        return []
    stride = context // 2
    windows = [(0, min(context, length), 1)]
    while windows[-1][1] < length:
        start = len(windows) * stride
        windows.append((start, min(start + context, length), windows[-1][1]))
    return windows


def sequence_nlls(ids: Sequence[int], scorer: Scorer) -> torch.Tensor:
    """NLL of every target ``ids[1:]`` under ``scorer`` with the sliding windows
    (:func:`window_targets`): ``[len(ids) - 1]`` float64."""
    ids = list(ids)
    parts = []
    for start, end, first_target in window_targets(len(ids), scorer.context_length):
        nlls = scorer.token_nlls(ids[start:end])  # targets start+1 … end-1
        parts.append(nlls[first_target - start - 1:])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


@dataclass
class GenerativePerplexity:
    """Generative perplexity of a set of samples under one scorer."""

    scorer: str
    mean_per_sample: float | None  # mean of per-sample exp(mean NLL), the paper's number
    token_weighted: float | None  # exp(total NLL / scored tokens)
    scored_tokens: int
    unscored_samples: int  # samples with no scored token (empty, one token, or only EOS)
    per_sample: list[float | None] = field(default_factory=list)
    per_sample_tokens: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def score_token_ids(id_lists: Sequence[Sequence[int]], scorer: Scorer,
                    progress: bool = False) -> GenerativePerplexity:
    """Generative perplexity of sequences already in the scorer's ids (BOS included if wanted):
    targets equal to the scorer's EOS are not scored."""
    from tqdm import tqdm

    per_sample, per_sample_tokens = [], []
    total_nll, total_tokens = 0.0, 0
    for ids in tqdm(id_lists, desc="gen-PPL", unit="sample", disable=not progress):
        nlls = sequence_nlls(ids, scorer)
        targets = torch.tensor(list(ids)[1:], dtype=torch.long)
        if scorer.eos_id is not None:
            nlls = nlls[targets != scorer.eos_id]
        count = int(nlls.numel())
        per_sample_tokens.append(count)
        per_sample.append(math.exp(float(nlls.mean())) if count else None)
        total_nll += float(nlls.sum())
        total_tokens += count
    scored = [p for p in per_sample if p is not None]
    return GenerativePerplexity(
        scorer=scorer.name,
        mean_per_sample=sum(scored) / len(scored) if scored else None,
        token_weighted=math.exp(total_nll / total_tokens) if total_tokens else None,
        scored_tokens=total_tokens,
        unscored_samples=len(per_sample) - len(scored),
        per_sample=per_sample,
        per_sample_tokens=per_sample_tokens,
    )


def generative_perplexity(texts: Sequence[str], scorer: Scorer, *,
                          max_length: int | None = None, prepend_bos: bool = True,
                          progress: bool = False) -> GenerativePerplexity:
    """The reference's generative perplexity of ``texts`` under ``scorer`` (module docstring):
    re-tokenise, put the scorer's BOS first (``prepend_bos``, when it has one), cut to
    ``max_length`` tokens if given, score with sliding windows, EOS targets excluded."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    id_lists = []
    for text in texts:
        ids = scorer.encode(text)
        if prepend_bos and scorer.bos_id is not None:
            ids = [scorer.bos_id] + ids
        id_lists.append(ids if max_length is None else ids[:max_length])
    return score_token_ids(id_lists, scorer, progress=progress)


def unigram_entropy(ids: Sequence[int]) -> float:
    """Shannon entropy (nats) of the empirical unigram distribution of ``ids`` (0 if empty)."""
    counts = Counter(int(i) for i in ids)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0
