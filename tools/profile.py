"""Profiles: collection with Nsight Compute, extraction (cached), summaries and diffs.

Collection runs `ncu` inside the sandbox with the GPU on one call of the candidate for one
workload (`sandbox/profile_target.py` opens the NVTX range `kda_profile` around that call).
The `.ncu-rep` is stored as a blob; a `profile` run links it to the candidate and workload.

Extraction (`tools/ncu_extract.py`) runs in a subprocess with a timeout; its JSON is cached
in the store keyed by the report's sha256, so a second summary of the same report costs a
database read and the pure-Python summary.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from .candidate import Candidate
from .errors import BadInput, KdaError, NotAvailable
from .jobs import CancelToken, executor
from .ncu_extract import EXIT_NO_MODULE
from .profile_diff import diff as diff_summaries
from .profile_summary import headline, render_text, summarize
from .store import sha256_file
from .workspace import Workspace

REPORT_MEDIA_TYPE = "application/vnd.nvidia.nsight-compute.report"
JSON_MEDIA_TYPE = "application/json"
EXTRACT_SCHEMA = 1
EXTRACT_TIMEOUT_S = 180.0
PROFILE_TIMEOUT_S = 600.0
NVTX_RANGE = "kda_profile"

# Our own table (the store's schema is the foundation's): report sha256 -> extracted JSON blob.
EXTRACT_TABLE = (
    "CREATE TABLE IF NOT EXISTS profile_extracts (report_sha TEXT NOT NULL, schema INTEGER NOT NULL, "
    "json_sha TEXT NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (report_sha, schema))"
)


# --- extraction --------------------------------------------------------------------------------
def extract_report_file(path: Path, timeout_s: float = EXTRACT_TIMEOUT_S) -> dict[str, Any]:
    """Run the extractor on a report file in a subprocess; clear errors for every failure."""
    from kda.sandbox.runner import kill_tree

    cmd = [sys.executable, "-m", "kda.tools.ncu_extract", str(path)]
    # Its own process group: on a timeout the reader goes, with the other readers it retried in.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise KdaError(f"reading the report {path.name} timed out after {timeout_s:g} s "
                           "(the report reader hung or the report is huge)") from None
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if r.returncode == EXIT_NO_MODULE:
        raise NotAvailable(r.stderr.strip())
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        if r.returncode < 0:
            msg = f"the report reader crashed (signal {-r.returncode}) on {path.name}"
        raise BadInput(f"cannot read {path.name}: {msg}")
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise KdaError(f"the report reader wrote malformed output for {path.name}") from None


def _cached_extract(ws: Workspace, report_sha: str) -> Optional[dict[str, Any]]:
    with ws.store.connect() as db:
        db.execute(EXTRACT_TABLE)
        row = db.execute("SELECT json_sha FROM profile_extracts WHERE report_sha = ? AND schema = ?",
                         (report_sha, EXTRACT_SCHEMA)).fetchone()
    if row is None:
        return None
    try:
        return json.loads(ws.store.get_blob(row["json_sha"]))
    except (BadInput, ValueError):
        return None  # a damaged cache entry is re-extracted


def extract_cached(ws: Workspace, report_path: Path, report_sha: str,
                   timeout_s: float = EXTRACT_TIMEOUT_S) -> tuple[dict[str, Any], bool]:
    """(extracted JSON, whether it came from the cache)."""
    hit = _cached_extract(ws, report_sha)
    if hit is not None:
        return hit, True
    t0 = time.monotonic()
    data = extract_report_file(report_path, timeout_s)
    seconds = time.monotonic() - t0
    json_sha = ws.store.put_blob(json.dumps(data, separators=(",", ":")).encode(), JSON_MEDIA_TYPE)
    with ws.store.transaction() as db:
        db.execute(EXTRACT_TABLE)
        db.execute("INSERT OR REPLACE INTO profile_extracts(report_sha, schema, json_sha, seconds, created) "
                   "VALUES (?,?,?,?,?)", (report_sha, EXTRACT_SCHEMA, json_sha, seconds, time.time()))
    return data, False


def resolve_report(ws: Workspace, ref: str) -> dict[str, Any]:
    """A stored report id (profile run id or blob sha256) or a workspace-relative .ncu-rep path
    -> {path, sha, origin, run}. A blob is materialized in a temp file only when it must be read."""
    ref = (ref or "").strip()
    if not ref:
        raise BadInput("report is empty: give a profile run id, a report blob sha256, or a .ncu-rep path")
    if ref.startswith("run_"):
        run = ws.store.get_run(ref)
        if run["kind"] != "profile":
            raise BadInput(f"run {ref} is a {run['kind']} run, not a profile run")
        sha = run["record"].get("report_blob")
        if not sha:
            raise BadInput(f"profile run {ref} has no stored report ({run['headline']})")
        return {"sha": sha, "origin": "run", "run": run, "path": None}
    if re.fullmatch(r"[0-9a-f]{64}", ref):
        if not ws.store.blob_path(ref).exists() and _cached_extract(ws, ref) is None:
            raise BadInput(f"no stored report {ref}")
        return {"sha": ref, "origin": "blob", "run": None, "path": None}
    path = ws.resolve(ref)
    if path.suffix != ".ncu-rep":
        raise BadInput(f"{ref!r} is not a .ncu-rep file (give a profile run id, a report sha256 or a .ncu-rep path)")
    if not path.is_file():
        raise BadInput(f"no report file {ws.rel(path) if path != ws.root else ref}")
    return {"sha": sha256_file(path), "origin": "path", "run": None, "path": path}


def report_data(ws: Workspace, ref: str, timeout_s: float = EXTRACT_TIMEOUT_S) -> tuple[dict[str, Any], dict[str, Any]]:
    info = resolve_report(ws, ref)
    hit = _cached_extract(ws, info["sha"])
    if hit is not None:
        return hit, {**info, "cached": True}
    if info["path"] is not None:
        data, cached = extract_cached(ws, info["path"], info["sha"], timeout_s)
        return data, {**info, "cached": cached}
    if not ws.store.blob_path(info["sha"]).exists():
        raise BadInput(f"the stored report {info['sha']} is missing from the blob store")
    report = ws.store.get_blob(info["sha"])  # checks the content hash
    with tempfile.TemporaryDirectory(prefix="kda-ncu-") as tmp:
        tmp_path = Path(tmp) / "report.ncu-rep"  # the reader wants a file; a blob has no name
        tmp_path.write_bytes(report)
        data, cached = extract_cached(ws, tmp_path, info["sha"], timeout_s)
    return data, {**info, "cached": cached}


def _remap_sources(summary: dict[str, Any], run: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Hotspot files captured inside the job dir -> the candidate's workspace path."""
    rec = (run or {}).get("record") or {}
    root, cand = rec.get("source_root"), rec.get("candidate_path")
    if not root or not cand:
        return summary

    def fix(h: dict[str, Any]) -> None:
        f = h.get("file") or ""
        if f.startswith(root.rstrip("/") + "/"):
            h["file"] = cand.rstrip("/") + "/" + f[len(root.rstrip("/")) + 1:]
            h["where"] = f"{h['file']}:{h.get('line')}"

    for k in summary["kernels"]:
        for h in k["hotspots"]:
            fix(h)
        for a in k["actions"]:
            for h in a["hotspots"]:
                fix(h)
    return summary


