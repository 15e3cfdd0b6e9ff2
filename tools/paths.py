"""Workspace path rules: every path an agent names is resolved and checked against the root."""

from __future__ import annotations

import fnmatch
from pathlib import Path, PurePosixPath

from .errors import PathRefused


def resolve_inside(root: Path, rel: str | Path) -> Path:
    """Resolve `rel` against `root` (following symlinks) and refuse anything that escapes it."""
    root = Path(root).resolve()
    rel_s = str(rel).strip()
    if not rel_s:
        raise PathRefused("empty path")
    if "\x00" in rel_s:
        raise PathRefused("path contains a NUL byte")
    candidate = Path(rel_s)
    target = (candidate if candidate.is_absolute() else root / candidate).resolve()
    try:
        target.relative_to(root)
    except ValueError:
        raise PathRefused(f"path {rel_s!r} resolves outside the workspace") from None
    return target


def relative(root: Path, path: Path) -> str:
    """Workspace-relative POSIX form of an absolute path inside the root."""
    return PurePosixPath(Path(path).resolve().relative_to(Path(root).resolve())).as_posix()


def matches(rel_posix: str, patterns: list[str]) -> bool:
    """True if a workspace-relative path matches any glob (`dir/**` also matches `dir` itself)."""
    for pat in patterns:
        if fnmatch.fnmatchcase(rel_posix, pat):
            return True
        if pat.endswith("/**") and (rel_posix == pat[:-3] or rel_posix.startswith(pat[:-2])):
            return True
    return False
