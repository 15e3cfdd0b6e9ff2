"""Where a benchmark's variance and wall time come from, measured piece by piece on one GPU.

    python benchmarks/timing_state.py --dataset DIR [--out DIR]

An experiment behind the harness's settings, not the product. In one process, with the bench
worker's primitives (L2 flush by reading, spin hold, CUPTI spans) and the Triton RMSNorm the
benchmark tests measure:

1. placement: the same kernel on each of several input sets (separate allocations), in passes;
   per set and per pass medians. A set-to-set spread well above the pass-to-pass spread of one
   set says the run-to-run shifts come from where the buffers lie, so more input sets help.
2. cache: small workloads with the L2 flushed (the harness), not flushed, flushed after a
   large matmul, after 600 KB of straight-line code ran on every SM (instruction caches
   emptied of the timed kernel's code), after reads from 8192 other 2 MiB pages (address
   translation caches), and launched after the GPU idled for 2 ms (as between Nsight Compute's
   serialized launches) with no hold before it.
3. checks: the results file (save, load) and compare_output of one large output, each part
   synchronized, alone and beside a second process keeping the GPU busy.
4. gap: the launch gap as the trusted worker measures it (200 probe frames), again and again in
   one process between RMSNorm blocks, and once in each of a few fresh processes, beside the gap
   before the RMSNorm kernel itself in those blocks. Says whether one measurement per device
   stands for every later run and every kernel.

Prints a table per part and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import say, spread  # noqa: E402  (the sibling script: one definition of the spread)
KERNEL_DIR = REPO / "tests" / "data_bench" / "triton_rmsnorm"


def smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


class Bench:
    def __init__(self, definition: dict) -> None:
        import torch

        from kda.sandbox import device_trace as DT
        from kda.sandbox import harness as H

        self.torch, self.H, self.DT = torch, H, DT
        self.d = definition
        self.dev = torch.device("cuda")
        self.fn = H.load_entry(KERNEL_DIR, "kernel.py::run", "ts_rmsnorm")
        self.flush = H.L2Flusher(self.dev)
        self.hold = DT.SpinHold(self.dev)
        self.tracer = DT.Tracer()

    def sets(self, wl: dict, n: int) -> list[tuple[list, list]]:
        H = self.H
        return [(H.make_inputs(self.d, wl, 1000 + i, self.dev), H.alloc_outputs(self.d, wl, self.dev)) for i in range(n)]

    def block(self, wl: dict, sets: list[tuple[list, list]], iters: int, flush: bool = True,
              before: Any = None, idle_s: float = 0.0, hold_us: float = 40.0, event: bool = False) -> list[float]:
        """Device spans (us) of `iters` calls cycling over `sets`, as the bench worker times them."""
        torch, H = self.torch, self.H
        self.tracer.start()
        for j in range(iters):
            ins, outs = sets[j % len(sets)]
            H.refill_inputs_(self.d, wl, ins, 7 + j)
            if before is not None:
                before()
            if flush:
                self.flush()
            torch.cuda.synchronize()
            if idle_s:  # the GPU idles before the launch, as between Nsight Compute's launches
                time.sleep(idle_s)
            self.hold(1.0 if idle_s else hold_us)
            if event:  # as the bench worker's frame does: a start event between the hold and the call
                torch.cuda.Event(enable_timing=True).record()
            self.fn(*ins, *outs)
            torch.cuda.synchronize()
            self.hold.mark()
        acts = self.tracer.stop()
        spans = self.tracer.spans_us(acts, iters)
        # The device's launch gap, which the bench worker measures once and adds to every span.
        self.last_gaps = self.tracer.launch_gaps_us(acts)
        return [s for s, _, _ in spans]


def placement(b: Bench, wls: list[dict], n_sets: int, passes: int, iters: int) -> list[dict]:
    rows = []
    for wl in wls:
        sets = b.sets(wl, n_sets)
        b.block(wl, sets, 50)  # warm-up: compile, clocks
        per_set: dict[int, list[float]] = {i: [] for i in range(n_sets)}
        per_pass_set: dict[int, list[float]] = {i: [] for i in range(n_sets)}
        clocks = [smi()]
        for _ in range(passes):
            for i in range(n_sets):
                xs = b.block(wl, [sets[i]], iters)
                per_set[i] += xs
                per_pass_set[i].append(statistics.median(xs))
            clocks.append(smi())
        set_medians = [statistics.median(v) for v in per_set.values()]
        within = [spread(v) for v in per_pass_set.values()]
        # What a run with 3 sets (the harness's old setting) or all sets would report, per pass.
        runs3 = [statistics.median(sum((per_pass_set[i][p:p + 1] for i in range(k, k + 3)), []))
                 for p in range(passes) for k in range(0, n_sets - 2, 3)]
        row = {"axes": wl["axes"], "set_medians_us": set_medians, "set_spread": spread(set_medians),
               "pass_spread_within_set_median": statistics.median(within),
               "pass_medians_us": per_pass_set, "clocks": clocks, "runs_of_3_sets_spread": spread(runs3)}
        rows.append(row)
        say(f"  placement {wl['axes']}: set medians {min(set_medians):.3f}..{max(set_medians):.3f} us "
            f"(spread {row['set_spread']:.2%}), pass-to-pass within a set {row['pass_spread_within_set_median']:.2%}, "
            f"3-set runs {row['runs_of_3_sets_spread']:.2%}; clocks {clocks[0]} -> {clocks[-1]}")
        del sets
    return rows


def code_evictor(torch: Any, dev: Any) -> Any:
    """A callable that runs 600 KB of straight-line machine code once on every SM: no kernel's
    code stays in an SM's instruction caches after it (they hold tens of KB), as after Nsight
    Compute's `--cache-control all`. A large matmul, tried earlier, runs a loop of a few KB."""
    import triton
    import triton.language as tl

    @triton.jit
    def straight_line(x_ptr, N: tl.constexpr):
        pid = tl.program_id(0)
        x = tl.load(x_ptr + pid).to(tl.uint32)
        for i in tl.static_range(N):  # unrolled: N distinct steps the compiler cannot fold
            x = (x ^ (x >> 7)) + (i * 2654435761 % 4294967291)
        tl.store(x_ptr + pid, x.to(tl.int32))

    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    buf = torch.zeros(4 * sms, dtype=torch.int32, device=dev)
    return lambda: straight_line[(4 * sms,)](buf, N=4000, num_warps=1)


