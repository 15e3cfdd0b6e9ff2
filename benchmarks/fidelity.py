"""Measurement fidelity: our harness against triton.testing.do_bench, flashinfer-bench's Benchmark
(persistent and isolated runners) and Nsight Compute, on the same kernels in the same run.

    python benchmarks/fidelity.py                      # on a CUDA machine; about 5 minutes
    python benchmarks/fidelity.py --quick              # fewer repeats and workloads
    python benchmarks/fidelity.py --allow-cpu --quick  # plumbing check without a GPU (ours only)

Kernels: a Triton RMSNorm on the 14 rmsnorm_h4096 workloads and a Triton GEMM on gemm_n4096_k4096
workloads, both from the FlashInfer Trace fixtures (../shared/fixtures/flashinfer-trace, or
--dataset). Reports per workload: (a) the spread of the median over repeats, (b) each harness's
median against Nsight Compute's gpu__time_duration, (c) the wall time of a full evaluation of one
candidate on all workloads of a task. Prints a table and writes JSON to $OUT (or
benchmarks/results/). Every component that is missing is skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "fixtures" / "flashinfer-trace"

# The same Triton RMSNorm the benchmark tests measure (one program per row, float32 accumulation).
TRITON_RMSNORM = (REPO / "tests" / "data_bench" / "triton_rmsnorm" / "kernel.py").read_text()

TRITON_GEMM = '''
import triton
import triton.language as tl


@triton.jit
def _gemm_abt(a_ptr, b_ptr, c_ptr, M, N, K: tl.constexpr, stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_m)
    pid_n = (pid % in_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_left = K - k
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_n[None, :] < N) & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def run(A, B, C):
    M, K = A.shape
    N = B.shape[0]
    BLOCK_M = 16 if M <= 16 else 64 if M <= 64 else 128
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, 128),)
    _gemm_abt[grid](A, B, C, M, N, K, A.stride(0), A.stride(1), B.stride(0), B.stride(1), C.stride(0),
                    C.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                    num_warps=8 if BLOCK_M == 128 else 4, num_stages=3)
'''

KERNELS = {"rmsnorm_h4096": ("_rmsnorm_row", TRITON_RMSNORM), "gemm_n4096_k4096": ("_gemm_abt", TRITON_GEMM)}


def say(msg: str) -> None:
    print(msg, flush=True)


def spread(xs: list[float]) -> float | None:
    """The product's spread (tools/stats.py) of the medians a harness produced; None below two."""
    from kda.tools.stats import spread as of

    xs = [x for x in xs if x]
    return of(xs) if len(xs) >= 2 else None


def guarded(name: str, fn: Callable[[], Any], skipped: dict[str, str]) -> Any:
    try:
        return fn()
    except Exception as e:  # a missing component is reported, never fatal
        skipped[name] = f"{type(e).__name__}: {e}"
        say(f"  ! {name} skipped: {skipped[name]}")
        traceback.print_exc(limit=3)
        return None


# --- setup --------------------------------------------------------------------------------------
def make_workspace(task: str, dataset: Path, base: Path) -> Any:
    from kda.tools.task import init_workspace, resolve_task
    from kda.tools.workspace import Workspace

    root = base / task
    init_workspace(root, resolve_task(task, str(dataset), None, None, None))
    ws = Workspace.open(root)
    d = ws.work_dir / "triton"
    d.mkdir()
    (d / "candidate.toml").write_text('language = "triton"\nentry_point = "kernel.py::run"\n')
    (d / "kernel.py").write_text(textwrap.dedent(KERNELS[task][1]))
    return ws


def load_candidate_fn(ws: Any) -> Callable[..., Any]:
    from kda.sandbox.harness import load_entry

    return load_entry(ws.work_dir / "triton", "kernel.py::run", f"fid_{ws.definition()['name']}")


