"""Benchmark (not a test) for the profile tools.

1. Summary time per full-set report (goal <= 1 s on the 2-core CI machine): cold (extraction
   subprocess + summary, nothing cached) and warm (extraction cached in the store), medians.
2. On a GPU machine with Nsight Compute: collection time through the `profile` MCP tool vs the
   same `ncu` command run by hand (goal <= 1.1x), alternating, medians.

    python benchmarks/profile.py [--repeats N] [--device-repeats N]

Prints a table and writes JSON to $OUT/profile.json when $OUT is set, else
benchmarks/results/profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KDA_SHARED_DIR", REPO.parent / "shared"))
NCU_FIXTURES = SHARED / "fixtures" / "ncu"
EXAMPLE = REPO / "kernels" / "examples" / "rmsnorm_h4096" / "triton_v1"


def _workspace(root: Path):
    from kda.tools.task import init_workspace, resolve_task
    from kda.tools.workspace import Workspace

    init_workspace(root, resolve_task("rmsnorm_h4096", None, None, None, None))
    return Workspace.open(root)


def bench_summaries(repeats: int) -> list[dict]:
    from kda.tools.profile import summary_for

    rows = []
    for rep in sorted(NCU_FIXTURES.glob("*.ncu-rep")):
        cold, warm = [], []
        kernels = 0
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                ws = _workspace(Path(tmp) / "ws")
                shutil.copyfile(rep, ws.root / "work" / rep.name)
                t0 = time.perf_counter()
                s, info = summary_for(ws, f"work/{rep.name}")
                cold.append(time.perf_counter() - t0)
                assert not info["cached"]
                t1 = time.perf_counter()
                s, info = summary_for(ws, f"work/{rep.name}")
                warm.append(time.perf_counter() - t1)
                assert info["cached"]
                kernels = len(s["kernels"])
        rows.append({"report": rep.name, "kernels": kernels, "size_mb": round(rep.stat().st_size / 2**20, 2),
                     "cold_s": round(statistics.median(cold), 3), "warm_s": round(statistics.median(warm), 3),
                     "goal_s": 1.0})
    return rows


def bench_collection(repeats: int) -> dict:
    """Tool vs the same ncu command by hand, on the Triton RMSNorm example, largest workload."""
    import anyio

    from kda.tools.candidate import load_candidate
    from kda.tools.profile import find_ncu, prepare_job

    exe = find_ncu()
    if exe is None:
        return {"skipped": "ncu is not installed"}
    try:
        import torch

        if not torch.cuda.is_available():
            return {"skipped": "no CUDA GPU"}
        gpu = torch.cuda.get_device_name(0)
    except Exception as e:  # pragma: no cover
        return {"skipped": f"torch/CUDA unavailable: {e}"}
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import mcp_client  # the same in-process MCP client the tests use

    tmp = Path(tempfile.mkdtemp(prefix="kda-bench-profile-"))
    try:
        ws = _workspace(tmp / "ws")
        shutil.copytree(EXAMPLE, ws.root / "work" / "v1")
        cand = load_candidate(ws, "work/v1")
        wl = max(ws.workloads(), key=lambda w: w["axes"]["batch_size"])
        by_hand, tool_total, tool_collect = [], [], []

        async def tool_once() -> tuple[float, float]:
            async with mcp_client(ws, "writer") as c:
                t0 = time.perf_counter()
                r = await c.call_tool("profile", {"path": "work/v1", "workload": wl["uuid"]})
                dt = time.perf_counter() - t0
                if r.is_error:
                    raise RuntimeError(r.content[0].text)
                return dt, r.structured_content["collect_s"]

        for i in range(repeats):
            job_dir, _, out_base, argv = prepare_job(ws, cand, wl, exe)
            try:
                t0 = time.perf_counter()
                p = subprocess.run(argv, cwd=job_dir, capture_output=True, text=True, timeout=600)
                by_hand.append(time.perf_counter() - t0)
                if p.returncode != 0 or not out_base.with_suffix(".ncu-rep").is_file():
                    raise RuntimeError(f"ncu by hand failed: {p.stdout[-500:]} {p.stderr[-500:]}")
            finally:
                shutil.rmtree(job_dir, ignore_errors=True)
            total, collect = anyio.run(tool_once)
            tool_total.append(total)
            tool_collect.append(collect)
        hand, tot, col = statistics.median(by_hand), statistics.median(tool_total), statistics.median(tool_collect)
        return {"gpu": gpu, "workload_batch": wl["axes"]["batch_size"], "repeats": repeats,
                "ncu_by_hand_s": round(hand, 2), "tool_collect_s": round(col, 2), "tool_total_s": round(tot, 2),
                "ratio_collect": round(col / hand, 3), "ratio_total": round(tot / hand, 3), "goal_ratio": 1.1,
                "samples": {"by_hand": by_hand, "tool_total": tool_total, "tool_collect": tool_collect}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device-repeats", type=int, default=3)
    ap.add_argument("--skip-device", action="store_true")
    a = ap.parse_args()
    if not NCU_FIXTURES.is_dir():
        print(f"fixtures not found at {NCU_FIXTURES}", file=sys.stderr)
        return 2
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version()}
    result["summaries"] = bench_summaries(a.repeats)
    print(f"{'report':28} {'kernels':>7} {'MB':>6} {'cold s':>8} {'warm s':>8}  goal")
    for r in result["summaries"]:
        print(f"{r['report']:28} {r['kernels']:>7} {r['size_mb']:>6} {r['cold_s']:>8} {r['warm_s']:>8}  <= 1 s")
    if not a.skip_device:
        result["collection"] = c = bench_collection(a.device_repeats)
        if "skipped" in c:
            print(f"collection: skipped ({c['skipped']})")
        else:
            print(f"\ncollection on {c['gpu']} (rmsnorm batch {c['workload_batch']}, median of {c['repeats']}):")
            print(f"  ncu by hand {c['ncu_by_hand_s']} s | tool: collect {c['tool_collect_s']} s "
                  f"({c['ratio_collect']}x), whole call incl. summary {c['tool_total_s']} s ({c['ratio_total']}x); "
                  f"goal <= 1.1x")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out_dir / 'profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
