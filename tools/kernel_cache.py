"""Compiled kernels (Triton's cache, torch extension builds), kept between runs of the same content.

A bench worker's home is its job directory, so Triton compiles into `<job dir>/.triton/cache`, a
C++/CUDA candidate builds into `<job dir>/build`, and both go away with the run: every run of a
candidate would compile again (about a second per Triton specialisation, half a minute for a torch
extension). After a run they are kept under
`.kda/cache/kernels/<key>`, the key naming the exact content that wrote it (the candidate's content
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
JOB_BUILD = Path("build")  # torch extensions (sandbox/harness.py names each build by its content)
KEPT = (JOB_CACHE, JOB_BUILD)
MAX_BYTES = 256 << 20


def _kept(ws: Workspace, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return ws.kda_dir / "cache" / "kernels" / safe


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
    """Copy what was kept for `key` (Triton's cache, torch extension builds) into the job directory;
    the number of files copied. The job may run under its own uid: the copy is writable by it (the
    job directory is private to the job, hidden from every other one)."""
    src = _kept(ws, key)
    if not src.is_dir():
        return 0
    n = 0
    for rel in KEPT:
        if (src / rel).is_dir():
            _copy_files(src / rel, job_dir / rel, 0o777, 0o666)
            for d in [job_dir / p for p in list(rel.parents)[:-1]]:
                d.chmod(0o777)
            n += len(_regular_files(job_dir / rel))
    return n


def keep(ws: Workspace, key: str, job_dir: Path) -> int:
    """Keep the job's Triton cache and extension builds for the next run of the same content
    (replacing what was kept); the number of files kept (0: none, or over MAX_BYTES)."""
    parts = [rel for rel in KEPT if (job_dir / rel).is_dir() and not (job_dir / rel).is_symlink()
             and not any((job_dir / p).is_symlink() for p in list(rel.parents)[:-1])]
    files = [f for rel in parts for f in _regular_files(job_dir / rel)]
    if not files or sum(n for _, n in files) > MAX_BYTES:
        return 0
    final = _kept(ws, key)
    tmp = final.with_name(f"{final.name}.{new_id('tmp')}")
    try:
        for rel in parts:
            _copy_files(job_dir / rel, tmp / rel, 0o755, 0o644)
        old = final.with_name(f"{final.name}.{new_id('old')}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    return len(files)
