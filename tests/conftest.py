"""Shared fixtures: real workspaces, real MCP sessions, the shared fixtures folder."""

from __future__ import annotations

import os
import shutil
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KDA_SHARED_DIR", REPO.parent / "shared"))


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


HAS_GPU = _has_gpu()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(pytest.mark.skip(reason="gpu test: no CUDA GPU on this machine"))


@pytest.fixture(scope="session")
def _template_workspace(tmp_path_factory) -> Path:
    """Validate and build rmsnorm_h4096 once per session; tests get copies."""
    from kda.tools.task import init_workspace, resolve_task

    root = tmp_path_factory.mktemp("template") / "ws"
    init_workspace(root, resolve_task("rmsnorm_h4096", None, None, None, None))
    return root


@pytest.fixture
def workspace(_template_workspace, tmp_path):
    from kda.tools.workspace import Workspace

    dest = tmp_path / "ws"
    shutil.copytree(_template_workspace, dest)
    return Workspace.open(dest)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared fixtures folder not found at {SHARED}")
    return SHARED


@asynccontextmanager
async def mcp_client(ws, role: str, mode: str = "auto") -> AsyncIterator:
    """An in-process MCP client session against a fresh server for (ws, role)."""
    from mcp import Client

    from kda.server.app import build_server

    server, _ = build_server(ws, role)
    async with Client(server, mode=mode) as client:
        yield client


@pytest.fixture
def anyio_backend():
    return "asyncio"
