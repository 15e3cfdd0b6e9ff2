"""benchmark / show_run / job_status / verify on CPU: the harness pieces and the tools end to end.

Real sandboxed workers, real SQLite, real MCP sessions. End-to-end cases use the smallest
rmsnorm_h4096 workloads so the suite stays fast on two cores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import anyio
import pytest
import torch

from kda.sandbox import harness as H
from kda.tools import bench, floor
from kda.tools.errors import BadInput, NotAvailable, PathRefused, PolicyError

from conftest import HAS_GPU, mcp_client

DEVICE = "cuda" if HAS_GPU else "cpu"

DATA = Path(__file__).parent / "data_bench"
CASES = Path(__file__).parent / "adversarial" / "cases"
BATCH1 = "f768064f-9585-47ad-a39e-ed24c2c063fe"
BATCH2 = "5966eb44-e0c6-4744-9511-3dc30e9a8df5"
BATCH4 = "b9c48cb0-1720-400e-8ca8-2984fcb042d9"


def _install(ws, src: Path, name: str | None = None) -> str:
    name = name or src.name
    shutil.copytree(src, ws.work_dir / name, ignore=shutil.ignore_patterns("__pycache__"))
    return f"work/{name}"


def _write_candidate(ws, name: str, code: str, language: str = "python", dps: bool = True) -> str:
    d = ws.work_dir / name
    d.mkdir()
    (d / "candidate.toml").write_text(f'language = "{language}"\nentry_point = "kernel.py::run"\n'
                                      f"destination_passing_style = {str(dps).lower()}\n")
    (d / "kernel.py").write_text(code)
    return f"work/{name}"


# --- harness pieces -------------------------------------------------------------------------------
def _definition() -> dict:
    from kda.tools.task import builtin_dataset

    return json.loads((builtin_dataset() / "definitions/rmsnorm/rmsnorm_h4096.json").read_text())


def test_inputs_are_deterministic_per_seed_and_fresh_across_seeds():
    d = _definition()
    wl = {"uuid": "x", "axes": {"batch_size": 3}, "inputs": {"hidden_states": {"type": "random"},
                                                             "weight": {"type": "random"}}}
    a = H.make_inputs(d, wl, 42, torch.device("cpu"))
    b = H.make_inputs(d, wl, 42, torch.device("cpu"))
    c = H.make_inputs(d, wl, 43, torch.device("cpu"))
    assert [t.shape for t in a] == [torch.Size([3, 4096]), torch.Size([4096])]
    assert a[0].dtype == torch.bfloat16
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # Redrawing a buffer in place gives exactly what a fresh draw gives.
    H.refill_inputs_(d, wl, c, 42)
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_random_values_follow_flashinfer_bench_ranges_and_scalars_pass_through():
    t8 = H.fill_random_(torch.empty(5000, dtype=torch.int8), 1)
    t32 = H.fill_random_(torch.empty(5000, dtype=torch.int32), 1)
    tb = H.fill_random_(torch.empty(5000, dtype=torch.bool), 1)
    tf8 = H.fill_random_(torch.empty(5000, dtype=torch.float8_e4m3fn), 1)
    assert t8.min() >= -128 and t8.max() <= 127 and t8.unique().numel() > 200
    assert t32.min() >= -1024 and t32.max() < 1024
    assert 0 < tb.sum() < 5000
    assert tf8.float().abs().max() <= 2.0
    d = {"axes": {"n": {"type": "var"}}, "inputs": {"x": {"shape": ["n"], "dtype": "float32"},
                                                    "eps": {"shape": None, "dtype": "float32"}},
         "outputs": {"y": {"shape": ["n"], "dtype": "float32"}}}
    wl = {"axes": {"n": 4}, "inputs": {"x": {"type": "random"}, "eps": {"type": "scalar", "value": 0.5}}}
    x, eps = H.make_inputs(d, wl, 0, torch.device("cpu"))
    assert eps == 0.5 and x.shape == (4,)


def test_poisoned_outputs_and_comparison_semantics():
    d = _definition()
    wl = {"axes": {"batch_size": 2}}
    (out,) = H.alloc_outputs(d, wl, torch.device("cpu"))
    assert torch.isnan(out.float()).all()
    assert H.poison_value(torch.int32) == torch.iinfo(torch.int32).min
    ref = torch.ones(2, 4096, dtype=torch.bfloat16)
    r = H.compare_output("output", out, ref, 1e-2, 1e-2, 1.0)
    assert r["status"] == "INCORRECT_NUMERICAL" and r["nan_count"] == 2 * 4096
    # An element fails only if abs error > atol AND rel error > rtol.
    big = torch.full((4,), 1000.0)
    ok = H.compare_output("y", big + 5.0, big, 1e-2, 1e-2, 1.0)  # abs 5 > atol, rel 0.005 < rtol
    assert ok["ok"], ok
    bad = big.clone()
    bad[2] = 1100.0
    r = H.compare_output("y", bad, big, 1e-2, 1e-2, 1.0)
    assert r["status"] == "INCORRECT_NUMERICAL" and r["check"] == "tolerance"
    assert "[2]" in r["evidence"] and r["matched_ratio"] == 0.75
    assert H.compare_output("y", bad, big, 1e-2, 1e-2, 0.7)["ok"]  # the matched ratio decides
    assert H.compare_output("y", big[:3], big, 1e-2, 1e-2, 1.0)["status"] == "INCORRECT_SHAPE"
    assert H.compare_output("y", big.double(), big, 1e-2, 1e-2, 1.0)["status"] == "INCORRECT_DTYPE"
    inf = big.clone()
    inf[0] = float("inf")
    assert "Inf" in H.compare_output("y", inf, big, 1e-2, 1e-2, 1.0)["evidence"]
    changed = big.clone()
    changed[1] = 999.0
    assert "changed by the call" in H.compare_input_digest("x", H.input_digest(changed), big)["evidence"]
    assert H.compare_input_digest("x", H.input_digest(big.clone()), big) is None
    assert "replaced" in H.compare_input_digest("x", H.input_digest(big[:2]), big)["evidence"]
    assert H.compare_input_digest("n", H.input_digest(3), 3) is None


def test_input_digest_sees_any_change_and_moves_between_rows():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4096 + 7, generator=g).to(torch.bfloat16)
    base = H.input_digest(x)
    assert H.input_digest(x.clone()) == base
    for i in range(0, x.numel(), 997):  # every single-element change shows
        y = x.clone().view(-1)
        y[i] = y[i] + 1
        assert H.input_digest(y.view_as(x)) != base, i
    swapped = x.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # same bytes, other rows
    assert H.input_digest(swapped) != base
    assert H.input_digest(torch.zeros_like(x)) != base
    odd = torch.arange(7, dtype=torch.uint8)  # a byte count that is not a multiple of 4
    assert H.input_digest(odd) != H.input_digest(odd.flip(0))


def test_workload_selection(workspace):
    d, wls = workspace.definition(), workspace.workloads()
    chosen, _ = bench.select_workloads(d, wls, "sample:3")
    sizes = [w["axes"]["batch_size"] for w in chosen]
    assert sizes[0] == 1 and sizes[-1] == 8192 and len(sizes) == 3
    assert len(bench.select_workloads(d, wls, "all")[0]) == 14
    assert len(bench.select_workloads(d, wls, "sample:99")[0]) == 14
    assert [w["uuid"] for w in bench.select_workloads(d, wls, [BATCH2, BATCH1])[0]] == [BATCH2, BATCH1]
    for bad in ("sample:0", "sample:x", "some", ["nope"], []):
        with pytest.raises(BadInput):
            bench.select_workloads(d, wls, bad)
    with pytest.raises(BadInput, match="listed more than once"):
        bench.select_workloads(d, wls, [BATCH1, BATCH2, BATCH1])
    assert bench.select_workloads(d, wls, " all ")[1] == "all"


def test_the_checked_output_is_a_timed_one_of_the_block_on_a_set_called_before():
    rng = random.Random(0)

    def drawn(before, warmup, timed, sets=32):
        return {bench.set_to_check(before, warmup, timed, sets, rng) for _ in range(400)}

    # First block, 10 warm-up + 30 timed calls over 32 sets: calls 32..39 reused sets 0-7, and
    # sets 0-7 were last called by timed calls. Never set 8 or 9: their last output is a warm-up one.
    assert drawn(0, 10, 30) == set(range(8))
    assert drawn(0, 10, 20) == set(range(10, 30))  # no set called twice yet: this block's timed ones
    # Second block after 44 calls: 1 warm-up (set 12) and 20 timed calls (sets 13-31, then 0).
    assert drawn(44, 1, 20) == set(range(13, 32)) | {0}
    assert drawn(100, 1, 50, sets=3) == {0, 1, 2}


def test_physical_floor_bytes():
    d = _definition()
    assert floor.min_bytes(d, {"axes": {"batch_size": 1}}) == 3 * 4096 * 2
    assert floor.min_bytes(d, {"axes": {"batch_size": 8192}}) == 2 * 8192 * 4096 * 2 + 4096 * 2
    # A kernel may beat the measured copy bandwidth by up to COPY_TO_PEAK (it cannot beat the memory).
    assert floor.floor_us(24576, 1e12, "cuda") == pytest.approx(0.024576 / floor.COPY_TO_PEAK)
    assert floor.floor_us(24576, 1e10, "cpu") is None  # fits in cache: no floor on a CPU
    # On a GPU, outputs its write-back L2 can hold at the kernel's end need not reach memory in it.
    read, written = floor.io_bytes(d, {"axes": {"batch_size": 4096}})
    assert (read, written) == (4096 * 4096 * 2 + 4096 * 2, 4096 * 4096 * 2)
    assert floor.floor_bytes(d, {"axes": {"batch_size": 4096}}, 50 << 20) == read
    assert floor.floor_bytes(d, {"axes": {"batch_size": 4096}}, 16 << 20) == read + written - (16 << 20)
    assert floor.floor_bytes(d, {"axes": {"batch_size": 4096}}) == read + written


def test_input_sets_fill_the_budget_on_a_gpu_and_stay_three_on_a_cpu():
    d = _definition()
    small, large = {"axes": {"batch_size": 1}}, {"axes": {"batch_size": 8192}}
    assert bench.input_sets(d, small, "cuda") == bench.MAX_SETS
    per_set = floor.min_bytes(d, large)  # 128 MiB and a little: the budget holds 15 of them
    assert per_set > 128 << 20 and bench.input_sets(d, large, "cuda") == 15
    assert bench.input_sets(d, {"axes": {"batch_size": 10 ** 6}}, "cuda") == bench.MIN_SETS
    assert bench.input_sets(d, small, "cpu") == bench.input_sets(d, large, "cpu") == bench.MIN_SETS


def test_headline_shows_speedups_and_intervals_to_the_same_digits():
    def rec(mean, mean_ci, geo, geo_ci):
        return {"status": "PASSED", "device": "cpu", "baseline": "reference", "workloads": [],
                "aggregate": {"passed": 2, "total": 2, "mean_speedup": mean, "mean_speedup_ci": mean_ci,
                              "geomean_speedup": geo, "geomean_speedup_ci": geo_ci}}

    slow = bench.headline_for(rec(0.00912, [0.00871, 0.00958], 0.0091, [0.0087, 0.0095]))
    assert "mean speedup 0.00912x [0.00871, 0.00958]" in slow
    assert "geomean 0.0091x [0.0087, 0.0095]" in slow
    fast = bench.headline_for(rec(1.25, [1.2, 1.3125], 1.5, [1.4375, 1.5625]))
    assert "mean speedup 1.250x [1.200, 1.312]" in fast and "geomean 1.500x [1.438, 1.562]" in fast


def test_bad_requests_are_refused_before_anything_runs(workspace):
    with pytest.raises(PathRefused):
        bench.prepare(workspace, "task", None, "all", "quick", "writer")
    with pytest.raises(BadInput):
        bench.prepare(workspace, None, None, "all", "quick", "writer")
    cu = workspace.work_dir / "cu"
    cu.mkdir()
    (cu / "candidate.toml").write_text('language = "cuda"\nentry_point = "k.cu::run"\n')
    (cu / "k.cu").write_text("// nothing\n")
    with pytest.raises(NotAvailable, match='set binding = "torch"'):  # a tvm-ffi or unset binding
        bench.prepare(workspace, "work/cu", None, "all", "quick", "writer")
    _write_candidate(workspace, "ok", "def run(hidden_states, weight, output):\n    pass\n")
    with pytest.raises(BadInput, match="unknown workload"):
        bench.prepare(workspace, "work/ok", None, ["not-a-uuid"], "quick", "writer")
    assert not (workspace.kda_dir / "jobs").exists()


def test_policy_refuses_looser_integrity_thresholds(workspace):
    from kda.tools.policy import load_policy

    pol = workspace.root / "policy.toml"
    pol.write_text(pol.read_text().replace("interference_ratio = 1.25", "interference_ratio = 1.9"))
    with pytest.raises(PolicyError, match="benchmark.interference_ratio"):
        load_policy(pol)


# --- end to end through MCP ----------------------------------------------------------------------
async def _bench(client, **args) -> dict:
    r = await client.call_tool("benchmark", {"wait_s": 300, **args})
    assert not r.is_error, r.content[0].text
    return r.structured_content


@pytest.mark.anyio
async def test_python_candidate_end_to_end(workspace):
    path = _install(workspace, DATA / "torch_rmsnorm", "v1")
    async with mcp_client(workspace, "writer") as client:
        r = await client.call_tool("benchmark", {"path": path, "workloads": [BATCH1, BATCH2], "wait_s": 300})
        out = r.structured_content
        text = r.content[0].text
        assert out["state"] == "done" and out["status"] == "PASSED", text
        assert text.startswith(f"PASSED 2/2 workloads on {DEVICE}") and "mean speedup" in text
        assert out["device"].startswith(DEVICE) and out["baseline"] == "reference"
        for w in out["workloads"]:
            assert w["status"] == "PASSED" and w["trials"] >= 3 and w["max_abs"] == 0.0
            assert w["baseline_ci_us"][0] <= w["baseline_us"] <= w["baseline_ci_us"][1]
            assert w["candidate_ci_us"][0] <= w["candidate_us"] <= w["candidate_ci_us"][1]
            assert w["speedup"] == pytest.approx(w["baseline_us"] / w["candidate_us"])
            assert w["clean_after_baseline_us"] is None  # not slowed beside the candidate: no second look
            assert w["speedup_ci"][0] <= w["speedup"] <= w["speedup_ci"][1]
        record = workspace.store.get_run(out["run_id"])["record"]
        assert "baseline_alone_again" not in record["phases_s"] and "gpu_second_look" not in record["env"]
        assert out["mean_speedup_ci"][0] <= out["mean_speedup"] <= out["mean_speedup_ci"][1]
        assert out["geomean_speedup"] <= out["mean_speedup"] + 1e-9

        # The run is stored with its environment, config and samples; show_run pages through it.
        run_id = out["run_id"]
        r = await client.call_tool("show_run", {"run_id": run_id, "limit": 1})
        page = r.structured_content
        assert page["kind"] == "benchmark" and page["items_key"] == "workloads" and page["total_items"] == 2
        assert page["next_offset"] == 1 and "samples" not in page["items"][0] and "logs" not in page["record"]
        rec = page["record"]
        assert rec["env"]["device"].startswith(DEVICE) and rec["env"]["worker"]["torch"] == torch.__version__
        assert rec["env"]["isolation"] in ("bubblewrap", "rlimits-only")
        assert rec["config"]["trials"] >= 3 and rec["config"]["order"].startswith("B C C B")
        gaps = {rec["config"]["launch_gap_us"]} | {w["launch_gap_us"] for w in page["items"]}
        if rec["env"]["device"] == "cpu":  # the host clock times the calls: no launch gap is added
            assert gaps == {0.0}
        else:  # one figure for the run, the device's
            assert len(gaps) == 1
        r = await client.call_tool("show_run", {"run_id": run_id, "offset": 1, "include_samples": True,
                                                "include_logs": True})
        item = r.structured_content["items"][0]
        assert len(item["samples"]["candidate"]) >= 10 and len(item["samples"]["clean"]) >= 5
        assert "candidate" in r.structured_content["record"]["logs"]
        stored = workspace.store.get_run(run_id)
        assert stored["candidate_hash"] == out["candidate_hash"] and stored["device"] == out["device"]
        # The device's copy bandwidth was measured once and cached for later runs.
        assert workspace.store.list_runs(kind="calibration")
        r = await client.call_tool("show_run", {"run_id": "run_nope"})
        assert r.is_error and "no run" in r.content[0].text
        r = await client.call_tool("show_run", {"run_id": run_id, "offset": 2})
        assert r.is_error and "offset 2 is past the end: 2 workloads (offsets 0..1)" in r.content[0].text
    # Workers' scratch directories are gone; nothing of the run lingers outside the store (but the
    # empty directories of a spare worker pair waiting for the next run, where the policy starts one).
    from kda.tools.bench_workers import spares

    assert not [d for d in (workspace.kda_dir / "jobs").glob("run_*") if d not in spares.directories()]


@pytest.mark.anyio
async def test_triton_candidate_runs_in_the_interpreter_on_cpu(workspace):
    path = _install(workspace, DATA / "triton_rmsnorm")
    async with mcp_client(workspace, "writer") as client:
        out = await _bench(client, path=path, workloads=[BATCH1])
        w = out["workloads"][0]
        assert out["status"] == "PASSED", w
        assert 0 <= w["max_abs"] <= 0.25  # a different summation order than the reference, within tolerance
        assert not any("torch compute ops" in f for f in out["flags"]), out["flags"]


@pytest.mark.anyio
async def test_value_returning_candidate_and_compile_error(workspace):
    ret = _write_candidate(workspace, "ret", (
        "import torch\n\n\ndef run(hidden_states, weight):\n    x = hidden_states.float()\n"
        "    s = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)\n"
        "    return (x * s * weight.float()).to(hidden_states.dtype)\n"), dps=False)
    broken = _write_candidate(workspace, "broken", "def run(hidden_states, weight, output)\n    pass\n")
    wrong_dtype = _write_candidate(workspace, "f32", (
        "import torch\n\n\ndef run(hidden_states, weight):\n    return hidden_states.float()\n"), dps=False)
    async with mcp_client(workspace, "writer") as client:
        out = await _bench(client, path=ret, workloads=[BATCH1])
        assert out["status"] == "PASSED", out["workloads"][0]
        out = await _bench(client, path=broken, workloads=[BATCH1, BATCH2])
        assert [w["status"] for w in out["workloads"]] == ["COMPILE_ERROR", "COMPILE_ERROR"]
        assert "SyntaxError" in out["workloads"][0]["evidence"]
        out = await _bench(client, path=wrong_dtype, workloads=[BATCH1])
        assert out["workloads"][0]["status"] == "INCORRECT_DTYPE"
        assert "float32" in out["workloads"][0]["evidence"]


@pytest.mark.anyio
async def test_long_run_returns_a_job_id_and_job_status_finishes_it(workspace, tmp_path):
    path = _install(workspace, DATA / "torch_rmsnorm", "v1")
    async with mcp_client(workspace, "writer") as client:
        first = await _bench(client, path=path, workloads=[BATCH1], wait_s=0)
        assert first["state"] == "running" and first["job_id"].startswith("job_")
        assert len(first["job_id"]) > 30  # 128 random bits
        for _ in range(600):
            r = await client.call_tool("job_status", {"job_id": first["job_id"]})
            st = r.structured_content
            if st["state"] != "running":
                break
            await anyio.sleep(0.2)
        assert st["state"] == "done", st
        assert st["result"]["status"] == "PASSED" and st["result"]["run_id"] == st["run_id"]
        assert any("PASSED" in p["message"] for p in st["progress"])
        assert r.content[0].text.startswith("done: PASSED")
        r = await client.call_tool("job_status", {"job_id": "job_" + "0" * 32})
        assert r.is_error and "no job" in r.content[0].text
    # Jobs are bound to their workspace: another workspace does not know the id.
    from kda.tools.task import init_workspace, resolve_task

    other = init_workspace(tmp_path / "other", resolve_task("rmsnorm_h4096", None, None, None, None))
    async with mcp_client(other, "reviewer") as client:
        r = await client.call_tool("job_status", {"job_id": first["job_id"]})
        assert r.is_error and "no job" in r.content[0].text


def _bench_workers() -> list[int]:
    """Every bench worker process on this machine."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if b"kda.sandbox.bench_worker" in Path(f"/proc/{p}/cmdline").read_bytes():
                pids.append(int(p))
        except OSError:
            pass
    return pids


