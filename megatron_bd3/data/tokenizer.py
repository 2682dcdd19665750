"""Tokenizers for BD3-LM: one interface over sentencepiece models and Hugging Face tokenizer.json.

BD3-LM needs four special ids besides the vocabulary: [MASK] (the absorbing state of the forward
process), BOS and EOS (documents are separated by EOS; chunks optionally get BOS...EOS) and PAD.
The reference recipes use GPT-2 (no mask token: [MASK] is appended, vocab 50257 -> 50258, mask id
50257, pad = eos) and bert-base-uncased ([MASK] = 103, BOS = [CLS], EOS = [SEP]). Both kinds of
tokenizer.json load here with exactly those ids.

On disk a tokenizer is a directory written by `BD3Tokenizer.save` (or `bd3-train-tokenizer`):

    tokenizer.model | tokenizer.json   the model (sentencepiece proto or HF tokenizers JSON)
    bd3_tokenizer.json                 kind, special ids and tokens, vocab size, fingerprint

`load_tokenizer(path)` accepts such a directory, a bare `.model` file or a bare `tokenizer.json`.
`find_model_tokenizer(model_dir)` finds the tokenizer of a model directory (in it or in its
`tokenizer/`) and refuses one whose fingerprint is not the one the model records.

`BD3Tokenizer.save_for_transformers(directory)` adds `tokenizer_config.json` and
`special_tokens_map.json` (and, for a tokenizers model, `tokenizer.json`) so that Hugging Face
`AutoTokenizer` loads the same ids (docs/convert.md, "Hugging Face"); a sentencepiece model
is read there by the class named in `TRANSFORMERS_SENTENCEPIECE_CLASS`, whose file the exporter
ships beside it.

Literal special-token strings in text ("[MASK]", "<|endoftext|>") are encoded as ordinary text,
never as the special id: a training document that happens to contain "[MASK]" must not put the
absorbing state into x_0. (HF's GPT-2 tokenizer would map a literal "<|endoftext|>" to 50256; we
deliberately do not.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MASK_TOKEN = "[MASK]"
METADATA_FILE = "bd3_tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
METADATA_FORMAT = "megatron_bd3.tokenizer"
METADATA_VERSION = 1
TRANSFORMERS_CONFIG_FILE = "tokenizer_config.json"
TRANSFORMERS_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# module.class of the sentencepiece tokenizer for transformers (megatron_bd3/convert/hf_files)
TRANSFORMERS_SENTENCEPIECE_CLASS = "tokenization_bd3lm.BD3LMTokenizer"

# Special-token spellings looked up, in order, in a tokenizer.json that is loaded without explicit
# choices. GPT-2 has only <|endoftext|> (BOS = EOS, pad = EOS as in the reference); BERT uses
# [CLS]/[SEP] as BOS/EOS exactly as the reference's get_tokenizer does.
HF_MASK_CANDIDATES = ("[MASK]", "<mask>", "<|mask|>")
HF_BOS_CANDIDATES = (
    "<s>",
    "<|begin_of_text|>",
    "<|startoftext|>",
    "<bos>",
    "[CLS]",
    "<|endoftext|>",
)
HF_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]")
HF_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")
HF_UNK_CANDIDATES = ("<unk>", "[UNK]", "<|unk|>")


class TokenizerError(ValueError):
    """A tokenizer file or directory that cannot be used for BD3-LM, with the reason."""


class BD3Tokenizer(ABC):
    """What the data pipeline, trainer and sampler need from a tokenizer.

    Attributes: `vocab_size` (embedding rows, [MASK] included), `mask_id`, `bos_id`, `eos_id`,
    `pad_id` (may equal `eos_id`), `unk_id` (None when the vocabulary has none), `source` (where it
    was loaded from, for messages).
    """

    kind: str = ""

    def __init__(
        self,
        *,
        vocab_size: int,
        mask_id: int,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        unk_id: int | None,
        source: str,
    ) -> None:
        self.vocab_size = int(vocab_size)
        self.mask_id = int(mask_id)
        self.bos_id = int(bos_id)
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.unk_id = None if unk_id is None else int(unk_id)
        self.source = source
        self._fingerprint: str | None = None
        for name, value in self.special_ids.items():
            if value is not None and not 0 <= value < self.vocab_size:
                raise TokenizerError(
                    f"{source}: {name} id {value} is outside the vocabulary [0, {self.vocab_size})"
                )
        clashes = [
            n for n in ("bos_id", "eos_id", "pad_id", "unk_id") if getattr(self, n) == mask_id
        ]
        if clashes:
            raise TokenizerError(
                f"{source}: mask id {mask_id} is also the {', '.join(clashes)}; [MASK] must be a "
                f"token of its own (it is the absorbing state of the diffusion)"
            )

    # ---------------------------------------------------------------- encoding
    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over several texts (backends override with a batched call)."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; the special tokens (mask, bos, eos, pad) are dropped from the text."""

    # ---------------------------------------------------------------- identity
    @property
    def special_ids(self) -> dict[str, int | None]:
        return {
            "mask_id": self.mask_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
        }

    @abstractmethod
    def _vocabulary_description(self) -> Any:
        """A JSON-able description of everything that decides which ids a text gets."""

    def fingerprint(self) -> str:
        """Stable sha256 (hex) of the vocabulary, its encoding rules and the special ids.

        Equal fingerprints mean the same text gives the same ids; the shard manifest records it so
        that data tokenized with another tokenizer is refused.
        """
        if self._fingerprint is None:
            payload = {
                "kind": self.kind,
                "vocab_size": self.vocab_size,
                "special_ids": self.special_ids,
                "vocabulary": self._vocabulary_description(),
            }
            blob = json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(blob.encode("ascii")).hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """Summary for logs, manifests and the metadata file."""
        return {
            "kind": self.kind,
            "source": self.source,
            "vocab_size": self.vocab_size,
            "special_ids": self.special_ids,
            "special_tokens": self.special_tokens(),
            "fingerprint": self.fingerprint(),
        }

    @abstractmethod
    def special_tokens(self) -> dict[str, str | None]:
        """The strings of the special tokens (mask, bos, eos, pad, unk)."""

    # ---------------------------------------------------------------- persistence
    @abstractmethod
    def _write_model(self, directory: Path) -> str:
        """Write the model file into `directory`; return its file name."""

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the model and `bd3_tokenizer.json` into `directory`; return the directory.

        `extra` (e.g. training options) is stored under "extra" in the metadata, for provenance.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_file = self._write_model(directory)
        metadata = {
            "format": METADATA_FORMAT,
            "version": METADATA_VERSION,
            "model_file": model_file,
            **self.describe(),
            # the directory travels (exports, checkpoints): name its own file, never the path
            # it was loaded from; the fingerprint says which tokenizer it is
            "source": model_file,
            "extra": extra or {},
        }
        _write_text(directory / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True))
        return directory

    def save_for_transformers(self, directory: str | Path) -> list[str]:
        """Write what Hugging Face ``AutoTokenizer`` reads next to :meth:`save`'s files:
        ``tokenizer_config.json`` (special tokens, the tokenizer class) and
        ``special_tokens_map.json``; returns the names written. Literal special-token strings
        stay text there too (``split_special_tokens``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tokens = self.special_tokens()
        special = {f"{role}_token": tokens[role] for role in ("bos", "eos", "pad", "mask", "unk")
                   if tokens[role] is not None}
        config = {
            **self._transformers_class(),
            **special,
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "bd3_tokenizer_fingerprint": self.fingerprint(),
        }
        written = [TRANSFORMERS_CONFIG_FILE, TRANSFORMERS_SPECIAL_TOKENS_FILE]
        _write_text(directory / TRANSFORMERS_CONFIG_FILE, json.dumps(config, indent=2))
        _write_text(directory / TRANSFORMERS_SPECIAL_TOKENS_FILE, json.dumps(special, indent=2))
        if not (directory / self._model_file_name()).is_file():
            written.append(self._write_model(directory))
        return written

    @abstractmethod
    def _transformers_class(self) -> dict[str, Any]:
        """tokenizer_config.json's class entries (``tokenizer_class``, ``auto_map``)."""

    @abstractmethod
    def _model_file_name(self) -> str:
        """The model file's name in a saved directory."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, mask_id={self.mask_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}, "
            f"source={self.source!r})"
        )


class SentencePieceTokenizer(BD3Tokenizer):
    """A sentencepiece model.

    [MASK] is the model's "[MASK]" piece when it has one (bd3-train-tokenizer adds it as a control
    symbol, which text can never produce); otherwise it is appended after the last piece, as the
    reference does for GPT-2. PAD falls back to EOS when the model has no pad piece.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
        import sentencepiece as spm

        self._model_proto = bytes(model_proto)
        try:
            self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise TokenizerError(f"{source}: not a readable sentencepiece model ({exc})") from exc
        sp = self._processor
        self._num_pieces = sp.get_piece_size()
        mask_id = sp.piece_to_id(MASK_TOKEN)
        if sp.id_to_piece(mask_id) != MASK_TOKEN:
            mask_id = self._num_pieces  # appended id with no piece behind it
        elif not sp.is_control(mask_id):
            logger.warning(
                "%s: the [MASK] piece (id %d) is not a control symbol, so a literal '[MASK]' in "
                "text encodes to the mask id; retrain with bd3-train-tokenizer to avoid this",
                source,
                mask_id,
            )
        for name, value in (("bos", sp.bos_id()), ("eos", sp.eos_id())):
            if value < 0:
                raise TokenizerError(
                    f"{source}: the sentencepiece model has no {name.upper()} piece "
                    f"({name}_id=-1); "
                    f"BD3 data needs EOS between documents and BOS for chunk wrapping. Train one "
                    f"with bd3-train-tokenizer (it reserves <unk>=0, <s>=1, </s>=2, <pad>=3, "
                    f"[MASK]=4)"
                )
        pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
        unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        super().__init__(
            vocab_size=self._num_pieces + (1 if mask_id == self._num_pieces else 0),
            mask_id=mask_id,
            bos_id=sp.bos_id(),
            eos_id=sp.eos_id(),
            pad_id=pad_id,
            unk_id=unk_id,
            source=source,
        )
        self._dropped = {self.mask_id, self.bos_id, self.eos_id, self.pad_id}

    @property
    def model_proto(self) -> bytes:
        return self._model_proto

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: the data tools parallelise over processes, not inside sentencepiece.
        return self._processor.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        kept = []
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise TokenizerError(
                    f"token id {token} is outside the vocabulary [0, {self.vocab_size})"
                )
            if token not in self._dropped:
                kept.append(token)
        return self._processor.decode(kept)

    def special_tokens(self) -> dict[str, str | None]:
        sp = self._processor

        def piece(token: int | None) -> str | None:
            if token is None:
                return None
            return MASK_TOKEN if token >= self._num_pieces else sp.id_to_piece(token)

        return {
            "mask": piece(self.mask_id),
            "bos": piece(self.bos_id),
            "eos": piece(self.eos_id),
            "pad": piece(self.pad_id),
            "unk": piece(self.unk_id),
        }

    def _vocabulary_description(self) -> Any:
        sp = self._processor
        pieces = []
        for token in range(self._num_pieces):
            if sp.is_control(token):
                kind = "control"
            elif sp.is_unknown(token):
                kind = "unknown"
            elif sp.is_byte(token):
                kind = "byte"
            elif sp.is_unused(token):
                kind = "unused"
            else:
                kind = "normal"
            pieces.append([sp.id_to_piece(token), repr(sp.get_score(token)), kind])
        if self.vocab_size > self._num_pieces:
            pieces.append([MASK_TOKEN, None, "appended"])
        return pieces

    def _write_model(self, directory: Path) -> str:
        tmp = directory / (SENTENCEPIECE_FILE + ".tmp")
        tmp.write_bytes(self._model_proto)
        tmp.replace(directory / SENTENCEPIECE_FILE)
        return SENTENCEPIECE_FILE

    def _model_file_name(self) -> str:
        return SENTENCEPIECE_FILE

    def _transformers_class(self) -> dict[str, Any]:
        return {"tokenizer_class": TRANSFORMERS_SENTENCEPIECE_CLASS.split(".")[1],
                "auto_map": {"AutoTokenizer": [TRANSFORMERS_SENTENCEPIECE_CLASS, None]},
                "vocab_file": SENTENCEPIECE_FILE}


