"""benchmark, show_run, job_status (writer) and verify (reviewer): measurement you cannot fool."""

from __future__ import annotations

import threading
from typing import Any, Callable, Literal, Optional, Union

import anyio
from pydantic import BaseModel, Field, field_validator

from kda.tools.errors import KdaError

from .toolkit import CallContext, Page, Reply, tool

WorkloadsArg = Union[str, list[str]]
_WORKLOADS_DESC = ("'all', 'sample:N' (N workloads spread over the var axes, smallest and largest included) "
                   "or a list of workload uuids (see task_info).")


class _CandidateArgs(BaseModel):
    path: Optional[str] = Field(None, description="Candidate directory under work/ (e.g. 'work/v1').")
    candidate: Optional[str] = Field(None, description=("A recorded candidate id instead of path: the candidate_hash "
                                                         "of an earlier benchmark (8+ hex digits), its content as it was then."))
    workloads: WorkloadsArg = Field("all", description=_WORKLOADS_DESC)
    wait_s: float = Field(50.0, ge=0, le=600, description="Return the result if done within this many seconds, "
                                                          "else a job id for job_status.")

    @field_validator("workloads")
    @classmethod
    def _wl(cls, v: WorkloadsArg) -> WorkloadsArg:
        if isinstance(v, str):
            v = v.strip()
            if not (v == "all" or v.startswith("sample:")):
                raise ValueError("use 'all', 'sample:N' or a list of workload uuids")
        return v


class BenchmarkInput(_CandidateArgs):
    mode: Literal["quick", "full"] = Field("quick", description="quick: fewer trials and iterations; full: more.")


class WorkloadResult(BaseModel):
    uuid: str
    axes: dict[str, Any]
    status: str = Field(description="flashinfer-bench EvaluationStatus or INPUT_MUTATED, TIMING_TAMPERED, "
                                    "BELOW_PHYSICAL_FLOOR, SANDBOX_VIOLATION")
    check: Optional[str] = Field(None, description="The check that failed.")
    evidence: str = ""
    baseline_us: Optional[float] = None
    baseline_ci_us: Optional[list[float]] = None
    candidate_us: Optional[float] = None
    candidate_ci_us: Optional[list[float]] = None
    speedup: Optional[float] = None
    speedup_ci: Optional[list[float]] = None
    clean_baseline_us: Optional[float] = None
    clean_after_baseline_us: Optional[float] = Field(
        None, description="Only where the baseline ran markedly slower beside the candidate than alone: "
                          "timed alone again after the candidate's processes exited (demonstrably slow "
                          "again: drift, not interference).")
    launch_gap_us: Optional[float] = Field(
        None, description="The device's launch gap, measured once per device, added to every device span "
                          "in the latencies above (0 where CUDA events time the calls).")
    floor_us: Optional[float] = None
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None
    matched_ratio: Optional[float] = None
    trials: Optional[int] = None
    notes: list[str] = Field(default_factory=list)


class BenchmarkOutput(BaseModel):
    state: Literal["done", "running"]
    job_id: str
    run_id: Optional[str] = None
    status: Optional[str] = None
    device: Optional[str] = None
    candidate_path: Optional[str] = None
    candidate_hash: Optional[str] = None
    baseline: Optional[str] = None
    mode: Optional[str] = None
    selection: Optional[str] = None
    passed: Optional[int] = None
    total: Optional[int] = None
    mean_speedup: Optional[float] = None
    mean_speedup_ci: Optional[list[float]] = None
    geomean_speedup: Optional[float] = None
    geomean_speedup_ci: Optional[list[float]] = None
    flags: list[str] = Field(default_factory=list)
    isolation: Optional[str] = None
    workloads: list[WorkloadResult] = Field(default_factory=list)
    progress: Optional[str] = None


def benchmark_output(rec: dict[str, Any], job_id: str) -> BenchmarkOutput:
    agg = rec.get("aggregate", {})
    rows = [WorkloadResult.model_validate({k: v for k, v in w.items() if k in WorkloadResult.model_fields})
            for w in rec.get("workloads", [])]
    return BenchmarkOutput(
        state="done", job_id=job_id, run_id=rec.get("run_id"), status=rec["status"], device=rec["device"],
        candidate_path=rec["candidate_path"], candidate_hash=rec["candidate_hash"], baseline=rec.get("baseline"),
        mode=rec.get("mode"), selection=rec.get("selection"), passed=agg.get("passed"), total=agg.get("total"),
        mean_speedup=agg.get("mean_speedup"), mean_speedup_ci=agg.get("mean_speedup_ci"),
        geomean_speedup=agg.get("geomean_speedup"), geomean_speedup_ci=agg.get("geomean_speedup_ci"),
        flags=rec.get("flags", []), isolation=rec.get("env", {}).get("isolation"), workloads=rows)