@pytest.mark.anyio
async def test_cancelling_the_call_kills_the_workers(workspace):
    from kda.tools import jobs

    path = _install(workspace, CASES / "hang")
    before = set(_bench_workers())
    async with mcp_client(workspace, "writer") as client:
        with anyio.move_on_after(6):
            await client.call_tool("benchmark", {"path": path, "workloads": [BATCH1], "wait_s": 120})
            pytest.fail("the hanging candidate cannot finish within 6 s")
        job = [j for j in jobs._JOBS.values() if Path(j.ws_root) == workspace.root][-1]
        assert await anyio.to_thread.run_sync(lambda: job.done.wait(30))
        assert job.state == "cancelled", (job.state, job.error)
        assert set(_bench_workers()) - before == set()
        r = await client.call_tool("job_status", {"job_id": job.id})
        assert r.structured_content["state"] == "cancelled"
        r = await client.call_tool("task_info", {"limit": 1})
        assert not r.is_error


@pytest.mark.anyio
async def test_benchmark_refuses_a_broken_lock(workspace):
    path = _install(workspace, DATA / "torch_rmsnorm", "v1")
    (workspace.task_dir / "workloads.jsonl").write_text((workspace.task_dir / "workloads.jsonl").read_text() + "\n")
    async with mcp_client(workspace, "writer") as client:
        r = await client.call_tool("benchmark", {"path": path, "workloads": [BATCH1]})
        assert r.is_error and "lock mismatch" in r.content[0].text
    assert workspace.store.list_runs(kind="benchmark") == []