# --- the harnesses ------------------------------------------------------------------------------
def wait_for_spares(ws: Any, timeout: float = 120.0) -> float | None:
    """Seconds waited until the spare worker pair for the next run is ready (None: the policy
    starts none here). An agent's next call usually comes later than the pair needs."""
    from kda.tools import bench_workers
    from kda.tools.jobs import executor

    if not bench_workers.spares_wanted(ws, executor().slots[0]):
        return None
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(p.key[0] == str(ws.root) for p in bench_workers.spares.waiting()):
            return time.time() - t0
        time.sleep(0.2)
    return None


def ours(ws: Any, workloads: Any, repeats: int, mode: str) -> dict[str, Any]:
    """Repeat 1 starts its own worker processes (cold); later repeats find the spare pair the
    previous run started ahead (waiting for it is not counted: it is the time between calls)."""
    from kda.tools import bench, bench_workers
    from kda.tools.jobs import CancelToken

    per: dict[str, list[float]] = {}
    per_ev: dict[str, list[float]] = {}
    walls, statuses, phases, ops, startup, waits, gaps = [], {}, [], [], [], [], []
    bench_workers.spares.clear()
    for i in range(repeats):
        if i:
            waits.append(wait_for_spares(ws))
        req = bench.prepare(ws, "work/triton", None, workloads, mode, "writer")
        t0 = time.time()
        _, rec = bench.run_benchmark(req, lambda *a: None, CancelToken())
        walls.append(time.time() - t0)
        phases.append(rec.get("phases_s", {}))
        ops.append(rec.get("worker_ops_s", {}))
        startup.append({k: rec["env"].get(k, {}).get("startup_s") for k in ("worker", "candidate_worker")})
        gaps.append(rec["config"].get("launch_gap_us"))
        spare = any("started ahead" in f for f in rec.get("flags", []))
        say(f"  ours repeat {i + 1}/{repeats} ({'spare workers' if spare else 'cold start'}): {rec['headline'][:120]} "
            f"({walls[-1]:.1f} s; " + ", ".join(f"{k} {v:.2f}" for k, v in phases[-1].items()) + ")")
        say(f"    worker ops: {ops[-1]}; launch gap {gaps[-1]} us")
        for w in rec["workloads"]:
            statuses[w["uuid"]] = w["status"]
            if w.get("candidate_us"):
                per.setdefault(w["uuid"], []).append(w["candidate_us"])
            if w.get("event_median_us"):
                per_ev.setdefault(w["uuid"], []).append(w["event_median_us"])
    say(f"  timing: {rec['env']['worker'].get('timing_mode')}")
    say(f"  worker start-up: trusted {rec['env']['worker'].get('startup_s')}, "
        f"candidate {rec['env'].get('candidate_worker', {}).get('startup_s')}")
    bench_workers.spares.clear()
    return {"median_us": per, "wall_s": walls[1:] or walls, "wall_cold_s": walls[:1], "status": statuses,
            "phases_s": phases, "worker_ops_s": ops, "startup_s": startup, "spare_wait_s": waits, "launch_gap_us": gaps,
            "timing_mode": rec["env"]["worker"].get("timing_mode"), "events": {"median_us": per_ev}}


def do_bench(ws: Any, wls: list[dict], repeats: int) -> dict[str, Any]:
    import torch
    import triton.testing

    from kda.sandbox import harness as H

    fn = load_candidate_fn(ws)
    d = ws.definition()
    dev = torch.device("cuda")
    per: dict[str, list[float]] = {}
    for w in wls:
        inputs = H.make_inputs(d, w, 1234, dev)
        outputs = H.alloc_outputs(d, w, dev)
        call = lambda: fn(*inputs, *outputs)  # noqa: E731
        call()
        torch.cuda.synchronize()
        per[w["uuid"]] = [float(triton.testing.do_bench(call, return_mode="median")) * 1e3 for _ in range(repeats)]
    return {"median_us": per}


