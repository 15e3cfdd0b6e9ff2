"""task_info: what the task is, its workloads, the baseline and the floors."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

from kda.tools.errors import LockMismatch

from .toolkit import CallContext, Page, Reply, tool


class TaskInfoInput(Page):
    pass


class WorkloadRow(BaseModel):
    uuid: str
    axes: dict[str, int]
    inputs: dict[str, str] = Field(description="input name -> kind (random, scalar, safetensors)")


class TaskInfoOutput(BaseModel):
    name: str
    op_type: Optional[str]
    description: Optional[str]
    axes: dict[str, Any]
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    reference: str
    baseline: str = Field(description="'reference' or the baseline solution's name")
    workload_count: int
    var_axis_ranges: dict[str, list[int]] = Field(description="var axis -> [min, max] over workloads")
    workloads: list[WorkloadRow]
    next_offset: Optional[int]
    lock_ok: bool
    lock_problem: Optional[str]
    correctness: dict[str, Any]
    target_speedup: float
    role: str
    tools: list[str]


@tool("task_info", title="Task info", input_model=TaskInfoInput, output_model=TaskInfoOutput,
      roles={"writer", "reviewer"}, read_only=True, idempotent=True)
def task_info(call: CallContext, args: TaskInfoInput) -> Reply[TaskInfoOutput]:
    """The kernel task of this workspace: definition (axes, input/output shapes and dtypes,
    reference code), workloads (paginated), the locked baseline, the correctness floors and
    the acceptance target. Also says whether the workspace lock is intact."""
    ws = call.ws
    d = ws.definition()
    wls = ws.workloads()
    ranges: dict[str, list[int]] = {}
    for w in wls:
        for k, v in w.get("axes", {}).items():
            lo, hi = ranges.get(k, [v, v])
            ranges[k] = [min(lo, v), max(hi, v)]
    args.check_start(len(wls), "workloads")
    page = wls[args.offset : args.offset + args.limit]
    rows = [
        WorkloadRow(uuid=w["uuid"], axes=w.get("axes", {}),
                    inputs={n: spec.get("type", "?") for n, spec in w.get("inputs", {}).items()})
        for w in page
    ]
    nxt = args.offset + args.limit if args.offset + args.limit < len(wls) else None
    try:
        ws.check_lock()
        lock_ok, lock_problem = True, None
    except LockMismatch as e:
        lock_ok, lock_problem = False, str(e)
    base = ws.baseline_solution()
    baseline = base["name"] if base else "reference"
    pol = ws.policy
    out = TaskInfoOutput(
        name=d["name"], op_type=d.get("op_type"), description=d.get("description"), axes=d["axes"],
        inputs=d["inputs"], outputs=d["outputs"], reference=d.get("reference", ""), baseline=baseline,
        workload_count=len(wls), var_axis_ranges=ranges, workloads=rows, next_offset=nxt,
        lock_ok=lock_ok, lock_problem=lock_problem, correctness=pol.correctness.model_dump(),
        target_speedup=pol.acceptance.target_speedup, role=call.role, tools=pol.tools_for(call.role),
    )
    shapes = ", ".join(f"{n} {s.get('dtype')}{list(s.get('shape') or [])}" for n, s in d["inputs"].items())
    rng = ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in ranges.items())
    head = (f"{d['name']}: {len(wls)} workloads ({rng}); inputs {shapes}; baseline {baseline}; "
            f"lock {'ok' if lock_ok else 'MISMATCH'}")
    return Reply(head, out)
