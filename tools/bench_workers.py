"""The bench's worker processes: the client of one sandboxed worker, and spare pairs started ahead.

Every run gets two fresh worker processes (`kda.sandbox.bench_worker`, trusted and candidate), used
by that run only and never again. Starting one takes seconds (importing torch, creating the CUDA
context), so the pool starts the next run's pair ahead of time: at server start and after each run,
when the policy's `benchmark.spare_workers` allows it. A spare pair has loaded nothing of any task
or candidate; it waits in its own empty job directories under `.kda/jobs/`. A run takes the pair
only if it was started for the same workspace, device and job environment, else it starts its own.
At most one spare pair waits per device; a newer one replaces it. Spares die with the server.
"""

from __future__ import annotations

import atexit
import json
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .jobs import Cancelled, CancelToken, Lease, executor
from .kernel_cache import JOB_CACHE
from .store import new_id
from .workspace import Workspace


class WorkerFailure(Exception):
    def __init__(self, status: str, check: str, evidence: str, dead: bool = True, traceback: str = ""):
        super().__init__(evidence)
        self.status, self.check, self.evidence, self.dead, self.traceback = status, check, evidence, dead, traceback


class WorkerClient:
    """One sandboxed bench worker on pipes: line-JSON requests, replies with alerts."""

    def __init__(self, name: str, job: Any, require_isolation: bool, cancel: CancelToken):
        from kda.sandbox.runner import spawn

        self.name, self.cancel = name, cancel
        self.proc = spawn(job, require_isolation=require_isolation, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.isolation = getattr(self.proc, "isolation", "unknown")
        self.replies: "queue.Queue[dict | None]" = queue.Queue()
        self.err_tail = bytearray()
        self.next_id = 1
        self._closed = False
        self.alerts: list[dict] = []
        self.notes: list[str] = []
        self.op_s: dict[str, float] = {}  # time spent inside the worker, by op (where a run's time goes)
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self._unhook = cancel.on_cancel(self.kill)

    def bind(self, cancel: CancelToken) -> None:
        """Serve another caller's cancel token (a spare started ahead of the run that takes it)."""
        self._unhook()
        self.cancel = cancel
        self._unhook = cancel.on_cancel(self.kill)

    def _read_out(self) -> None:
        for line in iter(self.proc.stdout.readline, b""):  # type: ignore[union-attr]
            try:
                self.replies.put(json.loads(line))
            except ValueError:
                self.replies.put({"id": None, "garbage": line[:200].decode(errors="replace")})
        self.replies.put(None)

    def _read_err(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):  # type: ignore[union-attr]
            self.err_tail += chunk
            if len(self.err_tail) > 256 * 1024:
                del self.err_tail[: len(self.err_tail) - 128 * 1024]

    def log_tail(self, n: int = 8000) -> str:
        return bytes(self.err_tail[-n:]).decode("utf-8", errors="replace")

    def _wait_reply(self, rid: int, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if self.cancel.cancelled:
                self.kill()
                raise Cancelled("cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerFailure("TIMEOUT", "timeout", f"{self.name} worker: {what} took longer than {timeout:.0f} s "
                                    "(killed)")
            try:
                rep = self.replies.get(timeout=min(0.25, left))
            except queue.Empty:
                continue
            if rep is None:
                if self.cancel.cancelled:
                    raise Cancelled("cancelled")
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:  # it closed its reply channel but lives on
                    self.kill()
                    raise WorkerFailure("SANDBOX_VIOLATION", "protocol",
                                        f"{self.name} worker closed its reply channel during {what} and kept "
                                        "running: something other than the harness touched it") from None
                rc = self.proc.returncode
                reason = self._death_reason(rc)
                raise WorkerFailure("RUNTIME_ERROR", "worker_died",
                                    f"{self.name} worker died during {what} ({reason}); stderr: "
                                    f"{self.log_tail(600).strip()[-600:]}")
            if rep.get("id") != rid:
                self.kill()
                raise WorkerFailure("SANDBOX_VIOLATION", "protocol",
                                    f"{self.name} worker sent a reply out of turn during {what} (expected id {rid}, "
                                    f"got {str(rep)[:200]}): something other than the harness wrote to its reply channel")
            self.alerts += rep.get("alerts", [])
            self.notes += rep.get("notes", [])
            return rep

    def _death_reason(self, rc: int | None) -> str:
        import signal as _sig

        from kda.sandbox.runner import _signal_words

        watch = getattr(self.proc, "_kda_watch", None)
        if watch is not None and watch.killed_for:
            return watch.killed_for
        if rc is None:
            return "unknown"
        if rc < 0:
            return _signal_words(-rc)[1]
        if rc > 128 and (rc - 128) in _sig.valid_signals():  # bwrap's status for a job killed by a signal
            return _signal_words(rc - 128)[1]
        return f"exit status {rc}"

    def ready(self, timeout: float) -> dict:
        rep = self._wait_reply(0, timeout, "start-up")
        if not rep.get("ok"):
            err = rep.get("error", {})
            raise WorkerFailure("RUNTIME_ERROR", "worker_start", f"{self.name} worker could not start: "
                                f"{err.get('evidence')}", traceback=err.get("traceback", ""))
        return rep.get("env", {})

    def request(self, op: str, timeout: float, **params: Any) -> dict:
        return self.receive(self.send(op, **params), timeout, op)

    def send(self, op: str, **params: Any) -> int:
        """Send a request without waiting (the worker answers requests in order); `receive` waits."""
        rid = self.next_id
        self.next_id += 1
        data = (json.dumps({"id": rid, "op": op, **params}) + "\n").encode()
        try:
            self.proc.stdin.write(data)  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            pass  # the reader reports the death with its reason
        return rid

    def receive(self, rid: int, timeout: float, op: str) -> dict:
        rep = self._wait_reply(rid, timeout, op)
        if isinstance(rep.get("op_s"), (int, float)):
            self.op_s[op] = self.op_s.get(op, 0.0) + float(rep["op_s"])
        parts = rep.get("parts_s")
        for k, v in (parts.items() if isinstance(parts, dict) else ()):
            if isinstance(v, (int, float)):
                self.op_s[f"{op}.{k}"] = self.op_s.get(f"{op}.{k}", 0.0) + float(v)
        if not rep.get("ok"):
            err = rep.get("error") or {}
            raise WorkerFailure(err.get("status", "RUNTIME_ERROR"), err.get("check", op),
                                err.get("evidence", "unknown error"), dead=bool(err.get("fatal")),
                                traceback=err.get("traceback", ""))
        return rep

    def take_alerts(self) -> list[dict]:
        out, self.alerts = self.alerts, []
        return out

    def take_notes(self) -> list[str]:
        out, self.notes = self.notes, []
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, exit_wait_s: float = 0.0) -> bool:
        from kda.sandbox.runner import kill_tree

        # Also when the worker itself is gone: what it forked may still run in its process group.
        return kill_tree(self.proc, exit_wait_s=exit_wait_s)

    def close(self, exit_wait_s: float = 0.0) -> bool:
        """Kill it: a worker has nothing to save, and a clean interpreter exit (CUDA context and
        profiler teardown) would cost the run most of a second. With `exit_wait_s`, wait until
        every process of its tree has exited; returns whether they all had."""
        if self._closed:
            return True
        self._closed = True
        gone = self.kill(exit_wait_s)
        self._unhook()
        return gone


# --- jobs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunDirs:
    """A run's directories: `ref/` (the trusted worker's) and `cand/` (the candidate's, with `src/`
    for its sources and `x/` for the results files the trusted worker reads)."""

    root: Path

    @property
    def ref(self) -> Path:
        return self.root / "ref"

    @property
    def cand(self) -> Path:
        return self.root / "cand"

    @classmethod
    def create(cls, ws: Workspace) -> "RunDirs":
        d = cls(ws.kda_dir / "jobs" / new_id("run"))
        for p in (d.ref, d.cand, d.cand / "src", d.cand / "x"):
            p.mkdir(parents=True, exist_ok=True)
        return d


def worker_env(lease: Lease, language: str) -> dict[str, str]:
    env = dict(lease.env)
    if lease.kind == "cpu" and language == "triton":
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if lease.kind == "cpu":
        # Idle OpenMP threads must sleep, not spin: the two workers take turns on the same cores.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def start_worker(ws: Workspace, role: str, dirs: RunDirs, lease: Lease, language: str,
                 cancel: CancelToken) -> WorkerClient:
    """One sandboxed bench worker for `role` ("trusted" or "candidate"), starting (not yet ready)."""
    from kda.sandbox.runner import Job, sandbox_pythonpath

    sb = ws.policy.sandbox
    ro = [*sandbox_pythonpath(), ws.task_dir]
    if role == "trusted":
        ro.append(dirs.cand)
    device = "cuda" if lease.kind == "cuda" else "cpu"
    cwd = dirs.ref if role == "trusted" else dirs.cand
    # Triton compiles where kernel_cache keeps and restores from, whatever Triton's default.
    env = {**worker_env(lease, language), "TRITON_CACHE_DIR": str(cwd / JOB_CACHE)}
    job = Job(argv=[sys.executable, "-m", "kda.sandbox.bench_worker", "--role", role, "--device", device],
              cwd=cwd, ro_paths=ro, hide_paths=[ws.kda_dir, ws.work_dir], env=env, gpu=lease.kind == "cuda",
              wall_timeout_s=float(sb.wall_timeout_s), limits=sb.limits())
    return WorkerClient(role, job, sb.require_isolation, cancel)


