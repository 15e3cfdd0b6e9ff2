"""KernelWiki pages: the front-matter model, loading, and chunking by heading.

A page is `pages/<id>.md`: YAML front matter (validated by `PageMeta`) and a markdown body.
Search works on chunks: one per heading section (long sections split by paragraph), each
carrying the page id, title, heading path, text and the filterable metadata.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kda.tools.errors import BadInput
from kda.tools.symptoms import SYMPTOMS

from . import PAGES_DIR

PAGE_TYPES = ("hardware", "technique", "pattern", "kernel", "language", "playbook", "migration")
ARCHITECTURES = ("sm80", "sm89", "sm90", "sm100", "sm120")
PAGES_SOURCE = "kernelwiki"  # the source name of the built-in pages

# MiniLM reads at most 256 word pieces; a section longer than this is split by paragraph so
# that its tail is still embedded, not silently truncated.
MAX_CHUNK_WORDS = 220

_ID_RE = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"


class PageMeta(BaseModel):
    """The front matter every page must carry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID_RE, description="kebab-case id, equal to the file name")
    title: str = Field(min_length=3)
    type: Literal["hardware", "technique", "pattern", "kernel", "language", "playbook", "migration"]
    architectures: list[Literal["sm80", "sm89", "sm90", "sm100", "sm120"]] = Field(min_length=1)
    tags: list[str] = Field(min_length=1)
    symptoms: list[str] = Field(default_factory=list)
    techniques: list[str] = Field(default_factory=list)
    confidence: Literal["verified", "source-reported", "inferred"]
    sources: list[str] = Field(min_length=1)
    related: list[str] = Field(default_factory=list)

    @field_validator("symptoms")
    @classmethod
    def _known_symptoms(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - SYMPTOMS)
        if unknown:
            raise ValueError(f"unknown symptom(s) {unknown}; allowed: the names in tools/symptoms.py")
        return v

    @field_validator("tags", "techniques")
    @classmethod
    def _nonempty_strings(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"empty entries {bad}")
        return [t.strip() for t in v]

    @field_validator("related")
    @classmethod
    def _related_ids(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if not re.match(_ID_RE, r)]
        if bad:
            raise ValueError(f"related ids must be kebab-case page ids: {bad}")
        return v


@dataclass(frozen=True)
class Page:
    meta: PageMeta
    body: str  # markdown after the front matter
    path: Path
    content_hash: str  # sha256 of the whole file

    @property
    def id(self) -> str:
        return self.meta.id


@dataclass(frozen=True)
class Chunk:
    """One searchable piece: a page section, a document section or a code definition."""

    page_id: str  # page id, or "<source>:<relative path>" for an ingested file
    title: str
    heading_path: tuple[str, ...]  # headings below the title; () is the page's introduction
    text: str
    source: str  # "kernelwiki" or the name a user gave `kda wiki ingest`
    kind: str  # page | doc | code
    path: str  # file path relative to the source root
    ordinal: int  # position within its file
    type: str = ""
    architectures: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    symptoms: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def heading(self) -> str:
        return " > ".join(self.heading_path) if self.heading_path else "(introduction)"

    def embed_text(self) -> str:
        """What the dense model reads: the title and headings give a generic section
        ("Pitfalls") the subject it belongs to."""
        head = " > ".join((self.title, *self.heading_path))
        return f"{head}\n{self.text}"

    def keyword_text(self) -> str:
        """What BM25 reads: the title and headings (twice, as a field boost), the tags and
        symptom names, and the text."""
        head = " ".join((self.title, *self.heading_path))
        meta = " ".join((*self.tags, *self.symptoms))
        return f"{head}\n{head}\n{meta}\n{self.text}"


# --- loading -----------------------------------------------------------------------------------
def split_front_matter(text: str, where: str) -> tuple[dict, str]:
    if not text.startswith("---"):
        raise BadInput(f"{where}: no YAML front matter (the file must start with a '---' line)")
    m = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.S)
    if not m:
        raise BadInput(f"{where}: front matter is not closed by a '---' line")
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        raise BadInput(f"{where}: front matter is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{where}: front matter must be a mapping of fields")
    return data, text[m.end():]


