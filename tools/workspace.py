"""A workspace: one kernel task, its immutable lock, the writer's work/ area and the store.

Layout:
  task/definition.json  task/workloads.jsonl  task/baseline/  task/lock.json
  policy.toml           work/                 .kda/ (kda.db, blobs/, logs/, audit.head)
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from .audit import AuditLog
from .errors import BadInput, LockMismatch, PathRefused
from .paths import matches, relative, resolve_inside
from .policy import Policy, load_policy
from .store import Store, sha256_file

LOCK_VERSION = 1


def lock_targets(root: Path) -> list[Path]:
    """Files the lock pins: everything under task/ except the lock itself, and policy.toml."""
    task = root / "task"
    files = [p for p in sorted(task.rglob("*")) if p.is_file() and p.name != "lock.json"] if task.is_dir() else []
    return [*files, root / "policy.toml"]


def compute_lock(root: Path) -> dict[str, Any]:
    return {
        "version": LOCK_VERSION,
        "files": {relative(root, p): sha256_file(p) for p in lock_targets(root)},
    }


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.task_dir = self.root / "task"
        self.work_dir = self.root / "work"
        self.kda_dir = self.root / ".kda"
        self.policy_path = self.root / "policy.toml"
        self.lock_path = self.task_dir / "lock.json"

    @classmethod
    def open(cls, root: Path | str) -> "Workspace":
        ws = cls(Path(root))
        if not ws.root.is_dir():
            raise BadInput(f"workspace {root} does not exist; create it with `kda init {root} --task NAME`")
        missing = [n for n in ("task/definition.json", "task/workloads.jsonl", "task/lock.json", "policy.toml")
                   if not (ws.root / n).is_file()]
        if missing:
            raise BadInput(f"{ws.root} is not a kda workspace (missing {', '.join(missing)}); run `kda init`")
        ws.work_dir.mkdir(exist_ok=True)
        _ = ws.policy  # parse now: a bad policy stops start-up, naming the key and the file
        ws.store.initialize()
        return ws

    @cached_property
    def policy(self) -> Policy:
        return load_policy(self.policy_path)

    @cached_property
    def store(self) -> Store:
        return Store(self.kda_dir)

    @cached_property
    def audit(self) -> AuditLog:
        return AuditLog(self.store, self.work_dir)

    # --- the lock --------------------------------------------------------------------------
    def check_lock(self) -> None:
        """Raise LockMismatch naming every changed, added or removed pinned file."""
        try:
            lock = json.loads(self.lock_path.read_text())
            pinned: dict[str, str] = lock["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise LockMismatch([("task/lock.json", "unreadable or malformed")]) from None
        current = {relative(self.root, p): p for p in lock_targets(self.root)}
        changes: list[tuple[str, str]] = []
        for rel, sha in sorted(pinned.items()):
            p = current.get(rel)
            if p is None or not p.is_file():
                changes.append((rel, "deleted"))
            elif sha256_file(p) != sha:
                changes.append((rel, "modified"))
        for rel in sorted(set(current) - set(pinned)):
            if current[rel].is_file():
                changes.append((rel, "added"))
        if changes:
            raise LockMismatch(changes)

    # --- task data (validated at init; pinned by the lock) ----------------------------------
    def definition(self) -> dict[str, Any]:
        return json.loads((self.task_dir / "definition.json").read_text())

    def workloads(self) -> list[dict[str, Any]]:
        lines = (self.task_dir / "workloads.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def baseline_solution(self) -> dict[str, Any] | None:
        path = self.task_dir / "baseline" / "solution.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # --- paths agents name -----------------------------------------------------------------
    def resolve(self, rel: str, *, for_write: bool = False) -> Path:
        path = resolve_inside(self.root, rel)
        rel_posix = relative(self.root, path) if path != self.root else "."
        if for_write:
            pol = self.policy.paths
            if matches(rel_posix, pol.protected) or not matches(rel_posix, pol.writable):
                raise PathRefused(f"path {rel!r} is protected: writes go under work/ only")
        return path

    def rel(self, path: Path) -> str:
        return relative(self.root, path)
