"""One runner for every untrusted job (compile, benchmark, profile workers).

Isolation, when bubblewrap is present: a read-only view of the whole system, a fresh /dev,
/proc and tmpfs /tmp, the job directory (and `rw_paths`) writable, `hide_paths` and the
server user's home replaced by empty tmpfs, no network, its own pid/ipc/uts namespaces,
`--die-with-parent`, `--new-session`. GPU jobs get the NVIDIA device nodes bound in.

Limits: RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE are set before exec. Memory is
*not* limited with RLIMIT_AS or RLIMIT_DATA (CUDA reserves huge virtual ranges, both break
GPU jobs); a watchdog thread sums the resident memory of the job's process tree and kills
the tree past `Limits.max_rss_bytes`. The same watchdog kills a tree that reaches
`Limits.max_processes`, because RLIMIT_NPROC is never enforced for root: when the server runs
as root inside bubblewrap, each job is dropped to its own unprivileged uid (setpriv, no
capabilities) so the kernel enforces RLIMIT_NPROC for exactly that job's processes too.

Without bubblewrap the job runs as a plain subprocess with the same limits and every result
says `isolation: rlimits-only`; `require_isolation=True` refuses that with install advice.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kda.tools.errors import NotAvailable

# As root, each job runs under its own unprivileged uid from this range (no passwd entry needed):
# RLIMIT_NPROC then counts exactly that job's processes, and jobs cannot signal one another.
JOB_UID_BASE, JOB_UID_SPAN = 1_900_000, 100_000
_ENV_ALLOW = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "CUDA_PATH",
    "LD_LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "CUDA_DEVICE_ORDER",
)
INSTALL_HINT = (
    "bubblewrap (`bwrap`) is required by the policy (sandbox.require_isolation = true) but is not usable "
    "on this machine; install it with `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`"
)


@dataclass
class Limits:
    cpu_seconds: int = 900
    max_processes: int = 512
    max_file_bytes: int = 2**31
    max_open_files: int = 4096
    max_rss_bytes: int = 16 * 2**30  # summed resident memory of the whole job tree


@dataclass
class Job:
    argv: list[str]
    cwd: Path  # the job dir, always writable
    ro_paths: list[Path] = field(default_factory=list)
    rw_paths: list[Path] = field(default_factory=list)
    hide_paths: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    gpu: bool = False
    wall_timeout_s: float = 600.0
    limits: Limits = field(default_factory=Limits)
    stdin: bytes | None = None
    network: bool = False
    tail_bytes: int = 64 * 1024  # how much of the end of stdout/stderr a result keeps
    # Keep the server's uid and capabilities (filesystem, network and pid isolation stay): Nsight
    # Compute needs them to read the GPU's performance counters, which drivers restrict to admins
    # by default. Only profile jobs ask for it; results say so in `isolation`.
    keep_privileges: bool = False


@dataclass
class JobResult:
    returncode: int | None
    signal: str | None
    timed_out: bool
    stdout_tail: str
    stderr_tail: str
    wall_s: float
    cpu_s: float
    isolation: str  # "bubblewrap" | "rlimits-only"
    reason: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.signal is None and not self.timed_out


# --- isolation probe ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _bwrap() -> str | None:
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=1)
def _probe_bwrap() -> bool:
    exe = _bwrap()
    if not exe:
        return False
    try:
        r = subprocess.run(
            [exe, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
             *_unshare_args(network=False), "--die-with-parent", "--new-session", "true"],
            capture_output=True, timeout=20,
        )
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def isolation_available() -> bool:
    """True when bubblewrap is installed and can build a sandbox here (probed once)."""
    return _probe_bwrap()


def _drop_privileges() -> bool:
    # As root, RLIMIT_NPROC means nothing; inside bubblewrap we switch the job to its own uid.
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def _job_uid() -> int:
    import secrets

    return JOB_UID_BASE + secrets.randbelow(JOB_UID_SPAN)


def _unshare_args(network: bool) -> list[str]:
    # Not --unshare-all: that includes a user namespace in which only uid 0 is mapped, so the
    # job could not be dropped to an unprivileged uid that the kernel counts for RLIMIT_NPROC.
    args = ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        args.append("--unshare-user")
    if not network:
        args.append("--unshare-net")
    return args


# --- python workers ----------------------------------------------------------------------------
def repo_root() -> Path:
    """The checkout holding sandbox/, tools/, server/ (the editable install points here)."""
    return Path(__file__).resolve().parents[1]


def sandbox_pythonpath() -> list[Path]:
    """Directories a sandboxed `sys.executable -m kda.sandbox.xxx` needs visible.

    The package is an editable install whose finder lives in site-packages and maps `kda.*`
    onto the checkout, so both site-packages and the checkout must be readable in the sandbox
    (they are bound read-only even when they sit under the hidden home directory)."""
    dirs: list[Path] = []
    for key in ("purelib", "platlib"):
        p = Path(sysconfig.get_paths()[key])
        if p.is_dir() and p not in dirs:
            dirs.append(p)
    root = repo_root()
    if root not in dirs:
        dirs.append(root)
    # A server that finds its packages through PYTHONPATH (a --target install, as on a bare GPU
    # image) hands the same path to its workers.
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and Path(entry).is_dir() and Path(entry).resolve() not in dirs:
            dirs.append(Path(entry).resolve())
    return dirs


# --- argv construction -------------------------------------------------------------------------
def _gpu_nodes() -> list[Path]:
    dev = Path("/dev")
    nodes = sorted(dev.glob("nvidia*"))  # nvidia0.., nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia-caps
    return [p for p in nodes if p.exists()]


def _home_rebinds() -> tuple[list[Path], list[Path]]:
    """The server user's home is hidden; what the job must still see under it is re-bound."""
    home = Path.home().resolve()
    keep: list[Path] = []
    candidates = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent,
                  *sandbox_pythonpath()]
    for c in candidates:
        c = c.resolve()
        if c.is_relative_to(home) and c != home and not any(c.is_relative_to(k) for k in keep):
            keep = [k for k in keep if not k.is_relative_to(c)] + [c]
    if home == Path("/"):
        return [], []
    return [home], keep


