"""Workspace storage: one SQLite database in WAL mode plus content-addressed blobs.

Every module that persists something goes through `Store`: runs (compile, benchmark, verify,
profile records), the content cache, jobs, and the audit chain. A writer and a reviewer
process may share one workspace, so every write is one short transaction with a busy timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import BadInput

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
  sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, media_type TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, role TEXT NOT NULL, candidate_path TEXT,
  candidate_hash TEXT, status TEXT NOT NULL, headline TEXT NOT NULL, device TEXT,
  created REAL NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_candidate ON runs(candidate_hash, kind, created);
CREATE TABLE IF NOT EXISTS cache (
  key TEXT PRIMARY KEY, kind TEXT NOT NULL, run_id TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, role TEXT NOT NULL, state TEXT NOT NULL,
  created REAL NOT NULL, updated REAL NOT NULL, progress TEXT NOT NULL DEFAULT '[]',
  run_id TEXT, error TEXT, owner TEXT
);
CREATE TABLE IF NOT EXISTS audit (
  seq INTEGER PRIMARY KEY, ts REAL NOT NULL, role TEXT NOT NULL, session TEXT NOT NULL,
  tool TEXT NOT NULL, args_digest TEXT NOT NULL, outcome TEXT NOT NULL, changes TEXT NOT NULL,
  prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS candidates (
  content_hash TEXT PRIMARY KEY, path TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS work_files (
  path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL
);
"""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def new_id(prefix: str) -> str:
    """Unguessable id: a type prefix plus 128 random bits."""
    return f"{prefix}_{secrets.token_hex(16)}"


class Store:
    def __init__(self, kda_dir: Path):
        self.dir = Path(kda_dir)
        self.db_path = self.dir / "kda.db"
        self.blob_dir = self.dir / "blobs"

    def initialize(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        with self.connect() as db:
            # Switching a database to WAL takes an exclusive lock that the busy timeout does not
            # wait for; a workspace is in WAL from its first open, so later opens only read the mode.
            for attempt in range(50):
                try:
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 49:
                        raise
                    time.sleep(0.1)
            db.executescript(SCHEMA)
        # Added after the first release: which server process runs a job. Workspaces made before
        # it get the column on their next open; two servers opening one at once must not both add it.
        with self.transaction() as db:
            if "owner" not in {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}:
                db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads (autocommit), closed when the block ends: sqlite3's own `with`
        never closes one, and a connection closed later by the garbage collector takes the WAL's
        -wal/-shm files away at an arbitrary moment."""
        db = self._open()
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front so readers of
        the chain head inside it cannot be overtaken by another process."""
        db = self._open()
        try:
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # --- blobs -----------------------------------------------------------------------------
    def blob_path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise BadInput(f"not a blob id: {sha!r}")
        return self.blob_dir / sha[:2] / sha[2:]

    def put_blob(self, data: bytes, media_type: str = "application/octet-stream") -> str:
        sha = sha256_bytes(data)
        path = self.blob_path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO blobs(sha256, size, media_type, created) VALUES (?,?,?,?)",
                (sha, len(data), media_type, time.time()),
            )
        return sha

    def get_blob(self, sha: str) -> bytes:
        path = self.blob_path(sha)
        if not path.exists():
            raise BadInput(f"no blob {sha}")
        data = path.read_bytes()
        if sha256_bytes(data) != sha:
            raise BadInput(f"blob {sha} is corrupt (content hash differs)")
        return data

    # --- candidates --------------------------------------------------------------------------
    def put_candidate(self, content_hash: str, path: str, snapshot: bytes) -> None:
        """Record a candidate's content (its snapshot is a blob whose sha256 is the content hash)."""
        if self.put_blob(snapshot, "application/json") != content_hash:
            raise ValueError("a candidate snapshot must hash to its content hash")
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO candidates(content_hash, path, created) VALUES (?,?,?)",
                       (content_hash, path, time.time()))

    def find_candidates(self, prefix: str, limit: int = 2) -> list[dict[str, Any]]:
        """Recorded candidates whose content hash starts with `prefix` (lowercase hex)."""
        with self.connect() as db:
            rows = db.execute("SELECT content_hash, path, created FROM candidates WHERE content_hash >= ? "
                              "AND content_hash < ? ORDER BY content_hash LIMIT ?",
                              (prefix, prefix + "g", limit)).fetchall()
        return [{"content_hash": r[0], "path": r[1], "created": r[2]} for r in rows]

    # --- runs ------------------------------------------------------------------------------
    def put_run(
        self,
        kind: str,
        role: str,
        status: str,
        headline: str,
        record: dict[str, Any],
        candidate_path: str | None = None,
        candidate_hash: str | None = None,
        device: str | None = None,
        run_id: str | None = None,
    ) -> str:
        run_id = run_id or new_id("run")
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runs(id, kind, role, candidate_path, candidate_hash, status, headline, device, created, record)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (run_id, kind, role, candidate_path, candidate_hash, status, headline, device, time.time(),
                 json.dumps(record, default=str)),
            )
        return run_id

    def get_run(self, run_id: str) -> dict[str, Any]:
        with self.connect() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise BadInput(f"no run {run_id!r} in this workspace")
        out = dict(row)
        out["record"] = json.loads(out["record"])
        return out

    def list_runs(self, kind: str | None = None, candidate_hash: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        q = "SELECT id, kind, role, candidate_path, candidate_hash, status, headline, device, created FROM runs WHERE 1=1"
        params: list[Any] = []
        if kind:
            q += " AND kind = ?"
            params.append(kind)
        if candidate_hash:
            q += " AND candidate_hash = ?"
            params.append(candidate_hash)
        q += " ORDER BY created DESC LIMIT ?"
        params.append(limit)
        with self.connect() as db:
            return [dict(r) for r in db.execute(q, params)]

    # --- content cache ---------------------------------------------------------------------
    def cache_get(self, key: str) -> str | None:
        with self.connect() as db:
            row = db.execute("SELECT run_id FROM cache WHERE key = ?", (key,)).fetchone()
        return row["run_id"] if row else None

    def cache_put(self, key: str, kind: str, run_id: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO cache(key, kind, run_id, created) VALUES (?,?,?,?)",
                (key, kind, run_id, time.time()),
            )