def parse_page(path: Path) -> Page:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path.name}: not UTF-8 ({e})") from None
    data, body = split_front_matter(text, path.name)
    try:
        meta = PageMeta.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'front matter'}: {err['msg']}"
                             for err in e.errors())
        raise BadInput(f"{path.name}: invalid front matter: {problems}") from None
    if meta.id != path.stem:
        raise BadInput(f"{path.name}: id {meta.id!r} differs from the file name {path.stem!r}")
    return Page(meta=meta, body=body, path=path, content_hash=hashlib.sha256(raw).hexdigest())


def load_pages(pages_dir: Path | None = None, *, check_related: bool = True) -> list[Page]:
    """Every page of `pages_dir` (default: the shipped pages), validated, sorted by id."""
    pages_dir = Path(pages_dir or PAGES_DIR)
    if not pages_dir.is_dir():
        raise BadInput(f"wiki pages folder {pages_dir} does not exist")
    pages = [parse_page(p) for p in sorted(pages_dir.glob("*.md"))]
    if check_related:
        ids = {p.id for p in pages}
        for p in pages:
            missing = sorted(set(p.meta.related) - ids)
            if missing:
                raise BadInput(f"{p.path.name}: related page(s) {missing} do not exist")
    return pages


# --- chunking ----------------------------------------------------------------------------------
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")


def markdown_sections(body: str, max_level: int = 3) -> list[tuple[tuple[str, ...], str]]:
    """Split markdown into (heading path, text) at headings of level <= max_level.

    Headings inside fenced code blocks (a `# comment` in a Python snippet) are not headings.
    Sections with no text of their own are dropped: their heading lives on in the path of the
    sections below them.
    """
    stack: list[tuple[int, str]] = []
    sections: list[tuple[tuple[str, ...], list[str]]] = [((), [])]
    in_fence = None
    for line in body.splitlines():
        fm = _FENCE.match(line)
        if fm:
            if in_fence is None:
                in_fence = fm.group(1)
            elif fm.group(1) == in_fence:
                in_fence = None
        hm = _HEADING.match(line) if in_fence is None else None
        if hm and len(hm.group(1)) <= max_level:
            level, name = len(hm.group(1)), hm.group(2).strip()
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, name))
            sections.append((tuple(n for _, n in stack), []))
        else:
            sections[-1][1].append(line)
    out = []
    for path, lines in sections:
        text = "\n".join(lines).strip()
        if text:
            out.append((path, text))
    return out


def split_long(text: str, max_words: int = MAX_CHUNK_WORDS) -> list[str]:
    """Pack paragraphs (blank-line separated, code fences kept whole) into pieces of at most
    `max_words` words; a single longer paragraph stays one piece."""
    if len(text.split()) <= max_words:
        return [text]
    blocks: list[str] = []
    cur: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if cur:
                blocks.append("\n".join(cur))
                cur = []
        else:
            cur.append(line)
    if cur:
        blocks.append("\n".join(cur))
    pieces: list[str] = []
    acc: list[str] = []
    n = 0
    for b in blocks:
        w = len(b.split())
        if acc and n + w > max_words:
            pieces.append("\n\n".join(acc))
            acc, n = [], 0
        acc.append(b)
        n += w
    if acc:
        pieces.append("\n\n".join(acc))
    return pieces


def page_sections(page: Page) -> list[tuple[tuple[str, ...], str]]:
    """(heading path, text) of a page's sections; the H1 repeats the title, so it is not a level."""
    h1 = _first_h1(page.body)
    return [(path[1:] if path and path[0] == h1 else path, text) for path, text in markdown_sections(page.body)]


def chunk_page(page: Page) -> list[Chunk]:
    m = page.meta
    chunks: list[Chunk] = []
    for path, text in page_sections(page):
        pieces = split_long(text)
        for i, piece in enumerate(pieces):
            hp = path if len(pieces) == 1 else (*path, f"part {i + 1}") if path else (f"part {i + 1}",)
            chunks.append(Chunk(
                page_id=m.id, title=m.title, heading_path=hp, text=piece, source=PAGES_SOURCE, kind="page",
                path=page.path.name, ordinal=len(chunks), type=m.type, architectures=tuple(m.architectures),
                tags=tuple(t.lower() for t in m.tags), symptoms=tuple(m.symptoms), sources=tuple(m.sources),
            ))
    return chunks


def _first_h1(body: str) -> str | None:
    for line in body.splitlines():
        hm = _HEADING.match(line)
        if hm and len(hm.group(1)) == 1:
            return hm.group(2).strip()
        if line.strip() and not hm:
            return None  # the H1, when there is one, comes first
    return None