@pytest.mark.anyio
async def test_speedup_is_against_the_locked_baseline_solution(tmp_path):
    """With task/baseline/solution.json the speedup is measured against it, not the reference."""
    from kda.tools.task import init_workspace, resolve_task

    slow = {
        "name": "slow_baseline", "definition": "rmsnorm_h4096", "author": "test",
        "spec": {"language": "python", "target_hardware": ["cpu"], "entry_point": "main.py::run",
                 "destination_passing_style": True},
        "sources": [{"path": "main.py", "content": (
            # The same arithmetic 40 times over: slow on any device (a sleep would be host time,
            # which a GPU timer rightly does not count).
            "import torch\n\n\ndef run(hidden_states, weight, output):\n    for _ in range(40):\n"
            "        x = hidden_states.float()\n        s = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)\n"
            "        output.copy_((x * s * weight.float()).to(hidden_states.dtype))\n")}],
    }
    (tmp_path / "baseline.json").write_text(json.dumps(slow))
    ws = init_workspace(tmp_path / "ws", resolve_task("rmsnorm_h4096", None, None, None, str(tmp_path / "baseline.json")))
    path = _install(ws, DATA / "torch_rmsnorm", "v1")
    async with mcp_client(ws, "writer") as client:
        out = await _bench(client, path=path, workloads=[BATCH1])
        w = out["workloads"][0]
        assert out["baseline"] == "slow_baseline" and out["status"] == "PASSED", w
        assert w["baseline_us"] > 10 * w["candidate_us"] and w["speedup_ci"][0] > 5, w


