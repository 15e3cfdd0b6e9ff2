"""Client setup files for Claude Code (the writer) and Codex (the reviewer)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import tomli_w

from kda.tools.workspace import Workspace


def _kda_command() -> list[str]:
    exe = shutil.which("kda")
    return [exe] if exe else [sys.executable, "-m", "kda.server.entry"]


def _serve_args(ws: Workspace, role: str) -> list[str]:
    return ["serve", "--workspace", str(ws.root), "--role", role]


def claude_config(ws: Workspace) -> list[tuple[Path, str]]:
    """`.mcp.json` with the writer server, and `.claude/settings.json` denying edits of protected paths.

    Claude Code checks file rules on Edit(...) (which covers its Write tool too); a leading `/`
    is relative to the project (the workspace), where the settings file lives.
    """
    cmd = _kda_command()
    mcp = {"mcpServers": {"kda-writer": {"type": "stdio", "command": cmd[0], "args": cmd[1:] + _serve_args(ws, "writer")}}}
    # Edit(...) rules cover every file-writing tool of Claude Code (Write included); it warns on
    # Write(...) path rules, which it does not read.
    deny = [f"Edit(/{pattern})" for pattern in ws.policy.paths.protected]
    settings = {
        "permissions": {
            "allow": ["mcp__kda-writer__*", "Edit(/work/**)"],
            "deny": deny,
        },
        "enabledMcpjsonServers": ["kda-writer"],
    }
    return [
        (ws.root / ".mcp.json", json.dumps(mcp, indent=2) + "\n"),
        (ws.root / ".claude" / "settings.json", json.dumps(settings, indent=2) + "\n"),
    ]


def codex_config(ws: Workspace) -> list[tuple[Path, str]]:
    """`.codex/config.toml`: the reviewer server with only its tools enabled, and a read-only profile."""
    cmd = _kda_command()
    doc = {
        "profiles": {"kda-reviewer": {"sandbox_mode": "read-only", "approval_policy": "never"}},
        "mcp_servers": {
            "kda-reviewer": {
                "command": cmd[0],
                "args": cmd[1:] + _serve_args(ws, "reviewer"),
                "enabled_tools": ws.policy.tools_for("reviewer"),
                "startup_timeout_sec": 30,
                "tool_timeout_sec": 120,
            }
        },
    }
    return [(ws.root / ".codex" / "config.toml", tomli_w.dumps(doc))]
