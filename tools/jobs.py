"""Jobs: long measurements that outlive the tool call that started them, and the device pool.

A job runs in a background thread of the server process. It has an unguessable id, a row in
the workspace's `jobs` table (so `job_status` only finds jobs of its own workspace), progress
events and, when done, a result and the id of the run it stored. Cancelling a job sets its
cancel token; the job's code kills its worker processes when it sees it.

Devices are leased through an `Executor`. `LocalPool` is the one implementation: one slot per
visible GPU (or one CPU slot without a GPU), one timing job per slot at a time, jobs queue for
the first free slot. A slot is also held by an exclusive file lock, so two server processes on
one machine (a writer and a reviewer) never time on the same GPU at once. A cluster backend only
has to provide `lease()`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from .errors import BadInput, KdaError
from .store import new_id
from .workspace import Workspace


class Cancelled(KdaError):
    """The job was cancelled (its call was cancelled, or the server is stopping)."""


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            callbacks = list(self._callbacks)
        for cb in callbacks:
            try:
                cb()
            except Exception:
                pass

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")

    def on_cancel(self, cb: Callable[[], None]) -> Callable[[], None]:
        """Run `cb` when cancelled (at once if already); returns a function that unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(cb)
                return lambda: self._callbacks.remove(cb) if cb in self._callbacks else None
        cb()
        return lambda: None

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


# --- devices -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lease:
    kind: str  # "cuda" | "cpu"
    index: str | None  # the GPU's id as CUDA_VISIBLE_DEVICES names it
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def visible_gpus() -> list[str]:
    """GPU ids this process may use, without importing torch. KDA_DEVICE=cpu forces none."""
    if os.environ.get("KDA_DEVICE", "").lower() == "cpu":
        return []
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [x.strip() for x in cvd.split(",") if x.strip() and x.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
            n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
            return [str(i) for i in range(n)]
        except (OSError, subprocess.SubprocessError):
            pass
    d = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(d.iterdir())))] if d.is_dir() else []


class Executor(Protocol):
    def lease(self, need_gpu: bool | None, cancel: CancelToken, on_wait: Callable[[str], None] | None = None,
              only: str | None = None) -> AbstractContextManager[Lease]: ...


class LocalPool:
    """One slot per visible GPU (or one CPU slot); the first free slot is leased."""

    def __init__(self, gpus: list[str] | None = None, lock_dir: Path | None = None):
        self.gpus = visible_gpus() if gpus is None else gpus
        self.slots = [Lease("cuda", g, {"CUDA_VISIBLE_DEVICES": g}) for g in self.gpus] or [Lease("cpu", None)]
        self.busy: set[int] = set()
        self.cond = threading.Condition()
        self.lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / "kda-device-locks")

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def _try_file_lock(self, lease: Lease):
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_dir / f"{lease.label.replace(':', '-')}.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            f.close()
            return None

    @contextmanager
    def lease(self, need_gpu: bool | None, cancel: CancelToken,
              on_wait: Callable[[str], None] | None = None, only: str | None = None) -> Iterator[Lease]:
        """The first free slot (`only`: that slot, by its label, e.g. "cuda:0"), held until the block ends."""
        if need_gpu and not self.gpus:
            raise KdaError("this job needs a CUDA GPU and none is visible on this machine")
        told = False
        while True:
            cancel.check()
            with self.cond:
                for i, s in enumerate(self.slots):
                    if i in self.busy or (only is not None and s.label != only):
                        continue
                    fh = self._try_file_lock(s)
                    if fh is None:
                        continue
                    self.busy.add(i)
                    break
                else:
                    i = -1
                if i < 0:
                    if on_wait and not told:
                        on_wait(f"queued: all {len(self.slots)} device slot(s) busy")
                        told = True
                    self.cond.wait(timeout=0.5)
                    continue
            try:
                yield self.slots[i]
            finally:
                try:
                    fcntl.flock(fh, fcntl.LOCK_UN)
                finally:
                    fh.close()
                with self.cond:
                    self.busy.discard(i)
                    self.cond.notify_all()
            return


_POOL: LocalPool | None = None
_POOL_LOCK = threading.Lock()


def executor() -> LocalPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = LocalPool()
        return _POOL


# --- jobs ----------------------------------------------------------------------------------------
ProgressFn = Callable[[float, float | None, str], None]