# --- spares --------------------------------------------------------------------------------------
@dataclass
class WorkerPair:
    key: tuple
    dirs: RunDirs
    trusted: WorkerClient
    cand: WorkerClient
    ready_at: float
    trusted_env: dict[str, Any]
    cand_env: dict[str, Any]

    def close(self) -> None:
        for w in (self.cand, self.trusted):
            w.close()
        shutil.rmtree(self.dirs.root, ignore_errors=True)


def pair_key(ws: Workspace, lease: Lease, trusted_language: str, candidate_language: str) -> tuple:
    """What a spare pair must have been started for: workspace, device, job environments and the
    sandbox policy as it is now (a pair started before the policy was tightened is not taken)."""
    return (str(ws.root), lease.kind, lease.index, tuple(sorted(worker_env(lease, trusted_language).items())),
            tuple(sorted(worker_env(lease, candidate_language).items())),
            json.dumps(ws.policy.sandbox.model_dump(), sort_keys=True, default=str))


def trusted_language(baseline: dict[str, Any] | None) -> str:
    """The trusted worker's job language: the locked baseline's, or python for the reference."""
    return baseline["spec"]["language"] if baseline else "python"


def spares_wanted(ws: Workspace, lease: Lease) -> bool:
    mode = ws.policy.benchmark.spare_workers
    return mode == "always" or (mode == "gpu" and lease.kind == "cuda")


