"""The audit chain: every kind of tampering shows; concurrent writers never break it."""

from __future__ import annotations

import sqlite3

from kda.tools.audit import AuditLog


def _fill(ws, n=6):
    for i in range(n):
        ws.audit.append("writer", "s1", "task_info", {"i": i}, "ok")


def _db(ws):
    return sqlite3.connect(ws.store.db_path)


def test_intact_chain_and_work_changes(workspace):
    d = workspace.work_dir / "v1"
    d.mkdir()
    (d / "kernel.py").write_text("a = 1\n")
    e1 = workspace.audit.append("writer", "s1", "compile", {"path": "work/v1"}, "ok")
    assert [c["path"] for c in e1["changes"]] == ["work/v1/kernel.py"] and e1["changes"][0]["before"] is None
    e2 = workspace.audit.append("reviewer", "s2", "task_info", {}, "ok")
    assert e2["changes"] == []
    (d / "kernel.py").write_text("a = 2\n")
    e3 = workspace.audit.append("writer", "s1", "compile", {"path": "work/v1"}, "ok")
    assert e3["changes"][0]["before"] == e1["changes"][0]["after"] != e3["changes"][0]["after"]
    (d / "kernel.py").unlink()
    e4 = workspace.audit.append("writer", "s1", "compile", {}, "ok")
    assert e4["changes"] == [{"path": "work/v1/kernel.py", "before": e3["changes"][0]["after"], "after": None}]
    rep = workspace.audit.verify()
    assert rep.intact, rep.problems
    assert rep.entries == 5  # init + 4


def test_edited_entry_is_detected(workspace):
    _fill(workspace)
    with _db(workspace) as db:
        db.execute("UPDATE audit SET outcome = 'ok: 9.9x speedup' WHERE seq = 3")
    rep = workspace.audit.verify()
    assert not rep.intact
    assert any("seq 3" in p and "edited" in p for p in rep.problems)


def test_deleted_entry_is_detected(workspace):
    _fill(workspace)
    with _db(workspace) as db:
        db.execute("DELETE FROM audit WHERE seq = 4")
    rep = workspace.audit.verify()
    assert any("deleted, inserted or reordered" in p for p in rep.problems)
    assert any("chain broken" in p for p in rep.problems)


def test_reordered_entries_are_detected(workspace):
    _fill(workspace)
    with _db(workspace) as db:
        rows = db.execute("SELECT * FROM audit WHERE seq IN (2, 3) ORDER BY seq").fetchall()
        db.execute("DELETE FROM audit WHERE seq IN (2, 3)")
        for r in reversed(rows):  # same rows, swapped order and seq numbers
            db.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?)", (5 - r[0], *r[1:]))
    rep = workspace.audit.verify()
    assert not rep.intact


def test_truncated_tail_is_detected(workspace):
    _fill(workspace)
    with _db(workspace) as db:
        db.execute("DELETE FROM audit WHERE seq >= 6")
    rep = workspace.audit.verify()
    assert any("cut from the tail" in p for p in rep.problems)


def test_rewritten_chain_with_head_file_is_still_caught_by_head(workspace):
    """Recomputing every hash after an edit still leaves the head file disagreeing."""
    from kda.tools.audit import entry_hash

    _fill(workspace)
    with _db(workspace) as db:
        rows = db.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        prev = "0" * 64
        for r in rows:
            outcome = "ok: forged" if r[0] == 2 else r[6]
            h = entry_hash(r[0], r[1], r[2], r[3], r[4], r[5], outcome, r[7], prev)
            db.execute("UPDATE audit SET outcome=?, prev_hash=?, hash=? WHERE seq=?", (outcome, prev, h, r[0]))
            prev = h
    rep = workspace.audit.verify()
    assert any("audit.head" in p for p in rep.problems)


def test_entries_filters_and_pages(workspace):
    _fill(workspace, 10)
    workspace.audit.append("reviewer", "s2", "audit_verify", {}, "ok")
    rows, total = workspace.audit.entries(role="writer", offset=2, limit=3)
    assert total == 10 and [r["seq"] for r in rows] == [4, 5, 6]
    rows, total = workspace.audit.entries(tool="audit_verify")
    assert total == 1 and rows[0]["role"] == "reviewer"


def test_two_logs_on_one_database_interleave_safely(workspace):
    """Two AuditLog objects (as two processes would hold) appending from threads."""
    import threading

    logs = [AuditLog(workspace.store, workspace.work_dir) for _ in range(2)]

    def worker(log, role):
        for i in range(100):
            log.append(role, role, "task_info", {"i": i}, "ok")

    threads = [threading.Thread(target=worker, args=(lg, r)) for lg, r in zip(logs, ("writer", "reviewer"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rep = workspace.audit.verify()
    assert rep.intact, rep.problems
    assert rep.entries == 201