@pytest.mark.anyio
async def test_a_benchmarked_candidate_is_recorded_and_measured_again_by_its_id(workspace):
    path = _install(workspace, DATA / "torch_rmsnorm", "v1")
    async with mcp_client(workspace, "writer") as client:
        first = await _bench(client, path=path, workloads=[BATCH1])
        cid = first["candidate_hash"]
        # The directory moves on; the id still names what was measured.
        kernel = workspace.root / path / "kernel.py"
        kernel.write_text(kernel.read_text() + "\n# edited after the run\n")
        again = await _bench(client, candidate=cid[:12], workloads=[BATCH1])
        assert again["candidate_hash"] == cid and again["status"] == "PASSED"
        edited = await _bench(client, path=path, workloads=[BATCH1])
        assert edited["candidate_hash"] != cid
        for bad, why in (("zz-top", "8 to 64 hex digits"), ("deadbeef", "no recorded candidate"),
                         (cid[:6], "8 to 64 hex digits")):
            r = await client.call_tool("benchmark", {"candidate": bad, "workloads": [BATCH1]})
            assert r.is_error and why in r.content[0].text, r.content[0].text
    async with mcp_client(workspace, "reviewer") as client:
        r = await client.call_tool("verify", {"candidate": cid, "workloads": [BATCH1], "wait_s": 300})
        assert not r.is_error, r.content[0].text
        assert r.structured_content["agreement"]["writer_run_id"] == again["run_id"]
    recorded = {c["content_hash"] for c in workspace.store.find_candidates("", limit=10)}
    assert recorded == {cid, edited["candidate_hash"]}  # the reviewer's verify recorded nothing


def test_a_recorded_id_must_name_one_candidate(workspace):
    from kda.tools.candidate import load_candidate, record_candidate, recorded_candidate

    path = _install(workspace, DATA / "torch_rmsnorm", "v1")
    cand = load_candidate(workspace, path)
    record_candidate(workspace, cand)
    assert recorded_candidate(workspace, cand.content_hash[:8].upper()).sources == cand.sources
    other = "e" if cand.content_hash[8] == "f" else "f"
    with workspace.store.transaction() as db:  # a second content whose hash shares the first 8 digits
        db.execute("INSERT INTO candidates(content_hash, path, created) VALUES (?,?,0)",
                   (cand.content_hash[:8] + other * 56, "work/other"))
    with pytest.raises(BadInput, match="more than one"):
        recorded_candidate(workspace, cand.content_hash[:8])
    assert recorded_candidate(workspace, cand.content_hash[:9]).content_hash == cand.content_hash


@pytest.mark.anyio
@pytest.mark.skipif(HAS_GPU, reason="CPU-only behaviour; tests/test_bench_gpu.py covers verify on a GPU")
async def test_verify_on_cpu_says_the_official_harness_needs_a_gpu(workspace):
    path = _install(workspace, DATA / "torch_rmsnorm", "v1")
    async with mcp_client(workspace, "writer") as client:
        mine = await _bench(client, path=path, workloads=[BATCH1])
    runs_before = {r["id"] for r in workspace.store.list_runs(limit=500)}
    files_before = sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*")
                          if p.is_file() and ".kda" not in p.parts)
    async with mcp_client(workspace, "reviewer") as client:
        r = await client.call_tool("verify", {"path": path, "workloads": [BATCH1], "wait_s": 300})
        assert not r.is_error, r.content[0].text
        v = r.structured_content
        assert v["verdict"] == "unverified"  # never a pass without the official harness
        assert v["official_ran"] is False and "needs a CUDA GPU" in v["official_reason"]
        assert "not run (needs a CUDA GPU)" in r.content[0].text
        assert v["integrity_status"] == "PASSED"
        assert v["agreement"]["writer_run_id"] == mine["run_id"]
        assert v["agrees_with_writer"] in (True, False)  # compared, whatever the CPU noise says
        assert v["agreement"]["workloads"][0]["writer_status"] == "PASSED"
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "verify" in tools and "benchmark" not in tools
    new_runs = [r for r in workspace.store.list_runs(limit=500) if r["id"] not in runs_before]
    assert [(r["kind"], r["role"]) for r in new_runs] == [("verify", "reviewer")]
    files_after = sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*")
                         if p.is_file() and ".kda" not in p.parts)
    assert files_after == files_before


@pytest.mark.anyio
async def test_verify_rejects_a_candidate_that_does_not_pack(workspace):
    d = workspace.work_dir / "empty_src"
    d.mkdir()
    (d / "candidate.toml").write_text('language = "python"\nentry_point = "kernel.py::run"\n')
    (d / "kernel.py").write_text("")  # flashinfer-bench refuses empty source files
    async with mcp_client(workspace, "reviewer") as client:
        r = await client.call_tool("verify", {"path": "work/empty_src", "workloads": [BATCH1]})
        assert r.is_error and "Solution" in r.content[0].text


# --- the decision rules on synthetic samples ------------------------------------------------------
def _analyzer(workspace, device: str):
    run = object.__new__(bench.BenchRun)
    run.ws, run.pol, run.device = workspace, workspace.policy, device
    run.definition = workspace.definition()
    run.launch_gap_us, run.l2_bytes = 0.0, 0
    return run


def _state(wl, base, cand, clean=None, host=None, overhead=0.0, warmup=(), events=None):
    st = bench.WorkloadState(wl)
    st.base, st.cand, st.clean = list(base), list(cand), list(clean or base)
    st.cand_host, st.overhead_us, st.cand_warmup = list(host or []), overhead, list(warmup)
    st.cand_ev = list(events or [])  # given: the samples are device-trace spans, these the events
    return st


