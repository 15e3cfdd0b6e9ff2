"""`kda wiki ingest PATH`: index a user's own sources beside the pages.

Documents (.md .markdown .rst .txt) are chunked by heading, then by paragraph. Code (.cu .cuh
.h .hpp .cpp .cc .cxx .py) is chunked by function and class with the comments just above each
definition: Python through `ast`, C++/CUDA through a brace-matching scanner that skips strings,
comments and preprocessor lines. Whatever lies between definitions (includes, macros,
constants) is kept as chunks too, so reading an ingested file back loses nothing.

Ingest is incremental by content hash: unchanged files are skipped, changed files are
re-chunked and re-embedded, files gone from the tree are dropped.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kda.tools.errors import BadInput

from .index import FileUpdate, WikiIndex
from .schema import PAGES_SOURCE, Chunk, markdown_sections, split_long, split_front_matter

DOC_SUFFIXES = {".md", ".markdown", ".rst", ".txt"}
CPP_SUFFIXES = {".cu", ".cuh", ".h", ".hpp", ".cpp", ".cc", ".cxx", ".hh", ".inl"}
PY_SUFFIXES = {".py"}
SUFFIXES = DOC_SUFFIXES | CPP_SUFFIXES | PY_SUFFIXES
SKIP_DIRS = {"__pycache__", "node_modules", "build", "dist", "site-packages", ".git", ".hg", ".svn", ".tox",
             ".venv", "venv", ".mypy_cache", ".pytest_cache"}
MAX_FILE_BYTES = 1_000_000  # larger files are generated tables, not knowledge
CODE_CHUNK_LINES = 120  # a longer definition is split so each piece keeps a readable size
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass
class IngestReport:
    name: str
    root: str
    files_seen: int
    files_unchanged: int
    files_updated: int
    files_removed: int
    chunks_added: int
    chunks_removed: int
    skipped: list[str]


# --- finding files ------------------------------------------------------------------------------
def find_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Text files under `root` (or `root` itself) by POSIX path relative to the root."""
    skipped: list[str] = []
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise BadInput(f"{root} is not a file kind ingest reads ({', '.join(sorted(SUFFIXES))})")
        return {root.name: root}, skipped
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if p.suffix.lower() not in SUFFIXES or fn.startswith("."):
                continue
            if p.is_symlink() and not p.resolve().is_relative_to(root):
                skipped.append(f"{p.relative_to(root).as_posix()} (link out of the tree)")
                continue
            found[p.relative_to(root).as_posix()] = p
    return found, skipped


def read_text(p: Path) -> str | None:
    """The file as text, or None when it is empty, binary or too large."""
    try:
        data = p.read_bytes()
    except OSError:
        return None
    if not data.strip() or len(data) > MAX_FILE_BYTES or b"\x00" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


# --- chunking -----------------------------------------------------------------------------------
def _doc_sections(text: str, suffix: str) -> list[tuple[tuple[str, ...], str]]:
    if suffix in (".md", ".markdown"):
        if text.startswith("---"):
            try:
                _, text = split_front_matter(text, "")
            except BadInput:
                pass
        return markdown_sections(text)
    if suffix == ".rst":
        return rst_sections(text)
    return [((), text.strip())] if text.strip() else []


def rst_sections(text: str) -> list[tuple[tuple[str, ...], str]]:
    """reStructuredText titles are underlined (optionally overlined) with one punctuation
    character; levels follow the order in which underline styles first appear."""
    lines = text.splitlines()
    styles: list[str] = []
    stack: list[tuple[int, str]] = []
    sections: list[tuple[tuple[str, ...], list[str]]] = [((), [])]
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        under = re.fullmatch(r"([=\-~^\"'`#*+:.<>_])\1{2,}\s*", nxt)
        if line.strip() and not re.fullmatch(r"([=\-~^\"'`#*+:.<>_])\1{2,}\s*", line) and under \
                and len(nxt.strip()) >= len(line.strip()) * 0.6:
            style = nxt.strip()[0]
            if style not in styles:
                styles.append(style)
            level = styles.index(style)
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, line.strip()))
            # an overline above the title belongs to the title, not to the previous section
            prev = sections[-1][1]
            if prev and prev[-1].strip() and set(prev[-1].strip()) == {style}:
                prev.pop()
            sections.append((tuple(n for _, n in stack), []))
            i += 2
            continue
        sections[-1][1].append(line)
        i += 1
    return [(p, "\n".join(ls).strip()) for p, ls in sections if "\n".join(ls).strip()]


