"""Reading documents out of the input files of the data tools.

Formats (chosen by extension with `format="auto"`):
  text     any other file. `text_mode` says what a document is:
             paragraph  runs of non-blank lines, separated by one or more blank lines (default;
                        a blank line is empty or whitespace only). Lines of a paragraph are joined
                        with "\\n".
             line       every line is a document (the Lee corpus layout); blank lines count as
                        empty documents.
             file       the whole file is one document.
           Line endings "\\r\\n" read as "\\n"; a UTF-8 byte-order mark is dropped.
  jsonl    .jsonl / .jsonl.gz / .json.gz: one JSON object per line, the text under `text_field`;
           blank lines are ignored.
  parquet  .parquet: the string (or binary UTF-8) column `text_field`; null counts as empty.
  mediawiki  .xml / .xml.bz2 (and Wikipedia's `...xml-p<first>p<last>.bz2` chunks): a MediaWiki
           XML export, plain or bz2; one document per article (a page of namespace 0 that is not
           a redirect), its wikitext stripped to plain text (mediawiki.py).
The name "default" stands for the embedded default corpus (`corpus.default_corpus_documents`),
"wikipedia" for the Wikipedia dump in gensim's test data (`mediawiki.wikipedia_dump_path`).

What is skipped, always counted in `SkipCounts` (and so in the manifest), never silently:
  - empty documents (empty or whitespace-only text) and empty files (no bytes, or only
    whitespace): recoverable, logged;
  - invalid UTF-8 lines (text) / records (jsonl, parquet binary): an error naming the file, line
    and byte offset with `on_bad_utf8="error"` (default), a counted skip with "skip" (mediawiki:
    always an error, as the XML parser rejects the file);
  - mediawiki pages that are not articles: redirects, and pages of other namespaces (talk, user,
    project, template, ...; a redirect there counts as another namespace); an article with no
    text left once its markup is stripped counts as an empty document.
Anything else that is wrong (missing field or column, invalid JSON, a non-string value, a corrupt
gzip, bz2, parquet or XML file, a pattern that matches nothing) is an error naming the file.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from megatron_bd3.data.corpus import DEFAULT_CORPUS_NAME, default_corpus_documents
from megatron_bd3.data.mediawiki import (
    MAIN_NAMESPACE,
    WIKIPEDIA_CORPUS_NAME,
    MediaWikiError,
    article_text,
    is_mediawiki_path,
    iter_pages,
    wikipedia_dump_path,
)

logger = logging.getLogger(__name__)

FORMATS = ("auto", "text", "jsonl", "parquet", "mediawiki")
NAMED_CORPORA = (DEFAULT_CORPUS_NAME, WIKIPEDIA_CORPUS_NAME)
"""Input names that stand for a corpus shipped with a dependency, not for a path."""
TEXT_MODES = ("paragraph", "line", "file")
BAD_UTF8_POLICIES = ("error", "skip")


class InputError(ValueError):
    """Bad input data; the message names the file (and line) and what is wrong."""


@dataclass
class SkipCounts:
    """What was left out of the inputs, by reason."""

    empty_documents: int = 0
    empty_files: int = 0
    bad_utf8_lines: int = 0
    bad_utf8_records: int = 0
    redirects: int = 0
    other_namespaces: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def total(self) -> int:
        return sum(self.as_dict().values())


@dataclass(frozen=True)
class SourceOptions:
    """How input files are read into documents (see the module docstring)."""

    format: str = "auto"
    text_mode: str = "paragraph"
    text_field: str = "text"
    on_bad_utf8: str = "error"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("format", self.format, FORMATS),
            ("text_mode", self.text_mode, TEXT_MODES),
            ("on_bad_utf8", self.on_bad_utf8, BAD_UTF8_POLICIES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if not self.text_field:
            raise ValueError("text_field must be a non-empty field/column name")

    @staticmethod
    def add_arguments(group) -> None:
        """The input-reading options of the command-line tools (bd3-train-tokenizer,
        bd3-prepare-data) on an argparse parser or argument group."""
        group.add_argument("--format", choices=FORMATS, default="auto")
        group.add_argument(
            "--text-mode",
            choices=TEXT_MODES,
            default="paragraph",
            help="text files: a document is a blank-line separated paragraph (default), a line, "
            "or the whole file",
        )
        group.add_argument("--text-field", default="text", help="jsonl field / parquet column")
        group.add_argument(
            "--on-bad-utf8",
            choices=BAD_UTF8_POLICIES,
            default="error",
            help="invalid UTF-8 lines/records: stop with an error (default) or skip and count them",
        )

    @classmethod
    def from_arguments(cls, args) -> SourceOptions:
        """The options parsed by `add_arguments`."""
        return cls(format=args.format, text_mode=args.text_mode, text_field=args.text_field,
                   on_bad_utf8=args.on_bad_utf8)


@dataclass
class InputRecord:
    """Per-input provenance for the manifest."""

    path: str
    format: str
    bytes: int
    documents: int = 0
    skipped: SkipCounts = field(default_factory=SkipCounts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "bytes": self.bytes,
            "documents": self.documents,
            "skipped": self.skipped.as_dict(),
        }


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Expand globs, each pattern's matches sorted, first occurrence kept; the names of
    `NAMED_CORPORA` ("default", "wikipedia") pass through.

    The order of documents (hence of samples) follows this list, so it must not depend on the
    file system's listing order.
    """
    if not patterns:
        raise InputError("no input given; pass --input PATH_OR_GLOB (or --input default)")
    result: list[str] = []
    for pattern in patterns:
        if pattern in NAMED_CORPORA:
            matches = [pattern]
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputError(f"input pattern {pattern!r} matches no file")
        else:
            if not os.path.isfile(pattern):
                raise InputError(f"input {pattern!r}: no such file")
            matches = [pattern]
        for match in matches:
            if match not in result:
                result.append(match)
    return result