def test_rules_with_device_timestamps(workspace):
    """Traced runs: the span covers every stream, the events only the timed one."""
    small = next(w for w in workspace.workloads() if w["axes"]["batch_size"] == 1)
    gpu = _analyzer(workspace, "cuda")
    bw = {"bytes_per_s": 3.0e12}
    # Honest: the events read about a microsecond above the span (the event frame).
    r = gpu._analyze(_state(small, [10.0] * 50, [2.2] * 50, events=[3.5] * 50, host=[900.0] * 50), bw)
    assert r["status"] == "PASSED" and r["beyond_timed_stream_us"] == pytest.approx(-1.3)
    # Work left running on another stream: in the span (so in the latency), after the end event.
    r = gpu._analyze(_state(small, [10.0] * 50, [250.0] * 50, events=[3.0] * 50), bw)
    assert r["status"] == "TIMING_TAMPERED" and r["check"] == "side_stream"
    assert r["candidate_us"] == pytest.approx(250.0) and "another stream" in r["evidence"]
    # Device time the events saw and the trace did not: the trace was interfered with.
    r = gpu._analyze(_state(small, [10.0] * 50, [1.0] * 50, events=[40.0] * 50), bw)
    assert r["status"] == "TIMING_TAMPERED" and r["check"] == "device_trace"
    # Calls that ran nothing on the device at all: no speedup, the floor says why.
    r = gpu._analyze(_state(small, [10.0] * 50, [0.0] * 50, events=[3.0] * 50), bw)
    assert r["status"] == "BELOW_PHYSICAL_FLOOR" and "no device work" in r["evidence"] and "speedup" not in r
    # Most calls empty, the rest on the device clock's 32 ns grid: the grouped median is above zero,
    # the count still says the work was not done.
    r = gpu._analyze(_state(small, [10.0] * 50, [0.0] * 30 + [2.176, 2.208] * 10, events=[3.0] * 50), bw)
    assert r["status"] == "BELOW_PHYSICAL_FLOOR" and "30 of 50 timed calls ran no device work" in r["evidence"]
    # A call that ran nothing on the device is noted.
    st = _state(small, [10.0] * 50, [2.0] * 50, events=[3.0] * 50)
    st.empty_calls = 3
    assert any("no device work" in n for n in gpu._analyze(st, bw)["notes"])


def test_latency_is_the_span_plus_the_launch_gap(workspace):
    """Traced runs add the device's launch gap once per call, to both sides; the floor and the
    no-work rule still judge the span itself."""
    small = next(w for w in workspace.workloads() if w["axes"]["batch_size"] == 1)
    big = next(w for w in workspace.workloads() if w["axes"]["batch_size"] == 8192)
    gpu = _analyzer(workspace, "cuda")
    gpu.launch_gap_us = 1.0
    bw = {"bytes_per_s": 3.0e12}
    r = gpu._analyze(_state(small, [4.0] * 50, [2.0] * 50, events=[3.5] * 50), bw)
    assert r["status"] == "PASSED"
    assert (r["baseline_us"], r["candidate_us"]) == (pytest.approx(5.0), pytest.approx(3.0))
    assert r["speedup"] == pytest.approx(5.0 / 3.0)  # not 4 / 2
    assert r["clean_baseline_us"] == pytest.approx(5.0)
    r = gpu._analyze(_state(small, [10.0] * 50, [0.0] * 50, events=[3.0] * 50), bw)
    assert r["status"] == "BELOW_PHYSICAL_FLOOR" and "no device work" in r["evidence"]
    assert "span 0.000 us" in r["evidence"] and r["launch_gap_us"] == 1.0
    # A small baseline slowed 1.33x beside the candidate is interference, the gap notwithstanding
    # (median spans 2.80 against 2.10 us; with the gap, 3.80 against 3.10 would be only 1.23x).
    r = gpu._analyze(_state(small, [2.75 + 0.001 * i for i in range(100)], [2.0] * 100, events=[3.5] * 100,
                            clean=[2.05 + 0.001 * i for i in range(100)]), bw)
    assert r["status"] == "TIMING_TAMPERED" and r["check"] == "interference" and "1.33x" in r["evidence"]
    floor_us = floor.min_bytes(workspace.definition(), big) / 3.6e6  # ~37.3 us
    r = gpu._analyze(_state(big, [60.0] * 100, [floor_us - 0.5] * 100), bw)  # span + gap is above it
    assert r["status"] == "BELOW_PHYSICAL_FLOOR" and "device time" in r["evidence"]


def test_verify_compares_spans_with_a_writer_record_of_another_launch_gap(workspace):
    """A writer record made before the device's launch gap was measured (none in its rows) agrees
    with a verify run that adds one, when the spans agree; and disagrees when they do not."""
    from kda.tools.verify import _agreement

    uuid = workspace.workloads()[0]["uuid"]
    row = {"uuid": uuid, "status": "PASSED", "candidate_us": 2.20, "candidate_ci_us": [2.18, 2.22]}
    workspace.store.put_run("benchmark", "writer", "PASSED", "w", {"workloads": [row]},
                            candidate_hash="c" * 64, device="cuda:H200")

    def verify_row(span):
        return {"uuid": uuid, "status": "PASSED", "launch_gap_us": 1.05, "candidate_us": span + 1.05,
                "candidate_ci_us": [span + 1.03, span + 1.07]}

    integrity = {"candidate_hash": "c" * 64, "device": "cuda:H200", "workloads": [verify_row(2.21)]}
    agree = _agreement(workspace, integrity, {"ran": False})
    assert agree["agrees"] is True and agree["workloads"][0]["latency_diff_pct"] < 1.0, agree
    integrity["workloads"] = [verify_row(2.60)]  # 18 % slower on the device
    assert _agreement(workspace, integrity, {"ran": False})["agrees"] is False


def test_a_baseline_slow_alone_again_is_drift_not_interference(workspace):
    """Slower beside the candidate than alone before it: drift only if, alone again once the
    candidate's worker has exited, the baseline is demonstrably slower than before too, and beside
    the candidate within the policy's ratio of that; anything less clear stays interference."""
    small = next(w for w in workspace.workloads() if w["axes"]["batch_size"] == 1)
    gpu = _analyzer(workspace, "cuda")
    gpu.launch_gap_us = 1.0
    bw = {"bytes_per_s": 3.0e12}
    slow = [10.0 + 0.01 * i for i in range(100)]
    fast = [5.0 + 0.01 * i for i in range(100)]

    def judged(after):
        st = _state(small, slow, [4.0] * 100, clean=fast)
        st.clean_after = list(after)
        return gpu._analyze(st, bw)

    r = judged([9.8 + 0.01 * i for i in range(100)])  # as slow alone as beside it: drift
    assert r["status"] == "PASSED" and r["speedup"] > 2, r
    assert r["clean_after_baseline_us"] == pytest.approx(11.295, abs=0.01)
    assert any("the machine slowed down" in n and "1.91x" in n for n in r["notes"]), r["notes"]
    assert len(r["samples"]["clean_after"]) == 100
    r = judged([6.0 + 0.01 * i for i in range(101)])  # slower alone, but far less than beside it
    assert r["status"] == "TIMING_TAMPERED" and r["check"] == "interference"
    assert "alone again after its worker had exited (6.50 us)" in r["evidence"] and "speedup" not in r
    assert judged(fast)["status"] == "TIMING_TAMPERED"  # fast again: it was the candidate
    # Inconclusive (half fast, half slow: the interval spans both) is not drift.
    bimodal = [5.0 + 0.01 * i for i in range(50)] + [10.0 + 0.01 * i for i in range(50)]
    assert judged(bimodal)["status"] == "TIMING_TAMPERED"
    # Without a second measurement (the candidate's worker never stopped), the first one decides.
    assert judged([])["status"] == "TIMING_TAMPERED"


def test_a_policy_without_the_second_look_lets_the_first_comparison_decide(workspace):
    from kda.tools.policy import _check_floors

    pol = workspace.policy
    strict = pol.model_copy(update={"benchmark": pol.benchmark.model_copy(update={"interference_second_look": False})})
    _check_floors(strict, workspace.policy, "policy.toml")  # turning it off tightens: allowed
    with pytest.raises(PolicyError, match="interference_second_look turned on"):
        _check_floors(workspace.policy, strict, "policy.toml")
    run = _analyzer(workspace, "cuda")
    run.pol, run.notes, run.isolation, run.cand = strict, [], "bubblewrap", None
    slowed = _state(workspace.workloads()[0], [10.0] * 100, [4.0] * 100, clean=[5.0] * 100)
    run._recheck_alone([slowed], None, 1)  # type: ignore[arg-type]  # returns before touching a worker or the progress callback
    assert slowed.clean_after == [] and "interference_second_look is off" in run.notes[0]
    assert run._analyze(slowed, {})["status"] == "TIMING_TAMPERED"