def _detail(rec: dict[str, Any]) -> str:
    from kda.tools.bench import fmt_speedup

    lines = []
    for w in rec.get("workloads", [])[:20]:
        ax = ",".join(f"{k}={v}" for k, v in w.get("axes", {}).items())
        if w["status"] == "PASSED" and w.get("speedup") is not None:
            lines.append(f"{w['uuid'][:8]} {ax}: {w['candidate_us']:.2f} us vs {w['baseline_us']:.2f} us -> "
                         f"{fmt_speedup(w['speedup'])}x [{fmt_speedup(w['speedup_ci'][0])}, {fmt_speedup(w['speedup_ci'][1])}]")
        else:
            lines.append(f"{w['uuid'][:8]} {ax}: {w['status']} ({w.get('check')}): {w.get('evidence', '')[:300]}")
    if len(rec.get("workloads", [])) > 20:
        lines.append(f"... {len(rec['workloads']) - 20} more: show_run(run_id='{rec.get('run_id')}')")
    if rec.get("run_id"):
        lines.append(f"run {rec['run_id']} (show_run for samples, environment and logs)")
    return "\n".join(lines)


async def _await_job(call: CallContext, job: Any, wait_s: float) -> bool:
    """Relay progress until the job is done or `wait_s` passes; a cancelled call kills the job."""
    sent = 0
    deadline = anyio.current_time() + wait_s
    try:
        while True:
            while sent < len(job.progress):
                p = job.progress[sent]
                sent += 1
                await call.progress(p["done"], p["total"], p["message"])
            if job.done.is_set() or anyio.current_time() >= deadline:
                break
            await anyio.sleep(0.1)
    except anyio.get_cancelled_exc_class():
        # Killing the worker trees can block for a moment: never in the event loop.
        threading.Thread(target=job.cancel.cancel, daemon=True).start()
        raise
    return job.done.is_set()


def _finished_or_raise(job: Any) -> dict[str, Any]:
    if job.state == "done" and job.result is not None:
        return job.result
    raise KdaError(f"{job.kind} job {job.id} {job.state}: {job.error}")


def _progress_text(job: Any) -> str:
    return job.progress[-1]["message"] if job.progress else "starting"


async def _start(call: CallContext, kind: str, body: Callable[..., Any]) -> Any:
    from kda.tools import jobs

    return await anyio.to_thread.run_sync(lambda: jobs.start_job(call.ws, call.role, kind, body))


@tool("benchmark", title="Benchmark a candidate", input_model=BenchmarkInput, output_model=BenchmarkOutput,
      roles={"writer"}, read_only=False, checks_lock=True)
async def benchmark(call: CallContext, args: BenchmarkInput) -> Reply[BenchmarkOutput]:
    """Measure a candidate against the locked baseline: correctness (>= 3 trials on fresh seeded inputs,
    poisoned outputs, NaN/Inf, shape, dtype, atol/rtol + matched ratio, input mutation) and timing
    (baseline and candidate in separate sandboxed processes taking turns B C C B on the same device,
    L2 flushed, inputs rotated, device synchronized, each call's device time on every stream from CUPTI
    timestamps, timed outputs re-checked). Reports per workload the
    median latency with a bootstrap 95% interval, the speedup with its interval, and the arithmetic and
    geometric mean speedups. Statuses: flashinfer-bench's plus INPUT_MUTATED, TIMING_TAMPERED,
    BELOW_PHYSICAL_FLOOR, SANDBOX_VIOLATION. Languages: python, triton, and cpp/cuda with
    binding = "torch" (built as a torch extension in the sandbox; cuda needs a GPU). Returns within
    wait_s or gives a job id for job_status."""
    from kda.tools import bench

    req = await anyio.to_thread.run_sync(
        lambda: bench.prepare(call.ws, args.path, args.candidate, args.workloads, args.mode, call.role))
    job = await _start(call, "benchmark", lambda progress, cancel: bench.run_benchmark(req, progress, cancel))
    if await _await_job(call, job, args.wait_s):
        rec = _finished_or_raise(job)
        return Reply(rec["headline"], benchmark_output(rec, job.id), _detail(rec))
    n = len(req.workloads)
    out = BenchmarkOutput(state="running", job_id=job.id, candidate_path=req.candidate.path,
                          candidate_hash=req.candidate.content_hash, mode=req.mode, selection=req.selection,
                          total=n, progress=_progress_text(job))
    return Reply(f"running: benchmark of {req.candidate.path} on {n} workload(s) continues as job {job.id}; "
                 f"call job_status(job_id='{job.id}') for the result", out)


