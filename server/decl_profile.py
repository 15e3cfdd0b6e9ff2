"""profile (writer), profile_summary and profile_diff (writer + reviewer, read-only).

Nsight Compute evidence turned into a ranked, evidence-backed diagnosis. The heavy parts
(the report reader, the sandbox) load only when a tool is called.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

from .toolkit import CallContext, Reply, tool


class ProfileInput(BaseModel):
    path: Optional[str] = Field(None, description="Candidate directory under work/, e.g. 'work/v1'.")
    candidate: Optional[str] = Field(None, description=("A recorded candidate id instead of `path`: the candidate_hash "
                                                         "of an earlier benchmark (8+ hex digits)."))
    workload: Optional[str] = Field(
        None, description="Workload uuid to profile. Default: the workload where the candidate is slowest "
                          "against the baseline in its latest benchmark run (the largest one if never benchmarked).")


class KernelSummaries(BaseModel):
    headline: str = Field(description="One line: the longest kernel's bottleneck, its deciding metrics, its hotspot.")
    text: str = Field(description="The diagnosis as text (under ~2,000 tokens).")
    kernels: list[dict[str, Any]] = Field(
        description="Per kernel: name, duration_us, bottleneck {name, why, evidence}, sol, dimensions (occupancy, "
                    "balance, stalls, tensor, timeline, memory), actions (<= 5, ranked, each with evidence, "
                    "ncu_est_speedup_pct, hotspots, wiki), hotspots, ncu_rules, notes.")


class ProfileOutput(KernelSummaries):
    run_id: str = Field(description="The profile run; pass it to profile_summary / profile_diff.")
    report_sha: str = Field(description="sha256 of the stored .ncu-rep blob.")
    candidate_path: str
    workload_uuid: str
    workload_choice: str = Field(description="Why this workload was profiled.")
    collect_s: float = Field(description="Seconds spent in Nsight Compute (sandboxed).")
    isolation: str


class ProfileSummaryInput(BaseModel):
    report: str = Field(description="A profile run id, a stored report's sha256, or a workspace-relative "
                                    ".ncu-rep path.")
    kernel: Optional[str] = Field(None, description="Only this kernel: its index in the report or part of its name.")


class ProfileSummaryOutput(KernelSummaries):
    report: str
    report_sha: str
    origin: str = Field(description="run, blob or path.")
    cached: bool = Field(description="True when the report's extracted metrics came from the store's cache.")


class ProfileDiffInput(BaseModel):
    a: str = Field(description="Before: a profile run id, report sha256 or .ncu-rep path.")
    b: str = Field(description="After: a profile run id, report sha256 or .ncu-rep path.")


class ProfileDiffOutput(BaseModel):
    headline: str
    text: str
    total_us: dict[str, Any] = Field(description="Summed kernel time of a and b, and the change in percent.")
    kernels: list[dict[str, Any]] = Field(
        description="Per matched kernel: duration, bottleneck, sol, stalls, occupancy, hotspots (a, b, delta), "
                    "and `moved`: the changes beyond noise.")
    only_a: list[str]
    only_b: list[str]


@tool("profile", title="Profile a candidate with Nsight Compute", input_model=ProfileInput,
      output_model=ProfileOutput, roles={"writer"}, read_only=False, idempotent=False, checks_lock=True)
def profile(call: CallContext, args: ProfileInput) -> Reply[ProfileOutput]:
    """Run Nsight Compute (full set, source import, PmSampling timeline) on one call of a candidate for one
    workload, inside the sandbox with the GPU; only the candidate's kernels of that call are profiled (NVTX
    range after warm-up). Stores the report, links it to the candidate, and returns the diagnosis: primary
    bottleneck with its deciding metrics, six dimensions, up to five ranked actions with evidence, hotspot
    source lines and wiki pages. Says plainly when `ncu` is not installed."""
    from kda.tools.candidate import resolve_candidate
    from kda.tools.profile import collect

    cand = resolve_candidate(call.ws, args.path, args.candidate)
    res = collect(call.ws, cand, args.workload, call.role)
    s = res["summary"]
    out = ProfileOutput(run_id=res["run_id"], report_sha=res["report_sha"], candidate_path=cand.path,
                        workload_uuid=res["workload"]["uuid"], workload_choice=res["workload_choice"],
                        collect_s=round(res["collect_s"], 3), isolation=res["isolation"],
                        headline=s["headline"], text=s["text"], kernels=s["kernels"])
    return Reply(f"{res['run_id']}: {s['headline']}", out, detail=s["text"])


@tool("profile_summary", title="Summarize an Nsight Compute report", input_model=ProfileSummaryInput,
      output_model=ProfileSummaryOutput, roles={"writer", "reviewer"}, read_only=True, idempotent=True)
def profile_summary(call: CallContext, args: ProfileSummaryInput) -> Reply[ProfileSummaryOutput]:
    """Diagnose a stored profile (run id or report sha256) or any .ncu-rep file in the workspace: primary
    bottleneck with the metric values that decide it; occupancy and launch geometry, block balance and tail,
    stall reasons, tensor-core use, timeline shape, memory (coalescing, caches, bank conflicts, spills);
    at most five ranked next actions, each with evidence, Nsight Compute's estimated speedup, hotspot lines
    and matching wiki pages. Works without a GPU or Nsight Compute installed."""
    from kda.tools.profile import summary_for

    s, info = summary_for(call.ws, args.report, args.kernel)
    out = ProfileSummaryOutput(report=args.report, report_sha=info["sha"], origin=info["origin"],
                               cached=info["cached"], headline=s["headline"], text=s["text"], kernels=s["kernels"])
    return Reply(s["headline"], out, detail=s["text"])


@tool("profile_diff", title="Compare two profiles", input_model=ProfileDiffInput, output_model=ProfileDiffOutput,
      roles={"writer", "reviewer"}, read_only=True, idempotent=True)
def profile_diff(call: CallContext, args: ProfileDiffInput) -> Reply[ProfileDiffOutput]:
    """Compare two profiles (run ids, report sha256s or .ncu-rep paths): duration, speed of light, stall mix,
    occupancy and hotspots per kernel, and what moved beyond noise."""
    from kda.tools.profile import diff_for

    d = diff_for(call.ws, args.a, args.b)
    out = ProfileDiffOutput(headline=d["headline"], text=d["text"], total_us=d["total_us"], kernels=d["kernels"],
                            only_a=d["only_a"], only_b=d["only_b"])
    return Reply(d["headline"], out, detail=d["text"])