def test_only_a_baseline_slowed_beside_the_candidate_is_timed_alone_again(workspace):
    gpu = _analyzer(workspace, "cuda")
    small, other = workspace.workloads()[:2]
    fast = [5.0 + 0.01 * i for i in range(100)]
    slowed = _state(small, [10.0 + 0.01 * i for i in range(100)], [4.0] * 100, clean=fast)
    steady = _state(other, fast, [4.0] * 100)
    failed = _state(other, [10.0] * 100, [4.0] * 100, clean=[5.0] * 100)
    failed.fail("INCORRECT_NUMERICAL", "trial", "wrong")
    gpu.states = [slowed, steady, failed]
    assert gpu._suspects() == [slowed]


@pytest.mark.anyio
async def test_a_suspected_slowdown_times_the_baseline_alone_again_without_the_candidate(workspace, monkeypatch):
    """The orchestration behind the rule above, on real workers: when the baseline looks slowed,
    the candidate's worker is stopped before the baseline is timed alone again, and the run's
    record keeps both figures."""
    seen = []
    real_alone = bench.BenchRun._time_baseline_alone

    def spy(self, st, s, tag):
        seen.append((tag, self.cand.proc.poll() is not None))
        return real_alone(self, st, s, tag)

    monkeypatch.setattr(bench.BenchRun, "_time_baseline_alone", spy)
    monkeypatch.setattr(bench.BenchRun, "_suspects", lambda self: [st for st in self.states if st.status == "PASSED"])
    path = _install(workspace, DATA / "torch_rmsnorm", "v1")
    async with mcp_client(workspace, "writer") as client:
        out = await _bench(client, path=path, workloads=[BATCH1, BATCH2])
        if out["isolation"] != "bubblewrap":  # a forked process could outlive the worker: no second look
            assert [t for t, _ in seen] == ["clean", "clean"]
            assert any("not timed alone again" in f for f in out["flags"]), out["flags"]
            return
        # Timed alone before the candidate's worker ran anything, and again after it was gone.
        assert [t for t, _ in seen] == ["clean", "clean", "clean_after", "clean_after"], seen
        assert all(gone for t, gone in seen if t == "clean_after"), seen
        assert out["status"] == "PASSED", out["workloads"]
        for w in out["workloads"]:
            assert w["clean_after_baseline_us"] > 0 and w["clean_baseline_us"] > 0, w
        record = workspace.store.get_run(out["run_id"])["record"]
        assert record["phases_s"]["baseline_alone_again"] > 0
        # The machine as it was for the second look, beside its state at the start and the end.
        env = record["env"]
        assert {"host_load_1m"} <= env["gpu_second_look"].keys() and env["gpu_second_look"]["host_load_1m"] >= 0
        assert env["gpu_start"].keys() == env["gpu_second_look"].keys() == env["gpu_end"].keys()
        # The server still serves, with fresh workers.
        again = await _bench(client, path=path, workloads=[BATCH1])
        assert again["status"] == "PASSED"


@pytest.mark.anyio
async def test_the_launch_gap_is_probed_in_fresh_trusted_processes_that_are_gone_after(workspace, monkeypatch):
    """The calibration's orchestration on real workers, as on a CUPTI device: two more trusted
    processes start after the bandwidth measurement, each is asked for the gap, and all have been
    closed with an exit wait, and have exited, before the baseline is timed. On a GPU the device's
    figure is the median of the three; a CPU build of torch has no CUPTI, so each process says it
    read no figure and the run goes on without a gap."""
    started, closed, seen = [], [], {}
    real_start, real_calibrate = bench.BenchRun._start, bench.BenchRun._calibrate
    real_close = bench.WorkerClient.close

    def start_spy(self, role, lease):
        started.append(real_start(self, role, lease))
        return started[-1]

    def close_spy(self, exit_wait_s=0.0):
        closed.append((self, exit_wait_s))
        return real_close(self, exit_wait_s)

    def calibrate_spy(self, traced):
        out = real_calibrate(self, True)
        extra = [w for w in started if w not in (self.trusted, self.cand)]
        seen.update(out=out, extra=extra, exited=[w.proc.poll() is not None for w in extra],
                    waited=[wait for w, wait in closed if w in extra])
        return out

    monkeypatch.setattr(bench.BenchRun, "_start", start_spy)
    monkeypatch.setattr(bench.BenchRun, "_calibrate", calibrate_spy)
    monkeypatch.setattr(bench.WorkerClient, "close", close_spy)
    path = _install(workspace, DATA / "torch_rmsnorm", "v1")
    async with mcp_client(workspace, "writer") as client:
        out = await _bench(client, path=path, workloads=[BATCH1])
    assert out["status"] == "PASSED", out["workloads"]
    extra, cal = seen["extra"], seen["out"]
    assert len(extra) == bench.GAP_PROCESSES - 1 and all(w.name == "trusted" for w in extra)
    assert seen["waited"] == [bench.EXIT_WAIT_S] * len(extra) and all(seen["exited"]), seen
    assert cal["bytes_per_s"] > 0
    if DEVICE == "cuda":
        gaps = cal["launch_gap_per_process_us"]
        assert len(gaps) == bench.GAP_PROCESSES and cal["launch_gap_us"] == sorted(gaps)[1], cal
        assert out["workloads"][0]["launch_gap_us"] == cal["launch_gap_us"]
    else:
        assert "launch_gap_us" not in cal and cal["launch_gap_error"].count("no figure") == bench.GAP_PROCESSES, cal
        assert out["workloads"][0]["launch_gap_us"] == 0.0