# --- job_status ---------------------------------------------------------------------------------------
class JobStatusInput(BaseModel):
    job_id: str = Field(max_length=200, description="The job id a benchmark or verify call returned.")


class JobStatusOutput(BaseModel):
    job_id: str
    kind: str
    state: str = Field(description="running, done, failed, cancelled, or lost (its server stopped)")
    progress: list[dict[str, Any]]
    run_id: Optional[str] = None
    error: Optional[str] = None
    result: Optional[dict[str, Any]] = Field(None, description="The finished call's structured result.")


@tool("job_status", title="Job status", input_model=JobStatusInput, output_model=JobStatusOutput,
      roles={"writer", "reviewer"}, read_only=True, idempotent=True)
def job_status(call: CallContext, args: JobStatusInput) -> Reply[JobStatusOutput]:
    """State, progress and (when done) the result of a benchmark or verify job of this workspace."""
    from kda.tools import jobs

    j = jobs.get_job(call.ws, args.job_id)
    result = None
    rec = j.get("result")
    if rec is not None:
        if j["kind"] == "benchmark":
            result = benchmark_output(rec, args.job_id).model_dump(mode="json")
        else:
            result = verify_output(rec, args.job_id).model_dump(mode="json")
    out = JobStatusOutput(job_id=args.job_id, kind=j["kind"], state=j["state"], progress=j["progress"][-20:],
                          run_id=j.get("run_id"), error=j.get("error"), result=result)
    if j["state"] == "done" and rec is not None:
        head = f"done: {rec['headline']}"
    elif j["state"] == "running":
        last = j["progress"][-1] if j["progress"] else None
        head = f"running: {j['kind']} " + (f"{last['done']:g}/{last['total']:g} — {last['message']}"
                                         if last and last.get("total") else (last["message"] if last else "starting"))
    else:
        head = f"{j['state']}: {j['kind']}: {j.get('error') or ''}".rstrip(": ")
    return Reply(head, out, _detail(rec) if rec else "")


# --- show_run -----------------------------------------------------------------------------------------
class ShowRunInput(Page):
    run_id: str = Field(max_length=200, description="A run id (from benchmark, verify, compile, profile ...).")
    include_samples: bool = Field(False, description="Include the raw latency samples of each workload.")
    include_logs: bool = Field(False, description="Include the workers' log tails.")


class ShowRunOutput(BaseModel):
    run_id: str
    kind: str
    role: str
    status: str
    headline: str
    device: Optional[str]
    created: float
    candidate_path: Optional[str]
    candidate_hash: Optional[str]
    record: dict[str, Any] = Field(description="The run record without its item list (and logs unless asked).")
    items_key: Optional[str] = Field(None, description="Which list of the record is paginated in `items`.")
    items: list[Any]
    total_items: int
    next_offset: Optional[int]


_LIST_KEYS = ("workloads", "items", "kernels", "results", "entries")


@tool("show_run", title="Show a run", input_model=ShowRunInput, output_model=ShowRunOutput,
      roles={"writer", "reviewer"}, read_only=True, idempotent=True)