def summary_for(ws: Workspace, ref: str, kernel: Optional[str] = None,
                timeout_s: float = EXTRACT_TIMEOUT_S) -> tuple[dict[str, Any], dict[str, Any]]:
    data, info = report_data(ws, ref, timeout_s)
    summary = _remap_sources(summarize(data, kernel), info.get("run"))
    summary["text"] = render_text(summary["kernels"])
    summary["headline"] = headline(summary["kernels"])
    return summary, info


def diff_for(ws: Workspace, a: str, b: str) -> dict[str, Any]:
    sa, _ = summary_for(ws, a)
    sb, _ = summary_for(ws, b)
    return diff_summaries(sa, sb)


# --- collection --------------------------------------------------------------------------------
def find_ncu() -> Optional[str]:
    exe = shutil.which("ncu")
    if exe:
        return exe
    for pattern in ("/usr/local/cuda/bin/ncu", "/usr/local/cuda-*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        hits = sorted(glob.glob(pattern), reverse=True)
        if hits:
            return hits[0]
    return None


@lru_cache(maxsize=4)
def ncu_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"Version\s+([\d.]+)", out)
    return m.group(1) if m else (out.strip().splitlines() or ["unknown"])[-1]


def ncu_argv(exe: str, out_base: Path, target: list[str]) -> list[str]:
    """The one ncu command line the tool runs (the benchmark runs the same one by hand)."""
    return [exe, "--set", "full", "--import-source", "yes", "--section", "PmSampling",
            "--section", "PmSampling_WarpStates", "--clock-control", "none", "--nvtx",
            "--nvtx-include", f"{NVTX_RANGE}/", "--target-processes", "all", "-f", "-o", str(out_base), *target]


