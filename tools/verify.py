"""The reviewer's `verify`: the official flashinfer-bench harness plus our integrity checks.

1. The candidate is packed as a flashinfer-bench `Solution` and validated by its model.
2. Our integrity pipeline (the same as `benchmark`: separate trusted worker, poisoned outputs,
   fresh seeded inputs, input-mutation, timed-output and tamper checks) runs on the workloads.
3. On a machine with a CUDA GPU, the official `flashinfer_bench.Benchmark` with its isolated
   runner evaluates the packed solution on the task's workloads, inside our sandbox
   (`python -m kda.tools.verify DIR` runs it and writes `results.json`). Without a GPU it does
   not run, and the verdict says so: never a pass it did not earn.
4. Agreement with the writer's latest `benchmark` of the same content hash on the same device:
   statuses equal and latencies agreeing (intervals overlap, or medians within 5% on a GPU, 25% on CPU).

Nothing in the workspace changes except verify's own run record (and the bookkeeping rows of
its job and the audit entry every call gets).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from . import bench
from .errors import BadInput
from .jobs import CancelToken, executor
from .store import new_id
from .workspace import Workspace

OFFICIAL_TIMEOUT_S = 1800


def pack_solution(ws: Workspace, cand: Any) -> dict[str, Any]:
    """The candidate as a flashinfer-bench Solution dict, validated by flashinfer-bench's model."""
    from flashinfer_bench.data import Solution
    from pydantic import ValidationError

    sol = cand.to_solution(ws.definition()["name"], author="kda-reviewer-verify")
    try:
        Solution.model_validate(sol)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise BadInput(f"{cand.path} does not pack to a valid flashinfer-bench Solution: {problems}") from None
    return sol


def _official(ws: Workspace, sol: dict[str, Any], workloads: list[dict[str, Any]], cancel: CancelToken,
              progress: Callable[[float, float | None, str], None]) -> dict[str, Any]:
    """Run flashinfer-bench's Benchmark (isolated runner) in our sandbox on a leased GPU."""
    from kda.sandbox.runner import Job, run_job, sandbox_pythonpath

    pool = executor()
    if not pool.has_gpu:
        return {"ran": False, "reason": "the official flashinfer-bench harness needs a CUDA GPU and none is visible "
                                        "on this machine; no official verdict (this is not a pass)"}
    work = ws.kda_dir / "jobs" / new_id("verify")
    work.mkdir(parents=True)
    try:
        (work / "definition.json").write_text(json.dumps(ws.definition()))
        (work / "solution.json").write_text(json.dumps(sol))
        (work / "workloads.jsonl").write_text("".join(json.dumps(w) + "\n" for w in workloads))
        c = ws.policy.correctness
        (work / "config.json").write_text(json.dumps({"atol": c.atol, "rtol": c.rtol, "num_trials": c.min_trials,
                                                       "required_matched_ratio": c.required_matched_ratio}))
        sb = ws.policy.sandbox
        with pool.lease(True, cancel, on_wait=lambda m: progress(0, None, m)) as lease:
            progress(0, None, f"official flashinfer-bench Benchmark (isolated runner) on {lease.label}")
            job = Job(argv=[sys.executable, "-m", "kda.tools.verify", str(work)], cwd=work,
                      ro_paths=[*sandbox_pythonpath(), ws.task_dir], hide_paths=[ws.kda_dir, ws.work_dir],
                      env={**lease.env, "FIB_CACHE_PATH": str(work / "fib-cache")}, gpu=True,
                      wall_timeout_s=min(float(sb.wall_timeout_s), OFFICIAL_TIMEOUT_S),
                      limits=sb.limits())
            res = run_job(job, require_isolation=sb.require_isolation)
        out_file = work / "results.json"
        if not out_file.is_file():
            return {"ran": False, "reason": f"the official harness did not finish: {res.reason}; "
                                            f"stderr: {res.stderr_tail[-800:]}", "isolation": res.isolation}
        data = json.loads(out_file.read_text())
        data.update(ran=True, isolation=res.isolation, wall_s=res.wall_s)
        return data
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _span(row: dict[str, Any]) -> Any:
    """A workload row's candidate median and interval as device spans, without its run's launch
    gap: a record made before the device's gap was measured (or with another figure) compares
    like for like."""
    from .stats import Interval  # numpy: loaded only when a verify runs

    gap = row.get("launch_gap_us") or 0.0
    lo, hi = row["candidate_ci_us"]
    return Interval(row["candidate_us"] - gap, lo - gap, hi - gap)


