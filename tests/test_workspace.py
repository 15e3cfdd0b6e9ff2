"""Workspaces, the lock, policies and bad input to `kda init` — engine level, no MCP."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from kda.tools.errors import BadInput, LockMismatch, PathRefused, PolicyError
from kda.tools.policy import shipped_policy_text
from kda.tools.task import init_workspace, resolve_task
from kda.tools.workspace import Workspace


def test_init_builds_the_layout_and_lock(workspace):
    root = workspace.root
    for part in ("task/definition.json", "task/workloads.jsonl", "task/lock.json", "policy.toml"):
        assert (root / part).is_file(), part
    assert (root / "work").is_dir() and (root / ".kda" / "kda.db").is_file()
    with sqlite3.connect(root / ".kda" / "kda.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    lock = json.loads((root / "task" / "lock.json").read_text())
    assert set(lock["files"]) == {"task/definition.json", "task/workloads.jsonl", "task/baseline/README.md", "policy.toml"}
    workspace.check_lock()  # intact
    assert workspace.definition()["name"] == "rmsnorm_h4096"
    assert len(workspace.workloads()) == 14


@pytest.mark.parametrize("target", ["task/definition.json", "task/workloads.jsonl", "policy.toml"])
def test_lock_names_the_changed_file(workspace, target):
    path = workspace.root / target
    path.write_text(path.read_text() + "\n ")
    with pytest.raises(LockMismatch) as e:
        workspace.check_lock()
    assert target in str(e.value) and "modified" in str(e.value)


def test_lock_sees_added_and_deleted_files(workspace):
    (workspace.root / "task" / "baseline" / "solution.json").write_text("{}")
    (workspace.root / "task" / "baseline" / "README.md").unlink()
    with pytest.raises(LockMismatch) as e:
        workspace.check_lock()
    msg = str(e.value)
    assert "task/baseline/solution.json (added)" in msg and "task/baseline/README.md (deleted)" in msg


def test_unknown_task_is_named():
    with pytest.raises(BadInput, match="unknown task 'nope'.*rmsnorm_h4096"):
        resolve_task("nope", None, None, None, None)


def test_malformed_definition_json(tmp_path):
    bad = tmp_path / "def.json"
    bad.write_text('{"name": "x", "axes": ')
    wl = tmp_path / "wl.jsonl"
    wl.write_text('{"uuid": "a", "axes": {}, "inputs": {}}\n')
    with pytest.raises(BadInput, match=r"not valid JSON: line 1"):
        resolve_task(None, None, str(bad), str(wl), None)


def test_definition_that_fails_the_schema(tmp_path):
    bad = tmp_path / "def.json"
    bad.write_text(json.dumps({"name": "x", "op_type": "y", "axes": {}, "inputs": {}, "outputs": {}}))
    wl = tmp_path / "wl.jsonl"
    wl.write_text('{"uuid": "a", "axes": {}, "inputs": {}}\n')
    with pytest.raises(BadInput, match="malformed definition"):
        resolve_task(None, None, str(bad), str(wl), None)


def test_workload_missing_a_var_axis(tmp_path):
    src = resolve_task("rmsnorm_h4096", None, None, None, None)
    d = tmp_path / "def.json"
    d.write_text(json.dumps(src.definition))
    wl = tmp_path / "wl.jsonl"
    wl.write_text(json.dumps({"uuid": "u1", "axes": {}, "inputs": {"hidden_states": {"type": "random"},
                                                                    "weight": {"type": "random"}}}) + "\n")
    with pytest.raises(BadInput, match=r"u1: no value for var axes \['batch_size'\]"):
        resolve_task(None, None, str(d), str(wl), None)


def test_existing_workspace_is_refused_and_untouched(workspace):
    before = sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*"))
    src = resolve_task("gemm_n4096_k4096", None, None, None, None)
    with pytest.raises(BadInput, match="already exists"):
        init_workspace(workspace.root, src)
    after = sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*"))
    assert before == after
    assert not list(workspace.root.parent.glob(".kda-init-*"))


def test_force_relocks_and_keeps_work(workspace):
    (workspace.work_dir / "v1").mkdir()
    (workspace.work_dir / "v1" / "k.py").write_text("x = 1\n")
    (workspace.root / "policy.toml").write_text((workspace.root / "policy.toml").read_text() + "\n")
    src = resolve_task("rmsnorm_h4096", None, None, None, None)
    ws = init_workspace(workspace.root, src, force=True)
    ws.check_lock()
    assert (ws.work_dir / "v1" / "k.py").read_text() == "x = 1\n"
    entries, _ = ws.audit.entries(tool="init --force")
    assert entries and entries[0]["role"] == "person"


def test_dataset_task(shared_dir, tmp_path):
    ds = shared_dir / "fixtures" / "flashinfer-trace"
    src = resolve_task("gemm_n256_k7168", str(ds), None, None, None)
    ws = init_workspace(tmp_path / "g", src)
    assert ws.definition()["name"] == "gemm_n256_k7168"
    assert len(ws.workloads()) == 17


def test_path_traversal_is_refused(workspace):
    for bad in ("../outside", "/etc/passwd", "work/../../x"):
        with pytest.raises(PathRefused, match="outside the workspace"):
            workspace.resolve(bad)
    (workspace.work_dir / "link").symlink_to("/etc")
    with pytest.raises(PathRefused):
        workspace.resolve("work/link/passwd")
    for protected in ("task/definition.json", "policy.toml", ".kda/kda.db"):
        with pytest.raises(PathRefused, match="protected"):
            workspace.resolve(protected, for_write=True)
    assert workspace.resolve("work/v1/kernel.py", for_write=True).name == "kernel.py"


def _edit_policy(ws, old: str, new: str) -> None:
    """Rewrite one piece of the workspace policy from the shipped text (which must contain it)."""
    text = shipped_policy_text()
    assert old in text, f"{old!r} not in policy.toml"
    (ws.root / "policy.toml").write_text(text.replace(old, new))


def test_bad_policy_key_stops_startup(workspace):
    _edit_policy(workspace, "[acceptance]", "[acceptance]\nspeedup_fudge = 2.0")
    with pytest.raises(PolicyError, match=r"policy.toml.*acceptance\.speedup_fudge"):
        Workspace.open(workspace.root)


def test_bad_policy_value_and_unknown_tool(workspace):
    _edit_policy(workspace, "rtol = 1e-2", 'rtol = "loose"')
    with pytest.raises(PolicyError, match="correctness.rtol"):
        Workspace.open(workspace.root)
    _edit_policy(workspace, '"task_info", "compile"', '"task_info", "rm_rf"')
    with pytest.raises(PolicyError, match="rm_rf"):
        Workspace.open(workspace.root)


def test_policy_may_tighten_never_loosen(workspace):
    _edit_policy(workspace, "atol = 1e-2", "atol = 1e-3")
    assert Workspace.open(workspace.root).policy.correctness.atol == 1e-3
    _edit_policy(workspace, "atol = 1e-2", "atol = 0.5")
    with pytest.raises(PolicyError, match="loosens.*correctness.atol 0.5 > floor 0.01"):
        Workspace.open(workspace.root)


def test_reviewer_cannot_be_given_writing_tools(workspace):
    _edit_policy(workspace, '"audit_log", "audit_verify", "verify"', '"audit_log", "audit_verify", "verify", "benchmark"')
    with pytest.raises(PolicyError, match="read_only but lists tools that write.*benchmark"):
        Workspace.open(workspace.root)


def test_cli_init_errors_are_clear(tmp_path):
    kda = [sys.executable, "-m", "kda.server.cli"]
    r = subprocess.run([*kda, "init", str(tmp_path / "w"), "--task", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown task 'nope'" in r.stderr
    assert not (tmp_path / "w").exists()
    r = subprocess.run([*kda, "init", str(tmp_path / "w"), "--task", "rmsnorm_h4096"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "14 workloads" in r.stdout


def test_device_calibration_is_measured_once_and_again_when_a_figure_is_missing(tmp_path):
    from kda.tools.floor import cached_calibration
    from kda.tools.store import Store

    store = Store(tmp_path / ".kda")
    store.initialize()
    calls = []

    def measure(gap):
        def run():
            calls.append(gap)
            return {"bytes_per_s": 3.0e12, "method": "copy", **({"launch_gap_us": gap} if gap else {})}
        return run

    # A run whose device trace was unavailable measures no gap ...
    first = cached_calibration(store, "cuda|H|0", measure(None))
    assert first["cached"] is False and "launch_gap_us" not in first
    assert cached_calibration(store, "cuda|H|0", measure(None))["cached"] is True
    # ... so a traced run measures again, and later traced runs reuse that figure.
    traced = cached_calibration(store, "cuda|H|0", measure(1.05), require=("launch_gap_us",))
    assert traced["cached"] is False and traced["launch_gap_us"] == 1.05
    again = cached_calibration(store, "cuda|H|0", measure(0.9), require=("launch_gap_us",))
    assert again["cached"] is True and again["launch_gap_us"] == 1.05 and again["run_id"] == traced["run_id"]
    assert calls == [None, 1.05]
    # A read-only caller measures without recording; another device has its own figures.
    assert cached_calibration(store, "cuda|H|1", measure(0.97), keep=False)["run_id"] is None
    assert cached_calibration(store, "cuda|H|1", measure(0.98))["launch_gap_us"] == 0.98
    assert [r["kind"] for r in store.list_runs(kind="calibration")] == ["calibration"] * 3


def test_servers_opening_a_workspace_from_before_job_owners_at_once_all_start(tmp_path):
    """The jobs table gained an `owner` column; an older database gets it on open, exactly once,
    even when a writer's and a reviewer's server open it at the same moment."""
    kda_dir = tmp_path / ".kda"
    kda_dir.mkdir()
    old = sqlite3.connect(kda_dir / "kda.db")
    old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, role TEXT NOT NULL, state TEXT NOT NULL,"
                " created REAL NOT NULL, updated REAL NOT NULL, progress TEXT NOT NULL DEFAULT '[]', run_id TEXT,"
                " error TEXT)")
    old.execute("INSERT INTO jobs VALUES ('job_old', 'benchmark', 'writer', 'done', 0, 0, '[]', NULL, NULL)")
    old.commit()
    old.close()
    import time

    start = time.time() + 3  # every process imported and waiting, then all open at once
    code = (f"import time; from kda.tools.store import Store; s = Store({str(kda_dir)!r}); "
            f"time.sleep(max(0.0, {start} - time.time())); s.initialize()")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    db = sqlite3.connect(kda_dir / "kda.db")
    assert "owner" in [r[1] for r in db.execute("PRAGMA table_info(jobs)")]
    assert db.execute("SELECT state FROM jobs WHERE id = 'job_old'").fetchone() == ("done",)
