"""Build the MCP server for one workspace and one role."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import secrets

from mcp.server.mcpserver import MCPServer

from kda.tools.workspace import Workspace

from .toolkit import RoleServer, register_tools

INSTRUCTIONS = {
    "writer": (
        "You are the writer on a kernel-engineering bench. Edit candidates only under work/ "
        "(a directory with candidate.toml and sources). Measure with the tools: every speedup is "
        "against the locked baseline, and the task, policy and history cannot be changed."
    ),
    "reviewer": (
        "You are the read-only reviewer. Inspect task, runs, candidates, audit log and profiles; "
        "verify claims with `verify`. You cannot change the workspace."
    ),
}


def load_declarations() -> None:
    """Import every `server/decl_*.py` module; each registers its tools on import (cheaply)."""
    from kda import server as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("decl_"):
            importlib.import_module(f"kda.server.{mod.name}")


def build_server(ws: Workspace, role: str) -> tuple[MCPServer, list[str]]:
    if role not in ws.policy.roles:
        from kda.tools.errors import PolicyError

        raise PolicyError(f"{ws.policy_path}: policy defines no role {role!r}; roles: {sorted(ws.policy.roles)}")
    load_declarations()
    session = f"{role}-{os.getpid()}-{secrets.token_hex(4)}"
    server = RoleServer(name=f"kda-{role}", version="0.1.0", instructions=INSTRUCTIONS[role], log_level="WARNING")
    exposed = register_tools(server, ws, role, session)

    @server.resource("kda://task", name="task", description="The task: definition and workloads.",
                     mime_type="application/json")
    def task_resource() -> str:
        return json.dumps({"definition": ws.definition(), "workloads": ws.workloads()}, indent=1)

    @server.resource("kda://policy", name="policy", description="The workspace policy (policy.toml).",
                     mime_type="application/toml")
    def policy_resource() -> str:
        return ws.policy_path.read_text()

    @server.resource("kda://role", name="role", description="This server's role and its tools.",
                     mime_type="application/json")
    def role_resource() -> str:
        return json.dumps({"role": role, "tools": exposed, "session": session})

    return server, exposed
