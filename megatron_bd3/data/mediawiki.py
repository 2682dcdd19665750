"""MediaWiki XML exports (Wikipedia dumps): pages streamed out of the XML, articles as plain text.

Reading: the export is parsed as a stream (`xml.etree.ElementTree.iterparse`), plain or
bz2-compressed (recognised by its magic bytes, not its name), one `Page` per `<page>` element,
whatever the export schema version (the XML namespace of the tags is ignored). A page's text is
that of its last `<revision>` (the only one in a pages-articles dump; the newest in a history
dump). Memory stays flat: each page is dropped from the tree once read.

Text: `article_text` turns wikitext into plain text with mwparserfromhell's `strip_code`, after
removing what is not prose: `<ref>` footnotes, tables, and links into the File / Image / Media /
Category namespaces (thumbnails with their captions, and the category list at the end of an
article). Templates (infoboxes, citation templates, navigation boxes), `<math>`, comments and
magic words are dropped by `strip_code` itself; links keep their visible text, bold and italics
their words. Section headings stay, as a line of their own. The article title is *not* added: the
lead sentence of an article already names its subject in bold, and a title line would turn an
article with no text into a non-empty document. Whitespace is collapsed within lines, lines are
stripped, and paragraphs (and list items, headings) stay separated: lines of a paragraph by "\\n",
paragraphs by one blank line.

The embedded Wikipedia corpus: gensim's wheel carries a shortened English Wikipedia dump in its
test data (`WIKIPEDIA_DUMP_FILE`, 206 pages of April 2016: 106 articles, 99 redirects and one
project-namespace page; 1.7 MB compressed, 0.45M words of plain text). Like the default corpus
(corpus.py) it is located without importing gensim; the data tools accept the name `wikipedia`.
"""

from __future__ import annotations

import bz2
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

WIKIPEDIA_CORPUS_NAME = "wikipedia"
"""The name the data tools accept in place of an input path (`--input wikipedia`)."""

WIKIPEDIA_DUMP_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_DUMP_RELATIVE_PATH = ("test", "test_data", WIKIPEDIA_DUMP_FILE)

MAIN_NAMESPACE = 0
"""Articles live in namespace 0; talk, user, project, template, ... pages do not."""

_DROPPED_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
"""Link prefixes whose links are not prose (English wiki names; a leading ':' makes a link to the
namespace visible again, and such links are kept)."""

_DROPPED_TAGS = frozenset({"ref", "references", "table"})
"""Footnotes and tables (wiki `{| ... |}` tables parse as a `table` tag); mwparserfromhell's own
invisible tags (`math`, `gallery`, ...) are dropped by `strip_code`."""

_BZ2_MAGIC = b"BZh"


