"""Training a sentencepiece tokenizer for BD3-LM (the library side of `bd3-train-tokenizer`).

Ids are fixed: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), <pad>=3, [MASK]=4. [MASK] is a control symbol,
so no text can ever encode to it. Normalisation is the identity and whitespace is kept as is, so
with byte fallback `decode(encode(text)) == text` for any text. Byte fallback needs the vocabulary
to hold all 256 byte pieces plus the required characters plus the specials; with
`byte_fallback="auto"` it is used when the vocabulary is large enough and dropped (with a warning;
rare characters then become <unk>, which bd3-prepare-data counts) otherwise.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from megatron_bd3.data.tokenizer import MASK_TOKEN, SentencePieceTokenizer, TokenizerError

logger = logging.getLogger(__name__)

MODEL_TYPES = ("bpe", "unigram")
MAX_SENTENCE_CHARS = 4096


@dataclass(frozen=True)
class SentencePieceOptions:
    vocab_size: int = 8000
    model_type: str = "bpe"
    byte_fallback: str = "auto"  # "auto" | "on" | "off"
    character_coverage: float = 0.9995
    user_symbols: tuple[str, ...] = field(default=("\n",))
    max_sentences: int = 2_000_000
    seed: int = 0
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
            )
        if self.byte_fallback not in ("auto", "on", "off"):
            raise ValueError(f"byte_fallback {self.byte_fallback!r} is not one of auto, on, off")
        if self.vocab_size < 8:
            raise ValueError(f"vocab_size {self.vocab_size} is too small (at least 8)")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage {self.character_coverage} must be in (0, 1]")


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Lines of the documents, long lines cut at spaces into pieces of <= MAX_SENTENCE_CHARS.

    sentencepiece trains on "sentences" and silently ignores those longer than its
    max_sentence_length; cutting them keeps every character in the statistics.
    """
    for document in documents:
        for line in document.split("\n"):
            while len(line) > MAX_SENTENCE_CHARS:
                cut = line.rfind(" ", 0, MAX_SENTENCE_CHARS)
                cut = cut if cut > 0 else MAX_SENTENCE_CHARS
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def _train(sentences: list[str], options: SentencePieceOptions, byte_fallback: bool) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(options.seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=options.vocab_size,
        model_type=options.model_type,
        character_coverage=options.character_coverage,
        byte_fallback=byte_fallback,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=[MASK_TOKEN],
        user_defined_symbols=list(options.user_symbols),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * MAX_SENTENCE_CHARS,
        input_sentence_size=options.max_sentences,
        shuffle_input_sentence=True,
        num_threads=options.num_threads,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    return model.getvalue()


def _training_error(exc: RuntimeError, options: SentencePieceOptions) -> TokenizerError:
    # sentencepiece reports "INTERNAL: file.cc(line) [check] message"; keep the message.
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    return TokenizerError(
        f"sentencepiece training failed (vocab_size {options.vocab_size}, model_type "
        f"{options.model_type}, byte_fallback {options.byte_fallback}): {text}"
    )


def train_sentencepiece(
    documents: Iterable[str], options: SentencePieceOptions, source: str = "<trained>"
) -> SentencePieceTokenizer:
    """Train a BD3 sentencepiece tokenizer on `documents`; save it with `.save(directory)`."""
    sentences = list(training_sentences(documents))
    if not sentences:
        raise TokenizerError("no training text: every document is empty")
    wanted = options.byte_fallback != "off"
    try:
        proto = _train(sentences, options, byte_fallback=wanted)
    except RuntimeError as exc:
        if not (options.byte_fallback == "auto" and "smaller than required_chars" in str(exc)):
            raise _training_error(exc, options) from exc
        logger.warning(
            "vocab_size %d is too small for byte fallback (256 byte pieces + required characters "
            "+ specials); training without it — characters outside the vocabulary will encode to "
            "<unk>",
            options.vocab_size,
        )
        try:
            proto = _train(sentences, options, byte_fallback=False)
        except RuntimeError as retry_exc:
            raise _training_error(retry_exc, options) from retry_exc
    return SentencePieceTokenizer(proto, source=source)


def options_record(options: SentencePieceOptions) -> dict:
    return asdict(options)
