"""How a tool is declared and exposed.

A declaration module defines an input model, an output model and a handler, and registers
them with `@tool(...)`. `register_tools` exposes, for one role, exactly the tools that the
policy grants that role *and* that are declared here: nothing else is ever registered.
Each exposed tool's parameters are the input model's fields (flat, with their descriptions),
its output schema is the output model, and every call is re-checked for the role, validated,
lock-checked when it measures/records/verifies, audited, and answered with a short first line.
"""

from __future__ import annotations

import difflib
import inspect
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Awaitable, Callable, Generic, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from kda.tools.errors import BadInput, KdaError, LockMismatch, RoleDenied
from kda.tools.workspace import Workspace

OutT = TypeVar("OutT", bound=BaseModel)


@dataclass
class Reply(Generic[OutT]):
    """What a handler returns: the first text line, the structured output, optional detail text."""

    headline: str
    data: OutT
    detail: str = ""


@dataclass
class CallContext:
    ws: Workspace
    role: str
    session: str
    mcp: Context | None = None

    async def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        if self.mcp is not None:
            try:
                await self.mcp.report_progress(done, total, message)
            except Exception:  # a client without a progress token: nothing to report to
                pass


Handler = Callable[[CallContext, Any], "Reply[Any] | Awaitable[Reply[Any]]"]


@dataclass
class ToolSpec:
    name: str
    title: str
    description: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    handler: Handler
    roles: frozenset[str]
    annotations: ToolAnnotations
    checks_lock: bool = False


REGISTRY: dict[str, ToolSpec] = {}


def tool(
    name: str,
    *,
    title: str,
    input_model: type[BaseModel],
    output_model: type[BaseModel],
    roles: set[str],
    read_only: bool,
    idempotent: bool = False,
    destructive: bool = False,
    open_world: bool = False,
    checks_lock: bool = False,
) -> Callable[[Handler], Handler]:
    """Declare a tool. The handler's docstring is the description the agent reads."""

    def deco(fn: Handler) -> Handler:
        handler = fn if inspect.iscoroutinefunction(fn) else sync_handler(fn)  # type: ignore[arg-type]
        if name in REGISTRY:
            raise RuntimeError(f"tool {name!r} declared twice")
        REGISTRY[name] = ToolSpec(
            name=name,
            title=title,
            description=inspect.cleandoc(fn.__doc__ or title),
            input_model=input_model,
            output_model=output_model,
            handler=handler,
            roles=frozenset(roles),
            annotations=ToolAnnotations(
                title=title,
                read_only_hint=read_only,
                destructive_hint=destructive if not read_only else False,
                idempotent_hint=idempotent,
                open_world_hint=open_world,
            ),
            checks_lock=checks_lock,
        )
        return fn

    return deco


class Page(BaseModel):
    """Pagination fields shared by listing tools."""

    offset: int = Field(0, ge=0, description="Index of the first item to return.")
    limit: int = Field(50, ge=1, le=500, description="Most items to return.")

    def check_start(self, total: int, what: str) -> None:
        """Refuse an offset past the end: an empty page would read as 'there is nothing'."""
        if self.offset and self.offset >= total:
            there = f"{total} {what} (offsets 0..{total - 1})" if total else f"there are no {what}"
            raise BadInput(f"offset {self.offset} is past the end: {there}")


def _signature_for(model: type[BaseModel], output: type[BaseModel]) -> inspect.Signature:
    params = []
    for fname, f in model.model_fields.items():
        ann = Annotated[(f.annotation, *f.metadata, Field(description=f.description))]  # type: ignore[misc]
        default = inspect.Parameter.empty if f.is_required() else f.get_default(call_default_factory=True)
        params.append(inspect.Parameter(fname, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
    params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context))
    return inspect.Signature(params, return_annotation=Annotated[CallToolResult, output])


def _shown(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} chars)"


def _format_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {msg} (got {_shown(err.get('input'))})")
    return "invalid arguments: " + "; ".join(parts)