def _agreement(ws: Workspace, integrity: dict[str, Any], official: dict[str, Any]) -> dict[str, Any]:
    """Compare with the writer's latest benchmark of the same content hash on the same device."""
    runs = [r for r in ws.store.list_runs(kind="benchmark", candidate_hash=integrity["candidate_hash"], limit=50)
            if r["device"] == integrity["device"]]
    if not runs:
        return {"writer_run_id": None, "agrees": None,
                "reason": f"no writer benchmark of content {integrity['candidate_hash'][:12]} on {integrity['device']}"}
    wanted = {w["uuid"] for w in integrity["workloads"]}
    chosen = None
    for r in runs:  # the latest writer benchmark that measured any of these workloads
        rec = ws.store.get_run(r["id"])["record"]
        if wanted & {w["uuid"] for w in rec.get("workloads", [])}:
            chosen = (r["id"], rec)
            break
    if chosen is None:
        return {"writer_run_id": runs[0]["id"], "agrees": None, "reason": "no workload in common", "workloads": []}
    writer_id, writer = chosen
    by_uuid = {w["uuid"]: w for w in writer.get("workloads", [])}
    official_by = {w["uuid"]: w for w in official.get("workloads", [])} if official.get("ran") else {}
    rows, agree_all, compared = [], True, 0
    for ours in integrity["workloads"]:
        theirs = by_uuid.get(ours["uuid"])
        if theirs is None:
            continue
        compared += 1
        status_ok = (ours["status"] == "PASSED") == (theirs["status"] == "PASSED")
        lat_ok, diff_pct = None, None
        if ours.get("candidate_ci_us") and theirs.get("candidate_ci_us"):
            mine, writer = _span(ours), _span(theirs)
            # Bootstrap intervals of a median are narrow; two separate runs also differ by
            # run-to-run drift, so medians within a small tolerance agree too (CPU timings of
            # Triton's interpreter drift far more than a GPU's).
            tol = 0.25 if integrity.get("device") == "cpu" else 0.05
            diff_pct = 100.0 * abs(mine.value - writer.value) / writer.value
            lat_ok = mine.overlaps(writer) or diff_pct <= 100.0 * tol
        off = official_by.get(ours["uuid"])
        off_ok = None if off is None else ((off["status"] == "PASSED") == (theirs["status"] == "PASSED"))
        agrees = status_ok and lat_ok is not False and off_ok is not False
        agree_all = agree_all and agrees
        rows.append({"uuid": ours["uuid"], "writer_status": theirs["status"], "verify_status": ours["status"],
                     "official_status": off["status"] if off else None,
                     "writer_candidate_ci_us": theirs.get("candidate_ci_us"),
                     "verify_candidate_ci_us": ours.get("candidate_ci_us"),
                     "official_latency_us": off["latency_ms"] * 1e3 if off and off.get("latency_ms") else None,
                     "latency_diff_pct": diff_pct, "latencies_agree": lat_ok, "agrees": agrees})
    if not compared:
        return {"writer_run_id": writer_id, "agrees": None, "reason": "no workload in common", "workloads": []}
    return {"writer_run_id": writer_id, "agrees": agree_all, "workloads": rows,
            "reason": "statuses equal and latencies agree (intervals overlap or medians within tolerance) on every common workload" if agree_all else
                      "disagreement on: " + ", ".join(r["uuid"][:8] for r in rows if not r["agrees"])}