def show_run(call: CallContext, args: ShowRunInput) -> Reply[ShowRunOutput]:
    """A stored run of any kind (benchmark, verify, compile, profile ...): its status, environment,
    configuration and per-workload results, paginated with offset/limit."""
    run = call.ws.store.get_run(args.run_id)
    rec = dict(run["record"])
    key = next((k for k in _LIST_KEYS if isinstance(rec.get(k), list)), None)
    items = rec.pop(key) if key else []
    if key:
        args.check_start(len(items), key)
    if not args.include_logs:
        rec.pop("logs", None)
    page = items[args.offset: args.offset + args.limit]
    if key == "workloads" and not args.include_samples:
        page = [{k: v for k, v in w.items() if k != "samples"} if isinstance(w, dict) else w for w in page]
    nxt = args.offset + args.limit if args.offset + args.limit < len(items) else None
    out = ShowRunOutput(run_id=run["id"], kind=run["kind"], role=run["role"], status=run["status"],
                        headline=run["headline"], device=run["device"], created=run["created"],
                        candidate_path=run["candidate_path"], candidate_hash=run["candidate_hash"], record=rec,
                        items_key=key, items=page, total_items=len(items), next_offset=nxt)
    shown = f"{key} {args.offset}..{args.offset + len(page) - 1} of {len(items)}" if key and page else "no items"
    return Reply(f"{run['kind']} run {run['id']}: {run['headline']} ({shown})", out)


# --- verify -------------------------------------------------------------------------------------------
class VerifyInput(_CandidateArgs):
    pass


class VerifyOutput(BaseModel):
    state: Literal["done", "running"]
    job_id: str
    run_id: Optional[str] = None
    verdict: Optional[Literal["pass", "fail", "unverified"]] = Field(
        None, description="pass only when the official harness ran and everything passed")
    integrity_status: Optional[str] = None
    official_ran: Optional[bool] = None
    official_reason: Optional[str] = None
    official: list[dict[str, Any]] = Field(default_factory=list, description="Per workload: the official status.")
    agrees_with_writer: Optional[bool] = None
    agreement: dict[str, Any] = Field(default_factory=dict)
    workloads: list[WorkloadResult] = Field(default_factory=list)
    device: Optional[str] = None
    candidate_hash: Optional[str] = None
    progress: Optional[str] = None


def verify_output(rec: dict[str, Any], job_id: str) -> VerifyOutput:
    off = rec.get("official", {})
    rows = [WorkloadResult.model_validate({k: v for k, v in w.items() if k in WorkloadResult.model_fields})
            for w in rec.get("workloads", [])]
    return VerifyOutput(state="done", job_id=job_id, run_id=rec.get("run_id"), verdict=rec["verdict"],
                        integrity_status=rec["status"], official_ran=bool(off.get("ran")),
                        official_reason=off.get("reason"),
                        official=[{k: v for k, v in w.items() if k != "log"} for w in off.get("workloads", [])],
                        agrees_with_writer=rec["agreement"].get("agrees"), agreement=rec["agreement"],
                        workloads=rows, device=rec.get("device"), candidate_hash=rec.get("candidate_hash"))


@tool("verify", title="Verify a candidate", input_model=VerifyInput, output_model=VerifyOutput,
      roles={"reviewer"}, read_only=True, checks_lock=True)
async def verify(call: CallContext, args: VerifyInput) -> Reply[VerifyOutput]:
    """Independent verification: packs the candidate as a flashinfer-bench Solution (validated by its model),
    runs our integrity pipeline and, on a CUDA machine, the official flashinfer_bench.Benchmark with its
    isolated runner; says whether it agrees with the writer's latest benchmark of the same content hash.
    Without a GPU it says plainly that the official harness needs one (verdict 'unverified', never 'pass').
    Changes nothing but its own run record."""
    from kda.tools import bench, verify as verify_mod

    def prep() -> Any:
        req = bench.prepare(call.ws, args.path, args.candidate, args.workloads, "quick", call.role, kind="verify")
        verify_mod.pack_solution(call.ws, req.candidate)  # a bad pack fails the call at once
        return req

    req = await anyio.to_thread.run_sync(prep)
    job = await _start(call, "verify", lambda progress, cancel: verify_mod.run_verify(req, progress, cancel))
    if await _await_job(call, job, args.wait_s):
        rec = _finished_or_raise(job)
        return Reply(rec["headline"], verify_output(rec, job.id), _detail(rec))
    out = VerifyOutput(state="running", job_id=job.id, candidate_hash=req.candidate.content_hash,
                       progress=_progress_text(job))
    return Reply(f"running: verify of {req.candidate.path} continues as job {job.id}; "
                 f"call job_status(job_id='{job.id}') for the verdict", out)
