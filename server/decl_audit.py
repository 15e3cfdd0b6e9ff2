"""audit_log and audit_verify: the reviewer's view of who did what."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Optional

from pydantic import BaseModel, Field, field_validator

from kda.tools.audit import PERSON
from kda.tools.errors import BadInput, LockMismatch

from .toolkit import REGISTRY, CallContext, Page, Reply, tool


class AuditLogInput(Page):
    tool: Optional[str] = Field(None, description="Only entries of this tool.")
    role: Optional[str] = Field(None, description="Only entries of this role (writer, reviewer, person).")
    since: Optional[str] = Field(None, description="Only entries at or after this time: ISO 8601 or Unix seconds.")

    @field_validator("since")
    @classmethod
    def _since(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        try:
            seconds = float(v)
        except ValueError:
            try:
                datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(f"since {v!r} is neither ISO 8601 nor Unix seconds") from None
            return v
        if not math.isfinite(seconds):
            raise ValueError(f"since {v!r} is not a finite number of seconds")
        return v


class AuditEntry(BaseModel):
    seq: int
    time: str
    role: str
    session: str
    tool: str
    args_digest: str
    outcome: str
    changes: list[dict[str, Any]]
    hash: str


class AuditLogOutput(BaseModel):
    total: int
    entries: list[AuditEntry]
    next_offset: Optional[int]


def _since_ts(v: Optional[str]) -> Optional[float]:
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        return datetime.fromisoformat(v).timestamp()


@tool("audit_log", title="Audit log", input_model=AuditLogInput, output_model=AuditLogOutput,
      roles={"reviewer"}, read_only=True, idempotent=True)
def audit_log(call: CallContext, args: AuditLogInput) -> Reply[AuditLogOutput]:
    """List audit entries (oldest first) with filters and pagination. Each entry records role,
    session, tool, an argument digest, the outcome, and the files under work/ that changed since
    the previous entry (sha256 before/after) — which role changed which file."""
    roles = sorted({*call.ws.policy.roles, PERSON})
    if args.role is not None and args.role not in roles:
        raise BadInput(f"role {args.role!r}: no such role; roles: {', '.join(roles)}")
    rows, total = call.ws.audit.entries(args.tool, args.role, _since_ts(args.since), args.offset, args.limit)
    if args.tool is not None and not total and args.tool not in REGISTRY:
        raise BadInput(f"tool {args.tool!r}: no such tool and no entries under that name; tools: "
                       f"{', '.join(sorted(REGISTRY))}")
    args.check_start(total, "matching entries")
    entries = [
        AuditEntry(seq=r["seq"], time=datetime.fromtimestamp(r["ts"]).isoformat(timespec="seconds"), role=r["role"],
                   session=r["session"], tool=r["tool"], args_digest=r["args_digest"], outcome=r["outcome"],
                   changes=r["changes"], hash=r["hash"])
        for r in rows
    ]
    nxt = args.offset + len(entries) if args.offset + len(entries) < total else None
    changed = sum(len(e.changes) for e in entries)
    head = f"{total} audit entries match; showing {len(entries)} from #{args.offset}; {changed} work/ file changes in this page"
    return Reply(head, AuditLogOutput(total=total, entries=entries, next_offset=nxt))


class AuditVerifyInput(BaseModel):
    pass


class AuditVerifyOutput(BaseModel):
    intact: bool
    entries: int
    head_seq: int
    head_hash: str
    chain_problems: list[str]
    lock_ok: bool
    lock_problems: list[str]


@tool("audit_verify", title="Verify audit chain and lock", input_model=AuditVerifyInput,
      output_model=AuditVerifyOutput, roles={"reviewer"}, read_only=True, idempotent=True)
def audit_verify(call: CallContext, args: AuditVerifyInput) -> Reply[AuditVerifyOutput]:
    """Recompute the audit hash chain and the workspace lock. Reports every edited, deleted,
    inserted or reordered entry, a cut tail, and every task/policy file that no longer matches
    the lock."""
    rep = call.ws.audit.verify()
    try:
        call.ws.check_lock()
        lock_problems: list[str] = []
    except LockMismatch as e:
        lock_problems = [f"{p}: {what}" for p, what in e.changes]
    ok = rep.intact and not lock_problems
    out = AuditVerifyOutput(intact=ok, entries=rep.entries, head_seq=rep.head_seq, head_hash=rep.head_hash,
                            chain_problems=rep.problems, lock_ok=not lock_problems, lock_problems=lock_problems)
    if ok:
        head = f"intact: {rep.entries} entries chain to head {rep.head_hash[:12]}; lock matches"
    else:
        first = (rep.problems + lock_problems)[0]
        head = f"TAMPERED: {len(rep.problems)} chain problem(s), {len(lock_problems)} lock problem(s); first: {first}"
    return Reply(head, out)