def tlb_evictor(torch: Any, dev: Any, gib: int = 16) -> Any:
    """A callable that reads one word in each 2 MiB page of a `gib` GiB buffer: the GPU's address
    translation caches then hold other pages than the timed kernel's."""
    pages = torch.zeros(gib * 512, 2 ** 19, dtype=torch.int32, device=dev)
    acc = torch.zeros((), dtype=torch.int64, device=dev)
    return lambda: torch.sum(pages[:, 0], dim=0, out=acc)


def cache(b: Bench, wls: list[dict], iters: int) -> list[dict]:
    torch = b.torch
    big = torch.randn(4096, 4096, device=b.dev, dtype=torch.bfloat16)
    evict_code, evict_tlb = code_evictor(torch, b.dev), tlb_evictor(torch, b.dev)
    evict_code()  # compile outside the timed blocks
    rows = []
    for wl in wls:
        sets = b.sets(wl, 3)
        b.block(wl, sets, 50)
        res = {"axes": wl["axes"]}
        for name, kw in (("l2_flush", {}), ("no_flush", {"flush": False}),
                         ("matmul_then_flush", {"before": lambda: torch.mm(big, big)}),
                         ("code_evict_then_flush", {"before": evict_code}),
                         ("tlb_evict_then_flush", {"before": evict_tlb}),
                         ("code_and_tlb_evict_then_flush", {"before": lambda: (evict_code(), evict_tlb())}),
                         ("idle_2ms_then_launch", {"idle_s": 0.002})):
            res[name] = statistics.median(b.block(wl, sets, iters, **kw))
            res[name + "_launch_gap"] = statistics.median(b.last_gaps)
        rows.append(res)
        say(f"  cache {wl['axes']}: " + ", ".join(f"{k} {v:.3f} us" for k, v in res.items() if k != "axes"))
    return rows


