"""The embedded default corpus: real English text that ships with an installed dependency.

gensim (a declared dependency) carries the Lee background corpus in its wheel:
`gensim/test/test_data/lee_background.cor`, 300 Australian news articles, one per line (~360 KB).
It lets the demo, the tests and the benchmarks run on real text with no network and no data
download. The file is located through the import system *without importing gensim* (importing it
costs seconds and pulls scipy); only its path is used.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

DEFAULT_CORPUS_NAME = "default"
"""The name the CLI tools accept in place of an input path (`--input default`)."""

_RELATIVE_PATH = ("test", "test_data", "lee_background.cor")


def gensim_test_data(relative: tuple[str, ...], corpus: str) -> Path:
    """A file shipped in the installed gensim package's test data, found without importing
    gensim. Raises FileNotFoundError naming `corpus` and what was looked for when gensim (or the
    file) is missing."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {corpus} ships inside the 'gensim' package (gensim==4.4.0, a dependency of "
            "megatron_bd3), which is not installed in this environment; install it with "
            "`pip install gensim==4.4.0` or pass your own text with --input"
        )
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*relative)
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(Path(r).joinpath(*relative)) for r in spec.submodule_search_locations)
    raise FileNotFoundError(
        f"the {corpus} file {relative[-1]} is missing from the installed gensim (looked at "
        f"{searched}); reinstall gensim==4.4.0 from its wheel or pass --input"
    )


def default_corpus_path() -> Path:
    """Path of the Lee background corpus inside the installed gensim package."""
    return gensim_test_data(_RELATIVE_PATH, "default corpus")


def default_corpus_documents() -> Iterator[str]:
    """Yield the 300 documents of the default corpus, in file order, stripped of line endings.

    Blank lines (there are none in the shipped file) are not documents and are not yielded.
    """
    path = default_corpus_path()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.strip()
            if text:
                yield text


def write_default_corpus(path: str | Path) -> Path:
    """Write the default corpus as a plain-text file, documents separated by one blank line.

    That is the `--text-mode paragraph` layout of `bd3-prepare-data` / `bd3-train-tokenizer`, so
    reading the file back gives exactly `default_corpus_documents()`. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("\n\n".join(default_corpus_documents()))
        handle.write("\n")
    return path
