"""The MCP surface: roles, annotations, errors, resources, stdio and HTTP transports, concurrency."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from conftest import mcp_client
from kda.server.client_config import claude_config, codex_config
from kda.tools.policy import READ_ONLY_TOOLS

pytestmark = pytest.mark.anyio
MODES = ["auto", "legacy"]


@pytest.mark.parametrize("mode", MODES)
async def test_reviewer_sees_only_read_only_tools(workspace, mode):
    async with mcp_client(workspace, "reviewer", mode) as c:
        tools = (await c.list_tools()).tools
        names = {t.name for t in tools}
        assert {"task_info", "audit_log", "audit_verify"} <= names
        assert names <= READ_ONLY_TOOLS
        for t in tools:
            assert t.annotations is not None and t.annotations.read_only_hint is True, t.name
            assert t.output_schema is not None, t.name
            assert t.description
        for writer_tool in ("compile", "benchmark", "record_candidate", "profile"):
            r = await c.call_tool(writer_tool, {})
            assert r.is_error and writer_tool in r.content[0].text
        r = await c.call_tool("benchmark", {"path": "work/x"})
        assert "'benchmark' is a writer tool; this server's role is 'reviewer'" in r.content[0].text
    rows, total = workspace.audit.entries(tool="benchmark", role="reviewer")
    assert total == 2 and all(e["outcome"].startswith("error: 'benchmark' is a writer tool") for e in rows)


async def test_pages_and_filters_past_what_exists_are_named(workspace):
    async with mcp_client(workspace, "reviewer") as c:
        r = await c.call_tool("task_info", {"offset": 14})
        assert r.is_error and "offset 14 is past the end: 14 workloads (offsets 0..13)" in r.content[0].text
        assert not (await c.call_tool("task_info", {"offset": 13})).is_error
        for args, words in [({"role": "admin"}, "role 'admin': no such role; roles: person, reviewer, writer"),
                            ({"tool": "no_such_tool"}, "tool 'no_such_tool': no such tool"),
                            ({"since": "nan"}, "since 'nan' is not a finite number of seconds"),
                            ({"since": "inf"}, "since 'inf' is not a finite number of seconds"),
                            ({"offset": 500}, "offset 500 is past the end")]:
            r = await c.call_tool("audit_log", args)
            assert r.is_error and words in r.content[0].text, (args, r.content[0].text)
        r = await c.call_tool("audit_log", {"tool": "benchmark"})  # a real tool never called: empty, fine
        assert not r.is_error and r.structured_content["total"] == 0
        # "null" sent as a string is read as null, as the SDK reads it.
        r = await c.call_tool("audit_log", {"since": "null", "limit": 1})
        assert not r.is_error, r.content[0].text


@pytest.mark.parametrize("mode", MODES)
async def test_bad_arguments_are_refused_in_words_before_anything_runs_and_audited(workspace, mode):
    async with mcp_client(workspace, "writer", mode) as c:
        # A misspelt parameter must not quietly fall back to its default (here: all 14 workloads).
        typo = await c.call_tool("benchmark", {"path": "work/x", "workload": ["f768064f"], "wait_s": 0})
        assert typo.is_error
        assert "unknown parameter 'workload' (did you mean 'workloads'?)" in typo.content[0].text
        cases = {
            ("benchmark", "mode"): ({"path": "work/x", "mode": "slow"}, "mode: Input should be 'quick' or 'full' (got 'slow')"),
            ("benchmark", "wait_s"): ({"path": "work/x", "wait_s": -1}, "wait_s: Input should be greater than or equal to 0 (got -1)"),
            ("benchmark", "workloads"): ({"path": "work/x", "workloads": "ALL"}, "(got 'ALL')"),
            ("job_status", "job_id"): ({}, "job_id: required"),
            ("task_info", "limit"): ({"limit": 10**9}, "limit: Input should be less than or equal to 500 (got 1000000000)"),
        }
        for (tool, _), (args, words) in cases.items():
            r = await c.call_tool(tool, args)
            assert r.is_error and r.content[0].text.startswith(f"Error executing tool {tool}: invalid arguments: ")
            assert words in r.content[0].text, r.content[0].text
        huge = await c.call_tool("show_run", {"run_id": 7, "limit": "many"})
        assert huge.is_error and "(got 'many')" in huge.content[0].text
        # A list sent as a JSON string is still read as a list, as the SDK reads it: the call gets
        # past the arguments to the missing candidate.
        listed = await c.call_tool("benchmark", {"path": "work/x", "workloads": '["f768064f-9585-47ad-a39e-ed24c2c063fe"]'})
        assert listed.is_error and "work/x does not exist" in listed.content[0].text, listed.content[0].text
    rows, total = workspace.audit.entries(role="writer", limit=50)
    assert total == 8 and sum(e["outcome"].startswith("error: invalid arguments") for e in rows) == 7


async def test_a_tool_entry_rechecks_the_role_on_every_call(workspace):
    """Defence in depth: even a reviewer-only tool's entry, were it ever reached by the writer,
    refuses the call and the refusal is audited."""
    from mcp.server.mcpserver.exceptions import ToolError

    import kda.server.app  # noqa: F401  (registers the declarations)
    from kda.server.toolkit import REGISTRY, _make_entry

    entry = _make_entry(REGISTRY["audit_verify"], workspace, "writer", "s-test")
    with pytest.raises(ToolError, match="may not call 'audit_verify'"):
        await entry()
    rows, total = workspace.audit.entries(tool="audit_verify", role="writer")
    assert total == 1 and "may not call" in rows[0]["outcome"]


@pytest.mark.parametrize("mode", MODES)
async def test_writer_tools_and_unregistered_tools_are_refused(workspace, mode):
    async with mcp_client(workspace, "writer", mode) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert "task_info" in names
        assert "audit_log" not in names and "audit_verify" not in names and "verify" not in names
        r = await c.call_tool("audit_log", {})
        assert r.is_error


@pytest.mark.parametrize("mode", MODES)
async def test_task_info_first_line_and_structure(workspace, mode):
    async with mcp_client(workspace, "writer", mode) as c:
        r = await c.call_tool("task_info", {"limit": 5})
        assert not r.is_error
        first = r.content[0].text.splitlines()[0]
        assert first.startswith("rmsnorm_h4096: 14 workloads (batch_size 1..8192)") and "lock ok" in first
        s = r.structured_content
        assert s["workload_count"] == 14 and len(s["workloads"]) == 5 and s["next_offset"] == 5
        assert s["baseline"] == "reference" and s["lock_ok"] is True
        r2 = await c.call_tool("task_info", {"offset": 10, "limit": 5})
        assert len(r2.structured_content["workloads"]) == 4 and r2.structured_content["next_offset"] is None
        bad = await c.call_tool("task_info", {"limit": 0})
        assert bad.is_error and "limit" in bad.content[0].text


async def test_resources(workspace):
    async with mcp_client(workspace, "reviewer") as c:
        uris = {str(r.uri) for r in (await c.list_resources()).resources}
        assert {"kda://task", "kda://policy"} <= uris
        task = json.loads((await c.read_resource("kda://task")).contents[0].text)
        assert task["definition"]["name"] == "rmsnorm_h4096"
        pol = (await c.read_resource("kda://policy")).contents[0].text
        assert "[roles.reviewer]" in pol


async def test_lock_and_audit_tampering_show_in_audit_verify(workspace):
    async with mcp_client(workspace, "reviewer") as c:
        r = await c.call_tool("audit_verify", {})
        assert r.structured_content["intact"] is True
        (workspace.root / "policy.toml").write_text((workspace.root / "policy.toml").read_text() + "# x\n")
        r = await c.call_tool("audit_verify", {})
        assert r.structured_content["intact"] is False
        assert r.structured_content["lock_problems"] == ["policy.toml: modified"]
        assert r.content[0].text.startswith("TAMPERED")
        import sqlite3

        with sqlite3.connect(workspace.store.db_path) as db:
            db.execute("UPDATE audit SET role = 'reviewer' WHERE seq = 1")
        r = await c.call_tool("audit_verify", {})
        assert any("seq 1" in p for p in r.structured_content["chain_problems"])


async def test_every_call_is_audited_with_role_and_outcome(workspace):
    async with mcp_client(workspace, "writer") as c:
        await c.call_tool("task_info", {})
    async with mcp_client(workspace, "reviewer") as c:
        await c.call_tool("audit_log", {"since": "yesterday"})
    rows, _ = workspace.audit.entries(tool="task_info")
    assert [r["role"] for r in rows] == ["writer"] and rows[0]["outcome"].startswith("ok: rmsnorm_h4096")
    rows, _ = workspace.audit.entries(tool="audit_log")
    assert rows[0]["role"] == "reviewer" and "neither ISO 8601 nor Unix seconds" in rows[0]["outcome"]


def _kda_argv() -> list[str]:
    return [sys.executable, "-m", "kda.server.cli"]


async def test_stdio_launch_as_claude_code_would(workspace):
    """Start the server from the exact command line `kda client-config claude` writes."""
    (mcp_path, mcp_text), _ = claude_config(workspace)
    entry = json.loads(mcp_text)["mcpServers"]["kda-writer"]
    assert entry["type"] == "stdio" and entry["args"][-4:] == ["--workspace", str(workspace.root), "--role", "writer"]
    params = StdioServerParameters(command=entry["command"], args=entry["args"], env=dict(os.environ))
    async with Client(params) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert "task_info" in names
        r = await c.call_tool("task_info", {})
        assert r.structured_content["name"] == "rmsnorm_h4096"


def test_client_configs(workspace):
    files = dict(claude_config(workspace))
    settings = json.loads(files[workspace.root / ".claude" / "settings.json"])
    assert "Edit(/task/**)" in settings["permissions"]["deny"] and "Edit(/policy.toml)" in settings["permissions"]["deny"]
    assert "Edit(/.kda/**)" in settings["permissions"]["deny"]
    import tomllib

    (path, text), = codex_config(workspace)
    doc = tomllib.loads(text)
    server = doc["mcp_servers"]["kda-reviewer"]
    assert server["enabled_tools"] == workspace.policy.tools_for("reviewer")
    assert server["args"][-1] == "reviewer"
    assert doc["profiles"]["kda-reviewer"]["sandbox_mode"] == "read-only"


async def _hammer(ws_root: Path, role: str, calls: int) -> int:
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "kda.server.entry", "serve", "--workspace", str(ws_root), "--role", role],
                                   env=dict(os.environ))
    ok = 0
    async with Client(params) as c:
        for _ in range(calls):
            r = await c.call_tool("task_info", {"limit": 1})
            ok += not r.is_error
    return ok


@pytest.mark.slow
async def test_two_server_processes_200_calls_each(workspace):
    results: dict[str, int] = {}

    async def run(role):
        results[role] = await _hammer(workspace.root, role, 200)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "writer")
        tg.start_soon(run, "reviewer")
    assert results == {"writer": 200, "reviewer": 200}
    rep = workspace.audit.verify()
    assert rep.intact, rep.problems
    rows, total = workspace.audit.entries(tool="task_info", limit=500)
    assert total == 400
    assert sorted({r["role"] for r in rows}) == ["reviewer", "writer"]
    assert len({r["session"] for r in rows}) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_streamable_http_transport(workspace):
    port = _free_port()
    proc = subprocess.Popen([*_kda_argv(), "serve", "--workspace", str(workspace.root), "--role", "reviewer",
                             "--transport", "http", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await anyio.sleep(0.2)
        async with Client(f"http://127.0.0.1:{port}/mcp") as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert "audit_verify" in names and "compile" not in names
            r = await c.call_tool("audit_verify", {})
            assert r.structured_content["intact"] is True
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_refuses_bad_role_and_missing_workspace(tmp_path, workspace):
    r = subprocess.run([*_kda_argv(), "serve", "--workspace", str(workspace.root), "--role", "admin"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown role 'admin'" in r.stderr
    r = subprocess.run([*_kda_argv(), "serve", "--workspace", str(tmp_path / "none"), "--role", "writer"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_server_startup_imports_nothing_heavy(workspace):
    code = (
        "import sys; from kda.tools.workspace import Workspace; from kda.server.app import build_server;"
        f"build_server(Workspace.open({str(workspace.root)!r}), 'writer'); build_server(Workspace.open({str(workspace.root)!r}), 'reviewer');"
        "heavy = [m for m in ('torch', 'triton', 'chromadb', 'sentence_transformers', 'flashinfer_bench', 'ncu_report', 'numpy') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


@pytest.mark.parametrize("target", ["task/workloads.jsonl", "policy.toml"])
async def test_lock_tampering_fails_the_next_measuring_call(workspace, target):
    cand = workspace.work_dir / "v1"
    cand.mkdir()
    (cand / "candidate.toml").write_text('language = "python"\nentry_point = "k.py::run"\n')
    (cand / "k.py").write_text("def run(hidden_states, weight, output):\n    output.copy_(hidden_states)\n")
    path = workspace.root / target
    path.write_text(path.read_text() + "\n")
    async with mcp_client(workspace, "writer") as w:
        r = await w.call_tool("compile", {"path": "work/v1"})
        assert r.is_error and f"{target} (modified)" in r.content[0].text
        info = await w.call_tool("task_info", {})  # reading still works, and says why measuring won't
        assert info.structured_content["lock_ok"] is False
    async with mcp_client(workspace, "reviewer") as rv:
        log = await rv.call_tool("audit_log", {"tool": "compile"})
        entry = log.structured_content["entries"][-1]
        assert entry["role"] == "writer" and entry["outcome"].startswith(f"lock mismatch: {target} modified")
        v = await rv.call_tool("audit_verify", {})
        assert v.structured_content["lock_problems"] == [f"{target}: modified"]
        assert v.structured_content["chain_problems"] == []
