"""Compiled kernels (Triton's cache, torch extension builds), kept between runs of the same content.

A bench worker's home is its job directory, so Triton compiles into `<job dir>/.triton/cache`, a
C++/CUDA candidate builds into `<job dir>/build`, and both go away with the run: every run of a
candidate would compile again (about a second per Triton specialisation, half a minute for a torch
extension). After a run they are kept under
`.kda/cache/kernels/<key>`, the key naming the exact content that wrote it (the candidate's content
hash, or the baseline's); the next run of the same content gets a copy before it loads. No other
content ever reads it, so a candidate can only poison its own cache. Only regular files are kept
(a symbolic link planted in the job directory is never followed), only finished extension builds,
at most MAX_BYTES per content and the MAX_KEPT most recently kept contents.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .store import new_id
from .workspace import Workspace

JOB_CACHE = Path(".triton") / "cache"
JOB_BUILD = Path("build")  # torch extensions (sandbox/harness.py names each build by its content)
KEPT = (JOB_CACHE, JOB_BUILD)
MAX_BYTES = 256 << 20
MAX_KEPT = 64


def _kept(ws: Workspace, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return ws.kda_dir / "cache" / "kernels" / safe


def _regular_files(root: Path) -> list[tuple[Path, int]]:
    """(path, size) of the regular files under root; never a link, never torch's build `lock`
    (a build killed while holding it would make every later load wait on it)."""
    out = []
    for dirpath, _dirs, files in os.walk(root):  # os.walk does not descend into linked directories
        for name in files:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and name != "lock":
                out.append((p, st.st_size))
    return out


def _copy_files(src: Path, dst: Path, mode_dirs: int, mode_files: int, files: list[tuple[Path, int]]) -> None:
    for p, _ in files:
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target, follow_symlinks=False)
        target.chmod(mode_files)
    for d in [dst, *(p for p in dst.rglob("*") if p.is_dir() and not p.is_symlink())]:
        d.chmod(mode_dirs)


def _finished_builds(build: Path) -> list[tuple[Path, int]]:
    """Files of the extension builds that finished: `<name>/` holding `<name>.so` (a build killed
    half way is never kept)."""
    return [f for d in sorted(build.iterdir()) if d.is_dir() and not d.is_symlink() and (d / f"{d.name}.so").is_file()
            for f in _regular_files(d)]


def restore(ws: Workspace, key: str, job_dir: Path) -> int:
    """Copy what was kept for `key` (Triton's cache, torch extension builds) into the job directory;
    the number of files copied (0 when nothing was kept or it could not be read: the job then
    compiles). The job may run under its own uid: the copy is writable by it (the job directory
    is private to the job, hidden from every other one)."""
    src = _kept(ws, key)
    n = 0
    try:
        if not src.is_dir():
            return 0
        for rel in KEPT:
            if (src / rel).is_dir():
                files = _regular_files(src / rel)
                _copy_files(src / rel, job_dir / rel, 0o777, 0o666, files)
                for d in [job_dir / p for p in list(rel.parents)[:-1]]:
                    d.chmod(0o777)
                n += len(files)
    except OSError:  # a concurrent keep replaced it: what was copied is whole files, the rest compiles
        pass
    return n


def keep(ws: Workspace, key: str, job_dir: Path, builds_ok: bool = True) -> int:
    """Keep the job's Triton cache and finished extension builds (`builds_ok`: the build loaded)
    for the next run of the same content, replacing what was kept; the number of files kept (0:
    none, over MAX_BYTES, or unreadable: the job directory is the job's, and may be anything)."""
    try:
        parts: list[tuple[Path, list[tuple[Path, int]]]] = []
        for rel in KEPT:
            d = job_dir / rel
            if any((job_dir / p).is_symlink() for p in [*list(rel.parents)[:-1], rel]) or not d.is_dir():
                continue
            if rel == JOB_BUILD and not builds_ok:
                continue
            parts.append((rel, _finished_builds(d) if rel == JOB_BUILD else _regular_files(d)))
    except OSError:
        return 0
    files = [f for _, fs in parts for f in fs]
    if not files or sum(n for _, n in files) > MAX_BYTES:
        return 0
    final = _kept(ws, key)
    if _same_files(final, {(str((rel / p.relative_to(job_dir / rel))), n) for rel, fs in parts for p, n in fs}):
        final.touch()  # nothing new (the run restored it and compiled nothing): only its age changes
        return len(files)
    tmp = final.with_name(f"{final.name}.{new_id('tmp')}")
    old = final.with_name(f"{final.name}.{new_id('old')}")
    try:
        for rel, fs in parts:
            _copy_files(job_dir / rel, tmp / rel, 0o755, 0o644, fs)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except OSError:
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    _evict(final.parent)
    return len(files)


def _same_files(kept: Path, want: set[tuple[str, int]]) -> bool:
    """Whether `kept` already holds exactly these (relative path, size) files."""
    try:
        return kept.is_dir() and {(str(p.relative_to(kept)), n) for p, n in _regular_files(kept)} == want
    except OSError:
        return False


def _evict(root: Path) -> None:
    """At most MAX_KEPT contents are kept: the least recently kept go first."""
    try:
        kept = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    except OSError:
        return
    for d in kept[:-MAX_KEPT] if len(kept) > MAX_KEPT else []:
        shutil.rmtree(d, ignore_errors=True)
