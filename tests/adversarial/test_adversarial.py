"""The adversarial suite: candidates that try to fool the benchmark, each caught with the right status.

Every case runs through the real MCP `benchmark` tool on a fresh rmsnorm_h4096 workspace (real
sandboxed workers, real SQLite), then checks that the server still answers `task_info` with the
lock intact. CPU cases run in CI on the batch-1 workload; GPU cases need a CUDA device.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import HAS_GPU, mcp_client

CASES_DIR = Path(__file__).parent / "cases"
BATCH1 = "f768064f-9585-47ad-a39e-ed24c2c063fe"
BATCH2 = "5966eb44-e0c6-4744-9511-3dc30e9a8df5"
BATCH4096 = "c85ad6ff-6546-44be-b379-782e12806dcc"

# name -> (expected status, expected failing check or None, text the evidence must contain or None)
CPU_CASES = {
    "all_nan": ("INCORRECT_NUMERICAL", "nan_inf", "NaN"),
    "inf": ("INCORRECT_NUMERICAL", "nan_inf", "Inf"),
    "unwritten": ("INCORRECT_NUMERICAL", "nan_inf", "unwritten"),
    "zero_inputs": ("INPUT_MUTATED", "input_mutation", "hidden_states"),
    # Caught in the trials where the allocator reuses an address (GPU), else in the timed outputs (CPU).
    "data_ptr_cache": ("INCORRECT_NUMERICAL", {"timed_outputs", "tolerance"}, None),
    "cpu_thread": ("TIMING_TAMPERED", "threads", "thread"),
    "patch_perf_counter": ("TIMING_TAMPERED", "timer_identity", "time.perf_counter"),
    "patch_elapsed_time": ("TIMING_TAMPERED", "timer_identity", "torch.cuda.Event.elapsed_time"),
    "gc_reference": ("INCORRECT_NUMERICAL", None, None),
    "lowered_precision": ("INCORRECT_NUMERICAL", "tolerance", "matched ratio"),
    "write_task": ("SANDBOX_VIOLATION", "protected_write", "policy.toml"),
    "sleep_warmup": ("TIMING_TAMPERED", "warmup_idle", "slept"),
    # The candidate shares the worker's interpreter: hooks, frame reads and rebinding what the
    # harness runs on are refused or reported.
    "audit_hook_defer": ("TIMING_TAMPERED", "hooks", "audit hook"),
    "setprofile_defer": ("TIMING_TAMPERED", "hooks", "profile function"),
    "stale_timed_stack": ("TIMING_TAMPERED", "introspection", "harness's frame"),
    "seed_precompute": ("TIMING_TAMPERED", "introspection", "harness's frame"),
    "python_thread": ("TIMING_TAMPERED", "threads", "_helper"),
    "lazy_subclass": ("RUNTIME_ERROR", "call", "torch.Tensor subclass"),
    "patch_worker_perf": ("TIMING_TAMPERED", "harness_identity", "_perf"),
    "patch_save_slot": ("TIMING_TAMPERED", "harness_identity", "_save"),
    "patch_alerts_thread": ("TIMING_TAMPERED", "harness_identity", "ALERTS"),
    "spoof_input_digest": ("TIMING_TAMPERED", "harness_identity", "harness.input_digest"),
    "patch_builtins_any": ("TIMING_TAMPERED", "harness_identity", "builtins.any"),
}


def _install(ws, name: str) -> str:
    shutil.copytree(CASES_DIR / name, ws.work_dir / name, ignore=shutil.ignore_patterns("__pycache__"))
    return f"work/{name}"


async def _bench(client, path: str, workloads, mode: str = "quick") -> dict:
    r = await client.call_tool("benchmark", {"path": path, "workloads": workloads, "mode": mode, "wait_s": 300})
    assert not r.is_error, r.content[0].text
    out = r.structured_content
    assert out["state"] == "done", out
    return out


def _evidence(workspace, run_id: str, uuid: str) -> str:
    """What the stored run says about one workload, whole (a failed GPU attack is diagnosed from this)."""
    rec = workspace.store.get_run(run_id)["record"]
    row = next(w for w in rec["workloads"] if w["uuid"] == uuid)
    keep = {k: v for k, v in row.items() if k != "samples"}
    samples = row.get("samples") or {}
    return json.dumps({"workload": keep, "timing_mode": rec["env"].get("worker", {}).get("timing_mode"),
                       "flags": rec.get("flags"), "candidate_samples": samples.get("candidate", [])[:40],
                       "candidate_event_samples": samples.get("candidate_events", [])[:40],
                       "hold_covered": samples.get("candidate_hold_covered", [])[:40]}, default=str)


async def _still_serving(client) -> None:
    r = await client.call_tool("task_info", {"limit": 1})
    assert not r.is_error
    assert r.structured_content["lock_ok"], r.structured_content["lock_problem"]


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(CPU_CASES))
async def test_attack_is_caught(workspace, name):
    status, check, text = CPU_CASES[name]
    path = _install(workspace, name)
    async with mcp_client(workspace, "writer") as client:
        out = await _bench(client, path, [BATCH1])
        w = out["workloads"][0]
        assert w["status"] == status, (name, w["status"], w["check"], w["evidence"])
        assert out["status"] == status
        if check:
            assert w["check"] in ({check} if isinstance(check, str) else check), (name, w["check"], w["evidence"])
        if text:
            assert text in w["evidence"], (name, w["evidence"])
        assert w["evidence"], "a failure must say why"
        assert w.get("speedup") is None, "a failed workload never reports a speedup"
        assert out["mean_speedup"] is None
        await _still_serving(client)
    if name == "gc_reference":
        assert any("gc.get_objects" in f for f in out["flags"]), out["flags"]
    if name == "write_task":
        workspace.check_lock()  # the writes were refused: task/ and policy.toml are untouched


@pytest.mark.anyio
async def test_content_fingerprint_cache_never_pays(workspace):
    """Fresh inputs every trial and every timed iteration: a content-keyed cache never answers."""
    path = _install(workspace, "fingerprint_cache")
    async with mcp_client(workspace, "writer") as client:
        out = await _bench(client, path, [BATCH1])
        assert out["status"] == "PASSED", out["workloads"][0]
        r = await client.call_tool("show_run", {"run_id": out["run_id"], "include_logs": True})
        logs = r.structured_content["record"]["logs"]["candidate"]
        assert "CACHE-HIT" not in logs
        await _still_serving(client)


@pytest.mark.anyio
async def test_torch_fallback_and_reference_call_are_flagged(workspace):
    path = _install(workspace, "torch_fallback")
    async with mcp_client(workspace, "writer") as client:
        out = await _bench(client, path, [BATCH1])
        flags = " | ".join(out["flags"])
        # It computes the right answer, so correctness passes; what it did is flagged.
        w = out["workloads"][0]
        assert out["status"] == "PASSED", f"{w['status']} {w['check']}: {w['evidence']} | notes: {w['notes']}"
        assert "torch compute ops" in flags, flags
        assert "definition.json" in flags, flags  # it read the task's reference code
        assert "torch-fallback" in flags or "dynamic-code" in flags, flags
        await _still_serving(client)


@pytest.mark.anyio
async def test_hang_times_out_and_server_keeps_serving(workspace):
    from kda.tools.workspace import Workspace, compute_lock

    # A person tightens the per-call timeout for this workspace (and re-locks it).
    pol = workspace.root / "policy.toml"
    pol.write_text(pol.read_text().replace("call_timeout_s = 120", "call_timeout_s = 2"))
    (workspace.task_dir / "lock.json").write_text(json.dumps(compute_lock(workspace.root), indent=2))
    ws = Workspace.open(workspace.root)
    assert ws.policy.benchmark.call_timeout_s == 2
    path = _install(ws, "hang")
    async with mcp_client(ws, "writer") as client:
        out = await _bench(client, path, [BATCH1])
        w = out["workloads"][0]
        assert w["status"] == "TIMEOUT", w
        assert "killed" in w["evidence"]
        await _still_serving(client)


# --- GPU-only attacks ------------------------------------------------------------------------------
GPU_CASES = {
    "side_stream": ("TIMING_TAMPERED", "side_stream"),
    "long_kernel": ("TIMING_TAMPERED", None),
    "illegal_access": ("RUNTIME_ERROR", None),
}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(GPU_CASES))
async def test_gpu_attack_is_caught(workspace, name):
    status, check = GPU_CASES[name]
    path = _install(workspace, name)
    async with mcp_client(workspace, "writer") as client:
        out = await _bench(client, path, [BATCH4096, BATCH2])
        for w in out["workloads"]:
            assert w["status"] == status, _evidence(workspace, out["run_id"], w["uuid"])
            if check:
                assert w["check"] == check, (name, w)
            assert w.get("speedup") is None
        await _still_serving(client)
        if name == "illegal_access":
            # The crashed worker is gone; a good candidate in the same server still measures.
            good = workspace.work_dir / "good"
            shutil.copytree(CASES_DIR.parent.parent / "data_bench" / "triton_rmsnorm", good)
            out = await _bench(client, "work/good", [BATCH2])
            assert out["status"] == "PASSED", out["workloads"][0]
