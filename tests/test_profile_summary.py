"""The profile summary over real H100 Nsight Compute reports (../shared/fixtures/ncu).

Each fixture kernel has a known bottleneck (the fixtures' README); the summary must find it
from metrics alone, point its hotspots at the right lines of kernels.cu, and back every
action with evidence that is really in the report.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import yaml

from kda.tools.errors import BadInput
from kda.tools.profile import extract_report_file
from kda.tools.profile_diff import diff
from kda.tools.profile_summary import REQUIRED, summarize, wiki_pages_dir
from kda.tools.symptoms import BOTTLENECKS, STALLS

from conftest import SHARED

NCU = SHARED / "fixtures" / "ncu"
pytestmark = pytest.mark.skipif(not (NCU / "cuda_bottlenecks.ncu-rep").is_file(), reason="ncu fixtures missing")

# (report, action index) -> accepted primary bottlenecks, from the fixtures' README.
EXPECTED = {
    ("vadd_full", 0): {"dram_bandwidth"},
    ("cuda_bottlenecks", 0): {"uncoalesced_global"},
    ("cuda_bottlenecks", 1): {"shared_bank_conflicts"},
    ("cuda_bottlenecks", 2): {"local_memory"},
    ("cuda_bottlenecks", 3): {"small_grid"},
    ("torch_triton", 0): {"launch_overhead", "small_grid"},
    ("torch_triton", 1): {"dram_bandwidth"},
    ("torch_triton", 2): {"dram_bandwidth"},
    ("torch_triton", 3): {"compute_tensor"},
}
# README durations (us), read from the reports by Nsight Compute itself.
DURATIONS_US = {("vadd_full", 0): 72, ("cuda_bottlenecks", 0): 410, ("cuda_bottlenecks", 1): 128,
                ("cuda_bottlenecks", 2): 1758, ("cuda_bottlenecks", 3): 1103, ("torch_triton", 0): 3.3,
                ("torch_triton", 1): 42, ("torch_triton", 2): 20, ("torch_triton", 3): 176}


@pytest.fixture(scope="module")
def extracted() -> dict[str, dict]:
    return {name: extract_report_file(NCU / f"{name}.ncu-rep") for name in ("vadd_full", "cuda_bottlenecks", "torch_triton")}


@pytest.fixture(scope="module")
def summaries(extracted) -> dict[str, dict]:
    return {name: summarize(data) for name, data in extracted.items()}


def _kernel(summaries, report, idx):
    return next(k for k in summaries[report]["kernels"] if k["index"] == idx)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_primary_bottleneck(summaries, key):
    k = _kernel(summaries, *key)
    assert k["bottleneck"]["name"] in EXPECTED[key], (k["name"], k["bottleneck"])
    assert k["bottleneck"]["name"] in BOTTLENECKS
    assert k["bottleneck"]["evidence"], "a bottleneck without deciding metric values"
    assert abs(k["duration_us"] - DURATIONS_US[key]) <= 0.06 * DURATIONS_US[key]


def test_classification_ignores_kernel_names(extracted):
    """Swap every kernel's name for another's: the diagnosis must not change."""
    for data in extracted.values():
        renamed = copy.deepcopy(data)
        names = [k["name"] for k in renamed["kernels"]]
        for k, new in zip(renamed["kernels"], names[1:] + names[:1] if len(names) > 1 else ["anonymous"]):
            k["name"] = new + "_x"
            k["mangled"] = None
        before = [k["bottleneck"]["name"] for k in summarize(data)["kernels"]]
        after = [k["bottleneck"]["name"] for k in summarize(renamed)["kernels"]]
        assert before == after


def test_evidence_is_real_metric_values(extracted, summaries):
    for name, data in extracted.items():
        for raw, k in zip(data["kernels"], summaries[name]["kernels"]):
            assert 1 <= len(k["actions"]) <= 5
            for ev in k["bottleneck"]["evidence"] + [e for a in k["actions"] for e in a["evidence"]]:
                assert ev["metric"] in raw["metrics"], ev
                assert ev["value"] == pytest.approx(raw["metrics"][ev["metric"]], rel=1e-3, abs=1e-3)
            for a in k["actions"]:
                assert a["evidence"] and a["symptom"] in BOTTLENECKS and a["action"]
            assert [a["rank"] for a in k["actions"]] == list(range(1, len(k["actions"]) + 1))
            assert k["actions"][0]["symptom"] == k["bottleneck"]["name"]


def test_six_dimensions(summaries):
    strided = _kernel(summaries, "cuda_bottlenecks", 0)
    d = strided["dimensions"]
    assert set(d) == {"occupancy", "balance", "stalls", "tensor", "timeline", "memory"}
    assert d["memory"]["global_load_sectors_per_request"] == pytest.approx(32.0)  # stride 33 floats
    assert d["memory"]["global_load_bytes_per_sector"] == pytest.approx(4.0)
    assert d["stalls"][0]["stall"] == "stall_long_scoreboard"
    assert all(r["stall"] in STALLS for r in d["stalls"][:3])
    assert d["timeline"]["samples"] >= 4 and d["timeline"]["shape"]
    vadd = _kernel(summaries, "vadd_full", 0)["dimensions"]
    assert vadd["memory"]["global_load_sectors_per_request"] == pytest.approx(4.0)  # coalesced fp32
    tiny = _kernel(summaries, "cuda_bottlenecks", 3)["dimensions"]
    assert tiny["occupancy"]["blocks"] == 4 and tiny["balance"]["sm_busy_pct"] < 10
    gemm = _kernel(summaries, "torch_triton", 3)["dimensions"]
    assert gemm["tensor"]["uses_tensor_cores"] and gemm["tensor"]["busiest_pipe"] == "tensor"
    local = _kernel(summaries, "cuda_bottlenecks", 2)["dimensions"]
    assert local["memory"]["local_share"] > 0.5
    conflicts = _kernel(summaries, "cuda_bottlenecks", 1)["dimensions"]
    assert conflicts["memory"]["shared_wavefronts_vs_ideal"] > 8


@pytest.mark.parametrize("idx,access", [
    (0, "in[(long long)i * stride % n]"),            # strided load
    (1, "tile[threadIdx.x][threadIdx.y]"),           # column read of the unpadded tile
    (2, "buf["),                                     # run-time indexed local array
    (3, "sinf(x)"),                                  # the dependent chain
])
def test_hotspots_point_at_kernels_cu(summaries, idx, access):
    source = (NCU / "kernels.cu").read_text().splitlines()
    k = _kernel(summaries, "cuda_bottlenecks", idx)
    top = k["actions"][0]["hotspots"][0]
    assert top["file"].endswith("kernels.cu")
    assert access in source[top["line"] - 1], (top, source[top["line"] - 1])
    assert top["text"] == source[top["line"] - 1].strip()


def test_ncu_speedups_and_rules(summaries):
    strided = _kernel(summaries, "cuda_bottlenecks", 0)
    act = strided["actions"][0]
    assert act["symptom"] == "uncoalesced_global"
    assert act["ncu_est_speedup_pct"] is not None and 0 < act["ncu_est_speedup_pct"] <= 100
    assert set(act["ncu_rules"]) & {"UncoalescedGlobalAccess", "MemoryCacheAccessPattern"}
    conflicts = _kernel(summaries, "cuda_bottlenecks", 1)["actions"][0]
    assert conflicts["ncu_est_speedup_pct"] is not None


def test_wiki_links_match_symptoms(summaries):
    pages = {}
    for p in wiki_pages_dir().glob("*.md"):
        text = p.read_text()
        meta = yaml.safe_load(text[3:text.find("\n---", 3)])
        pages[meta["id"]] = set(meta.get("symptoms") or [])
    if not pages:
        pytest.skip("no wiki pages")
    linked = 0
    for s in summaries.values():
        for k in s["kernels"]:
            for a in k["actions"]:
                for pid in a["wiki"]:
                    assert pid in pages
                    assert a["symptom"] in pages[pid] or any(st in pages[pid] for st in STALLS), (a["symptom"], pid)
                    linked += 1
    assert linked > 0


def test_no_source_report_says_so(summaries):
    gemm = _kernel(summaries, "torch_triton", 3)
    assert any("no source-line correlation" in n for n in gemm["notes"])
    assert gemm["sass_hotspots"] and gemm["sass_hotspots"][0]["sass"]


def test_text_is_short_and_names_the_bottleneck(summaries):
    for s in summaries.values():
        assert len(s["text"]) < 8000  # ~2,000 tokens at ~4 characters per token
        longest = max(s["kernels"], key=lambda k: k["duration_us"])
        assert longest["bottleneck"]["name"] in s["text"] and longest["bottleneck"]["name"] in s["headline"]


def test_summary_is_fast(extracted):
    for data in extracted.values():
        t0 = time.perf_counter()
        summarize(data)
        assert time.perf_counter() - t0 < 1.0


def test_unknown_metric_set_is_a_clear_error(extracted):
    data = copy.deepcopy(extracted["vadd_full"])
    del data["kernels"][0]["metrics"][REQUIRED[1]]
    with pytest.raises(BadInput, match=REQUIRED[1].replace(".", r"\.")):
        summarize(data)
    with pytest.raises(BadInput, match="no kernel"):
        summarize(extracted["vadd_full"], kernel="no_such_kernel")


def test_diff_says_what_moved(summaries):
    tt = summaries["torch_triton"]
    a = {"kernels": [tt["kernels"][0]]}
    b = {"kernels": [tt["kernels"][1]]}
    d = diff(a, b)
    moved = d["kernels"][0]["moved"]
    assert moved[0].startswith("bottleneck ")
    assert any(m.startswith("duration ") for m in moved)
    assert d["kernels"][0]["duration_us"]["speedup"] < 1
    same = diff(tt, tt)
    assert all(not k["moved"] for k in same["kernels"]) and same["total_us"]["delta_pct"] == 0
    apart = diff(summaries["vadd_full"], summaries["cuda_bottlenecks"])
    assert apart["only_a"] == ["vadd"] and len(apart["only_b"]) == 4
    json.dumps(d)  # structured output must serialize


def test_diff_matches_hotspots_of_two_candidates_by_file_name_and_line(summaries):
    """Sources of different candidates live in different folders; the same line is the same site."""
    k = summaries["cuda_bottlenecks"]["kernels"][0]
    assert len(k["hotspots"]) >= 2, "the fixture kernel has several source hotspots"
    a, b = copy.deepcopy(k), copy.deepcopy(k)
    for kern, folder in ((a, "work/v1"), (b, "work/v2")):
        for h in kern["hotspots"]:
            h["where"] = f"{folder}/{h['where'].rsplit('/', 1)[-1]}"
    d = diff({"kernels": [a]}, {"kernels": [b]})["kernels"][0]
    assert d["hotspots"]["gone"] == [] and d["hotspots"]["new"] == []
    assert not any(m.startswith("top hotspot") for m in d["moved"])
    b["hotspots"] = b["hotspots"][1:]  # the top site is gone in b
    d = diff({"kernels": [a]}, {"kernels": [b]})["kernels"][0]
    assert d["hotspots"]["gone"] == [a["hotspots"][0]["where"]]
    assert any(m.startswith("top hotspot") for m in d["moved"])