def run_verify(req: bench.BenchRequest, progress: Callable[[float, float | None, str], None],
               cancel: CancelToken) -> tuple[str, dict[str, Any]]:
    ws = req.ws
    sol = pack_solution(ws, req.candidate)
    runner = bench.BenchRun(req, progress, cancel, store_calibration=False)
    integrity = runner.run_unstored()
    official = _official(ws, sol, req.workloads, cancel, progress)
    agreement = _agreement(ws, integrity, official)
    integrity_ok = integrity["status"] == "PASSED"
    if official.get("ran"):
        off_ok = all(w["status"] == "PASSED" for w in official.get("workloads", [])) and bool(official.get("workloads"))
        verdict = "pass" if (integrity_ok and off_ok) else "fail"
    else:
        verdict = "unverified" if integrity_ok else "fail"
    record = {
        "kind": "verify", "verdict": verdict, "status": integrity["status"], "device": integrity["device"],
        "candidate_path": integrity["candidate_path"], "candidate_hash": integrity["candidate_hash"],
        "solution_name": sol["name"], "official": official, "agreement": agreement,
        "integrity": {k: v for k, v in integrity.items() if k not in ("workloads",)},
        "workloads": integrity["workloads"], "aggregate": integrity["aggregate"], "selection": integrity["selection"],
        "baseline": integrity["baseline"], "mode": integrity["mode"],
    }
    off_txt = ("official harness: " + ("all passed" if official.get("ran") and verdict == "pass" else
                                      "ran" if official.get("ran") else "not run (needs a CUDA GPU)"))
    agree_txt = {True: "agrees with the writer's benchmark", False: "DISAGREES with the writer's benchmark",
                 None: agreement.get("reason", "nothing to compare")}[agreement["agrees"]]
    record["headline"] = (f"verify {verdict.upper()}: integrity {integrity['status']} "
                          f"({integrity['aggregate']['passed']}/{integrity['aggregate']['total']}) on "
                          f"{integrity['device']}; {off_txt}; {agree_txt}")
    run_id = ws.store.put_run("verify", req.role, verdict, record["headline"], record,
                              candidate_path=integrity["candidate_path"], candidate_hash=integrity["candidate_hash"],
                              device=integrity["device"], run_id=runner.run_id)
    record["run_id"] = run_id
    return run_id, record


# --- the sandboxed official run ---------------------------------------------------------------------
def _official_main(work: Path) -> int:
    """Inside the sandbox: flashinfer-bench's Benchmark, isolated runner, results to results.json."""
    import logging

    from flashinfer_bench.bench import Benchmark, BenchmarkConfig
    from flashinfer_bench.data import Definition, Solution, Trace, TraceSet, Workload

    logging.basicConfig(level=logging.WARNING)
    d = Definition.model_validate(json.loads((work / "definition.json").read_text()))
    sol = Solution.model_validate(json.loads((work / "solution.json").read_text()))
    wls = [Workload.model_validate(json.loads(line)) for line in (work / "workloads.jsonl").read_text().splitlines()
           if line.strip()]
    cfg_in = json.loads((work / "config.json").read_text())
    ts = TraceSet(root=work / "trace", definitions={d.name: d}, solutions={d.name: [sol]},
                  workloads={d.name: [Trace(definition=d.name, workload=w) for w in wls]}, traces={})
    cfg = BenchmarkConfig(use_isolated_runner=True, log_dir=str(work / "logs"), atol=float(cfg_in["atol"]),
                          rtol=float(cfg_in["rtol"]), num_trials=int(cfg_in["num_trials"]),
                          required_matched_ratio=float(cfg_in["required_matched_ratio"]))
    bm = Benchmark(ts, cfg)
    try:
        result = bm.run_all(dump_traces=False)
    finally:
        bm.close()
    rows = []
    got = {t.workload.uuid: t for t in result.traces.get(d.name, [])}
    for w in wls:
        t = got.get(w.uuid)
        if t is None or t.evaluation is None:
            rows.append({"uuid": w.uuid, "status": "NOT_RUN", "log": "the official harness returned no trace"})
            continue
        ev = t.evaluation
        perf = ev.performance
        rows.append({"uuid": w.uuid, "status": ev.status.value,
                     "latency_ms": perf.latency_ms if perf else None,
                     "reference_latency_ms": perf.reference_latency_ms if perf else None,
                     "speedup": perf.speedup_factor if perf else None,
                     "max_abs_error": ev.correctness.max_absolute_error if ev.correctness else None,
                     "max_rel_error": ev.correctness.max_relative_error if ev.correctness else None,
                     "log": (ev.log or "")[-1500:]})
    (work / "results.json").write_text(json.dumps({"workloads": rows, "harness": "flashinfer_bench.Benchmark",
                                                    "runner": "isolated"}))
    return 0


if __name__ == "__main__":
    sys.exit(_official_main(Path(sys.argv[1])))