class MediaWikiError(ValueError):
    """A MediaWiki export that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Page:
    """One `<page>` of an export."""

    title: str
    namespace: int
    is_redirect: bool
    text: str


def is_mediawiki_path(path: str) -> bool:
    """True for `.xml` and `.xml.bz2` names, and for the `.bz2` chunks of a Wikipedia dump, whose
    names carry `.xml` before a page range (`enwiki-...-pages-articles1.xml-p1p41242.bz2`)."""
    name = Path(path).name.lower()
    return name.endswith((".xml", ".xml.bz2")) or (name.endswith(".bz2") and ".xml-" in name)


def wikipedia_dump_path() -> Path:
    """Path of the shortened Wikipedia dump inside the installed gensim package."""
    from megatron_bd3.data.corpus import gensim_test_data

    return gensim_test_data(_DUMP_RELATIVE_PATH, f"'{WIKIPEDIA_CORPUS_NAME}' corpus")


# ------------------------------------------------------------------ reading pages
def _local_name(tag: str) -> str:
    """`{http://www.mediawiki.org/xml/export-0.10/}page` -> `page`."""
    return tag.rpartition("}")[2]


def _page(element: ElementTree.Element, path: str) -> Page:
    title, namespace, is_redirect, text = "", MAIN_NAMESPACE, False, ""
    for child in element:
        name = _local_name(child.tag)
        if name == "title":
            title = child.text or ""
        elif name == "ns":
            try:
                namespace = int((child.text or "").strip())
            except ValueError:
                raise MediaWikiError(
                    f"{path}: page {title!r} has namespace {child.text!r}, expected an integer"
                ) from None
        elif name == "redirect":
            is_redirect = True
        elif name == "revision":  # the last revision wins (the newest, in a history dump)
            text = next((node.text or "" for node in child if _local_name(node.tag) == "text"), "")
    # Exports before schema 0.5 have no <redirect> element; the text still says so.
    is_redirect = is_redirect or text.lstrip()[:9].upper() == "#REDIRECT"
    return Page(title=title, namespace=namespace, is_redirect=is_redirect, text=text)


def iter_pages(path: str) -> Iterator[Page]:
    """The pages of a MediaWiki XML export (plain or bz2), in file order.

    Raises MediaWikiError naming the file for a file that is not a MediaWiki export, a truncated
    or corrupt bz2 stream, and malformed or truncated XML.
    """
    pages = 0
    with open(path, "rb") as raw:
        is_bz2 = raw.read(len(_BZ2_MAGIC)) == _BZ2_MAGIC
        raw.seek(0)
        handle: BinaryIO = bz2.BZ2File(raw) if is_bz2 else raw  # type: ignore[assignment]
        root: ElementTree.Element | None = None
        try:
            for event, element in ElementTree.iterparse(handle, events=("start", "end")):
                if root is None:
                    root = element
                    if _local_name(root.tag) != "mediawiki":
                        raise MediaWikiError(
                            f"{path}: not a MediaWiki XML export (the root element is "
                            f"<{_local_name(root.tag)}>, expected <mediawiki>)"
                        )
                elif event == "end" and _local_name(element.tag) == "page":
                    page = _page(element, path)
                    root.clear()  # the page is read: keep memory flat on a full dump
                    pages += 1
                    yield page
        except (EOFError, OSError) as exc:
            raise MediaWikiError(
                f"{path}: the bz2 stream is truncated or corrupt after {pages} complete pages "
                f"({exc})"
            ) from None
        except ElementTree.ParseError as exc:
            raise MediaWikiError(
                f"{path}: malformed or truncated XML after {pages} complete pages ({exc})"
            ) from None


# ------------------------------------------------------------------ wikitext -> text
def _is_prose(node) -> bool:
    from mwparserfromhell.nodes import Tag, Wikilink

    if isinstance(node, Tag):
        return str(node.tag).strip().lower() not in _DROPPED_TAGS
    if isinstance(node, Wikilink):
        prefix, colon, _ = str(node.title).strip().partition(":")
        return not (colon and prefix.strip().lower() in _DROPPED_LINK_NAMESPACES)
    return True


def _keep_prose(code) -> None:
    """Drop the non-prose nodes of `code`, at any depth, in one walk (`Wikicode.remove` searches
    the whole tree per node: quadratic on an article with hundreds of references)."""
    from mwparserfromhell.nodes import ExternalLink, Heading, Tag, Wikilink

    kept = []
    for node in code.nodes:
        if not _is_prose(node):
            continue
        if isinstance(node, Tag):
            children = [node.contents]
        elif isinstance(node, Wikilink):
            children = [node.text]
        elif isinstance(node, Heading | ExternalLink):
            children = [node.title]
        else:  # templates, comments, ... are dropped whole by strip_code
            children = []
        for child in children:
            if child is not None:
                _keep_prose(child)
        kept.append(node)
    code.nodes = kept


def article_text(wikitext: str) -> str:
    """Plain text of an article's wikitext (see the module docstring for what is kept)."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    _keep_prose(code)
    text = code.strip_code(normalize=True, collapse=True)

    paragraphs: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        line = " ".join(line.split())  # also turns &nbsp; (U+00A0) into a plain space
        if line:
            lines.append(line)
        elif lines:
            paragraphs.append("\n".join(lines))
            lines = []
    if lines:
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)