def detect_format(path: str) -> str:
    """'jsonl' / 'parquet' / 'mediawiki' by extension, 'text' otherwise."""
    name = path.lower()
    if is_mediawiki_path(path):
        return "mediawiki"
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def iter_documents(path: str, options: SourceOptions, record: InputRecord) -> Iterator[str]:
    """Yield the non-empty documents of one input; counts go into `record`."""
    if path == DEFAULT_CORPUS_NAME:
        for document in default_corpus_documents():
            record.documents += 1
            yield document
        return
    if path == WIKIPEDIA_CORPUS_NAME:
        fmt = "mediawiki"
        source = str(wikipedia_dump_path())
    else:
        fmt = detect_format(path) if options.format == "auto" else options.format
        source = path
    if fmt == "mediawiki":
        reader = _mediawiki_documents(source, record)
    elif fmt == "jsonl":
        reader = _jsonl_documents(path, options, record)
    elif fmt == "parquet":
        reader = _parquet_documents(path, options, record)
    else:
        reader = _text_documents(path, options, record)
    for document in reader:
        if document.strip():
            record.documents += 1
            yield document
        else:
            record.skipped.empty_documents += 1


def open_input(path: str, options: SourceOptions) -> InputRecord:
    """An empty provenance record for `path` (format resolved, size read)."""
    if path == DEFAULT_CORPUS_NAME:
        return InputRecord(path=path, format="default", bytes=0)
    if path == WIKIPEDIA_CORPUS_NAME:
        try:
            size = os.path.getsize(wikipedia_dump_path())
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
        return InputRecord(path=path, format="mediawiki", bytes=size)
    fmt = detect_format(path) if options.format == "auto" else options.format
    return InputRecord(path=path, format=fmt, bytes=os.path.getsize(path))


def iter_all_documents(
    paths: Sequence[str], options: SourceOptions, records: list[InputRecord]
) -> Iterator[str]:
    """Documents of every input in order; one `InputRecord` per input is appended to `records`."""
    for path in paths:
        record = open_input(path, options)
        records.append(record)
        yield from iter_documents(path, options, record)
        if record.skipped.total():
            logger.warning(
                "%s: skipped %s", path, {k: v for k, v in record.skipped.as_dict().items() if v}
            )
    if not any(r.documents for r in records):
        raise InputError(
            f"no documents in the inputs {list(paths)} (all files empty or all documents skipped)"
        )


def total_skips(records: Sequence[InputRecord]) -> SkipCounts:
    total = SkipCounts()
    for record in records:
        for key, value in record.skipped.as_dict().items():
            setattr(total, key, getattr(total, key) + value)
    return total


# ------------------------------------------------------------------ text files
def _decode_line(
    raw: bytes,
    path: str,
    line_number: int,
    offset: int,
    options: SourceOptions,
    record: InputRecord,
) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if options.on_bad_utf8 == "skip":
            record.skipped.bad_utf8_lines += 1
            return None
        raise InputError(
            f"{path}:{line_number}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at file offset "
            f"{offset + exc.start}: {exc.reason}); fix the file or pass --on-bad-utf8 skip to "
            f"drop such lines (they are counted in the manifest)"
        ) from None


def _text_lines(path: str, options: SourceOptions, record: InputRecord) -> Iterator[str | None]:
    """Decoded lines without their line ending; None for a skipped invalid line."""
    offset = 0
    saw_text = False
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode_line(raw, path, line_number, offset, options, record)
            offset += len(raw)
            if line is None:
                yield None
                continue
            if line_number == 1 and line.startswith("\ufeff"):
                line = line[1:]
            line = line.rstrip("\n").rstrip("\r")
            saw_text = saw_text or bool(line.strip())
            yield line
    if not saw_text:
        record.skipped.empty_files += 1
        logger.warning("%s: empty file (no text), skipped", path)


