"""Errors the engine raises. Each names the problem in words a user can act on.

The MCP layer turns every `KdaError` into a `ToolError`; the CLI prints it and exits non-zero.
"""


class KdaError(Exception):
    """Base class: a problem the user or agent can fix from the message alone."""


class BadInput(KdaError):
    """The request itself is wrong (unknown task, malformed file, bad parameter)."""


class PathRefused(KdaError):
    """A path resolves outside the workspace, or is protected for the operation asked."""


class LockMismatch(KdaError):
    """A file pinned by task/lock.json changed since `kda init`."""

    def __init__(self, changes: list[tuple[str, str]]):
        self.changes = changes  # (relative path, what happened)
        first = ", ".join(f"{p} ({what})" for p, what in changes[:5])
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        super().__init__(
            f"workspace lock mismatch: {first}{more}. The task and policy are immutable after "
            "`kda init`; restore the file(s) or re-create the workspace with `kda init --force`."
        )


class PolicyError(KdaError):
    """The policy file is invalid or loosens a floor."""


class NotAvailable(KdaError):
    """A tool or toolchain this request needs is missing on this machine."""


class RoleDenied(KdaError):
    """The calling role is not allowed this tool or action."""