def _bwrap_argv(job: Job, uid: int | None) -> list[str]:
    cwd = Path(job.cwd).resolve()
    # /dev/shm is a private tmpfs: POSIX semaphores (multiprocessing locks) and shared memory
    # need it, and nothing in it is shared with the host.
    a = [_bwrap() or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm",
         "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp"]
    tmpfs_roots = [Path("/tmp")]
    made: set[Path] = set()

    def parents(dest: Path) -> list[str]:
        # bwrap creates missing mount points inside a tmpfs with mode 0700, which the job (as
        # its unprivileged uid) could not traverse; create them 0755 first.
        out: list[str] = []
        for anc in reversed(dest.parents):
            if anc not in made and any(anc != t and anc.is_relative_to(t) for t in tmpfs_roots):
                made.add(anc)
                out += ["--perms", "0755", "--dir", str(anc)]
        return out

    # Python packages the server imports from under /tmp (a --target install) stay visible.
    for p in sandbox_pythonpath():
        if p.is_relative_to("/tmp"):
            a += [*parents(p), "--ro-bind", str(p), str(p)]
    hidden_homes, keep = _home_rebinds()
    for h in hidden_homes:  # binds below re-expose what a job needs under it
        a += ["--tmpfs", str(h)]
        tmpfs_roots.append(h)
        for k in keep:
            a += [*parents(k), "--ro-bind", str(k), str(k)]
    # Outer paths first, inner ones later, so "hide work/ but show work/v1" and "show the
    # workspace but hide its .kda/" both mean what they say.
    mounts: list[tuple[int, int, str, Path]] = []
    for p in job.ro_paths:
        mounts.append((0, 0, "--ro-bind", Path(p).resolve()))
    for p in job.rw_paths:
        mounts.append((0, 1, "--bind", Path(p).resolve()))
    for p in job.hide_paths:
        if Path(p).exists():
            mounts.append((0, 2, "--tmpfs", Path(p).resolve()))
    mounts.append((0, 1, "--bind", cwd))
    for _, _, op, p in sorted(mounts, key=lambda m: (len(m[3].parts), m[1])):
        a += parents(p)
        if op == "--tmpfs":
            a += ["--perms", "0755", op, str(p)]
            tmpfs_roots.append(p)
        else:
            a += [op, str(p), str(p)]
    a += ["--chdir", str(cwd)]
    if job.gpu:
        for node in _gpu_nodes():
            a += ["--dev-bind", str(node), str(node)]
    a += _unshare_args(job.network)
    a += ["--die-with-parent", "--new-session"]
    if uid is not None:
        a += ["--", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
              "--bounding-set=-all", "--inh-caps=-all"]
    elif job.keep_privileges:
        a += ["--"]
    else:
        a += ["--cap-drop", "ALL", "--"]
    return a + list(job.argv)