def _speedup_of(row: dict[str, Any]) -> Optional[float]:
    sp = row.get("speedup")
    if isinstance(sp, dict):
        sp = sp.get("median", sp.get("point", sp.get("value")))
    if isinstance(sp, (int, float)):
        return float(sp)
    cand = row.get("candidate_ms", row.get("latency_ms"))
    base = row.get("baseline_ms", row.get("reference_latency_ms"))
    for key in ("candidate", "baseline"):
        v = row.get(key)
        if isinstance(v, dict):
            val = v.get("median_ms", v.get("median"))
            if key == "candidate":
                cand = val
            else:
                base = val
    if isinstance(cand, (int, float)) and isinstance(base, (int, float)) and cand > 0:
        return float(base) / float(cand)
    return None


def _benchmark_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    for key in ("workloads", "results", "per_workload"):
        rows = record.get(key)
        if isinstance(rows, dict):
            return [{"uuid": k, **v} for k, v in rows.items() if isinstance(v, dict)]
        if isinstance(rows, list):
            return [r for r in rows if isinstance(r, dict)]
    return []


def default_workload(ws: Workspace, cand: Candidate) -> tuple[dict[str, Any], str]:
    """(workload, why): where the candidate is slowest against the baseline per its latest
    benchmark run; with no benchmark yet, the largest workload."""
    workloads = ws.workloads()
    if not workloads:
        raise BadInput("the task has no workloads")
    by_uuid = {w["uuid"]: w for w in workloads}
    for run in ws.store.list_runs(kind="benchmark", candidate_hash=cand.content_hash, limit=5):
        rec = ws.store.get_run(run["id"])["record"]
        scored = []
        for row in _benchmark_rows(rec):
            uuid = row.get("uuid") or row.get("workload_uuid") or row.get("workload")
            sp = _speedup_of(row)
            if isinstance(uuid, str) and uuid in by_uuid and sp is not None:
                scored.append((sp, uuid))
        if scored:
            sp, uuid = min(scored)
            return by_uuid[uuid], f"slowest against the baseline ({sp:.2f}x) in benchmark run {run['id']}"

    def size(w: dict[str, Any]) -> int:
        n = 1
        for v in (w.get("axes") or {}).values():
            n *= max(1, int(v))
        return n

    w = max(workloads, key=size)
    return w, "no benchmark of this candidate yet: the largest workload"


def prepare_job(ws: Workspace, cand: Candidate, workload: dict[str, Any], exe: str) -> tuple[Path, Path, Path, list[str]]:
    """A fresh job dir holding a copy of the candidate and the target's spec, and the ncu argv.
    (benchmarks/profile.py runs the same argv by hand to measure the tool's overhead.)"""
    job_dir = Path(tempfile.mkdtemp(prefix="kda-profile-"))
    cdir = job_dir / "candidate"
    cdir.mkdir()
    cand.write_to(cdir)
    spec = {"candidate_dir": str(cdir), "entry_point": cand.spec.entry_point,
            "destination_passing_style": cand.spec.destination_passing_style, "definition": ws.definition(),
            "workload": workload, "safetensors_root": str(ws.task_dir), "warmup": 3, "seed": 0,
            "range": NVTX_RANGE}
    (job_dir / "spec.json").write_text(json.dumps(spec))
    out_base = job_dir / "report"
    argv = ncu_argv(exe, out_base, [sys.executable, "-m", "kda.sandbox.profile_target", str(job_dir / "spec.json")])
    return job_dir, cdir, out_base, argv