def argument_problem(model: type[BaseModel], raw: Any) -> str | None:
    """What is wrong with a call's arguments for this input model, in words; None if nothing.

    Runs before the SDK's own argument model, which drops unknown keys (a misspelt `workloads`
    would silently mean all workloads) and answers range errors with a pydantic dump. `raw` is
    what the SDK would validate: JSON strings already pre-parsed by its own rule.
    """
    if not isinstance(raw, dict):
        return f"invalid arguments: expected an object of named parameters, got {_shown(raw)}"
    fields = model.model_fields
    unknown = [k for k in raw if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            near = difflib.get_close_matches(str(k), list(fields), n=1)
            hints.append(f"{_shown(k, 40)}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        known = ", ".join(fields) or "none"
        return f"invalid arguments: unknown parameter {', '.join(hints)}; this tool takes: {known}"
    try:
        model.model_validate(raw)
    except ValidationError as e:
        return _format_validation(e)
    return None


def _make_entry(spec: ToolSpec, ws: Workspace, role: str, session: str) -> Callable[..., Any]:
    async def entry(**kwargs: Any) -> CallToolResult:
        mcp_ctx = kwargs.pop("ctx", None)
        call = CallContext(ws=ws, role=role, session=session, mcp=mcp_ctx)
        started = time.monotonic()
        outcome = "error: unexpected"
        try:
            # The role is checked again on every call, against the policy as loaded at launch.
            if spec.name not in ws.policy.tools_for(role) or role not in spec.roles:
                raise RoleDenied(f"role {role!r} may not call {spec.name!r}")
            try:
                args = spec.input_model.model_validate(kwargs)
            except ValidationError as e:
                raise KdaError(_format_validation(e)) from None
            if spec.checks_lock:
                await anyio.to_thread.run_sync(ws.check_lock)
            reply = await spec.handler(call, args)  # sync handlers were wrapped by @tool
            outcome = "ok: " + reply.headline
            text = reply.headline + (("\n" + reply.detail) if reply.detail else "")
            return CallToolResult(
                content=[TextContent(type="text", text=text)],
                structured_content=reply.data.model_dump(mode="json"),
            )
        except LockMismatch as e:
            outcome = "lock mismatch: " + ", ".join(f"{p} {w}" for p, w in e.changes)
            raise ToolError(str(e)) from None
        except KdaError as e:
            outcome = "error: " + str(e)
            raise ToolError(str(e)) from None
        except ToolError as e:
            outcome = "error: " + str(e)
            raise
        except Exception as e:  # a bug of ours: say so plainly, keep serving
            outcome = f"internal error: {type(e).__name__}: {e}"
            tb = traceback.format_exc()
            (ws.kda_dir / "logs").mkdir(parents=True, exist_ok=True)
            with open(ws.kda_dir / "logs" / "server-errors.log", "a") as f:
                f.write(f"--- {time.ctime()} {spec.name}\n{tb}\n")
            raise ToolError(f"internal error in {spec.name}: {type(e).__name__}: {e} (see .kda/logs/server-errors.log)") from None
        finally:
            elapsed = time.monotonic() - started
            await anyio.to_thread.run_sync(
                lambda: ws.audit.append(role, session, spec.name, dict(kwargs), f"{outcome} ({elapsed:.2f}s)")
            )

    entry.__name__ = spec.name
    entry.__doc__ = spec.description
    entry.__signature__ = _signature_for(spec.input_model, spec.output_model)  # type: ignore[attr-defined]
    entry.__annotations__ = {"ctx": Context, "return": Annotated[CallToolResult, spec.output_model]}
    return entry


def sync_handler(fn: Callable[[CallContext, Any], Reply[Any]]) -> Callable[[CallContext, Any], Awaitable[Reply[Any]]]:
    """Run a blocking handler in a worker thread so the server keeps answering meanwhile."""

    async def run(call: CallContext, args: Any) -> Reply[Any]:
        return await anyio.to_thread.run_sync(lambda: fn(call, args))

    run.__doc__ = fn.__doc__
    run.__name__ = fn.__name__
    return run


class RoleServer(MCPServer):
    """The MCP server of one role. Its `tools/call` first asks `gate` (set by `register_tools`):
    a call to a tool this role does not have, or with arguments the tool's input model refuses, is
    refused in words and audited. Done here rather than in middleware, so the SDK's own checks
    (an uninitialized session) and its shaping of replies still apply."""

    gate: Callable[[str, Any], Awaitable[str | None]] | None = None

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        if self.gate is not None:
            # Checked as the SDK will read them: some clients send lists and objects as JSON
            # strings, which the tool's own metadata parses first.
            registered = self._tool_manager.get_tool(name)
            seen = (registered.fn_metadata.pre_parse_json(arguments)
                    if registered is not None and isinstance(arguments, dict) else arguments)
            refusal = await self.gate(name, seen)
            if refusal is not None:
                raise ToolError(refusal)
        return await super().call_tool(name, arguments, context)


def _call_gate(ws: Workspace, role: str, session: str, exposed: list[str]) -> Callable[..., Any]:
    async def gate(name: str, raw: Any) -> str | None:
        if name in exposed:
            problem = argument_problem(REGISTRY[name].input_model, raw if raw is not None else {})
            if problem is None:
                return None
        else:
            spec = REGISTRY.get(name)
            owners = sorted(r for r in ws.policy.roles if spec and name in ws.policy.tools_for(r) and r in spec.roles)
            problem = (f"{name!r} is a {'/'.join(owners)} tool; this server's role is {role!r}" if owners
                       else f"unknown tool {_shown(name, 60)}") + f" (tools here: {', '.join(exposed)})"
        args = dict(raw) if isinstance(raw, Mapping) else {"arguments": raw}
        await anyio.to_thread.run_sync(lambda: ws.audit.append(role, session, name[:100], args, f"error: {problem}"))
        label = name if len(name) <= 60 else name[:60] + "..."
        return f"Error executing tool {label}: {problem}"

    return gate


def register_tools(server: RoleServer, ws: Workspace, role: str, session: str) -> list[str]:
    granted = ws.policy.tools_for(role)
    exposed = []
    for name in granted:
        spec = REGISTRY.get(name)
        if spec is None or role not in spec.roles:
            continue  # not implemented yet, or never for this role: never registered
        if ws.policy.roles[role].read_only and not spec.annotations.read_only_hint:
            continue
        server.add_tool(
            _make_entry(spec, ws, role, session),
            name=spec.name,
            title=spec.title,
            description=spec.description,
            annotations=spec.annotations,
            structured_output=True,
        )
        exposed.append(name)
    server.gate = _call_gate(ws, role, session, exposed)
    return exposed