def _make_writable_for_job(job: Job, uid: int) -> None:
    for top in [Path(job.cwd), *map(Path, job.rw_paths)]:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            try:
                os.chown(p, uid, uid, follow_symlinks=False)
            except OSError:
                pass


def _env(job: Job) -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_ALLOW if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    # The interpreter's bin dir first, so `python` inside the job is the server's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    # A job's own uid has no passwd entry; getpass.getuser() (which torch's compile caches call)
    # reads these first instead of failing.
    env.update(HOME=str(Path(job.cwd).resolve()), TMPDIR="/tmp", PYTHONDONTWRITEBYTECODE="1",
               PYTHONNOUSERSITE="1", USER="kda-job", LOGNAME="kda-job")
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if not job.gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(job.env)
    return env


def _preexec(limits: Limits) -> Callable[[], None]:
    def apply() -> None:
        def cap(which: int, value: int, grace: int = 0) -> None:
            soft, hard = resource.getrlimit(which)
            new_hard = value + grace
            if hard != resource.RLIM_INFINITY:
                value, new_hard = min(value, hard), min(new_hard, hard)
            resource.setrlimit(which, (value, new_hard))

        # CPU: SIGXCPU at the soft limit names the cause; SIGKILL at the hard limit 2 s later.
        cap(resource.RLIMIT_CPU, int(limits.cpu_seconds), grace=2)
        cap(resource.RLIMIT_NPROC, int(limits.max_processes))
        cap(resource.RLIMIT_FSIZE, int(limits.max_file_bytes))
        cap(resource.RLIMIT_NOFILE, int(limits.max_open_files))
        cap(resource.RLIMIT_CORE, 0)

    return apply


def _prepare(job: Job, require_isolation: bool) -> tuple[list[str], str]:
    if not Path(job.cwd).is_dir():
        raise NotAvailable(f"job directory {job.cwd} does not exist")
    if isolation_available():
        uid = _job_uid() if _drop_privileges() and not job.keep_privileges else None
        if uid is not None:
            _make_writable_for_job(job, uid)
        return _bwrap_argv(job, uid), "bubblewrap (privileged: GPU counters)" if job.keep_privileges else "bubblewrap"
    if require_isolation:
        raise NotAvailable(INSTALL_HINT)
    return list(job.argv), "rlimits-only"


# --- process tree ------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(entry.name))
    return kids


