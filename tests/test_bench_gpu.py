"""benchmark and verify on a CUDA GPU: a Triton RMSNorm end to end through the MCP tools."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import HAS_GPU, mcp_client

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]

DATA = Path(__file__).parent / "data_bench"


@pytest.mark.anyio
async def test_triton_rmsnorm_on_all_workloads(workspace):
    shutil.copytree(DATA / "triton_rmsnorm", workspace.work_dir / "v1")
    async with mcp_client(workspace, "writer") as client:
        r = await client.call_tool("benchmark", {"path": "work/v1", "workloads": "all", "mode": "quick",
                                                 "wait_s": 600})
        assert not r.is_error, r.content[0].text
        out = r.structured_content
        assert out["state"] == "done", out
        assert out["status"] == "PASSED", r.content[0].text
        assert out["device"].startswith("cuda:") and out["total"] == 14
        for w in out["workloads"]:
            assert w["status"] == "PASSED", w
            lo, hi = w["candidate_ci_us"]
            if w["candidate_us"] >= 20:
                assert (hi - lo) / w["candidate_us"] < 0.05, w  # tight intervals on a quiet GPU
            if w["floor_us"] is not None:
                assert w["candidate_us"] > w["floor_us"], w
        big = [w for w in out["workloads"] if w["axes"]["batch_size"] >= 1024]
        # One fused kernel against the reference's chain of torch ops.
        assert all(w["speedup"] > 1.0 for w in big), [(w["axes"], w["speedup"]) for w in big]
        assert out["geomean_speedup"] > 1.0

        run = await client.call_tool("show_run", {"run_id": out["run_id"]})
        env = run.structured_content["record"]["env"]
        assert env["worker"]["gpu_name"] and env["worker"]["cuda"]
        assert env["calibration"]["bytes_per_s"] > 5e11
        if env["worker"]["timing_mode"].startswith("CUPTI"):  # the launch gap a queued kernel waits
            cfg = run.structured_content["record"]["config"]
            assert 0.1 < cfg["launch_gap_us"] < 10.0 and cfg["launch_gap_us"] == env["calibration"]["launch_gap_us"]
            # The gap is the process's: the device's figure is the median of three fresh processes'.
            per_process = env["calibration"]["launch_gap_per_process_us"]
            assert len(per_process) == 3 and cfg["launch_gap_us"] == sorted(per_process)[1], env["calibration"]
        assert "clocks.sm" in env["gpu_start"] or "nvidia_smi" in env["gpu_start"]
        # The candidate's compiled kernels are kept for the next run of the same content.
        kept = workspace.kda_dir / "cache" / "kernels" / f"candidate-{out['candidate_hash']}"
        kept_files = sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file())
        assert any(p.suffix == ".cubin" for p in kept_files), kept_files
        r = await client.call_tool("benchmark", {"path": "work/v1", "workloads": "sample:2", "wait_s": 600})
        again = r.structured_content
        assert again["status"] == "PASSED", r.content[0].text
        run = await client.call_tool("show_run", {"run_id": again["run_id"]})
        assert any("compiled kernels from an earlier run" in f for f in run.structured_content["record"]["flags"])

    async with mcp_client(workspace, "reviewer") as client:
        r = await client.call_tool("verify", {"path": "work/v1", "workloads": "sample:3", "wait_s": 600})
        assert not r.is_error, r.content[0].text
        v = r.structured_content
        assert v["official_ran"] is True, v["official_reason"]
        assert v["verdict"] == "pass", r.content[0].text
        assert all(w["status"] == "PASSED" for w in v["official"]), v["official"]
        assert v["agreement"]["writer_run_id"] == again["run_id"]  # the writer's latest run of this content
        assert v["agrees_with_writer"] is not None
    # The reviewer's verify changed nothing but its record: not even the kept kernels.
    assert sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file()) == kept_files


def test_cuda_candidate_is_built_and_measured(workspace):
    from kda.tools import bench
    from kda.tools.jobs import CancelToken

    shutil.copytree(DATA / "cuda_rmsnorm", workspace.work_dir / "cu")
    req = bench.prepare(workspace, "work/cu", None, "sample:3", "quick", "writer")
    _, rec = bench.run_benchmark(req, lambda *a: None, CancelToken())
    assert rec["status"] == "PASSED", rec["headline"]
    assert rec["language"] == "cuda" and len(rec["workloads"]) == 3
    big = [w for w in rec["workloads"] if w["axes"]["batch_size"] >= 1024]
    assert big and all(w["speedup"] > 1.0 for w in big), [(w["axes"], w.get("speedup")) for w in big]
