"""The embedded default corpus: found without importing gensim, real text, clear error if absent."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_bd3.data.corpus import (
    default_corpus_documents,
    default_corpus_path,
    write_default_corpus,
)
from megatron_bd3.data.sources import InputRecord, SourceOptions, iter_documents
from tests.dist_launcher import REPO_ROOT


def test_default_corpus_is_real_news_text():
    documents = list(default_corpus_documents())
    assert len(documents) == 300
    assert default_corpus_path().name == "lee_background.cor"
    text = " ".join(documents)
    # Real English news prose: known content of the Lee corpus and ordinary word statistics.
    assert documents[0].startswith("Hundreds of people have been forced to vacate their homes")
    for word in ("Australia", "Sydney", "bushfire", "government", "police"):
        assert word in text
    words = text.split()
    assert len(words) > 50_000
    assert sum(w.lower() == "the" for w in words) / len(words) > 0.03
    assert all(doc == doc.strip() and doc for doc in documents)


def test_default_corpus_does_not_import_gensim():
    code = (
        "import sys\n"
        "from megatron_bd3.data.corpus import default_corpus_documents\n"
        "n = sum(1 for _ in default_corpus_documents())\n"
        "print(n, 'gensim' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["300", "False"]


def test_missing_gensim_gives_a_clear_error():
    # `python -S` runs without site-packages: a real environment in which gensim is absent.
    code = (
        "from megatron_bd3.data.corpus import default_corpus_path\n"
        "try:\n"
        "    default_corpus_path()\n"
        "except FileNotFoundError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout.startswith("ERROR")
    assert "gensim" in proc.stdout and "--input" in proc.stdout


def test_written_corpus_reads_back_as_the_same_documents(tmp_path):
    path = write_default_corpus(tmp_path / "lee.txt")
    record = InputRecord(path=str(path), format="text", bytes=path.stat().st_size)
    documents = list(iter_documents(str(path), SourceOptions(text_mode="paragraph"), record))
    assert documents == list(default_corpus_documents())
    assert record.documents == 300 and record.skipped.total() == 0


@pytest.mark.parametrize("mode", ["paragraph", "line", "file"])
def test_default_input_name_ignores_text_mode(mode):
    record = InputRecord(path="default", format="default", bytes=0)
    documents = list(iter_documents("default", SourceOptions(text_mode=mode), record))
    assert len(documents) == 300
