"""Append-only, hash-chained audit log in the workspace database.

Every tool call appends one entry: who (role, session), what (tool, a digest of the
arguments), the outcome, and which files under work/ changed since the previous entry
(path, sha256 before/after). Each entry's hash covers its fields and the previous hash; the
head (seq and hash) is also kept in `.kda/audit.head`, so a truncated tail shows too.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import Store, canonical_json, sha256_file

GENESIS = "0" * 64
PERSON = "person"  # the role of entries a person makes from the command line (kda init)


def args_digest(args: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(args).encode()).hexdigest()


def entry_hash(seq: int, ts: float, role: str, session: str, tool: str, digest: str, outcome: str,
               changes: str, prev_hash: str) -> str:
    body = canonical_json([seq, repr(ts), role, session, tool, digest, outcome, changes, prev_hash])
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class ChainReport:
    entries: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


class AuditLog:
    def __init__(self, store: Store, work_dir: Path):
        self.store = store
        self.work_dir = Path(work_dir)
        self.head_file = store.dir / "audit.head"

    # --- work/ change tracking -------------------------------------------------------------
    def _scan_work(self, db) -> list[dict[str, Any]]:
        known = {r["path"]: dict(r) for r in db.execute("SELECT * FROM work_files")}
        seen: set[str] = set()
        changes: list[dict[str, Any]] = []
        if self.work_dir.is_dir():
            for dirpath, dirnames, filenames in os.walk(self.work_dir):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                for name in sorted(filenames):
                    p = Path(dirpath) / name
                    if p.is_symlink() or not p.is_file():
                        continue
                    rel = "work/" + p.relative_to(self.work_dir).as_posix()
                    seen.add(rel)
                    st = p.stat()
                    old = known.get(rel)
                    if old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
                        continue
                    sha = sha256_file(p)
                    db.execute(
                        "INSERT OR REPLACE INTO work_files(path, sha256, size, mtime_ns) VALUES (?,?,?,?)",
                        (rel, sha, st.st_size, st.st_mtime_ns),
                    )
                    if old is None or old["sha256"] != sha:
                        changes.append({"path": rel, "before": old["sha256"] if old else None, "after": sha})
        for rel, old in known.items():
            if rel not in seen:
                db.execute("DELETE FROM work_files WHERE path = ?", (rel,))
                changes.append({"path": rel, "before": old["sha256"], "after": None})
        return changes

    # --- append ----------------------------------------------------------------------------
    def append(self, role: str, session: str, tool: str, args: dict[str, Any], outcome: str) -> dict[str, Any]:
        with self.store.transaction() as db:
            last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq = (last["seq"] + 1) if last else 1
            prev = last["hash"] if last else GENESIS
            changes = canonical_json(self._scan_work(db))
            ts = time.time()
            digest = args_digest(args)
            outcome = outcome[:500]
            h = entry_hash(seq, ts, role, session, tool, digest, outcome, changes, prev)
            db.execute(
                "INSERT INTO audit(seq, ts, role, session, tool, args_digest, outcome, changes, prev_hash, hash)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (seq, ts, role, session, tool, digest, outcome, changes, prev, h),
            )
            # Written while the write lock is held, so concurrent writers cannot reorder heads.
            tmp = self.head_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(f"{seq} {h}\n")
            os.replace(tmp, self.head_file)
        return {"seq": seq, "hash": h, "changes": json.loads(changes)}

    # --- read ------------------------------------------------------------------------------
    def entries(self, tool: str | None = None, role: str | None = None, since: float | None = None,
                offset: int = 0, limit: int = 50) -> tuple[list[dict[str, Any]], int]:
        where, params = ["1=1"], []
        if tool:
            where.append("tool = ?")
            params.append(tool)
        if role:
            where.append("role = ?")
            params.append(role)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        cond = " AND ".join(where)
        with self.store.connect() as db:
            total = db.execute(f"SELECT COUNT(*) FROM audit WHERE {cond}", params).fetchone()[0]
            rows = db.execute(
                f"SELECT * FROM audit WHERE {cond} ORDER BY seq LIMIT ? OFFSET ?", [*params, limit, offset]
            ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["changes"] = json.loads(d["changes"])
            out.append(d)
        return out, total

    def verify(self) -> ChainReport:
        """Recompute the chain: edited, deleted, inserted or reordered rows and a cut tail all show."""
        rep = ChainReport()
        prev = GENESIS
        expected_seq = 1
        with self.store.connect() as db:
            rows = db.execute("SELECT * FROM audit ORDER BY rowid").fetchall()
        for r in rows:
            rep.entries += 1
            if r["seq"] != expected_seq:
                rep.problems.append(f"entry order broken at seq {r['seq']}: expected seq {expected_seq} (entry deleted, inserted or reordered)")
                expected_seq = r["seq"]
            if r["prev_hash"] != prev:
                rep.problems.append(f"entry seq {r['seq']}: prev_hash does not match the previous entry's hash (chain broken)")
            h = entry_hash(r["seq"], r["ts"], r["role"], r["session"], r["tool"], r["args_digest"],
                           r["outcome"], r["changes"], r["prev_hash"])
            if h != r["hash"]:
                rep.problems.append(f"entry seq {r['seq']}: contents do not match its hash (entry edited)")
            prev = r["hash"]
            expected_seq += 1
        rep.head_seq = rows[-1]["seq"] if rows else 0
        rep.head_hash = prev
        try:
            head_seq_s, head_hash = self.head_file.read_text().split()
            head_seq = int(head_seq_s)
        except (OSError, ValueError):
            if rows:
                rep.problems.append("audit head file .kda/audit.head is missing or unreadable")
            return rep
        if head_seq != rep.head_seq or head_hash != rep.head_hash:
            rep.problems.append(
                f"chain head is seq {rep.head_seq} but .kda/audit.head records seq {head_seq}: "
                + ("entries were cut from the tail" if head_seq > rep.head_seq else "head does not match the last entry")
            )
        return rep