def test_rules_floor_interference_side_stream_and_sleep(workspace):
    big = next(w for w in workspace.workloads() if w["axes"]["batch_size"] == 8192)
    small = next(w for w in workspace.workloads() if w["axes"]["batch_size"] == 1)
    gpu = _analyzer(workspace, "cuda")
    bw = {"bytes_per_s": 3.0e12}
    nbytes = floor.min_bytes(workspace.definition(), big)  # ~134 MB: at least 37.3 us at 1.2 x 3 TB/s
    fast = [20.0 + 0.01 * i for i in range(100)]
    r = gpu._analyze(_state(big, [60.0] * 100, fast), bw)
    assert r["status"] == "BELOW_PHYSICAL_FLOOR" and r["floor_us"] == pytest.approx(nbytes / 3.6e6)
    assert "physical floor" in r["evidence"] and "speedup" not in r
    honest = [50.0 + 0.01 * i for i in range(100)]
    assert gpu._analyze(_state(big, [60.0] * 100, honest), bw)["status"] == "PASSED"
    # With a 50 MB L2, 50 MB of the output may still be there when the kernel ends: a lower floor.
    gpu.l2_bytes = 50 << 20
    r = gpu._analyze(_state(big, [60.0] * 100, [28.0 + 0.01 * i for i in range(100)]), bw)
    assert r["status"] == "PASSED" and r["floor_us"] == pytest.approx((nbytes - (50 << 20)) / 3.6e6)
    r = gpu._analyze(_state(big, [60.0] * 100, fast), bw)
    assert r["status"] == "BELOW_PHYSICAL_FLOOR" and "bytes to or from memory" in r["evidence"]
    gpu.l2_bytes = 0
    # The baseline beside the candidate runs far slower than alone: interference, not speedup.
    r = gpu._analyze(_state(small, [10.0 + 0.01 * i for i in range(100)], [4.0] * 100,
                            clean=[5.0 + 0.01 * i for i in range(100)]), bw)
    assert r["status"] == "TIMING_TAMPERED" and r["check"] == "interference"
    # Each call kept the device busy well past the timed stream's end event.
    r = gpu._analyze(_state(small, [10.0] * 50, [3.0] * 50, host=[300.0] * 50, overhead=8.0), bw)
    assert r["status"] == "TIMING_TAMPERED" and r["check"] == "side_stream"
    assert gpu._analyze(_state(small, [10.0] * 50, [3.0] * 50, host=[12.0] * 50, overhead=8.0),
                        bw)["status"] == "PASSED"
    # A few microseconds beyond the events that the baseline shows too are launch/sync latency ...
    honest_st = _state(small, [10.0] * 50, [3.0] * 50, host=[3.0 + 8.0 + 7.0] * 50, overhead=8.0)
    honest_st.base_host, honest_st.base_overhead_us = [10.0 + 8.0 + 6.5] * 50, 8.0
    r = gpu._analyze(honest_st, bw)
    assert r["status"] == "PASSED" and r["unaccounted_us"] == pytest.approx(7.0)
    assert r["baseline_unaccounted_us"] == pytest.approx(6.5)
    # Seen on an H200 for an honest Triton RMSNorm (batch 2048): 18.8 us beyond 13.1 us of event time.
    seen = _state(small, [10.0] * 50, [13.1] * 50, host=[13.1 + 8.0 + 18.8] * 50, overhead=8.0)
    seen.base_host, seen.base_overhead_us = [10.0 + 8.0 + 3.9] * 50, 8.0
    assert gpu._analyze(seen, bw)["status"] == "PASSED"
    # ... but the same latency in the baseline does not excuse hidden work on top of it.
    hidden = _state(small, [10.0] * 50, [3.0] * 50, host=[3.0 + 8.0 + 7.0 + 15.0] * 50, overhead=8.0)
    hidden.base_host, hidden.base_overhead_us = [10.0 + 8.0 + 6.5] * 50, 8.0
    r = gpu._analyze(hidden, bw)
    assert r["status"] == "TIMING_TAMPERED" and r["check"] == "side_stream" and "more than the baseline" in r["evidence"]
    # Warm-up calls that sleep (wall time without CPU time), more than once.
    naps = [{"wall_ms": 60.0, "idle_ms": 59.0}, {"wall_ms": 61.0, "idle_ms": 60.0}]
    r = gpu._analyze(_state(small, [10.0] * 50, [9.0] * 50, warmup=naps), bw)
    assert r["status"] == "TIMING_TAMPERED" and r["check"] == "warmup_idle"
    assert gpu._analyze(_state(small, [10.0] * 50, [9.0] * 50, warmup=naps[:1]), bw)["status"] == "PASSED"


# The body of a correct RMSNorm, for candidates that test something other than the arithmetic.
RMS_LINES = (
    "    x = hidden_states.float()\n"
    "    y = x * (x.square().mean(-1, keepdim=True) + 1e-5).rsqrt() * weight.float()\n"
    "    output.copy_(y.to(output.dtype))\n"
)


async def _bench_source(workspace, name: str, code: str) -> dict:
    """A python candidate from source, benchmarked on batch 1 through a writer session."""
    path = _write_candidate(workspace, name, code)
    async with mcp_client(workspace, "writer") as client:
        return await _bench(client, path=path, workloads=[BATCH1], mode="quick")


@pytest.mark.anyio
async def test_candidate_may_write_caches_in_its_own_job_dir(workspace):
    """Compilers cache under HOME (the worker's job dir, inside .kda/jobs/): not a violation."""
    code = (
        "import os\n"
        "def run(hidden_states, weight, output):\n"
        "    d = os.path.join(os.path.expanduser('~'), '.cache', 'kernels')\n"
        "    os.makedirs(d, exist_ok=True)\n"
        "    open(os.path.join(d, 'entry'), 'w').write('x')\n"
        + RMS_LINES
    )
    out = await _bench_source(workspace, "caching", code)
    assert out["status"] == "PASSED", out


@pytest.mark.anyio
async def test_copying_from_a_protected_file_is_a_read_not_a_write(workspace):
    """shutil.copyfile out of task/ only writes its destination: noted as a read, not a violation."""
    code = (
        "import shutil\n"
        "from pathlib import Path\n"
        "src = next(p / 'task' / 'definition.json' for p in Path.cwd().parents if (p / 'task').is_dir())\n"
        "shutil.copyfile(src, 'copy.json')\n"
        "def run(hidden_states, weight, output):\n"
        + RMS_LINES
    )
    out = await _bench_source(workspace, "copier", code)
    assert out["status"] == "PASSED", out["workloads"][0]
    assert any("definition.json" in f for f in out["flags"]), out["flags"]


def test_a_finished_job_read_by_another_process_returns_its_record(workspace):
    """job_status from a server process that did not run the job reads the result from the store."""
    from kda.tools import jobs

    def body(progress, cancel):
        rec = {"kind": "benchmark", "status": "PASSED", "headline": "PASSED 1/1"}
        run_id = workspace.store.put_run("benchmark", "writer", "PASSED", rec["headline"], rec)
        return run_id, rec

    job = jobs.start_job(workspace, "writer", "benchmark", body)
    assert job.done.wait(10)
    del jobs._JOBS[job.id]  # as seen from another server process
    out = jobs.get_job(workspace, job.id)
    assert out["state"] == "done" and out["result"]["headline"] == "PASSED 1/1"
    assert out["result"]["run_id"] == job.run_id


def test_a_running_job_of_another_live_server_is_running_and_one_of_a_dead_server_is_lost(workspace):
    """The writer's server runs a benchmark while the reviewer's asks: running, not lost."""
    import subprocess
    import sys
    import time

    from kda.tools import jobs

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ids = {}
        for name, token in (("live", jobs.process_token(other.pid)), ("gone", None)):
            ids[name] = f"job_{name}"
            with workspace.store.transaction() as db:
                db.execute("INSERT INTO jobs(id, kind, role, state, created, updated, progress, owner)"
                           " VALUES (?,?,?,?,?,?,?,?)", (ids[name], "benchmark", "writer", "running", time.time(),
                                                          time.time(), '[{"done": 1, "total": 3, "message": "trials"}]',
                                                          token))
        assert jobs.get_job(workspace, ids["live"])["state"] == "running"
        other.kill()
        time.sleep(0.5)  # killed, not yet reaped: a zombie is gone all the same
        assert jobs.get_job(workspace, ids["live"])["state"] == "lost"
        other.wait()
        assert jobs.get_job(workspace, ids["live"])["state"] == "lost"
        assert jobs.get_job(workspace, ids["gone"])["state"] == "lost"
    finally:
        if other.poll() is None:
            other.kill()


def _wait_for_spare(timeout: float = 240.0):
    import time

    from kda.tools.bench_workers import spares

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if spares.waiting():
            return spares.waiting()[0]
        time.sleep(0.5)
    raise AssertionError("no spare worker pair became ready")