def _text_documents(path: str, options: SourceOptions, record: InputRecord) -> Iterator[str]:
    mode = options.text_mode
    if mode == "line":
        for line in _text_lines(path, options, record):
            if line is not None:
                yield line
        return
    if mode == "file":
        lines = [line for line in _text_lines(path, options, record) if line is not None]
        if any(line.strip() for line in lines):
            yield "\n".join(lines)
        return
    paragraph: list[str] = []
    for line in _text_lines(path, options, record):
        if line is None:  # a skipped invalid line leaves the paragraph open
            continue
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


# ------------------------------------------------------------------ jsonl
def _open_jsonl(path: str) -> BinaryIO:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _jsonl_documents(path: str, options: SourceOptions, record: InputRecord) -> Iterator[str]:
    field_name = options.text_field
    line_number = 0
    saw_record = False
    try:
        with _open_jsonl(path) as handle:
            for line_number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    if options.on_bad_utf8 == "skip":
                        record.skipped.bad_utf8_records += 1
                        continue
                    raise InputError(
                        f"{path}:{line_number}: invalid UTF-8 ({exc.reason} at byte {exc.start} of "
                        f"the line); fix the file or pass --on-bad-utf8 skip to drop such records"
                    ) from None
                if not line.strip():
                    continue
                saw_record = True
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"{path}:{line_number}: invalid JSON ({exc.msg} at column {exc.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise InputError(
                        f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}"
                    )
                if field_name not in obj:
                    raise InputError(
                        f"{path}:{line_number}: no field {field_name!r} (fields: "
                        f"{', '.join(sorted(obj)) or 'none'}); choose the text field with "
                        f"--text-field"
                    )
                value = obj[field_name]
                if value is None:
                    value = ""
                if not isinstance(value, str):
                    raise InputError(
                        f"{path}:{line_number}: field {field_name!r} is a {type(value).__name__}, "
                        f"expected a string"
                    )
                yield value
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(
            f"{path}: the gzip stream is truncated or corrupt after line {line_number} ({exc})"
        ) from exc
    if not saw_record:
        record.skipped.empty_files += 1
        logger.warning("%s: empty file (no records), skipped", path)


# ------------------------------------------------------------------ mediawiki
def _mediawiki_documents(path: str, record: InputRecord) -> Iterator[str]:
    """Article texts; "" for an article whose text is all markup (counted by the caller)."""
    if os.path.getsize(path) == 0:
        record.skipped.empty_files += 1
        logger.warning("%s: empty file (no bytes), skipped", path)
        return
    saw_page = False
    try:
        for page in iter_pages(path):
            saw_page = True
            if page.namespace != MAIN_NAMESPACE:
                record.skipped.other_namespaces += 1
            elif page.is_redirect:
                record.skipped.redirects += 1
            else:
                yield article_text(page.text)
    except MediaWikiError as exc:
        raise InputError(str(exc)) from None
    if not saw_page:
        record.skipped.empty_files += 1
        logger.warning("%s: MediaWiki export without pages, skipped", path)


# ------------------------------------------------------------------ parquet
def _parquet_documents(path: str, options: SourceOptions, record: InputRecord) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = options.text_field
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from exc
    names = parquet.schema_arrow.names
    if column not in names:
        raise InputError(
            f"{path}: no column {column!r} (columns: {', '.join(names) or 'none'}); choose the "
            f"text column with --text-field"
        )
    column_type = parquet.schema_arrow.field(column).type
    is_binary = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
    if not (is_binary or pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(
            f"{path}: column {column!r} has type {column_type}, expected string or binary"
        )
    if parquet.metadata.num_rows == 0:
        record.skipped.empty_files += 1
        logger.warning("%s: empty parquet file (no rows), skipped", path)
        return
    row = 0
    try:
        for batch in parquet.iter_batches(columns=[column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    yield ""
                elif is_binary:
                    try:
                        yield value.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        if options.on_bad_utf8 == "skip":
                            record.skipped.bad_utf8_records += 1
                            continue
                        raise InputError(
                            f"{path}: row {row - 1}, column {column!r}: invalid UTF-8 "
                            f"({exc.reason}); "
                            f"pass --on-bad-utf8 skip to drop such rows"
                        ) from None
                else:
                    yield value
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: corrupt parquet data near row {row} ({exc})") from exc


def describe_inputs(paths: Sequence[str]) -> str:
    """Short form of an input list for log lines."""
    names = [p if p in NAMED_CORPORA else Path(p).name for p in paths]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
