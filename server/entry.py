"""The `kda` entry point. `kda serve` starts without typer (clients start a server for every
session, and typer with rich costs ~70 ms of that start-up); every other command, and anything
unusual on the serve line (help, a typo), goes to the full CLI in cli.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kda.tools.errors import KdaError


def run_server(workspace: Path, role: str, transport: str, host: str, port: int) -> int:
    from kda.tools.workspace import Workspace

    from .app import build_server

    try:
        if role not in ("writer", "reviewer"):
            raise KdaError(f"unknown role {role!r}: use writer or reviewer")
        if transport not in ("stdio", "http"):
            raise KdaError(f"unknown transport {transport!r}: use stdio or http")
        ws = Workspace.open(workspace)
        server, _ = build_server(ws, role)
        from kda.tools.bench_workers import prestart

        prestart(ws)  # the first benchmark's worker processes, started ahead (where the policy wants them)
    except KdaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=host, port=port)
    return 0


def _serve_fast(argv: list[str]) -> int | None:
    """`kda serve` without typer: clients start the server on every session, and typer with rich
    costs ~70 ms of that start-up. Anything unusual (help, a typo) goes to the full CLI."""
    p = argparse.ArgumentParser(prog="kda serve", add_help=False, exit_on_error=False)
    p.add_argument("--workspace", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--transport", default="stdio")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    try:
        ns, rest = p.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return None
    if rest:
        return None
    return run_server(Path(ns.workspace), ns.role, ns.transport, ns.host, ns.port)


def main() -> None:
    if sys.argv[1:2] == ["serve"] and not {"-h", "--help"} & set(sys.argv[2:]):
        code = _serve_fast(sys.argv[2:])
        if code is not None:
            sys.exit(code)
    from .cli import app

    app()


if __name__ == "__main__":
    main()
