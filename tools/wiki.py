"""Glue between the KernelWiki index and its callers (MCP tools, `kda wiki`).

Where the index lives: $KDA_WIKI_INDEX when set; else the user cache ($XDG_CACHE_HOME/kda/wiki
or ~/.cache/kda/wiki), shared by every workspace so the pages are embedded once per user and
the sources a user ingests are searchable everywhere; else, when the cache is not writable,
the workspace's .kda/wiki. One open index per folder per process; it is built on first use.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import NotAvailable

if TYPE_CHECKING:  # the index pulls numpy/bm25s/chromadb: imported only when a wiki tool runs
    from kda.kernelwiki.index import ReadResult, SearchResult, WikiIndex

    from .workspace import Workspace

_OPEN: dict[Path, "WikiIndex"] = {}
_OPEN_LOCK = threading.Lock()


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(d, os.W_OK | os.X_OK)


def index_dir(ws: "Workspace | None" = None) -> Path:
    from kda.kernelwiki.index import default_index_dir

    if os.environ.get("KDA_WIKI_INDEX"):
        return default_index_dir()
    user = default_index_dir()
    if _writable(user) or ws is None:
        return user
    return ws.kda_dir / "wiki"


def open_index(ws: "Workspace | None" = None, path: Path | str | None = None) -> "WikiIndex":
    """The index for `path` (default: `index_dir(ws)`), opened once per process."""
    try:
        from kda.kernelwiki.index import WikiIndex
    except ImportError as e:
        raise NotAvailable(f"the wiki needs its extra dependencies ({e.name} is missing): "
                           "pip install 'kda-mcp[wiki]'") from None
    target = Path(path).expanduser().resolve() if path is not None else index_dir(ws).resolve()
    with _OPEN_LOCK:
        ix = _OPEN.get(target)
        if ix is None:
            ix = WikiIndex(target)
            _OPEN[target] = ix
        return ix


def search(ws: "Workspace | None", query: str, k: int = 5, filters: Mapping[str, Any] | None = None) -> "SearchResult":
    return open_index(ws).search(query, k, filters)


def read(ws: "Workspace | None", page_id: str, section: str | None = None, offset: int = 0,
         limit: int = 8000) -> "ReadResult":
    return open_index(ws).read(page_id, section, offset, limit)


def forget(path: Path | str | None = None) -> None:
    """Drop cached open indexes (tests, or after removing an index folder)."""
    with _OPEN_LOCK:
        if path is None:
            _OPEN.clear()
        else:
            _OPEN.pop(Path(path).expanduser().resolve(), None)