GAP_PROBE = """
import json, sys, torch
from kda.sandbox import device_trace as DT
from kda.sandbox.bench_worker import probe_launch_gap_us
dev = torch.device("cuda")
hold, tr = DT.SpinHold(dev), DT.Tracer()
gap = lambda: probe_launch_gap_us(tr, hold, dev)
first = gap()
a = torch.ones(1 << 28, device=dev)  # 1 GiB copies first, as the trusted worker's calibration makes
b = torch.empty_like(a)
for _ in range(10):
    b.copy_(a)
torch.cuda.synchronize()
# the worker module sends fd 1 to stderr (its protocol owns stdout): the figures go to stderr
print("GAPS " + json.dumps([first, gap(), gap()]), file=sys.stderr)
"""


def gap(b: Bench, wls: list[dict], rounds: int, fresh: int) -> dict:
    from kda.sandbox.bench_worker import probe_launch_gap_us

    DT = b.DT
    rows = []
    sets = {id(wl): b.sets(wl, 3) for wl in wls}
    for r in range(rounds):
        row: dict[str, Any] = {"probe_gap_us": probe_launch_gap_us(b.tracer, b.hold, b.dev)}
        for wl in wls:
            # A hold far longer than Triton's host-side launch, so the kernel waits queued behind
            # it: its gap is then the device's, as the probe's is.
            spans = b.block(wl, sets[id(wl)], 100, hold_us=300.0)
            cell = {"span_us": DT.middle_mean(spans), "kernel_gap_us": DT.middle_mean(b.last_gaps[1:])}
            b.block(wl, sets[id(wl)], 100, hold_us=300.0, event=True)
            cell["kernel_gap_after_event_us"] = DT.middle_mean(b.last_gaps[1:])
            row[f"b{wl['axes']['batch_size']}"] = cell
        rows.append(row)
        say(f"  gap round {r + 1}: probe {row['probe_gap_us']:.3f} us; " + "; ".join(
            f"{k} gap {v['kernel_gap_us']:.3f} (after an event {v['kernel_gap_after_event_us']:.3f}) "
            f"span {v['span_us']:.3f}" for k, v in row.items() if k != "probe_gap_us"))
    procs = []
    for _ in range(fresh):
        res = subprocess.run([sys.executable, "-c", GAP_PROBE], capture_output=True, text=True, timeout=120)
        line = [ln for ln in res.stderr.splitlines() if ln.startswith("GAPS ")]
        procs.append(json.loads(line[-1][5:]) if res.returncode == 0 and line else res.stderr[-300:])
    say(f"  probe gap in fresh processes: {procs}")
    probes = [r["probe_gap_us"] for r in rows]
    say(f"  probe gap in one process: {min(probes):.3f}-{max(probes):.3f} us")
    return {"rounds": rows, "fresh_processes": procs}


BUSY = """
import torch, time
x = torch.randn(8192, 8192, device="cuda")
t0 = time.time()
while time.time() - t0 < {secs}:
    for _ in range(20):
        x = torch.tanh(x)
    torch.cuda.synchronize()
"""