def collect(ws: Workspace, cand: Candidate, workload_uuid: Optional[str], role: str,
            timeout_s: Optional[float] = None) -> dict[str, Any]:
    """Run ncu on one call of the candidate; store report + run; return the run id and summary."""
    from kda.sandbox.runner import Job, run_job  # noqa: PLC0415 - the sandbox loads lazily

    if workload_uuid:
        match = [w for w in ws.workloads() if w["uuid"] == workload_uuid]
        if not match:
            raise BadInput(f"no workload {workload_uuid!r} in this task (see task_info)")
        workload, why = match[0], "as asked"
    else:
        workload, why = default_workload(ws, cand)
    exe = find_ncu()
    if exe is None:
        raise NotAvailable("Nsight Compute (`ncu`) is not installed on this machine, so `profile` cannot collect; "
                           "install Nsight Compute (CUDA toolkit) or profile elsewhere and pass the .ncu-rep to "
                           "profile_summary, which works without it")
    pol = ws.policy.sandbox
    timeout = min(float(timeout_s or PROFILE_TIMEOUT_S), float(pol.wall_timeout_s))
    job_dir, cdir, out_base, argv = prepare_job(ws, cand, workload, exe)
    try:
        # The workspace is hidden from the candidate except task/ (read-only: safetensors inputs).
        # The same device pool as benchmark and verify: a profile never lands on a GPU that is timing.
        with executor().lease(None, CancelToken()) as lease:
            job = Job(argv=argv, cwd=job_dir, ro_paths=[ws.task_dir], hide_paths=[ws.root], gpu=True,
                      keep_privileges=True, wall_timeout_s=timeout, env=dict(lease.env),
                      limits=pol.limits())
            t0 = time.monotonic()
            res = run_job(job, require_isolation=pol.require_isolation)
            collect_s = time.monotonic() - t0
        report = out_base.with_suffix(".ncu-rep")
        log = (res.stdout_tail + "\n" + res.stderr_tail).strip()
        if res.timed_out:
            raise KdaError(f"profiling timed out after {timeout:g} s (workload {workload['uuid']}); "
                           f"last output: {log[-400:]}")
        if "ERR_NVGPUCTRPERM" in log:
            raise NotAvailable("ncu may not read the GPU performance counters as this user (ERR_NVGPUCTRPERM): "
                               "run the server as an administrator or set NVreg_RestrictProfilingToAdminUsers=0")
        if not res.ok or not report.is_file():
            why_failed = "no kernel ran inside the NVTX range" if res.ok else res.reason
            raise KdaError(f"profiling failed: {why_failed}; ncu output: {log[-800:]}")
        data = report.read_bytes()
        sha = ws.store.put_blob(data, REPORT_MEDIA_TYPE)
        record = {
            "report_blob": sha, "report_bytes": len(data), "workload_uuid": workload["uuid"],
            "workload_axes": workload.get("axes", {}), "workload_choice": why, "candidate_path": cand.path,
            "source_root": str(cdir.resolve()), "ncu": exe, "ncu_version": ncu_version(exe), "command": argv[:-4] + ["<profile_target>"],
            "isolation": res.isolation, "collect_s": round(collect_s, 3), "wall_timeout_s": timeout,
        }
        run_id = ws.store.put_run("profile", role, "ok", f"profile of {cand.path} on workload {workload['uuid']}",
                                  record, candidate_path=cand.path, candidate_hash=cand.content_hash,
                                  device=_device_name(lease.index))
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    t1 = time.monotonic()
    summary, info = summary_for(ws, run_id)
    return {"run_id": run_id, "report_sha": sha, "workload": workload, "workload_choice": why,
            "summary": summary, "collect_s": collect_s, "summarize_s": time.monotonic() - t1,
            "isolation": record["isolation"]}


@lru_cache(maxsize=16)
def _device_name(index: str | None) -> Optional[str]:
    """The leased GPU's name (not the first one nvidia-smi lists)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader",
                              *(["-i", index] if index else [])],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


__all__ = ["collect", "summary_for", "diff_for", "report_data", "extract_report_file", "find_ncu", "ncu_argv",
           "default_workload"]
