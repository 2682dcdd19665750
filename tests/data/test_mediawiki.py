"""The MediaWiki XML input format: page reading, markup stripping, bad files, the gensim dump."""

from __future__ import annotations

import bz2
import json
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from megatron_bd3.cli.prepare_data import main as prepare_data_main
from megatron_bd3.data.mediawiki import WIKIPEDIA_CORPUS_NAME, article_text, iter_pages
from megatron_bd3.data.packing import TEST, TRAIN, VALIDATION, document_split
from megatron_bd3.data.sources import (
    InputError,
    SourceOptions,
    detect_format,
    expand_inputs,
    iter_documents,
    open_input,
)

EXPORT_NAMESPACE = "http://www.mediawiki.org/xml/export-0.10/"


def page_xml(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    redirect_element = f'<redirect title="{escape(redirect)}" />' if redirect else ""
    return (
        f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>{redirect_element}"
        f"<revision><id>2</id><model>wikitext</model><format>text/x-wiki</format>"
        f'<text xml:space="preserve">{escape(text)}</text></revision></page>\n'
    )


def export_xml(*pages: str) -> str:
    return (
        f'<mediawiki xmlns="{EXPORT_NAMESPACE}" version="0.10" xml:lang="en">\n'
        f"<siteinfo><sitename>Test</sitename><namespaces>"
        f'<namespace key="0" /><namespace key="1">Talk</namespace></namespaces></siteinfo>\n'
        + "".join(pages)
        + "</mediawiki>\n"
    )


MARKUP = """{{Infobox person|name=Ada|birth_date={{birth date|1815|12|10}}}}
'''Ada Lovelace''' was an English [[mathematician]] and ''writer''.<ref>{{cite book|title=A Book}} \
Footnote text.</ref> She worked on [[Charles Babbage|Babbage's]] [[Analytical Engine]].<ref name="b"/>
[[File:Ada Lovelace portrait.jpg|thumb|Portrait of [[Ada Lovelace|Ada]]]]

== Work ==
<!-- an editor's comment -->
Her notes include an [[algorithm]]&nbsp;for   the engine.

{| class="wikitable"
! Year !! Event
|-
| 1843 || Notes published
|}
* First [[item]]
* Second item
See [http://example.org the archive].

{{Authority control}}
[[Category:English mathematicians]]
[[Category:1815 births]]"""

MARKUP_TEXT = """Ada Lovelace was an English mathematician and writer. She worked on Babbage's \
Analytical Engine.

Work

Her notes include an algorithm for the engine.

First item
Second item
See the archive."""


@pytest.fixture()
def small_export() -> str:
    return export_xml(
        page_xml("Ada Lovelace", MARKUP),
        page_xml("Lovelace", "#REDIRECT [[Ada Lovelace]]", redirect="Ada Lovelace"),
        page_xml("AdaLovelace", "#redirect [[Ada Lovelace]] {{R from CamelCase}}"),  # no element
        page_xml("Talk:Ada Lovelace", "Is the portrait right? ~~~~", ns=1),
        page_xml("Stub", "{{stub}}\n[[Category:Stubs]]"),
        page_xml(
            "Analytical Engine",
            "The '''Analytical Engine''' was a computer.\n\nIt was never built.",
        ),
    )


def read(path: Path, options: SourceOptions | None = None):
    options = options or SourceOptions()
    record = open_input(str(path), options)
    return list(iter_documents(str(path), options, record)), record


def test_articles_are_documents_and_the_rest_is_counted(tmp_path, small_export):
    path = tmp_path / "small.xml"
    path.write_text(small_export, encoding="utf-8")
    documents, record = read(path)
    assert record.format == "mediawiki"
    assert documents == [
        MARKUP_TEXT,
        "The Analytical Engine was a computer.\n\nIt was never built.",
    ]
    assert record.documents == 2
    skipped = record.skipped.as_dict()
    assert skipped["redirects"] == 2  # one by <redirect />, one by its text only
    assert skipped["other_namespaces"] == 1  # the talk page
    assert skipped["empty_documents"] == 1  # "Stub": nothing left once the markup is gone
    pages = list(iter_pages(str(path)))
    assert [(p.title, p.namespace, p.is_redirect) for p in pages][:4] == [
        ("Ada Lovelace", 0, False),
        ("Lovelace", 0, True),
        ("AdaLovelace", 0, True),
        ("Talk:Ada Lovelace", 1, False),
    ]


def test_markup_is_stripped_to_prose():
    assert article_text(MARKUP) == MARKUP_TEXT
    assert article_text("[[:Category:Mathematicians|a category]] is linked") == (
        "a category is linked"
    )
    assert article_text("{{Infobox}}\n\n\n  \n[[Category:X]]") == ""


def test_bz2_exports_read_like_plain_ones(tmp_path, small_export):
    plain = tmp_path / "small.xml"
    plain.write_text(small_export, encoding="utf-8")
    compressed = tmp_path / "enwiki-pages-articles1.xml-p10p30.bz2"
    compressed.write_bytes(bz2.compress(small_export.encode("utf-8")))
    assert detect_format(str(compressed)) == "mediawiki"
    assert detect_format("dump.xml.bz2") == "mediawiki" and detect_format("notes.bz2") == "text"
    assert read(compressed)[0] == read(plain)[0]
    # --format mediawiki reads any name; compression is told by the magic bytes.
    renamed = tmp_path / "export.dat"
    renamed.write_bytes(compressed.read_bytes())
    assert read(renamed, SourceOptions(format="mediawiki"))[0] == read(plain)[0]


def test_truncated_bz2_is_an_error_naming_the_file(tmp_path, small_export):
    data = bz2.compress(small_export.encode("utf-8"))
    path = tmp_path / "cut.xml.bz2"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.xml\.bz2: the bz2 stream is truncated or corrupt"):
        read(path)
    path.write_bytes(b"BZh9" + b"\x00" * 64)
    with pytest.raises(InputError, match=r"cut\.xml\.bz2: the bz2 stream is truncated or corrupt"):
        read(path)


def test_truncated_or_foreign_xml_is_an_error_naming_the_file(tmp_path, small_export):
    path = tmp_path / "cut.xml"
    path.write_text(small_export[: len(small_export) * 2 // 3], encoding="utf-8")
    with pytest.raises(
        InputError,
        match=r"cut\.xml: malformed or truncated XML after \d+ complete pages \(no element",
    ):
        read(path)
    path.write_text("<rss><item>not a wiki</item></rss>", encoding="utf-8")
    with pytest.raises(InputError, match=r"cut\.xml: not a MediaWiki XML export .*<rss>"):
        read(path)


def test_empty_exports_are_counted_as_empty_files(tmp_path):
    (tmp_path / "none.xml").write_bytes(b"")
    (tmp_path / "no-pages.xml").write_text(export_xml(), encoding="utf-8")
    for name in ("none.xml", "no-pages.xml"):
        documents, record = read(tmp_path / name)
        assert documents == [] and record.skipped.empty_files == 1


def test_a_test_split_comes_out_of_train_only():
    documents = [f"document number {i}" for i in range(2000)]
    without = [document_split(d, 0.1, 0) for d in documents]
    with_test = [document_split(d, 0.1, 0, test_fraction=0.2) for d in documents]
    for before, after in zip(without, with_test, strict=True):
        assert (before == VALIDATION) == (after == VALIDATION)
        assert after != TEST or before == TRAIN
    assert 0.15 < with_test.count(TEST) / len(documents) < 0.25
    assert document_split("x", 0.0, 0, test_fraction=0.0) == TRAIN


def test_the_wikipedia_dump_prepares_into_three_splits(tmp_path, tokenizer_dir, capsys):
    """The real dump in gensim's test data, through the CLI: page counts and a test split."""
    assert expand_inputs([WIKIPEDIA_CORPUS_NAME]) == [WIKIPEDIA_CORPUS_NAME]
    output = tmp_path / "wiki"
    argv = ["--input", WIKIPEDIA_CORPUS_NAME, "--tokenizer", str(tokenizer_dir)]
    argv += ["--output", str(output), "--seq-length", "128", "--no-progress", "-q"]
    argv += ["--val-fraction", "0.1", "--test-fraction", "0.1"]
    assert prepare_data_main(argv) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    (record,) = manifest["inputs"]
    assert record["path"] == WIKIPEDIA_CORPUS_NAME and record["format"] == "mediawiki"
    assert record["documents"] == 106
    assert record["skipped"]["redirects"] == 99
    assert record["skipped"]["other_namespaces"] == 1
    assert record["skipped"]["empty_documents"] == 0
    assert manifest["options"]["test_fraction"] == 0.1
    splits = manifest["splits"]
    assert set(splits) == {TRAIN, VALIDATION, TEST}
    assert sum(split["documents"] for split in splits.values()) == 106
    assert all(split["sequences"] > 0 for split in splits.values())
    assert sorted(p.name for p in output.glob("test-*.tar")) == [
        s["file"] for s in splits[TEST]["shards"]
    ]
    assert json.loads(capsys.readouterr().out)["splits"][TEST]["documents"] > 0
