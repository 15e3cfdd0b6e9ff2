"""The sandbox contains what a hostile candidate does, says why it stopped, and keeps working."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from kda.sandbox import runner
from kda.sandbox.runner import Job, Limits, isolation_available, run_job, spawn, kill_tree
from kda.tools.errors import NotAvailable

needs_bwrap = pytest.mark.skipif(not isolation_available(), reason="bubblewrap not usable here")


def py(code: str, cwd: Path, **kw) -> Job:
    return Job(argv=[sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, **kw)


@pytest.fixture
def job_dir(tmp_path) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    return d


def assert_next_call_works(job_dir: Path) -> None:
    r = run_job(py("print('still here')", job_dir))
    assert r.ok and r.stdout_tail.strip() == "still here", r


def test_plain_job_reports_exit_output_and_times(job_dir):
    r = run_job(py("import sys; print('out'); print('err', file=sys.stderr); open('made', 'w').write('x')", job_dir))
    assert r.ok and r.reason == "exit 0"
    assert r.stdout_tail == "out\n" and r.stderr_tail == "err\n"
    assert (job_dir / "made").read_text() == "x"
    assert r.wall_s > 0 and r.isolation in ("bubblewrap", "rlimits-only")
    r = run_job(py("raise SystemExit(3)", job_dir))
    assert not r.ok and r.returncode == 3 and r.reason == "exit 3"


def test_stdin_and_on_line(job_dir):
    seen: list[str] = []
    r = run_job(py("import sys; [print(l.strip().upper()) for l in sys.stdin]", job_dir), on_line=seen.append)
    assert r.ok
    r = run_job(Job(argv=[sys.executable, "-c", "import sys; [print(l.strip().upper()) for l in sys.stdin]"],
                    cwd=job_dir, stdin=b"a\nb\n"), on_line=seen.append)
    assert r.stdout_tail == "A\nB\n" and seen[-2:] == ["A", "B"]


@needs_bwrap
def test_write_outside_job_dir_is_contained(job_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "escaped.txt"
    r = run_job(py(f"open({str(target)!r}, 'w').write('gotcha')", job_dir, ro_paths=[outside]))
    assert not r.ok and r.returncode == 1
    assert "Read-only file system" in r.stderr_tail or "Permission denied" in r.stderr_tail
    assert not target.exists()
    # Paths not bound at all are not even visible: /tmp is a fresh tmpfs, the home directory is hidden.
    r = run_job(py(f"import os; print(os.path.exists({str(outside)!r}))", job_dir))
    assert r.stdout_tail.strip() == "False"
    assert r.isolation == "bubblewrap"
    assert_next_call_works(job_dir)


@needs_bwrap
def test_write_into_task_is_refused(workspace, job_dir):
    definition = workspace.task_dir / "definition.json"
    before = definition.read_bytes()
    r = run_job(py(f"open({str(definition)!r}, 'a').write('tampered')", job_dir, ro_paths=[workspace.task_dir]))
    assert not r.ok and ("Read-only file system" in r.stderr_tail or "Permission denied" in r.stderr_tail)
    assert definition.read_bytes() == before
    workspace.check_lock()  # still intact
    assert_next_call_works(job_dir)


@needs_bwrap
def test_hidden_paths_are_empty(workspace, job_dir):
    r = run_job(py(f"import os; print(sorted(os.listdir({str(workspace.kda_dir)!r})))", job_dir,
                   hide_paths=[workspace.kda_dir], ro_paths=[workspace.root]))
    assert r.ok and r.stdout_tail.strip() == "[]", r.stderr_tail


@needs_bwrap
def test_network_is_unreachable(job_dir):
    r = run_job(py("""
        import socket
        s = socket.create_connection(("1.1.1.1", 53), timeout=5)
        print("connected")
    """, job_dir))
    assert not r.ok and "connected" not in r.stdout_tail
    assert "unreachable" in r.stderr_tail.lower() or "Errno" in r.stderr_tail
    assert_next_call_works(job_dir)


def test_fork_bomb_is_stopped(job_dir):
    r = run_job(py("""
        import os, time
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    """, job_dir, limits=Limits(max_processes=48), wall_timeout_s=30))
    assert not r.ok and not r.timed_out
    assert "process limit 48" in r.reason
    assert r.wall_s < 20
    assert_next_call_works(job_dir)


def test_spin_forever_hits_wall_timeout(job_dir):
    r = run_job(py("while True: pass", job_dir, wall_timeout_s=1.0))
    assert r.timed_out and not r.ok
    assert r.reason == "wall timeout 1 s exceeded"
    assert 0.9 < r.wall_s < 5
    assert_next_call_works(job_dir)


def test_spin_forever_hits_cpu_limit(job_dir):
    r = run_job(py("while True: pass", job_dir, limits=Limits(cpu_seconds=1), wall_timeout_s=30))
    assert not r.ok and not r.timed_out
    assert r.reason.startswith("CPU limit exceeded") and r.signal == "SIGXCPU"
    assert r.cpu_s >= 0.9


def test_unbounded_allocation_is_killed(job_dir):
    r = run_job(py("""
        chunks = []
        while True:
            chunks.append(b"\\x01" * (32 << 20))
    """, job_dir, limits=Limits(max_rss_bytes=384 << 20), wall_timeout_s=60))
    assert not r.ok and not r.timed_out
    assert r.reason.startswith("memory limit exceeded")
    assert_next_call_works(job_dir)


def test_segfault_is_reported(job_dir):
    r = run_job(py("import ctypes; ctypes.string_at(0)", job_dir))
    assert not r.ok and r.signal == "SIGSEGV"
    assert r.reason == "killed by SIGSEGV (segmentation fault)"
    assert_next_call_works(job_dir)


def test_file_size_limit(job_dir):
    r = run_job(py("open('big', 'wb').write(b'x' * (4 << 20))", job_dir, limits=Limits(max_file_bytes=1 << 20)))
    # Python ignores SIGXFSZ, so the write fails with EFBIG instead of the signal killing it.
    assert not r.ok and ("file size limit exceeded" in r.reason or "File too large" in r.stderr_tail)
    assert not (job_dir / "big").exists() or (job_dir / "big").stat().st_size <= 1 << 20


def test_output_tail_is_capped(job_dir):
    r = run_job(py("print('y' * 300000); print('END')", job_dir, tail_bytes=1000))
    assert r.ok and r.stdout_tail.endswith("END\n") and "bytes cut" in r.stdout_tail
    assert len(r.stdout_tail) < 1200


def test_sandboxed_python_imports_our_package(job_dir):
    r = run_job(Job(argv=[sys.executable, "-c", "import kda.sandbox.runner as r; print(r.JOB_UID_BASE)"], cwd=job_dir))
    assert r.ok and r.stdout_tail.strip() == str(runner.JOB_UID_BASE), r.stderr_tail


def test_spawn_talks_over_pipes_and_is_killed(job_dir):
    import subprocess

    proc = spawn(py("import sys\nfor l in sys.stdin:\n    print(int(l) * 2, flush=True)", job_dir),
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("21\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "42"
    finally:
        kill_tree(proc)
    assert proc.returncode is not None


def test_kill_tree_can_wait_until_every_process_has_exited(job_dir, monkeypatch):
    """Signalled is not exited: a killed process holds its files (and GPU context) until its exit is
    done. Asked to, kill_tree waits for the whole tree and says whether it is gone."""
    import subprocess
    import time

    def forked_job():
        proc = spawn(py("""
            import os, time
            if os.fork() == 0:
                time.sleep(60)
            print("forked", flush=True)
            time.sleep(60)
        """, job_dir), stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "forked"
        deadline = time.monotonic() + 10
        while not runner._descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # the forked child (and, under bubblewrap, the sandbox's own processes)
        return proc, [proc.pid, *runner._descendants(proc.pid)]

    proc, tree = forked_job()
    assert len(tree) >= 2
    assert kill_tree(proc, exit_wait_s=10) is True
    assert all(runner._exited(p) for p in tree)
    # One that never exits (as a process stuck in the kernel): the wait ends, and says so.
    proc, _ = forked_job()
    monkeypatch.setattr(runner, "_exited", lambda pid: False)
    t0 = time.monotonic()
    assert kill_tree(proc, exit_wait_s=0.2) is False
    assert time.monotonic() - t0 < 5


def test_without_bubblewrap_runs_rlimits_only_or_refuses(job_dir, monkeypatch):
    monkeypatch.setattr(runner, "isolation_available", lambda: False)
    r = run_job(py("print('plain')", job_dir))
    assert r.ok and r.isolation == "rlimits-only" and r.stdout_tail == "plain\n"
    r = run_job(py("while True: pass", job_dir, limits=Limits(cpu_seconds=1), wall_timeout_s=30))
    assert r.reason.startswith("CPU limit exceeded") and r.isolation == "rlimits-only"
    with pytest.raises(NotAvailable, match="apt-get install bubblewrap"):
        run_job(py("print('never')", job_dir), require_isolation=True)
    with pytest.raises(NotAvailable, match="bubblewrap"):
        spawn(py("print('never')", job_dir), require_isolation=True)


def test_missing_program_is_a_result_not_a_crash(job_dir, monkeypatch):
    monkeypatch.setattr(runner, "isolation_available", lambda: False)
    r = run_job(Job(argv=["/nonexistent/prog"], cwd=job_dir))
    assert not r.ok and "could not start" in r.reason


@pytest.mark.skipif(not isolation_available(), reason="needs bubblewrap")
def test_only_profile_jobs_keep_privileges(job_dir):
    import os

    argv = [sys.executable, "-c", "import os; print(os.getuid())"]
    plain = run_job(Job(argv=argv, cwd=job_dir, wall_timeout_s=30))
    kept = run_job(Job(argv=argv, cwd=job_dir, wall_timeout_s=30, keep_privileges=True))
    assert plain.ok and kept.ok, (plain.reason, kept.reason)
    assert kept.stdout_tail.strip() == str(os.getuid()) and "privileged" in kept.isolation
    if os.geteuid() == 0:
        assert plain.stdout_tail.strip() != "0" and plain.isolation == "bubblewrap"


def test_workers_import_what_the_server_imports_through_pythonpath(job_dir, tmp_path, monkeypatch):
    """A --target install under /tmp on PYTHONPATH (as on a bare GPU image) stays importable."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "probe_mod_kda.py").write_text("VALUE = 42\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    r = run_job(py("import probe_mod_kda; print(probe_mod_kda.VALUE)", job_dir, wall_timeout_s=30))
    assert r.ok and r.stdout_tail.strip() == "42", r


def test_posix_semaphores_work_in_the_sandbox(job_dir):
    """multiprocessing locks (flashinfer-bench's harness makes one at import) need /dev/shm."""
    r = run_job(py("import multiprocessing as m; l = m.Lock(); l.acquire(); l.release(); print('locked')", job_dir,
                   wall_timeout_s=30))
    assert r.ok and r.stdout_tail.strip() == "locked", r


def test_the_job_user_has_a_name(job_dir):
    """A job's own uid has no passwd entry; getpass.getuser() must still answer (torch's compile
    caches name their directory after it, and a candidate that reaches torch._dynamo calls it)."""
    r = run_job(py("import getpass, os; print(os.getuid(), getpass.getuser())", job_dir, wall_timeout_s=30))
    assert r.ok, r.stderr_tail
    uid, name = r.stdout_tail.split()
    assert name == "kda-job"
    if runner._drop_privileges() and isolation_available():
        assert int(uid) >= runner.JOB_UID_BASE  # really an unnamed uid
