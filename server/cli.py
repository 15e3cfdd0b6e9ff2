"""The `kda` command: init, serve, client-config, demo, tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from kda.tools.errors import KdaError

from .wiki_cli import wiki_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kda-mcp: a kernel-engineering bench for coding agents, served over MCP.")
app.add_typer(wiki_app, name="wiki")


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command()
def init(
    directory: Path = typer.Argument(..., help="Workspace directory to create."),
    task: Optional[str] = typer.Option(None, "--task", help="Built-in task or a definition name in --dataset."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="FlashInfer Trace folder (default: $FIB_DATASET_PATH)."),
    definition: Optional[str] = typer.Option(None, "--definition", help="Definition JSON file."),
    workloads: Optional[str] = typer.Option(None, "--workloads", help="Workloads JSONL file."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Baseline solution.json (default: the reference)."),
    policy: str = typer.Option("default", "--policy", help="Policy from policies/ to copy."),
    force: bool = typer.Option(False, "--force", help="Re-create task/ and the lock of an existing workspace."),
) -> None:
    """Create a workspace for one kernel task, with its task locked."""
    from kda.tools.task import init_workspace, resolve_task

    try:
        src = resolve_task(task, dataset, definition, workloads, baseline)
        ws = init_workspace(directory, src, policy=policy, force=force)
    except KdaError as e:
        _fail(e)
    typer.echo(f"workspace {ws.root}: task {src.name}, {len(src.workloads)} workloads, "
               f"baseline {'solution' if src.baseline else 'reference'}; edit candidates under {ws.work_dir}")


@app.command()
def tasks() -> None:
    """List the built-in tasks."""
    from kda.tools.task import builtin_tasks

    for name in builtin_tasks():
        typer.echo(name)


@app.command()
def serve(
    workspace: Path = typer.Option(..., "--workspace", help="Workspace directory."),
    role: str = typer.Option(..., "--role", help="writer or reviewer."),
    transport: str = typer.Option("stdio", "--transport", help="stdio or http (streamable HTTP)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8765, "--port"),
) -> None:
    """Serve one role of one workspace over MCP."""
    from .entry import run_server

    code = run_server(workspace, role, transport, host, port)
    if code:
        raise typer.Exit(code)


@app.command("client-config")
def client_config(
    client: str = typer.Argument(..., help="claude or codex."),
    workspace: Path = typer.Option(..., "--workspace", help="Workspace directory."),
    write: bool = typer.Option(False, "--write", help="Write the files instead of printing them."),
) -> None:
    """Print (or --write) the exact setup for Claude Code (writer) or Codex (reviewer)."""
    from kda.tools.workspace import Workspace

    from .client_config import claude_config, codex_config

    try:
        ws = Workspace.open(workspace)
        files = claude_config(ws) if client == "claude" else codex_config(ws) if client == "codex" else None
        if files is None:
            raise KdaError(f"unknown client {client!r}: use claude or codex")
    except KdaError as e:
        _fail(e)
    for path, text in files:
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            typer.echo(f"wrote {path}")
        else:
            typer.echo(f"# {path}\n{text}")


@app.command()
def demo(
    keep: Optional[Path] = typer.Option(None, "--keep", help="Build the demo workspace here and keep it."),
) -> None:
    """Run the whole loop on a temporary rmsnorm_h4096 workspace with both roles over stdio."""
    from .demo import run_demo

    try:
        code = run_demo(keep)
    except KdaError as e:
        _fail(e)
    raise typer.Exit(code)


if __name__ == "__main__":
    from .entry import main as entry_main

    entry_main()
