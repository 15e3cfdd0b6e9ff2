"""`kda demo`: a real end-to-end session over stdio with both roles, printed as a transcript.

It builds a workspace for the built-in `rmsnorm_h4096` task, copies two example candidates into
work/ (an honest Triton RMSNorm and a dishonest output cache), starts the writer and the reviewer
as `kda serve` subprocesses through the MCP client, and calls every tool each role exposes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

from kda.tools.task import builtin_dataset, init_workspace, resolve_task

EXAMPLES = ("triton_v1", "cached_cheat")


def _plan(workloads: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(role, tool, arguments) in the order a real session would go."""
    return [
        ("writer", "wiki_search", {"query": "rmsnorm is memory bound, how do I reach DRAM bandwidth?", "k": 3}),
        ("writer", "wiki_read", {"page_id": "rmsnorm-layernorm", "section": "Symptoms in Nsight Compute", "limit": 1200}),
        ("writer", "compile", {"path": "work/triton_v1"}),
        ("writer", "compile", {"path": "work/triton_v1"}),  # second time: served from the cache
        ("writer", "benchmark", {"path": "work/triton_v1", "workloads": workloads, "mode": "quick"}),
        ("writer", "benchmark", {"path": "work/cached_cheat", "workloads": workloads, "mode": "quick"}),
        ("writer", "show_run", {"run_id": "$first_bench", "limit": 3}),
        ("writer", "profile", {"path": "work/triton_v1"}),
        ("writer", "profile_summary", {"report": "$last_profile"}),
        ("reviewer", "task_info", {"limit": 1}),
        ("reviewer", "verify", {"path": "work/triton_v1", "workloads": workloads}),
        ("reviewer", "show_run", {"run_id": "$first_bench", "limit": 3}),
        ("reviewer", "audit_log", {"role": "writer", "limit": 5}),
        ("reviewer", "audit_verify", {}),
        ("writer", "compile", {"path": "../outside"}),  # refused: outside the workspace
    ]


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _server(ws: Path, role: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable,
                                 args=["-m", "kda.server.entry", "serve", "--workspace", str(ws), "--role", role],
                                 env=dict(os.environ))


def _substitute(args: dict[str, Any], memo: dict[str, str]) -> dict[str, Any] | None:
    out = {}
    for k, v in args.items():
        if isinstance(v, str) and v.startswith("$"):
            if v[1:] not in memo:
                return None
            v = memo[v[1:]]
        out[k] = v
    return out


async def _call(client: Client, role: str, name: str, args: dict[str, Any]) -> Any:
    t0 = time.perf_counter()
    r = await client.call_tool(name, args)
    # Long measurements come back as a job: follow it the way an agent would.
    s = r.structured_content if isinstance(r.structured_content, dict) else {}
    while not r.is_error and s.get("state") == "running" and s.get("job_id"):
        await anyio.sleep(2.0)
        r = await client.call_tool("job_status", {"job_id": s["job_id"]})
        s = r.structured_content if isinstance(r.structured_content, dict) else {}
        if s.get("state") != "running" and isinstance(s.get("result"), dict):
            s = s["result"]
    dt = time.perf_counter() - t0
    text = r.content[0].text.splitlines()[0] if r.content else ""
    shown = ", ".join(f"{k}={v}" for k, v in args.items())
    print(f"[{role}] {name}({shown})  {dt:.1f}s\n    {'ERROR ' if r.is_error else ''}{text}")
    return r, s


async def _session(ws: Path) -> int:
    failures = 0
    memo: dict[str, str] = {}
    async with Client(_server(ws, "writer")) as writer, Client(_server(ws, "reviewer")) as reviewer:
        clients = {"writer": writer, "reviewer": reviewer}
        tools = {role: {t.name for t in (await c.list_tools()).tools} for role, c in clients.items()}
        for role in clients:
            print(f"[{role}] tools: {', '.join(sorted(tools[role]))}")
        print()
        r, info = await _call(writer, "writer", "task_info", {"limit": 50})
        if _has_gpu():
            workloads: Any = "all"
        else:  # the CPU path runs Triton's interpreter: the two smallest workloads keep it short
            by_size = sorted(info["workloads"], key=lambda w: sorted(w["axes"].values()))
            workloads = [w["uuid"] for w in by_size[:2]]
        for role, name, args in _plan(workloads):
            if name not in tools[role]:
                print(f"[{role}] {name}: not available on this server")
                continue
            call_args = _substitute(args, memo)
            if call_args is None:
                print(f"[{role}] {name}: skipped (needs an earlier result)")
                continue
            r, s = await _call(clients[role], role, name, call_args)
            run_id = s.get("run_id") if not r.is_error else None
            if run_id:
                if name == "benchmark":
                    memo.setdefault("first_bench", run_id)
                if name == "profile":
                    memo["last_profile"] = run_id
            expected_error = call_args.get("path") == "../outside" or (name == "profile" and not _has_gpu())
            if name == "benchmark" and not r.is_error:
                expected = "PASSED" if "triton_v1" in call_args["path"] else None
                ok = s.get("status") == expected if expected else s.get("status") != "PASSED"
                failures += not ok
            elif r.is_error != expected_error:
                failures += 1
    return failures


def run_demo(keep: Path | None = None) -> int:
    tmp = None
    if keep is None:
        tmp = tempfile.mkdtemp(prefix="kda-demo-")
        ws = Path(tmp) / "workspace"
    else:
        ws = Path(keep)
    try:
        src = resolve_task("rmsnorm_h4096", None, None, None, None)
        init_workspace(ws, src)
        examples = builtin_dataset() / "examples" / "rmsnorm_h4096"
        for name in EXAMPLES:
            shutil.copytree(examples / name, ws / "work" / name)
        print(f"kda demo: workspace {ws} (task rmsnorm_h4096, {len(src.workloads)} workloads, baseline = reference)")
        print(f"          candidates: {', '.join('work/' + n for n in EXAMPLES)}\n")
        failures = anyio.run(_session, ws)
        print(f"\ndemo {'finished' if not failures else f'finished with {failures} unexpected result(s)'}")
        return 1 if failures else 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
