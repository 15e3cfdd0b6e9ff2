"""Triton's compiled kernels, kept between runs of the same content.

A bench worker's home is its job directory, so Triton compiles into `<job dir>/.triton/cache` and
that directory goes away with the run: every run of a candidate would compile its kernels again
(about a second per specialisation). After a run the cache is kept under
`.kda/cache/triton/<key>`, the key naming the exact content that wrote it (the candidate's content
hash, or the baseline's); the next run of the same content gets a copy before it loads. No other
content ever reads it, so a candidate can only poison its own cache. Only regular files are kept
(a symbolic link planted in the job directory is never followed), and at most MAX_BYTES.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .store import new_id
from .workspace import Workspace

JOB_CACHE = Path(".triton") / "cache"
MAX_BYTES = 256 << 20


def _kept(ws: Workspace, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return ws.kda_dir / "cache" / "triton" / safe


def _regular_files(root: Path) -> list[tuple[Path, int]]:
    out = []
    for dirpath, _dirs, files in os.walk(root):  # os.walk does not descend into linked directories
        for name in files:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                out.append((p, st.st_size))
    return out


def _copy_files(src: Path, dst: Path, mode_dirs: int, mode_files: int) -> None:
    for p, _ in _regular_files(src):
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target, follow_symlinks=False)
        target.chmod(mode_files)
    for d in [dst, *(p for p in dst.rglob("*") if p.is_dir() and not p.is_symlink())]:
        d.chmod(mode_dirs)


def restore(ws: Workspace, key: str, job_dir: Path) -> int:
    """Copy the kept cache of `key` into the job's Triton cache; the number of files copied.
    The job may run under its own uid: the copy is writable by it (the job directory is private
    to the job, hidden from every other one)."""
    src = _kept(ws, key)
    if not src.is_dir():
        return 0
    dst = job_dir / JOB_CACHE
    _copy_files(src, dst, 0o777, 0o666)
    for d in (job_dir / ".triton",):
        d.chmod(0o777)
    return len(_regular_files(dst))


def keep(ws: Workspace, key: str, job_dir: Path) -> int:
    """Keep the job's Triton cache for the next run of the same content (replacing the kept one);
    the number of files kept (0: none, or over MAX_BYTES)."""
    src = job_dir / JOB_CACHE
    if src.is_symlink() or not src.is_dir():
        return 0
    files = _regular_files(src)
    if not files or sum(n for _, n in files) > MAX_BYTES:
        return 0
    final = _kept(ws, key)
    tmp = final.with_name(f"{final.name}.{new_id('tmp')}")
    try:
        _copy_files(src, tmp, 0o755, 0o644)
        old = final.with_name(f"{final.name}.{new_id('old')}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    return len(files)
