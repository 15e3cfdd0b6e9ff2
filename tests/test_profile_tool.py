"""profile / profile_summary / profile_diff through real MCP sessions, the store cache, and bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import SHARED, mcp_client
from kda.tools.candidate import resolve_candidate
from kda.tools.errors import BadInput, KdaError, NotAvailable
from kda.tools.profile import (
    REPORT_MEDIA_TYPE,
    default_workload,
    extract_report_file,
    find_ncu,
    summary_for,
)

NCU = SHARED / "fixtures" / "ncu"
pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(not (NCU / "vadd_full.ncu-rep").is_file(), reason="ncu fixtures missing")]


def _put(ws, name: str, dest: str | None = None) -> str:
    rel = dest or f"work/{name}"
    shutil.copyfile(NCU / name, ws.root / rel)
    return rel


# --- bad input -----------------------------------------------------------------------------------
def test_not_a_report(tmp_path):
    junk = tmp_path / "junk.ncu-rep"
    junk.write_bytes(b"\x7fELF" + bytes(range(256)) * 8)
    with pytest.raises(BadInput, match="not an Nsight Compute report"):
        extract_report_file(junk)
    empty = tmp_path / "empty.ncu-rep"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match="empty file"):
        extract_report_file(empty)


def test_empty_range(tmp_path):
    # The header of a real report without its result blocks: a report with no profiled kernel.
    cut = tmp_path / "cut.ncu-rep"
    cut.write_bytes((NCU / "vadd_full.ncu-rep").read_bytes()[:4096])
    with pytest.raises(BadInput, match="no profiled kernel"):
        extract_report_file(cut)


def test_extraction_timeout():
    with pytest.raises(KdaError, match="timed out after"):
        extract_report_file(NCU / "cuda_bottlenecks.ncu-rep", timeout_s=0.05)


async def test_summary_paths_are_checked(workspace):
    (workspace.root / "work" / "notes.txt").write_text("hello")
    async with mcp_client(workspace, "reviewer") as c:
        for ref, words in [("../outside.ncu-rep", "outside the workspace"), ("work/notes.txt", "not a .ncu-rep"),
                           ("work/missing.ncu-rep", "no report file"), ("run_00", "no run"), ("f" * 64, "no stored report"),
                           ("", "empty")]:
            r = await c.call_tool("profile_summary", {"report": ref})
            assert r.is_error and words in r.content[0].text, (ref, r.content[0].text)


# --- summaries through MCP, with the cache ----------------------------------------------------------
async def test_profile_summary_over_mcp_and_cache(workspace):
    rel = _put(workspace, "cuda_bottlenecks.ncu-rep")
    async with mcp_client(workspace, "reviewer") as c:
        tools = {t.name for t in (await c.list_tools()).tools}
        assert {"profile_summary", "profile_diff"} <= tools and "profile" not in tools
        r = await c.call_tool("profile_summary", {"report": rel})
        assert not r.is_error, r.content[0].text
        s = r.structured_content
        assert s["cached"] is False and s["origin"] == "path" and len(s["kernels"]) == 4
        first_line = r.content[0].text.splitlines()[0]
        assert first_line == s["headline"] and "local_memory" in first_line
        assert "Next actions:" in r.content[0].text
        again = await c.call_tool("profile_summary", {"report": rel, "kernel": "strided"})
        s2 = again.structured_content
        assert s2["cached"] is True and [k["name"] for k in s2["kernels"]] == ["strided_copy"]
        assert s2["kernels"][0]["bottleneck"]["name"] == "uncoalesced_global"
        by_sha = await c.call_tool("profile_summary", {"report": s["report_sha"], "kernel": "1"})
        assert by_sha.structured_content["kernels"][0]["bottleneck"]["name"] == "shared_bank_conflicts"


async def test_cached_summary_is_fast(workspace):
    import time

    rel = _put(workspace, "torch_triton.ncu-rep")
    t0 = time.perf_counter()
    summary_for(workspace, rel)
    cold = time.perf_counter() - t0
    t1 = time.perf_counter()
    s, info = summary_for(workspace, rel)
    warm = time.perf_counter() - t1
    assert info["cached"] and warm < 1.0 and warm < cold
    assert s["kernels"][3]["bottleneck"]["name"] == "compute_tensor"


async def test_stored_profile_run_and_diff(workspace):
    """A profile run as `profile` stores it: the report blob linked from the run record."""
    store = workspace.store
    sha_a = store.put_blob((NCU / "torch_triton.ncu-rep").read_bytes(), REPORT_MEDIA_TYPE)
    run_a = store.put_run("profile", "writer", "ok", "fixture", {"report_blob": sha_a, "workload_uuid": "w"},
                          candidate_path="work/v1", candidate_hash="h1")
    rel_b = _put(workspace, "vadd_full.ncu-rep")
    bench = store.put_run("benchmark", "writer", "ok", "b", {"workloads": []})
    async with mcp_client(workspace, "writer") as c:
        r = await c.call_tool("profile_summary", {"report": run_a})
        assert not r.is_error, r.content[0].text
        assert r.structured_content["origin"] == "run" and r.structured_content["report_sha"] == sha_a
        bad = await c.call_tool("profile_summary", {"report": bench})
        assert bad.is_error and "not a profile run" in bad.content[0].text
        d = await c.call_tool("profile_diff", {"a": run_a, "b": rel_b})
        assert not d.is_error, d.content[0].text
        dd = d.structured_content
        assert dd["only_b"] == ["vadd"] and len(dd["only_a"]) == 4 and dd["total_us"]["delta_pct"] < 0
        same = await c.call_tool("profile_diff", {"a": run_a, "b": sha_a})
        assert all(not k["moved"] for k in same.structured_content["kernels"])
        assert "nothing moved" in same.content[0].text


# --- collection --------------------------------------------------------------------------------------
def _candidate(ws, name="v1"):
    src = Path(__file__).resolve().parents[1] / "kernels" / "examples" / "rmsnorm_h4096" / "triton_v1"
    shutil.copytree(src, ws.root / "work" / name)
    return f"work/{name}"


async def test_profile_bad_input(workspace):
    rel = _candidate(workspace)
    async with mcp_client(workspace, "writer") as c:
        both = await c.call_tool("profile", {"path": rel, "candidate": "c1"})
        assert both.is_error and "exactly one" in both.content[0].text
        wl = await c.call_tool("profile", {"path": rel, "workload": "no-such-uuid"})
        assert wl.is_error and "no workload 'no-such-uuid'" in wl.content[0].text
        outside = await c.call_tool("profile", {"path": "task"})
        assert outside.is_error and "under work/" in outside.content[0].text
        malformed = await c.call_tool("profile", {"candidate": "cand_123"})
        assert malformed.is_error and "8 to 64 hex digits" in malformed.content[0].text
        unknown = await c.call_tool("profile", {"candidate": "0123abcd"})
        assert unknown.is_error and "no recorded candidate" in unknown.content[0].text


@pytest.mark.skipif(find_ncu() is not None, reason="ncu is installed here")
async def test_profile_without_ncu_says_so(workspace):
    rel = _candidate(workspace)
    async with mcp_client(workspace, "writer") as c:
        r = await c.call_tool("profile", {"path": rel})
        assert r.is_error and "`ncu`) is not installed" in r.content[0].text
    with pytest.raises(NotAvailable):
        from kda.tools.profile import collect

        collect(workspace, resolve_candidate(workspace, rel, None), None, "writer")


def test_default_workload_is_slowest_against_baseline(workspace):
    rel = _candidate(workspace)
    cand = resolve_candidate(workspace, rel, None)
    wls = workspace.workloads()
    w, why = default_workload(workspace, cand)
    assert "no benchmark" in why
    assert w["axes"]["batch_size"] == max(x["axes"]["batch_size"] for x in wls)
    rows = [{"uuid": x["uuid"], "speedup": 1.5 + i / 10} for i, x in enumerate(wls)]
    rows[3]["speedup"] = 0.7
    workspace.store.put_run("benchmark", "writer", "ok", "b", {"workloads": rows},
                            candidate_path=rel, candidate_hash=cand.content_hash)
    w2, why2 = default_workload(workspace, cand)
    assert w2["uuid"] == wls[3]["uuid"] and "0.70x" in why2
    json.dumps(why2)


# --- the collection pipeline with a stand-in for ncu (CI has no GPU) ---------------------------------
def _fake_ncu(monkeypatch, script: str):
    """Replace the ncu command line by a Python one-liner run in the same sandbox job: it gets the
    report path ncu would write (`-o BASE`) as argv[1] and a copy of the fixtures folder as argv[2]
    (copied into the job dir: the sandbox shows nothing else of /tmp, where fixtures may live)."""
    import kda.tools.profile as prof

    monkeypatch.setattr(prof, "find_ncu", lambda: sys.executable)
    monkeypatch.setattr(prof, "ncu_version", lambda exe: "fake")

    def argv(exe, out_base, target):
        fixtures = Path(out_base).parent / "fixtures"
        shutil.copytree(NCU, fixtures, ignore=shutil.ignore_patterns("*.cu", "*.py", "*.md"))
        return [exe, "-c", script, str(out_base), str(fixtures), *target]

    monkeypatch.setattr(prof, "ncu_argv", argv)


def test_collect_stores_report_and_run(workspace, monkeypatch):
    from kda.tools.profile import collect

    _fake_ncu(monkeypatch, "import shutil,sys; shutil.copyfile(sys.argv[2] + '/vadd_full.ncu-rep', sys.argv[1] + '.ncu-rep')")
    rel = _candidate(workspace)
    cand = resolve_candidate(workspace, rel, None)
    res = collect(workspace, cand, None, "writer")
    run = workspace.store.get_run(res["run_id"])
    assert run["kind"] == "profile" and run["candidate_hash"] == cand.content_hash and run["candidate_path"] == rel
    assert run["record"]["report_blob"] == res["report_sha"]
    assert workspace.store.get_blob(res["report_sha"]) == (NCU / "vadd_full.ncu-rep").read_bytes()
    assert res["summary"]["kernels"][0]["bottleneck"]["name"] == "dram_bandwidth"
    assert res["workload"]["axes"]["batch_size"] == 8192 and "no benchmark" in res["workload_choice"]
    assert run["record"]["isolation"] in ("bubblewrap (privileged: GPU counters)", "rlimits-only")


def test_collect_failures_are_clear(workspace, monkeypatch):
    from kda.tools.profile import collect

    rel = _candidate(workspace)
    cand = resolve_candidate(workspace, rel, None)
    _fake_ncu(monkeypatch, "print('==WARNING== No kernels were profiled.')")
    with pytest.raises(KdaError, match="no kernel ran inside the NVTX range"):
        collect(workspace, cand, None, "writer")
    _fake_ncu(monkeypatch, "import sys; print('==ERROR== ERR_NVGPUCTRPERM - no permission'); sys.exit(1)")
    with pytest.raises(NotAvailable, match="performance counters"):
        collect(workspace, cand, None, "writer")
    _fake_ncu(monkeypatch, "import time; time.sleep(60)")
    with pytest.raises(KdaError, match="timed out after 2 s"):
        collect(workspace, cand, None, "writer", timeout_s=2)
    assert not workspace.store.list_runs(kind="profile")  # nothing half-written


def test_hotspots_map_back_to_the_candidate(workspace):
    """Sources captured in the job dir are reported under the candidate's workspace path."""
    from pathlib import PurePosixPath

    data = extract_report_file(NCU / "cuda_bottlenecks.ncu-rep")
    captured_dir = str(PurePosixPath(data["kernels"][0]["hotspots"]["lines"][0]["file"]).parent)
    sha = workspace.store.put_blob((NCU / "cuda_bottlenecks.ncu-rep").read_bytes(), REPORT_MEDIA_TYPE)
    run = workspace.store.put_run("profile", "writer", "ok", "fixture",
                                  {"report_blob": sha, "source_root": captured_dir, "candidate_path": "work/v1"})
    s, _ = summary_for(workspace, run, kernel="strided_copy")
    top = s["kernels"][0]["actions"][0]["hotspots"][0]
    assert top["file"] == "work/v1/kernels.cu" and top["where"] == f"work/v1/kernels.cu:{top['line']}"
    assert "work/v1/kernels.cu:" in s["text"] and "work/v1/kernels.cu" in s["headline"]