def _descendants(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for c in kids.get(pid, ()):
            out.append(c)
            todo.append(c)
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (the first is field 3, the state),
    or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def _cpu_seconds(pid: int) -> float | None:
    rest = _stat(pid)
    return None if rest is None else (int(rest[11]) + int(rest[12])) / _TICK  # utime + stime


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def kill_tree(proc: subprocess.Popen, *, wait: bool = True, exit_wait_s: float = 0.0) -> bool:
    """SIGKILL the job's process group and every descendant (collected before killing, since
    killed parents orphan their children). Inside bubblewrap, killing the outer bwrap also
    tears down the job's pid namespace (--die-with-parent). With `exit_wait_s`, then wait up to
    that long until every process seen in the tree has exited, not merely been signalled (a killed
    process still holds its GPU context, and the work queued on it, until its exit releases
    them). Returns whether all of them had exited (True when not asked to wait for them)."""
    # Once reaped, its pid may belong to an unrelated process: neither waited for nor searched
    # (its own children were reparented when it died). Its process group is still signalled.
    reaped = proc.returncode is not None
    seen: set[int] = set() if reaped else {proc.pid}
    for _ in range(3):
        pids = [] if reaped else _descendants(proc.pid)
        seen.update(pids)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not pids:
            break
    if wait:
        try:
            proc.wait(timeout=10)
            seen.discard(proc.pid)  # reaped: its pid is free for others
        except subprocess.TimeoutExpired:  # pragma: no cover - an unkillable (D-state) process
            pass
    watch = getattr(proc, "_kda_watch", None)
    if watch is not None:
        watch.stop.set()
    if not exit_wait_s:
        return True
    deadline = time.monotonic() + exit_wait_s
    while any(not _exited(pid) for pid in seen):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _exited(pid: int) -> bool:
    """Gone, or a zombie with no thread left exiting: its exit (and the release of its files and
    device contexts) is done."""
    rest = _stat(pid)
    return rest is None or (rest[0] in (b"Z", b"X") and int(rest[17]) <= 1)  # state; num_threads (field 20)


class _Watchdog(threading.Thread):
    """Polls the job tree: kills it past the memory or process limit (and records why)."""

    def __init__(self, proc: subprocess.Popen, limits: Limits, interval: float = 0.05, owns_wait: bool = True):
        super().__init__(daemon=True, name=f"kda-watch-{proc.pid}")
        self.proc, self.limits, self.interval = proc, limits, interval
        # run_job reaps with os.wait4 itself (for CPU time); then the watchdog must never reap.
        self.owns_wait = owns_wait
        self.stop = threading.Event()
        self.killed_for: str | None = None
        self._cpu_seen: dict[int, float] = {}  # last CPU time sampled per pid (killed jobs are never reaped
        # by their parents, so wait4's rusage misses them)

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu_seen.values())

    def run(self) -> None:
        while not self.stop.is_set() and (not self.owns_wait or self.proc.poll() is None):
            pids = _descendants(self.proc.pid)
            rss = _rss([self.proc.pid, *pids])
            for pid in pids:
                c = _cpu_seconds(pid)
                if c is not None:
                    self._cpu_seen[pid] = c
            if len(pids) >= self.limits.max_processes:
                self.killed_for = f"process limit {self.limits.max_processes} reached (unbounded fork?)"
            elif rss > self.limits.max_rss_bytes:
                self.killed_for = (f"memory limit exceeded: resident {rss / 2**20:.0f} MiB > "
                                   f"{self.limits.max_rss_bytes / 2**20:.0f} MiB")
            if self.killed_for:
                kill_tree(self.proc, wait=self.owns_wait)
                return
            self.stop.wait(self.interval)


def spawn(job: Job, *, require_isolation: bool = False, **popen_kwargs) -> subprocess.Popen:
    """Start a job in the same sandbox for a long-lived worker (talk over pipes). The caller owns
    the process and ends it with kill_tree(proc); a watchdog enforces memory/process limits."""
    argv, isolation = _prepare(job, require_isolation)
    proc = subprocess.Popen(argv, cwd=str(job.cwd), env=_env(job), start_new_session=True,
                            preexec_fn=_preexec(job.limits), **popen_kwargs)
    proc.isolation = isolation  # type: ignore[attr-defined]
    watch = _Watchdog(proc, job.limits, interval=0.2)
    proc._kda_watch = watch  # type: ignore[attr-defined]
    watch.start()
    return proc