def _python_defs(text: str) -> list[tuple[tuple[str, ...], int, int]] | None:
    """(name path, first line, last line) of top-level functions/classes and of methods; 1-based.
    The first line reaches back over decorators and the comment block just above."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    lines = text.splitlines()

    def start_of(node: ast.AST) -> int:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        while first > 1 and lines[first - 2].lstrip().startswith("#"):
            first -= 1
        return first

    out: list[tuple[tuple[str, ...], int, int]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(((node.name,), start_of(node), node.end_lineno or node.lineno))
        elif isinstance(node, ast.ClassDef):
            end = node.end_lineno or node.lineno
            methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            if end - node.lineno + 1 <= CODE_CHUNK_LINES or not methods:
                out.append(((f"class {node.name}",), start_of(node), end))
                continue
            # a large class: its header (docstring, attributes) and each method separately
            head_end = start_of(methods[0]) - 1
            out.append(((f"class {node.name}",), start_of(node), head_end))
            for m in methods:
                out.append(((f"class {node.name}", m.name), start_of(m), m.end_lineno or m.lineno))
    return out


def cpp_defs(text: str) -> list[tuple[tuple[str, ...], int, int]]:
    """(name path, first line, last line) of brace-delimited definitions; 1-based.

    A scanner, not a parser: it tracks comments, string/char literals and preprocessor lines,
    matches braces, and descends into `namespace` and `extern "C"` blocks (and into large
    classes). A definition starts after the previous `;`, `}` or preprocessor line, so the
    comments just above it come with it.
    """
    n = len(text)
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line_of(pos: int) -> int:
        lo, hi = 0, len(line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if line_starts[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1

    # code[i] is text[i] with comments, literals and preprocessor lines blanked out
    code = list(text)
    i = 0
    at_line_start = True
    while i < n:
        c = text[i]
        if at_line_start and c == "#":
            j = i
            while j < n:  # a preprocessor line, with backslash continuations
                if text[j] == "\n" and text[j - 1] != "\\":
                    break
                j += 1
            for k in range(i, j):
                if code[k] != "\n":
                    code[k] = " "
            if j > i and code[j - 1] == " ":
                code[j - 1] = ";"  # a directive ends a statement: the next definition starts after it
            i = j
            continue
        if c == "/" and i + 1 < n and text[i + 1] == "/":
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                code[k] = " "
            i = j
            continue
        if c == "/" and i + 1 < n and text[i + 1] == "*":
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if code[k] != "\n":
                    code[k] = " "
            i = j
            continue
        if c == 'R' and text.startswith('R"', i):
            m = re.match(r'R"([^()\\ ]{0,16})\(', text[i:])
            if m:
                end = text.find(")" + m.group(1) + '"', i)
                j = n if end < 0 else end + len(m.group(1)) + 2
                for k in range(i, j):
                    if code[k] != "\n":
                        code[k] = " "
                i = j
                continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            for k in range(i, min(j + 1, n)):
                if code[k] != "\n":
                    code[k] = " "
            i = j + 1
            continue
        if c == "\n":
            at_line_start = True
        elif not c.isspace():
            at_line_start = False
        i += 1
    code_s = "".join(code)

    out: list[tuple[tuple[str, ...], int, int]] = []

    def scan(lo: int, hi: int, prefix: tuple[str, ...]) -> None:
        stmt_start = lo
        i = lo
        depth_paren = 0
        while i < hi:
            c = code_s[i]
            if c in "([":
                depth_paren += 1
            elif c in ")]":
                depth_paren = max(0, depth_paren - 1)
            elif c == ";" and depth_paren == 0:
                stmt_start = i + 1
            elif c == "}":
                stmt_start = i + 1
            elif c == "{" and depth_paren == 0:
                close = _match_brace(code_s, i, hi)
                header = code_s[stmt_start:i]
                end = close + 1
                m = re.match(r"\s*;", code_s[end:end + 40])
                if m:
                    end += m.end()
                start = _skip_blank(text, stmt_start, i)
                kind, name = _classify(header)
                if kind in ("namespace", "extern"):
                    scan(i + 1, close, prefix + ((name,) if name else ()))
                elif kind == "class" and line_of(close) - line_of(start) + 1 > CODE_CHUNK_LINES:
                    out.append(((*prefix, name), line_of(start), line_of(i)))
                    scan(i + 1, close, prefix + (name,))
                else:
                    out.append(((*prefix, name), line_of(start), line_of(max(start, end - 1))))
                i = end
                stmt_start = end
                continue
            i += 1

    scan(0, n, ())
    return out


def _match_brace(code: str, open_pos: int, hi: int) -> int:
    depth = 0
    for j in range(open_pos, hi):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return hi - 1  # unbalanced (a macro-heavy file): the rest is one definition


def _skip_blank(text: str, lo: int, hi: int) -> int:
    while lo < hi and text[lo] in " \t\r\n":
        lo += 1
    return lo


_CLASS_RE = re.compile(r"\b(class|struct|union|enum(?:\s+class|\s+struct)?)\s+(?:\[\[[^\]]*\]\]\s*)?(?:alignas\([^)]*\)\s*)?"
                       r"([A-Za-z_]\w*)")


def _classify(header: str) -> tuple[str, str]:
    h = " ".join(header.split())
    m = re.search(r"(?:^|\s)(?:inline\s+)?namespace\s*([\w:]*)\s*$", h)  # macros may precede it
    if m:
        return "namespace", f"namespace {m.group(1)}" if m.group(1) else "namespace"
    if re.match(r'^extern\s*$', h) or h.startswith('extern') and h.rstrip().endswith(('"C"', "'C'")) or h == "extern":
        return "extern", ""
    paren = h.find("(")
    m = _CLASS_RE.search(h)
    if m and (paren < 0 or m.start() < paren) and not re.search(r"\)\s*(const\s*)?$", h):
        return "class", f"{m.group(1).split()[0]} {m.group(2)}"
    if paren >= 0:
        m = re.search(r"((?:[A-Za-z_]\w*\s*::\s*)*(?:operator\s*[^\s(]+|~?[A-Za-z_]\w*))\s*(?:<[^()]*>)?\s*$", h[:paren])
        if m:
            return "function", " ".join(m.group(1).split())
    words = re.findall(r"[A-Za-z_]\w*", h)
    return "block", words[-1] if words else "block"


def _line_chunks(lines: list[str], spans: list[tuple[tuple[str, ...], int, int]], top: str
                 ) -> list[tuple[tuple[str, ...], str]]:
    """Cut a file into definition chunks and the text between them ("top level")."""
    spans = sorted((s for s in spans if s[2] >= s[1]), key=lambda s: s[1])
    out: list[tuple[tuple[str, ...], str]] = []
    pos = 1
    for path, a, b in spans:
        if a < pos:  # overlapping (a class header and its first method): keep the later part
            a = pos
            if a > b:
                continue
        gap = "\n".join(lines[pos - 1:a - 1]).strip()
        if gap:
            out.extend(_pieces((top,), gap))
        out.extend(_pieces(path, "\n".join(lines[a - 1:b]).strip("\n")))
        pos = b + 1
    tail = "\n".join(lines[pos - 1:]).strip()
    if tail:
        out.extend(_pieces((top,), tail))
    return out


def _pieces(path: tuple[str, ...], text: str) -> list[tuple[tuple[str, ...], str]]:
    ls = text.splitlines()
    if len(ls) <= CODE_CHUNK_LINES:
        return [(path, text)] if text.strip() else []
    parts = [ls[i:i + CODE_CHUNK_LINES] for i in range(0, len(ls), CODE_CHUNK_LINES)]
    return [((*path, f"part {k + 1}"), "\n".join(p)) for k, p in enumerate(parts) if "\n".join(p).strip()]


def chunk_file(source: str, rel: str, text: str) -> list[Chunk]:
    suffix = Path(rel).suffix.lower()
    sections: list[tuple[tuple[str, ...], str]]
    if suffix in DOC_SUFFIXES:
        kind = "doc"
        sections = []
        for path, body in _doc_sections(text, suffix):
            pieces = split_long(body)
            sections += [(path if len(pieces) == 1 else (*path, f"part {i + 1}"), p) for i, p in enumerate(pieces)]
    else:
        kind = "code"
        lines = text.splitlines()
        spans = _python_defs(text) if suffix in PY_SUFFIXES else cpp_defs(text)
        if spans is None:  # Python that does not parse: paragraphs
            spans = []
        sections = _line_chunks(lines, spans, "(top level)")
    title = f"{source}: {rel}"
    return [Chunk(page_id=f"{source}:{rel}", title=title, heading_path=path, text=body, source=source, kind=kind,
                  path=rel, ordinal=i) for i, (path, body) in enumerate(sections) if body.strip()]


# --- the command ----------------------------------------------------------------------------------
def check_name(name: str) -> str:
    name = name.strip()
    if name == PAGES_SOURCE:
        raise BadInput(f"{PAGES_SOURCE!r} is the name of the built-in pages; choose another --name")
    if not _NAME_RE.match(name):
        raise BadInput(f"source name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a "
                       "letter or digit)")
    return name


def ingest_path(index: WikiIndex, path: Path | str, name: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Index (or bring up to date) the sources under `path` as source `name`."""
    root = Path(path).expanduser()
    if not root.exists():
        raise BadInput(f"ingest path {path} does not exist")
    root = root.resolve()
    name = check_name(name or root.stem)
    known_root = index.source_root(name)
    if known_root is not None and Path(known_root) != root:
        raise BadInput(f"source {name!r} is already indexed from {known_root}; remove it first "
                       f"(`kda wiki remove {name}`) or choose another --name")
    files, skipped = find_files(root)
    known = index.file_hashes(name)
    updates: list[FileUpdate] = []
    unchanged = 0
    present: set[str] = set()
    for rel, p in files.items():
        text = read_text(p)
        if text is None:
            skipped.append(f"{rel} (empty, binary or over {MAX_FILE_BYTES} bytes)")
            continue
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        present.add(rel)
        if known.get(rel) == digest:
            unchanged += 1
            continue
        chunks = chunk_file(name, rel, text)
        if not chunks:
            skipped.append(f"{rel} (no text)")
            present.discard(rel)
            continue
        updates.append(FileUpdate(rel, digest, chunks))
    if not present:
        raise BadInput(f"{path} holds no text to index (looked for {', '.join(sorted(SUFFIXES))}"
                       f"{'; skipped ' + str(len(skipped)) + ' file(s)' if skipped else ''}); nothing was indexed")
    removed = [rel for rel in known if rel not in present]
    stats = {"chunks_added": 0, "chunks_removed": 0}
    if updates or removed or known_root is None:
        stats = index.apply(name, str(root), updates, removed, progress)
    return IngestReport(name=name, root=str(root), files_seen=len(files), files_unchanged=unchanged,
                        files_updated=len(updates), files_removed=len(removed), chunks_added=stats["chunks_added"],
                        chunks_removed=stats["chunks_removed"], skipped=skipped)
