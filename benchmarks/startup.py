"""Cold start to first `tools/list` answer over stdio: `kda serve` vs a bare MCPServer.

Method: launch the server process, send `initialize`, `notifications/initialized` and
`tools/list` as raw JSON-RPC lines, and stop the clock when the `tools/list` answer arrives.
The same minimal client drives both servers, so client overhead cancels. Median of N runs,
alternating the two servers so machine drift hits both alike. Goal: kda <= 1.2x bare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rpc(proc: subprocess.Popen, msg: dict) -> None:
    proc.stdin.write((json.dumps(msg) + "\n").encode())
    proc.stdin.flush()


def _read_id(proc: subprocess.Popen, want: int) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("server exited: " + proc.stderr.read().decode()[-2000:])
        msg = json.loads(line)
        if msg.get("id") == want:
            return msg


def time_start(argv: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _rpc(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                    "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                               "clientInfo": {"name": "startup-bench", "version": "0"}}})
        _read_id(proc, 1)
        _rpc(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        _rpc(proc, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        tools = _read_id(proc, 2)["result"]["tools"]
        return time.perf_counter() - t0, len(tools)
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "startup.json"))
    args = ap.parse_args()
    from kda.tools.task import init_workspace, resolve_task

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        init_workspace(ws, resolve_task("rmsnorm_h4096", None, None, None, None))
        servers = {
            "kda serve (writer)": [sys.executable, "-m", "kda.server.entry", "serve", "--workspace", str(ws), "--role", "writer"],
            "kda serve (reviewer)": [sys.executable, "-m", "kda.server.entry", "serve", "--workspace", str(ws), "--role", "reviewer"],
            "bare MCPServer, 1 tool": [sys.executable, str(HERE / "_bare_server.py")],
        }
        times: dict[str, list[float]] = {k: [] for k in servers}
        ntools: dict[str, int] = {}
        for name, argv in servers.items():  # warm the OS file cache once
            time_start(argv)
        for _ in range(args.runs):
            for name, argv in servers.items():
                t, n = time_start(argv)
                times[name].append(t)
                ntools[name] = n
    bare = statistics.median(times["bare MCPServer, 1 tool"])
    rows = []
    print(f"{'server':<26} {'tools':>5} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'vs bare':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"server": name, "tools": ntools[name], "median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                     "max_ms": max(ts) * 1e3, "ratio_vs_bare": med / bare, "runs": len(ts)})
        print(f"{name:<26} {ntools[name]:>5} {med*1e3:>10.1f} {min(ts)*1e3:>8.1f} {max(ts)*1e3:>8.1f} {med/bare:>7.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "startup", "python": sys.version.split()[0],
                                          "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