def fib(ws: Any, wls: list[dict], repeats: int, isolated: bool) -> dict[str, Any]:
    from flashinfer_bench.bench import Benchmark, BenchmarkConfig
    from flashinfer_bench.data import Definition, Solution, Trace, TraceSet, Workload

    from kda.tools.candidate import load_candidate

    d = Definition.model_validate(ws.definition())
    sol = Solution.model_validate(load_candidate(ws, "work/triton").to_solution(d.name))
    per: dict[str, list[float]] = {}
    walls, statuses = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="fid-fib-"))
    for i in range(repeats):
        ts = TraceSet(root=tmp / "trace", definitions={d.name: d}, solutions={d.name: [sol]},
                      workloads={d.name: [Trace(definition=d.name, workload=Workload.model_validate(w)) for w in wls]})
        cfg = BenchmarkConfig(use_isolated_runner=isolated, log_dir=str(tmp / "logs"))
        t0 = time.time()
        bm = Benchmark(ts, cfg)
        try:
            res = bm.run_all(dump_traces=False)
        finally:
            bm.close()
        walls.append(time.time() - t0)
        for t in res.traces.get(d.name, []):
            statuses[t.workload.uuid] = t.evaluation.status.value
            if t.evaluation.performance:
                per.setdefault(t.workload.uuid, []).append(t.evaluation.performance.latency_ms * 1e3)
        say(f"  flashinfer-bench ({'isolated' if isolated else 'persistent'}) repeat {i + 1}/{repeats}: "
            f"{walls[-1]:.1f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    return {"median_us": per, "wall_s": walls, "status": statuses}


NCU_DRIVER = '''
import json, sys, torch
sys.path.insert(0, {repo!r})
from kda.sandbox import harness as H
from kda.tools.workspace import Workspace
ws = Workspace.open({ws!r})
fn = H.load_entry(ws.work_dir / "triton", "kernel.py::run", "ncu_driver")
d = ws.definition()
wls = json.loads(open({wls!r}).read())
flush = H.L2Flusher(torch.device("cuda")) if {l2flush} else None
for w in wls:
    inputs = H.make_inputs(d, w, 99, torch.device("cuda"))
    outputs = H.alloc_outputs(d, w, torch.device("cuda"))
    for _ in range({reps}):
        if flush is not None:  # our harness's L2 flush, as its timed frame runs it (not profiled)
            flush()
            torch.cuda.synchronize()
        if {hold}:  # a spin kernel before the launch keeps the GPU busy and its clock up
            torch.cuda._sleep(2_000_000)
        fn(*inputs, *outputs)
    torch.cuda.synchronize()
'''


def ncu_durations_us(argv: list[str], kernel_regex: str, cache_control: str = "all",
                     timeout: float = 1800) -> tuple[list[float], str]:
    """Runs `argv` under Nsight Compute at the clocks the GPU runs at (no clock locking) and returns
    the gpu__time_duration of every profiled launch, in microseconds and launch order, with the
    tail of what ncu printed (for errors)."""
    from kda.tools.profile import find_ncu

    exe = find_ncu()
    if not exe:
        raise RuntimeError("Nsight Compute (ncu) not found on PATH, /usr/local/cuda/bin or /opt/nvidia")
    cmd = [exe, "--clock-control", "none", "--cache-control", cache_control, "--metrics", "gpu__time_duration.sum",
           "--csv", "--kernel-name", f"regex:{kernel_regex}", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rows = [r for r in csv.DictReader(io.StringIO("\n".join(
        line for line in res.stdout.splitlines() if line.startswith('"'))))
            if r.get("Metric Name") == "gpu__time_duration.sum"]
    out = []
    for r in rows:
        unit, v = r.get("Metric Unit", "nsecond"), float(r["Metric Value"].replace(",", ""))
        out.append(v / 1e3 if unit.startswith("n") else v if unit.startswith("u") else v * 1e3)
    return out, res.stderr[-800:] + res.stdout[-800:]


def ncu(ws: Any, wls: list[dict], kernel: str, reps: int, cache_control: str = "all",
        hold: bool = False, l2flush: bool = False) -> dict[str, Any]:
    """Nsight Compute's gpu__time_duration at the clocks the GPU runs at (no clock locking).
    cache_control "all" (ncu's default) flushes every cache before each launch; "none" leaves them.
    hold: each launch is queued behind a ~1 ms spin kernel (not profiled), so the GPU is busy, not
    idle, just before it, as in our harness. l2flush: our harness's L2 flush before each launch
    (with cache_control "none": what ncu counts beyond our span under our cache state)."""
    tmp = Path(tempfile.mkdtemp(prefix="fid-ncu-"))
    (tmp / "wls.json").write_text(json.dumps(wls))
    drv = tmp / "driver.py"
    drv.write_text(NCU_DRIVER.format(repo=str(REPO), ws=str(ws.root), wls=str(tmp / "wls.json"), reps=reps, hold=hold,
                                     l2flush=l2flush))
    durs, said = ncu_durations_us([sys.executable, str(drv)], kernel, cache_control)
    if len(durs) < len(wls) * reps:
        raise RuntimeError(f"ncu reported {len(durs)} launches, expected {len(wls) * reps}: {said}")
    per: dict[str, list[float]] = {}
    for i, us in enumerate(durs[: len(wls) * reps]):
        per.setdefault(wls[i // reps]["uuid"], []).append(us)
    shutil.rmtree(tmp, ignore_errors=True)
    # The first launch of each workload may include a cold instruction cache; take the median.
    return {"median_us": {k: [statistics.median(v)] for k, v in per.items()}, "raw_us": per}


def ncu_repeated(ws: Any, wls: list[dict], kernel: str, reps: int, repeats: int) -> dict[str, Any]:
    """`ncu` run `repeats` times (each a fresh profiled process): per workload the median of each
    run, so Nsight Compute's own run-to-run spread is reported beside ours. The reference is the
    median of those medians."""
    runs = [ncu(ws, wls, kernel, reps) for _ in range(repeats)]
    per = {w["uuid"]: [r["median_us"][w["uuid"]][0] for r in runs] for w in wls}
    return {"median_us": {u: [statistics.median(v)] for u, v in per.items()}, "run_medians_us": per,
            "raw_us": [r["raw_us"] for r in runs]}


# --- report -------------------------------------------------------------------------------------
# name: (what it is, the `ncu` arguments that make it)
NCU_VARIANT_RUNS = {
    "ncu_nocache": ("without the cache flush (`--cache-control none`)", {"cache_control": "none"}),
    "ncu_held": ("with its cache flush, each launch queued behind a spin kernel (GPU busy before it)", {"hold": True}),
    "ncu_l2flush": ("without its cache flush, after our L2 flush (our harness's cache state)",
                    {"cache_control": "none", "l2flush": True}),
}
NCU_VARIANTS = {name: what for name, (what, _) in NCU_VARIANT_RUNS.items()}


def report(task: str, wls: list[dict], res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    ncu_m = (res.get("ncu") or {}).get("median_us", {})
    for w in wls:
        u = w["uuid"]
        row: dict[str, Any] = {"task": task, "uuid": u, "axes": w["axes"]}
        ref = ncu_m.get(u, [None])[0]
        row["ncu_us"] = ref
        ncu_runs = ((res.get("ncu") or {}).get("run_medians_us") or {}).get(u)
        if ncu_runs and len(ncu_runs) > 1:
            row["ncu_spread"] = spread(ncu_runs)
        for variant in NCU_VARIANTS:
            nc = ((res.get(variant) or {}).get("median_us") or {}).get(u)
            if nc:
                row[f"{variant}_us"] = nc[0]
                vals = ((res.get("ours") or {}).get("median_us") or {}).get(u)
                if vals:
                    row[f"ours_vs_{variant}"] = statistics.median(vals) / nc[0] - 1
        for h in ("ours", "ours_events", "do_bench", "fib_persistent", "fib_isolated"):
            vals = ((res.get(h) or {}).get("median_us") or {}).get(u)
            if not vals:
                continue
            med = statistics.median(vals)
            row[f"{h}_us"] = med
            row[f"{h}_spread"] = spread(vals)
            if ref:
                row[f"{h}_vs_ncu"] = med / ref - 1
        rows.append(row)
    return rows


def fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}%" if pct else f"{v:.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    hs = ["ours", "ours_events", "do_bench", "fib_persistent", "fib_isolated"]
    head = ["task", "axes", "ncu us"] + [f"{h} us / spread / vs ncu" for h in hs]
    say(" | ".join(head))
    for r in rows:
        ncu_sp = f" ({100 * r['ncu_spread']:.1f}%)" if r.get("ncu_spread") is not None else ""
        cells = [r["task"], ",".join(f"{k}={v}" for k, v in r["axes"].items()), fmt(r.get("ncu_us")) + ncu_sp]
        for h in hs:
            sp = r.get(f"{h}_spread")
            cells.append(f"{fmt(r.get(f'{h}_us'))} / {fmt(sp, True).lstrip('+') if sp is not None else '-'} / "
                         f"{fmt(r.get(f'{h}_vs_ncu'), True)}")
        for variant, what in NCU_VARIANTS.items():
            if f"{variant}_us" in r:
                cells.append(f"ncu {what} {fmt(r[f'{variant}_us'])}, ours {fmt(r.get(f'ours_vs_{variant}'), True)}")
        say(" | ".join(cells))


def markdown(env: dict[str, Any], rows: list[dict[str, Any]], walls: dict[str, Any], skipped: dict[str, str]) -> str:
    hs = [("ours", "ours"), ("ours_events", "ours, events only"), ("do_bench", "do_bench"), ("fib_persistent", "fib persistent"),
          ("fib_isolated", "fib isolated")]
    out = [f"Device: {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env.get('triton')}, "
           f"flashinfer-bench {env.get('flashinfer_bench')}; {env['date']}.", "",
           "Median latency in us, its spread over repeats ((max-min)/median), and its distance from Nsight "
           "Compute's gpu__time_duration.", "",
           "| task | axes | ncu us | " + " | ".join(f"{n} us | {n} spread | {n} vs ncu" for _, n in hs) + " |",
           "|" + "---|" * (3 + 3 * len(hs))]
    for r in rows:
        cells = [r["task"], ",".join(f"{k}={v}" for k, v in r["axes"].items()), fmt(r.get("ncu_us"))]
        for h, _ in hs:
            sp = r.get(f"{h}_spread")
            cells += [fmt(r.get(f"{h}_us")), f"{100 * sp:.2f}%" if sp is not None else "-",
                      fmt(r.get(f"{h}_vs_ncu"), True)]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    variants = [v for v in NCU_VARIANTS if any(f"{v}_us" in r for r in rows)]
    if variants:
        out += ["Nsight Compute " + "; ".join(f"{v}: {NCU_VARIANTS[v]}" for v in variants) + ":", "",
                "| task | axes | ncu us | ours us | " + " | ".join(f"{v} us | ours vs {v}" for v in variants) + " |",
                "|" + "---|" * (4 + 2 * len(variants))]
        out += [f"| {r['task']} | {','.join(f'{k}={v}' for k, v in r['axes'].items())} | {fmt(r.get('ncu_us'))} | "
                f"{fmt(r.get('ours_us'))} | " + " | ".join(f"{fmt(r.get(f'{v}_us'))} | {fmt(r.get(f'ours_vs_{v}'), True)}"
                                                            for v in variants) + " |"
                for r in rows]
        out.append("")
    for task, w in walls.items():
        parts = [f"{h} {statistics.median(v):.1f} s" for h, v in w.items() if isinstance(v, list) and v]
        out.append(f"- Full evaluation of one candidate, {task} ({w['workloads']} workloads): " + ", ".join(parts))
    for k, v in skipped.items():
        out.append(f"- Skipped {k}: {v}")
    return "\n".join(out) + "\n"


BEGIN, END = "<!-- fidelity:begin -->", "<!-- fidelity:end -->"


def update_readme(text: str) -> None:
    readme = REPO / "benchmarks" / "README.md"
    cur = readme.read_text()
    if BEGIN in cur and END in cur:
        head, rest = cur.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
        say(f"updated {readme}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.environ.get("FIB_DATASET_PATH", str(DEFAULT_DATASET)))
    ap.add_argument("--tasks", default="rmsnorm_h4096,gemm_n4096_k4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fib-repeats", type=int, default=3, help="repeats of flashinfer-bench's persistent runner")
    ap.add_argument("--fib-isolated-repeats", type=int, default=1, help="its isolated runner takes ~90 s a run")
    ap.add_argument("--gemm-workloads", default="sample:4")
    ap.add_argument("--rmsnorm-workloads", default=None, help="default: all (sample:4 with --quick)")
    ap.add_argument("--harnesses", default="ours,do_bench,fib_persistent,fib_isolated,ncu",
                    help="which to run, comma-separated; ncu variants: " + ", ".join(NCU_VARIANTS))
    ap.add_argument("--ncu-reps", type=int, default=9, help="profiled launches per workload, for ncu and each variant (their median is its figure)")
    ap.add_argument("--ncu-repeats", type=int, default=1,
                    help="ncu runs; above 1 the table gives ncu's own spread and the reference is their median")
    ap.add_argument("--mode", default="quick", choices=["quick", "full"])
    ap.add_argument("--quick-target-ms", type=float, default=None,
                    help="experiment: timed wall time per block in quick mode (the product's setting otherwise)")
    ap.add_argument("--quick", action="store_true", help="2 repeats, sample:4 rmsnorm workloads, no isolated runner")
    ap.add_argument("--allow-cpu", action="store_true", help="run what can run without a GPU (ours, interpreter)")
    ap.add_argument("--update-readme", action="store_true", help="write the table into benchmarks/README.md")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if a.quick:
        a.repeats, a.fib_repeats, a.fib_isolated_repeats = 2, 2, 0
    if a.quick_target_ms:
        from dataclasses import replace

        from kda.tools import bench

        shipped = bench.settings_for
        bench.settings_for = lambda mode, device, trials: (  # noqa: E731
            replace(shipped(mode, device, trials), target_s=a.quick_target_ms / 1e3) if mode == "quick"
            else shipped(mode, device, trials))

    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not a.allow_cpu:
        say("no CUDA GPU visible: this benchmark compares GPU timers (pass --allow-cpu for a plumbing check)")
        return 2
    dataset = Path(a.dataset)
    if not (dataset / "definitions").is_dir():
        say(f"dataset {dataset} not found (pass --dataset)")
        return 2
    skipped: dict[str, str] = {}
    env: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "torch": torch.__version__, "cuda": torch.version.cuda,
                           "gpu": torch.cuda.get_device_name() if gpu else "none (cpu)", "python": sys.version.split()[0]}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError as e:
        env["triton"] = f"unavailable: {e}"
    try:
        import flashinfer_bench
        env["flashinfer_bench"] = getattr(flashinfer_bench, "__version__", "?")
    except ImportError as e:
        env["flashinfer_bench"] = f"unavailable: {e}"
    base = Path(tempfile.mkdtemp(prefix="kda-fidelity-"))
    all_rows: list[dict[str, Any]] = []
    walls: dict[str, Any] = {}
    details: dict[str, Any] = {}
    try:
        for task in [t.strip() for t in a.tasks.split(",") if t.strip()]:
            if task not in KERNELS:
                say(f"unknown task {task}; known: {', '.join(KERNELS)}")
                continue
            say(f"== {task}")
            ws = make_workspace(task, dataset, base)
            from kda.tools.bench import select_workloads

            spec = (a.gemm_workloads if task.startswith("gemm")
                    else a.rmsnorm_workloads or ("sample:4" if a.quick else "all"))
            if not gpu:  # the interpreter is slow: the two smallest workloads only
                spec = [w["uuid"] for w in sorted(ws.workloads(), key=lambda w: sorted(w["axes"].values()))[:2]]
            wls, _ = select_workloads(ws.definition(), ws.workloads(), spec)
            uuids = [w["uuid"] for w in wls]
            res: dict[str, Any] = {}
            want = {h.strip() for h in a.harnesses.split(",")}
            if "ours" in want:
                res["ours"] = guarded(f"{task}/ours", lambda: ours(ws, uuids, a.repeats, a.mode), skipped)
            if ((res.get("ours") or {}).get("events") or {}).get("median_us"):
                res["ours_events"] = res["ours"]["events"]
            if gpu:
                if "do_bench" in want:
                    res["do_bench"] = guarded(f"{task}/do_bench", lambda: do_bench(ws, wls, a.repeats), skipped)
                if a.fib_repeats and "fib_persistent" in want:
                    res["fib_persistent"] = guarded(f"{task}/fib_persistent",
                                                    lambda: fib(ws, wls, a.fib_repeats, isolated=False), skipped)
                if a.fib_isolated_repeats and "fib_isolated" in want:
                    res["fib_isolated"] = guarded(f"{task}/fib_isolated",
                                                  lambda: fib(ws, wls, a.fib_isolated_repeats, isolated=True), skipped)
                if "ncu" in want:
                    res["ncu"] = guarded(f"{task}/ncu", lambda: ncu_repeated(ws, wls, KERNELS[task][0], a.ncu_reps,
                                                                                a.ncu_repeats), skipped)
                for variant, (_, kw) in NCU_VARIANT_RUNS.items():
                    if variant in want:
                        res[variant] = guarded(f"{task}/{variant}",
                                               lambda kw=kw: ncu(ws, wls, KERNELS[task][0], a.ncu_reps, **kw), skipped)
            else:
                skipped[f"{task}/do_bench, flashinfer-bench, ncu"] = "no CUDA GPU"
            walls[task] = {h: (res.get(h) or {}).get("wall_s") for h in ("ours", "fib_persistent", "fib_isolated")}
            walls[task]["ours_cold"] = (res.get("ours") or {}).get("wall_cold_s")
            walls[task]["workloads"] = len(wls)
            details[task] = {k: (res.get("ours") or {}).get(k)
                             for k in ("median_us", "phases_s", "worker_ops_s", "startup_s", "spare_wait_s", "timing_mode",
                                       "launch_gap_us")}
            for name in ("ncu", *NCU_VARIANTS):  # every profiled launch, not only the medians in the rows
                if res.get(name):
                    details[task][name] = res[name]
            rows = report(task, wls, res)
            all_rows += rows
            for h in ("ours", "fib_persistent", "fib_isolated"):
                st = (res.get(h) or {}).get("status") or {}
                bad = {u: s for u, s in st.items() if s != "PASSED"}
                if bad:
                    say(f"  ! {h}: not passed on {len(bad)} workload(s): {bad}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    say("")
    print_table(all_rows)
    say("")
    for task, w in walls.items():
        say(f"wall time of a full evaluation ({task}, {w['workloads']} workloads): "
            + ", ".join(f"{h} {statistics.median(v):.1f} s" for h, v in w.items() if isinstance(v, list) and v))
    for k, v in skipped.items():
        say(f"skipped {k}: {v}")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"fidelity-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    # Paths in the record are relative to the repository (results get committed).
    def rel(v: str) -> str:
        p = Path(v).resolve()
        return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else "(outside the repository)"

    args = {k: rel(v) if k in ("dataset", "out") else v for k, v in vars(a).items()}
    out.write_text(json.dumps({"env": env, "rows": all_rows, "wall_s": walls, "ours": details, "skipped": skipped,
                               "args": args}, indent=1, default=str))
    say(f"wrote {out}")
    md = markdown(env, all_rows, walls, skipped)
    (out.with_suffix(".md")).write_text(md)
    if a.update_readme:
        update_readme(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