class SparePool:
    """At most one spare pair per device (lease label), for whichever workspace ran there last.

    Pairs start on one long-lived background thread (a sandboxed worker dies with the thread that
    started it), which holds the device's lease until both workers are ready: their start-up (CUDA
    context, timer calibration) never overlaps anyone's timing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pairs: dict[str, WorkerPair] = {}
        self._starting: dict[CancelToken, Path | None] = {}  # each start's token and, once made, its job dirs
        self._todo: "queue.Queue[tuple]" = queue.Queue()
        self._thread: threading.Thread | None = None
        self.closed = False

    def take(self, key: tuple, lease: Lease, cancel: CancelToken) -> WorkerPair | None:
        with self._lock:
            pair = self._pairs.get(lease.label)
            if pair is None or pair.key != key:
                return None
            del self._pairs[lease.label]
        if not (pair.trusted.alive() and pair.cand.alive()):
            pair.close()
            return None
        for w in (pair.trusted, pair.cand):
            w.bind(cancel)
        return pair

    def start(self, ws: Workspace, lease: Lease, trusted_language: str, candidate_language: str) -> None:
        """Start a pair for the next run on this device, in the background (it replaces the pair
        waiting there). Nothing happens when the policy wants no spares here."""
        if self.closed or not spares_wanted(ws, lease):
            return
        token = CancelToken()
        with self._lock:
            self._starting[token] = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="kda-spare-workers", daemon=True)
                self._thread.start()
        self._todo.put((ws, lease, trusted_language, candidate_language, token))

    def _serve(self) -> None:
        while True:
            self._start(*self._todo.get())

    def _start(self, ws: Workspace, lease: Lease, trusted_language: str, candidate_language: str,
               token: CancelToken) -> None:
        key = pair_key(ws, lease, trusted_language, candidate_language)
        dirs: RunDirs | None = None
        workers: list[WorkerClient] = []
        pair: WorkerPair | None = None
        try:
            with self._lock:
                waiting = self._pairs.get(lease.label)
            if token.cancelled or self.closed or (waiting is not None and waiting.key == key
                                                  and waiting.trusted.alive() and waiting.cand.alive()):
                return
            with executor().lease(None, token, only=lease.label):
                dirs = RunDirs.create(ws)
                with self._lock:
                    self._starting[token] = dirs.root
                for role, lang in (("trusted", trusted_language), ("candidate", candidate_language)):
                    workers.append(start_worker(ws, role, dirs, lease, lang, token))
                envs = [w.ready(180) for w in workers]
            pair = WorkerPair(key, dirs, workers[0], workers[1], time.time(), envs[0], envs[1])
        except Exception:  # a spare is an optimisation: the next run starts its own workers
            for w in workers:
                w.close()
            if dirs is not None:
                shutil.rmtree(dirs.root, ignore_errors=True)
        finally:
            old = None
            with self._lock:
                self._starting.pop(token, None)
                if pair is not None and not self.closed:
                    old = self._pairs.pop(lease.label, None)
                    self._pairs[lease.label] = pair
                    pair = None
            for p in (old, pair):  # the pair it replaces; or this one, when the pool closed meanwhile
                if p is not None:
                    p.close()

    def waiting(self) -> list[WorkerPair]:
        with self._lock:
            return list(self._pairs.values())

    def directories(self) -> set[Path]:
        """The job directories of the pairs waiting and of those starting."""
        with self._lock:
            return {p.dirs.root for p in self._pairs.values()} | {d for d in self._starting.values() if d}

    def clear(self) -> None:
        """Kill the pairs waiting and those starting."""
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
            starting = list(self._starting)
        for t in starting:
            t.cancel()
        for p in pairs:
            p.close()

    def close(self) -> None:
        self.closed = True
        self.clear()


spares = SparePool()
atexit.register(spares.close)


def prestart(ws: Workspace) -> None:
    """At server start: a spare pair on every GPU the policy wants spares on (in the background;
    finding the GPUs runs nvidia-smi, which must not delay the server's start)."""
    if ws.policy.benchmark.spare_workers == "off":
        return

    def go() -> None:
        lang = trusted_language(ws.baseline_solution())
        for lease in executor().slots:
            if lease.kind == "cuda":
                # On a GPU the job environment does not depend on the candidate's language.
                spares.start(ws, lease, lang, "triton")

    threading.Thread(target=go, name="kda-spare-prestart", daemon=True).start()