def checks(b: Bench, wl: dict, tmp: Path, busy: bool) -> dict:
    torch, H = b.torch, b.H
    from kda.sandbox import exchange

    ref_fn = H.load_source_function(b.d["reference"], str(tmp / "ref.py"))
    proc = subprocess.Popen([sys.executable, "-c", BUSY.format(secs=60)]) if busy else None
    if proc:
        time.sleep(5)  # its context is up and running
    try:
        t: dict[str, list[float]] = {}

        def lap(k: str, t0: float) -> float:
            torch.cuda.synchronize()
            now = time.perf_counter()
            t.setdefault(k, []).append(now - t0)
            return now

        stage_w, stage_r = exchange.Staging(True), exchange.Staging(True)
        for rep in range(3):
            records, refs = [], []
            for i in range(3):
                ins = H.make_inputs(b.d, wl, 50 + i, b.dev)
                outs = H.alloc_outputs(b.d, wl, b.dev)
                t0 = time.perf_counter()
                b.fn(*ins, *outs)
                t0 = lap("candidate_call", t0)
                records.append({"outputs": [o.clone() for o in outs], "inputs": [json.dumps(H.input_digest(x)) for x in ins]})
                t0 = lap("copy_and_digest", t0)
                refs.append(ref_fn(*[x.clone() for x in ins]))
                lap("reference", t0)
            for label, where in (("disk", tmp), ("shm", Path("/dev/shm"))):
                f = where / f"kda-ts-{os.getpid()}.kdax"
                t0 = time.perf_counter()
                exchange.save(records, str(f), stage_w)
                t0 = lap(f"save[{label}]", t0)
                got = exchange.load(str(f), stage_r)
                lap(f"load[{label}]", t0)
                f.unlink()
            for r, ref in zip(got, refs):
                t0 = time.perf_counter()
                x = r["outputs"][0].to(device=b.dev)
                t0 = lap("h2d", t0)
                H.compare_output("output", r["outputs"][0], ref, 1e-2, 1e-2, 1.0)
                t0 = lap("compare_output", t0)
                x.float()
                lap("widen", t0)
        return {k: statistics.median(v) * 1e3 for k, v in t.items()} | {"busy": busy}
    finally:
        if proc:
            proc.kill()
            proc.wait()


def rmsnorm_task(ds: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The rmsnorm_h4096 definition from a FlashInfer Trace dataset, and its workloads by batch size."""
    d = json.loads((ds / "definitions" / "rmsnorm" / "rmsnorm_h4096.json").read_text())
    wls = [json.loads(x)["workload"] for x in
           (ds / "workloads" / "rmsnorm" / "rmsnorm_h4096.jsonl").read_text().splitlines() if x.strip()]
    return d, {w["axes"]["batch_size"]: w for w in wls}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--sets", type=int, default=12)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--parts", default="placement,cache,checks,gap", help="which parts to run, comma-separated")
    ap.add_argument("--gap-rounds", type=int, default=10)
    ap.add_argument("--gap-fresh", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    if not torch.cuda.is_available():
        say("no CUDA GPU: this experiment measures GPU timing")
        return 2
    d, by_b = rmsnorm_task(Path(a.dataset))
    pick = [by_b[k] for k in (7, 170, 8804, 14509) if k in by_b]
    b = Bench(d)
    out: dict[str, Any] = {"env": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                   "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "clocks_start": smi()}}
    parts = {p.strip() for p in a.parts.split(",")}
    if "placement" in parts:
        say("== placement (per input set)")
        out["placement"] = placement(b, pick, a.sets, a.passes, a.iters)
    if "cache" in parts:
        say("== cache state")
        out["cache"] = cache(b, pick, 200)
    if "checks" in parts:
        say("== correctness check costs (ms, median of 3)")
        checks_part(b, by_b, out)
    if "gap" in parts:
        say("== launch gap: probe frames against the kernel's own")
        out["gap"] = gap(b, [by_b[k] for k in (7, 14509) if k in by_b], a.gap_rounds, a.gap_fresh)
    out["env"]["clocks_end"] = smi()
    p = Path(a.out) / f"timing-state-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=1, default=str))
    say(f"wrote {p}")
    return 0


def checks_part(b: Bench, by_b: dict, out: dict) -> None:
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        for busy in (False, True):
            r = checks(b, by_b[max(by_b)], Path(tmp), busy)
            out.setdefault("checks", []).append(r)
            say("  " + ("beside a busy process: " if busy else "alone: ") + ", ".join(
                f"{k} {v:.1f}" for k, v in r.items() if k != "busy"))


if __name__ == "__main__":
    sys.exit(main())