class HFTokenizer(BD3Tokenizer):
    """A Hugging Face `tokenizers` model (tokenizer.json), e.g. GPT-2 or bert-base-uncased.

    Each special may be named explicitly; otherwise the usual spellings are looked up (see the
    HF_*_CANDIDATES tuples). A missing [MASK] is added as a special token at the end of the
    vocabulary (GPT-2: id 50257, vocab 50258, as in the reference). A missing PAD is EOS.
    """

    kind = "hf_tokenizers"

    def __init__(
        self,
        tokenizer: Any,
        source: str = "<memory>",
        *,
        mask_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
    ) -> None:
        from tokenizers import AddedToken

        self._tokenizer = tokenizer

        def find(explicit: str | None, candidates: tuple[str, ...], role: str) -> str | None:
            if explicit is not None:
                if tokenizer.token_to_id(explicit) is None:
                    raise TokenizerError(
                        f"{source}: the {role} token {explicit!r} is not in the vocabulary"
                    )
                return explicit
            for name in candidates:
                if tokenizer.token_to_id(name) is not None:
                    return name
            return None

        mask = find(mask_token, HF_MASK_CANDIDATES, "mask")
        if mask is None:
            mask = MASK_TOKEN
            tokenizer.add_special_tokens([AddedToken(mask, special=True, normalized=False)])
            logger.info(
                "%s: no mask token in the vocabulary; appended %s as id %d",
                source,
                mask,
                tokenizer.token_to_id(mask),
            )
        bos = find(bos_token, HF_BOS_CANDIDATES, "BOS")
        eos = find(eos_token, HF_EOS_CANDIDATES, "EOS")
        missing = [role for role, value in (("BOS", bos), ("EOS", eos)) if value is None]
        if missing:
            raise TokenizerError(
                f"{source}: no {' or '.join(missing)} token found (looked for BOS in "
                f"{list(HF_BOS_CANDIDATES)}, EOS in {list(HF_EOS_CANDIDATES)}); import it with "
                f"`bd3-train-tokenizer --from {source} --bos-token TOKEN --eos-token TOKEN "
                f"--output DIR`"
            )
        pad = find(pad_token, HF_PAD_CANDIDATES, "PAD") or eos
        unk = find(unk_token, HF_UNK_CANDIDATES, "UNK")
        self._tokens = {"mask": mask, "bos": bos, "eos": eos, "pad": pad, "unk": unk}
        # Literal special strings in text are text (see the module docstring).
        tokenizer.encode_special_tokens = True
        super().__init__(
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
            mask_id=tokenizer.token_to_id(mask),
            bos_id=tokenizer.token_to_id(bos),
            eos_id=tokenizer.token_to_id(eos),
            pad_id=tokenizer.token_to_id(pad),
            unk_id=None if unk is None else tokenizer.token_to_id(unk),
            source=source,
        )

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [
            enc.ids for enc in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(t) for t in ids]
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise TokenizerError(
                    f"token id {token} is outside the vocabulary [0, {self.vocab_size})"
                )
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def special_tokens(self) -> dict[str, str | None]:
        return dict(self._tokens)

    def _vocabulary_description(self) -> Any:
        # The whole tokenizer definition (normalizer, pre-tokenizer, model with merges, added
        # tokens) decides the ids; padding/truncation settings do not.
        definition = json.loads(self._tokenizer.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
        return definition

    def _write_model(self, directory: Path) -> str:
        tmp = directory / (HF_FILE + ".tmp")
        tmp.write_text(self._tokenizer.to_str(pretty=True), encoding="utf-8")
        tmp.replace(directory / HF_FILE)
        return HF_FILE

    def _model_file_name(self) -> str:
        return HF_FILE

    def _transformers_class(self) -> dict[str, Any]:
        return {"tokenizer_class": "PreTrainedTokenizerFast"}


# -------------------------------------------------------------------- loading
def load_sentencepiece(path: str | Path) -> SentencePieceTokenizer:
    """A sentencepiece `.model` file."""
    path = Path(path)
    try:
        proto = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read the sentencepiece model ({exc})") from exc
    return SentencePieceTokenizer(proto, source=str(path))


def load_hf_tokenizer_json(
    path: str | Path,
    *,
    mask_token: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
) -> HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (e.g. GPT-2's or bert-base-uncased's)."""
    from tokenizers import Tokenizer

    path = Path(path)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception subclass with the serde text
        raise TokenizerError(f"{path}: not a readable Hugging Face tokenizer.json ({exc})") from exc
    return HFTokenizer(
        tokenizer,
        source=str(path),
        mask_token=mask_token,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
    )


def _load_directory(directory: Path) -> BD3Tokenizer:
    meta_path = directory / METADATA_FILE
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TokenizerError(
            f"{directory}: not a tokenizer directory (no readable {METADATA_FILE}: {exc}); "
            f"write one with bd3-train-tokenizer, or pass a .model or tokenizer.json file"
        ) from exc
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{meta_path}: invalid JSON ({exc})") from exc
    if metadata.get("format") != METADATA_FORMAT:
        raise TokenizerError(
            f"{meta_path}: format is {metadata.get('format')!r}, expected {METADATA_FORMAT!r}"
        )
    kind = metadata.get("kind")
    model_path = directory / str(metadata.get("model_file", ""))
    if kind == SentencePieceTokenizer.kind:
        tokenizer: BD3Tokenizer = load_sentencepiece(model_path)
    elif kind == HFTokenizer.kind:
        tokens = metadata.get("special_tokens", {})
        tokenizer = load_hf_tokenizer_json(
            model_path,
            mask_token=tokens.get("mask"),
            bos_token=tokens.get("bos"),
            eos_token=tokens.get("eos"),
            pad_token=tokens.get("pad"),
            unk_token=tokens.get("unk"),
        )
    else:
        raise TokenizerError(
            f"{meta_path}: unknown tokenizer kind {kind!r} (expected "
            f"{SentencePieceTokenizer.kind!r} or {HFTokenizer.kind!r})"
        )
    tokenizer.source = str(directory)
    expected = metadata.get("fingerprint")
    if expected != tokenizer.fingerprint():
        raise TokenizerError(
            f"{directory}: {model_path.name} does not match {METADATA_FILE} (fingerprint "
            f"{tokenizer.fingerprint()[:16]}... vs recorded {str(expected)[:16]}...); the model "
            f"file was replaced or edited — re-save the tokenizer with bd3-train-tokenizer"
        )
    return tokenizer


def load_tokenizer(path: str | Path) -> BD3Tokenizer:
    """Load a tokenizer directory (bd3-train-tokenizer output), a `.model` or a `tokenizer.json`."""
    path = Path(path)
    if path.is_dir():
        return _load_directory(path)
    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    if path.name == METADATA_FILE:
        return _load_directory(path.parent)
    if path.suffix == ".model":
        return load_sentencepiece(path)
    if path.suffix == ".json":
        return load_hf_tokenizer_json(path)
    raise TokenizerError(
        f"{path}: unknown tokenizer file type; expected a directory written by "
        f"bd3-train-tokenizer, a sentencepiece .model file or a Hugging Face tokenizer.json"
    )


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` (and a final newline) atomically: a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)


def check_tokenizer_fingerprint(tokenizer: BD3Tokenizer, expected: str | None,
                                model: str | Path) -> None:
    """Refuse ``tokenizer`` when the model at ``model`` records another tokenizer fingerprint
    (its ids would decode to other text). ``expected`` None (an older model) checks nothing."""
    if expected is not None and tokenizer.fingerprint() != expected:
        raise TokenizerError(
            f"tokenizer {tokenizer.source} has fingerprint {tokenizer.fingerprint()[:16]}..., but "
            f"the model {model} was trained with tokenizer {expected[:16]}...; use the tokenizer "
            "the model was trained with"
        )


MODEL_TOKENIZER_SUBDIR = "tokenizer"


def find_model_tokenizer(model_dir: str | Path, explicit: str | Path | None = None,
                         expected_fingerprint: str | None = None) -> BD3Tokenizer | None:
    """The tokenizer of a model directory: ``explicit`` (a tokenizer directory or file), else the
    one saved in ``model_dir`` or in ``model_dir/tokenizer``, else None. One whose fingerprint is
    not ``expected_fingerprint`` (what the model's config.json records) is refused
    (TokenizerError)."""
    model_dir = Path(model_dir)
    path = None if explicit is None else Path(explicit)
    if path is None:
        for candidate in (model_dir, model_dir / MODEL_TOKENIZER_SUBDIR):
            if (candidate / METADATA_FILE).is_file():
                path = candidate
                break
    if path is None:
        return None
    tokenizer = load_tokenizer(path)
    check_tokenizer_fingerprint(tokenizer, expected_fingerprint, model_dir)
    return tokenizer
