"""Device: profile a Triton RMSNorm candidate end to end through the MCP `profile` tool."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import mcp_client
from kda.tools.profile import find_ncu
from kda.tools.symptoms import BOTTLENECKS

pytestmark = [pytest.mark.gpu, pytest.mark.anyio,
              pytest.mark.skipif(find_ncu() is None, reason="Nsight Compute (ncu) is not installed")]

EXAMPLE = Path(__file__).resolve().parents[1] / "kernels" / "examples" / "rmsnorm_h4096" / "triton_v1"


async def test_profile_triton_rmsnorm_end_to_end(workspace):
    shutil.copytree(EXAMPLE, workspace.root / "work" / "v1")
    source = (EXAMPLE / "kernel.py").read_text().splitlines()
    big = max(workspace.workloads(), key=lambda w: w["axes"]["batch_size"])
    async with mcp_client(workspace, "writer") as c:
        r = await c.call_tool("profile", {"path": "work/v1", "workload": big["uuid"]})
        assert not r.is_error, r.content[0].text
        out = r.structured_content
        print(r.content[0].text)
        assert out["workload_uuid"] == big["uuid"] and out["candidate_path"] == "work/v1"
        kernels = out["kernels"]
        assert kernels and all(k["name"] for k in kernels)
        main = max(kernels, key=lambda k: k["duration_us"])
        assert "rmsnorm" in main["name"]
        # A large-batch RMSNorm streams 2 x 64 MiB: the summary must call it memory bound.
        assert main["bottleneck"]["name"] in BOTTLENECKS
        assert main["bottleneck"]["name"] in {"dram_bandwidth", "memory_latency", "l2_bound"}, main["bottleneck"]
        assert main["bottleneck"]["name"] in out["headline"]
        # Hotspots are lines of the candidate's own source, mapped back to its workspace path.
        hot = [h for h in main["hotspots"] if h["file"] and h["file"].startswith("work/v1/kernel.py")]
        assert hot, main["hotspots"]
        assert hot[0]["text"] == source[hot[0]["line"] - 1].strip()
        assert "work/v1/kernel.py:" in r.content[0].text

        # Stored and linked: the run names the report blob and the candidate; summaries reuse the cache.
        run = workspace.store.get_run(out["run_id"])
        assert run["kind"] == "profile" and run["candidate_path"] == "work/v1"
        assert run["record"]["report_blob"] == out["report_sha"]
        assert workspace.store.blob_path(out["report_sha"]).is_file()
        again = await c.call_tool("profile_summary", {"report": out["run_id"]})
        assert again.structured_content["cached"] is True
        assert again.structured_content["kernels"][0]["bottleneck"] == kernels[0]["bottleneck"]

        # The default workload (no benchmark yet) is the largest, so a second profile matches the first.
        r2 = await c.call_tool("profile", {"path": "work/v1"})
        assert not r2.is_error, r2.content[0].text
        assert r2.structured_content["workload_uuid"] == big["uuid"]
        d = await c.call_tool("profile_diff", {"a": out["run_id"], "b": r2.structured_content["run_id"]})
        assert not d.is_error and d.structured_content["kernels"]