# --- run to completion -------------------------------------------------------------------------
class _Tail:
    def __init__(self, cap: int):
        self.cap, self.buf, self.dropped = cap, bytearray(), 0

    def add(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 2 * self.cap:
            cut = len(self.buf) - self.cap
            self.dropped += cut
            del self.buf[:cut]

    def text(self) -> str:
        data = bytes(self.buf[-self.cap :])
        dropped = self.dropped + len(self.buf) - len(data)
        s = data.decode("utf-8", errors="replace")
        return (f"[... {dropped} bytes cut ...]\n" + s) if dropped else s


def _pump(stream, tail: _Tail, on_line: Callable[[str], None] | None) -> None:
    pending = b""
    for chunk in iter(lambda: stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536), b""):
        tail.add(chunk)
        if on_line is not None:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    on_line(line.decode("utf-8", errors="replace"))
                except Exception:  # a progress callback must never break the job
                    pass
            if len(pending) > 65536:
                pending = pending[-65536:]
    if on_line is not None and pending:
        try:
            on_line(pending.decode("utf-8", errors="replace"))
        except Exception:
            pass
    stream.close()


def _signal_words(sig: int) -> tuple[str, str]:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    desc = (signal.strsignal(sig) or "").lower()
    special = {signal.SIGXCPU: "CPU limit exceeded", signal.SIGXFSZ: "file size limit exceeded"}
    if sig in special:
        return name, f"{special[sig]} (killed by {name})"
    return name, f"killed by {name}" + (f" ({desc})" if desc else "")


def run_job(job: Job, *, require_isolation: bool = False,
            on_line: Callable[[str], None] | None = None) -> JobResult:
    """Run a job to completion in the sandbox. Never raises for anything the job does; raises
    NotAvailable only when isolation is required and missing (or the job dir is missing)."""
    argv, isolation = _prepare(job, require_isolation)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, cwd=str(job.cwd), env=_env(job), start_new_session=True, preexec_fn=_preexec(job.limits),
            stdin=subprocess.PIPE if job.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    except OSError as e:
        return JobResult(None, None, False, "", f"cannot start {job.argv[0]!r}: {e.strerror or e}",
                         time.monotonic() - start, 0.0, isolation,
                         f"could not start {job.argv[0]!r}: {e.strerror or e}")
    out, err = _Tail(job.tail_bytes), _Tail(job.tail_bytes)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, on_line), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err, on_line), daemon=True)]
    for t in pumps:
        t.start()
    if job.stdin is not None:
        def feed() -> None:
            try:
                proc.stdin.write(job.stdin)  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
        threading.Thread(target=feed, daemon=True).start()
    watch = _Watchdog(proc, job.limits, owns_wait=False)
    watch.start()

    timed_out = False
    status, usage = None, None
    deadline = start + job.wall_timeout_s
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:  # pragma: no cover - reaped elsewhere
            status = None
            break
        if pid:
            break
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            kill_tree(proc, wait=False)
            continue
        time.sleep(0.005 if time.monotonic() - start < 0.5 else 0.02)
    wall = time.monotonic() - start
    watch.stop.set()
    # Orphans that left the process group would keep the pipes open; the group is dead now.
    for t in pumps:
        t.join(timeout=2.0)
    if any(t.is_alive() for t in pumps):
        kill_tree(proc, wait=False)
        for t in pumps:
            t.join(timeout=2.0)

    if status is not None:
        proc.returncode = os.waitstatus_to_exitcode(status)
    rc = proc.returncode
    sig_name: str | None = None
    returncode: int | None = rc
    reason = ""
    if rc is not None and rc < 0:
        sig_name, reason = _signal_words(-rc)
        returncode = None
    elif isolation.startswith("bubblewrap") and rc is not None and rc > 128 and (rc - 128) in signal.valid_signals():
        # bwrap reports a job killed by signal N as exit status 128+N.
        sig_name, reason = _signal_words(rc - 128)
        returncode = None
    elif rc is not None:
        reason = f"exit {rc}"
    cpu = max((usage.ru_utime + usage.ru_stime) if usage is not None else 0.0, watch.cpu_s)
    if timed_out:
        reason = f"wall timeout {job.wall_timeout_s:g} s exceeded"
    elif watch.killed_for:
        reason = watch.killed_for
    return JobResult(returncode=returncode, signal=sig_name, timed_out=timed_out, stdout_tail=out.text(),
                     stderr_tail=err.text(), wall_s=wall, cpu_s=cpu, isolation=isolation, reason=reason or "unknown")