def test_spare_workers_are_fresh_processes_started_ahead_for_the_next_run(workspace, monkeypatch):
    from kda.tools import bench_workers
    from kda.tools.jobs import CancelToken, executor

    monkeypatch.setattr(bench_workers, "spares_wanted", lambda ws, lease: True)
    bench_workers.spares.clear()
    path = _install(workspace, DATA / "torch_rmsnorm", "v1")
    lease = executor().slots[0]
    try:
        req = bench.prepare(workspace, path, None, [BATCH1], "quick", "writer")
        _, first = bench.run_benchmark(req, lambda *a: None, CancelToken())
        assert first["status"] == "PASSED" and not any("started ahead" in f for f in first["flags"])
        first_pids = set(first["env"]["worker_processes"].values())
        pair = _wait_for_spare()
        spare_pids = {pair.trusted.proc.pid, pair.cand.proc.pid}
        assert pair.trusted.alive() and pair.cand.alive() and not spare_pids & first_pids
        # A pair is bound to its workspace, device and job environment: no other run takes it.
        assert pair.key == bench_workers.pair_key(workspace, lease, "python", "python")
        assert bench_workers.spares.take(("elsewhere", *pair.key[1:]), lease, CancelToken()) is None

        req = bench.prepare(workspace, path, None, [BATCH1], "quick", "writer")
        _, second = bench.run_benchmark(req, lambda *a: None, CancelToken())
        assert second["status"] == "PASSED", second["headline"]
        assert any("started ahead" in f for f in second["flags"])
        # The second run used the spare pair, and closed it after the run.
        assert set(second["env"]["worker_processes"].values()) == spare_pids
        assert not pair.trusted.alive() and not pair.cand.alive()
        assert second["phases_s"]["workers_start"] < first["phases_s"]["workers_start"]
        nxt = _wait_for_spare()
        assert {nxt.trusted.proc.pid, nxt.cand.proc.pid}.isdisjoint(spare_pids | first_pids)
    finally:
        bench_workers.spares.clear()


def test_kept_kernel_cache_is_regular_files_of_one_content_only(workspace, tmp_path, monkeypatch):
    from kda.tools import kernel_cache as kc

    job = tmp_path / "job1"
    cache = job / kc.JOB_CACHE / "ABCD"
    cache.mkdir(parents=True)
    (cache / "k.cubin").write_bytes(b"\x7fELF" + b"\0" * 60)
    (cache / "k.json").write_text("{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for candidates")
    (cache / "planted").symlink_to(secret)
    (job / kc.JOB_CACHE / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    assert kc.keep(workspace, "candidate-aaa", job) == 2
    kept_cubin = kc._kept(workspace, "candidate-aaa") / kc.JOB_CACHE / "ABCD" / "k.cubin"
    inode = kept_cubin.stat().st_ino
    assert kc.keep(workspace, "candidate-aaa", job) == 2
    assert kept_cubin.stat().st_ino == inode  # the same files again: nothing is copied
    # A run of the same content gets the files back, writable by the job's own uid.
    job2 = tmp_path / "job2"
    job2.mkdir()
    assert kc.restore(workspace, "candidate-aaa", job2) == 2
    got = sorted(p.relative_to(job2 / kc.JOB_CACHE) for p in (job2 / kc.JOB_CACHE).rglob("*") if p.is_file())
    assert got == [Path("ABCD/k.cubin"), Path("ABCD/k.json")]
    assert (job2 / kc.JOB_CACHE / "ABCD" / "k.cubin").stat().st_mode & 0o777 == 0o666
    assert (job2 / kc.JOB_CACHE / "ABCD").stat().st_mode & 0o777 == 0o777
    assert not any(p.is_symlink() for p in (job2 / kc.JOB_CACHE).rglob("*"))
    # Other content gets nothing.
    job3 = tmp_path / "job3"
    job3.mkdir()
    assert kc.restore(workspace, "candidate-bbb", job3) == 0 and not (job3 / kc.JOB_CACHE).exists()
    # A newer run replaces the kept cache; one over the size cap is not kept.
    (cache / "k.cubin").unlink()
    assert kc.keep(workspace, "candidate-aaa", job) == 1
    monkeypatch.setattr(kc, "MAX_BYTES", 1)
    (cache / "big.bin").write_bytes(b"x" * 10)
    assert kc.keep(workspace, "candidate-aaa", job) == 0
    job4 = tmp_path / "job4"
    job4.mkdir()
    assert kc.restore(workspace, "candidate-aaa", job4) == 1


def test_only_finished_extension_builds_are_kept_and_never_a_lock(workspace, tmp_path):
    from kda.tools import kernel_cache as kc

    job = tmp_path / "job"
    done, killed = job / kc.JOB_BUILD / "kda_ext_done", job / kc.JOB_BUILD / "kda_ext_killed"
    for d in (done, killed):
        d.mkdir(parents=True)
        (d / "build.ninja").write_text("rule cxx\n")
        (d / "lock").write_text("")  # torch's build lock, left by a build that was killed
    (done / "kda_ext_done.so").write_bytes(b"\x7fELF")
    (killed / "kernel.o").write_bytes(b"\0")  # no .so: the build never finished
    assert kc.keep(workspace, "candidate-ccc", job) == 2
    back = tmp_path / "back"
    back.mkdir()
    kc.restore(workspace, "candidate-ccc", back)
    got = sorted(str(p.relative_to(back)) for p in back.rglob("*") if p.is_file())
    assert got == ["build/kda_ext_done/build.ninja", "build/kda_ext_done/kda_ext_done.so"]
    # A build whose module did not load is not kept at all.
    assert kc.keep(workspace, "candidate-ddd", job, builds_ok=False) == 0


def test_cpp_candidate_is_built_as_a_torch_extension_and_its_build_kept(workspace):
    from kda.tools.jobs import CancelToken

    path = _install(workspace, DATA / "cpp_rmsnorm", "cpp")
    req = bench.prepare(workspace, path, None, [BATCH1, BATCH2], "quick", "writer")
    _, first = bench.run_benchmark(req, lambda *a: None, CancelToken())
    assert first["status"] == "PASSED", first["headline"]
    assert first["language"] == "cpp" and all(w["max_abs"] == 0.0 for w in first["workloads"])
    # The same content again: the kept build is imported, not rebuilt.
    _, second = bench.run_benchmark(bench.prepare(workspace, path, None, [BATCH1], "quick", "writer"),
                                    lambda *a: None, CancelToken())
    assert second["status"] == "PASSED", second["headline"]
    assert any("compiled kernels from an earlier run" in f for f in second["flags"])
    assert second["phases_s"]["candidate_load"] < first["phases_s"]["candidate_load"] / 3

    # A compiler error is the candidate's COMPILE_ERROR, with the compiler's words.
    bad = workspace.work_dir / "cpp_bad"
    shutil.copytree(workspace.work_dir / "cpp", bad)
    (bad / "kernel.cpp").write_text((bad / "kernel.cpp").read_text().replace("output.copy_(", "output.copy_(undeclared_x + "))
    _, rec = bench.run_benchmark(bench.prepare(workspace, "work/cpp_bad", None, [BATCH1], "quick", "writer"),
                                 lambda *a: None, CancelToken())
    w = rec["workloads"][0]
    assert w["status"] == "COMPILE_ERROR" and "undeclared_x" in w["evidence"], w


def test_native_candidates_that_cannot_run_here_are_refused_with_the_reason(workspace):
    cand = workspace.work_dir / "nobind"
    shutil.copytree(DATA / "cpp_rmsnorm", cand)
    toml = (cand / "candidate.toml").read_text()
    (cand / "candidate.toml").write_text(toml.replace('binding = "torch"\n', ""))
    with pytest.raises(NotAvailable, match='binding = "torch"'):
        bench.prepare(workspace, "work/nobind", None, [BATCH1], "quick", "writer")
    if not HAS_GPU:
        (cand / "candidate.toml").write_text(toml.replace('"cpp"', '"cuda"'))
        with pytest.raises(NotAvailable, match="needs a CUDA GPU"):
            bench.prepare(workspace, "work/nobind", None, [BATCH1], "quick", "writer")