@dataclass
class Job:
    id: str
    kind: str
    role: str
    ws_root: Path
    cancel: CancelToken = field(default_factory=CancelToken)
    state: str = "running"
    progress: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    run_id: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


_JOBS: dict[str, Job] = {}
_JOBS_LOCK = threading.Lock()


def _db_update(ws: Workspace, job: Job) -> None:
    with ws.store.transaction() as db:
        db.execute("UPDATE jobs SET state=?, updated=?, progress=?, run_id=?, error=? WHERE id=?",
                   (job.state, time.time(), json.dumps(job.progress[-50:]), job.run_id, job.error, job.id))


def start_job(ws: Workspace, role: str, kind: str,
              body: Callable[[ProgressFn, CancelToken], tuple[str | None, dict[str, Any]]]) -> Job:
    """Run `body(progress, cancel) -> (run_id, result)` in a background thread."""
    job = Job(id=new_id("job"), kind=kind, role=role, ws_root=ws.root)
    now = time.time()
    with ws.store.transaction() as db:
        db.execute("INSERT INTO jobs(id, kind, role, state, created, updated, progress, owner) VALUES (?,?,?,?,?,?,?,?)",
                   (job.id, kind, role, "running", now, now, "[]", process_token()))
    last_write = [0.0]

    def progress(done: float, total: float | None, message: str) -> None:
        job.progress.append({"done": done, "total": total, "message": message, "t": round(time.time(), 3)})
        if time.time() - last_write[0] > 1.0:
            last_write[0] = time.time()
            try:
                _db_update(ws, job)
            except Exception:
                pass

    def run() -> None:
        try:
            job.run_id, job.result = body(progress, job.cancel)
            job.state = "done"
        except Cancelled:
            job.state, job.error = "cancelled", "cancelled before it finished; its workers were killed"
        except KdaError as e:
            job.state, job.error = "failed", str(e)
        except Exception as e:  # a bug of ours: keep the trace for the log, say so plainly
            job.state, job.error = "failed", f"internal error: {type(e).__name__}: {e}"
            try:
                (ws.kda_dir / "logs").mkdir(parents=True, exist_ok=True)
                with open(ws.kda_dir / "logs" / "server-errors.log", "a") as f:
                    f.write(f"--- {time.ctime()} job {job.id} ({kind})\n{traceback.format_exc()}\n")
            except OSError:
                pass
        finally:
            try:
                _db_update(ws, job)
            finally:
                job.done.set()

    with _JOBS_LOCK:
        _JOBS[job.id] = job
    threading.Thread(target=run, name=f"kda-{kind}-{job.id[-8:]}", daemon=True).start()
    return job


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken
    for the process that had it before; None if it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped: gone all the same
        return None
    return fields[19]


def process_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_ticks(pid) or ''}"


def process_alive(token: str | None) -> bool:
    """Whether the process a job row names still runs (another server of this workspace, say the
    writer's while the reviewer asks). Rows from before owners were recorded count as gone."""
    if not token:
        return False
    pid_s, _, ticks = token.partition(":")
    try:
        os.kill(int(pid_s), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # it exists, under another user
    now = _start_ticks(int(pid_s))
    if ticks:
        return now == ticks
    return now is not None or not Path("/proc").is_dir()  # without /proc, kill(0) is all there is


def get_job(ws: Workspace, job_id: str) -> dict[str, Any]:
    """The job's state as this workspace records it (in-memory detail when this process runs it)."""
    with ws.store.connect() as db:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise BadInput(f"no job {job_id!r} in this workspace")
    out = dict(row)
    out["progress"] = json.loads(out.get("progress") or "[]")
    out["result"] = None
    job = _JOBS.get(job_id)
    if job is not None and Path(job.ws_root) == ws.root:
        out.update(state=job.state, progress=job.progress[-50:], run_id=job.run_id, error=job.error,
                   result=job.result)
    elif out["state"] == "running" and not process_alive(out.get("owner")):
        out["state"] = "lost"
        out["error"] = "the server process running this job has stopped; start the measurement again"
    if out["result"] is None and out.get("run_id") and out["state"] == "done":
        try:
            rec = ws.store.get_run(out["run_id"])["record"]
            rec.setdefault("run_id", out["run_id"])
            out["result"] = rec
        except KdaError:
            pass
    return out

