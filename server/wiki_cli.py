"""`kda wiki ...`: build, search and read the wiki; ingest, list and remove the user's sources."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from kda.tools.errors import KdaError

wiki_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                       help="KernelWiki: search the pages, ingest your own sources beside them.")


def _note(msg: str) -> None:
    typer.echo(msg, err=True)

IndexOpt = typer.Option(None, "--index", help="Index folder (default: $KDA_WIKI_INDEX or ~/.cache/kda/wiki).")
WorkspaceOpt = typer.Option(None, "--workspace", help="Use this workspace's index location rules (.kda/wiki "
                                                      "when the user cache is not writable).")


def _fail(e: Exception) -> None:
    _note(f"error: {e}")
    raise typer.Exit(2)


def _open(index: Optional[Path], workspace: Optional[Path]):
    import warnings

    from kda.tools import wiki
    from kda.tools.workspace import Workspace

    ws = Workspace.open(workspace) if workspace else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ix = wiki.open_index(ws, index)
    for w in caught:
        if w.category.__name__ == "WikiWarning":
            _note(f"warning: {w.message}")
    return ix


def _parse_filters(items: List[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for it in items:
        if "=" not in it:
            raise KdaError(f"filter {it!r} must look like key=value (e.g. type=playbook, architecture=sm90)")
        k, v = it.split("=", 1)
        out.setdefault(k.strip(), []).extend(x for x in v.split(",") if x.strip())
    return out


@wiki_app.command()
def ingest(
    path: Path = typer.Argument(..., help="A folder (or file) of docs and code: .md .rst .txt .cu .cuh .h .hpp .cpp .py"),
    name: Optional[str] = typer.Option(None, "--name", help="Source name (default: the folder name)."),
    index: Optional[Path] = IndexOpt,
    workspace: Optional[Path] = WorkspaceOpt,
) -> None:
    """Index PATH as a source beside the pages; re-running updates only changed files."""
    from kda.kernelwiki.ingest import ingest_path

    started = time.monotonic()
    try:
        ix = _open(index, workspace)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last[0] > 2 or done == total:
                last[0] = time.monotonic()
                _note(f"embedded {done}/{total} chunks")

        rep = ingest_path(ix, path, name, progress)
    except KdaError as e:
        _fail(e)
    typer.echo(f"source {rep.name} ({rep.root}): {rep.files_seen} files seen, {rep.files_updated} updated, "
               f"{rep.files_unchanged} unchanged, {rep.files_removed} removed; +{rep.chunks_added} / "
               f"-{rep.chunks_removed} chunks in {time.monotonic() - started:.1f}s; index {ix.path}")
    if rep.skipped:
        typer.echo(f"skipped {len(rep.skipped)}: " + "; ".join(rep.skipped[:10]) + (" ..." if len(rep.skipped) > 10 else ""))


@wiki_app.command()
def sources(index: Optional[Path] = IndexOpt, workspace: Optional[Path] = WorkspaceOpt) -> None:
    """List the indexed sources (the built-in pages are 'kernelwiki')."""
    try:
        ix = _open(index, workspace)
    except KdaError as e:
        _fail(e)
    for s in ix.sources():
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["updated"]))
        typer.echo(f"{s['name']:<24} {s['files']:>6} files {s['chunks']:>7} chunks  updated {when}  {s['root']}")


@wiki_app.command()
def remove(name: str = typer.Argument(..., help="Source name, as `kda wiki sources` lists it."),
           index: Optional[Path] = IndexOpt, workspace: Optional[Path] = WorkspaceOpt) -> None:
    """Drop an ingested source from the index."""
    try:
        n = _open(index, workspace).remove_source(name)
    except KdaError as e:
        _fail(e)
    typer.echo(f"removed source {name}: {n} chunks")


@wiki_app.command()
def search(
    query: str = typer.Argument(...),
    k: int = typer.Option(5, "-k", help="Number of hits."),
    filter: List[str] = typer.Option([], "--filter", "-f", help="key=value (type, architecture, tags, symptom, "
                                                                "source); repeatable; comma = any of."),
    index: Optional[Path] = IndexOpt,
    workspace: Optional[Path] = WorkspaceOpt,
) -> None:
    """Search the wiki from the shell."""
    try:
        res = _open(index, workspace).search(query, k, _parse_filters(filter))
    except KdaError as e:
        _fail(e)
    for note in res.notes:
        _note(f"note: {note}")
    for n, h in enumerate(res.hits, 1):
        where = " > ".join(h.heading_path) or "introduction"
        typer.echo(f"{n}. {h.page_id} [{where}] {h.score:.4f}\n   {h.snippet}")
    if not res.hits:
        typer.echo("no hits")


@wiki_app.command()
def read(page_id: str = typer.Argument(...), section: Optional[str] = typer.Option(None, "--section"),
         index: Optional[Path] = IndexOpt, workspace: Optional[Path] = WorkspaceOpt) -> None:
    """Print a page (or one section)."""
    try:
        ix = _open(index, workspace)
        offset: Optional[int] = 0
        while offset is not None:
            r = ix.read(page_id, section, offset, 30000)
            typer.echo(r.text, nl=False)
            offset = r.next_offset
        typer.echo("")
    except KdaError as e:
        _fail(e)


@wiki_app.command()
def build(index: Optional[Path] = IndexOpt, workspace: Optional[Path] = WorkspaceOpt) -> None:
    """Build (or bring up to date) the index now, so the first search is fast."""
    started = time.monotonic()
    try:
        ix = _open(index, workspace)
    except KdaError as e:
        _fail(e)
    for note in ix.notes:
        typer.echo(note)
    typer.echo(f"index {ix.path}: {ix.chunk_count} chunks ready in {time.monotonic() - started:.1f}s")
