"""What Nsight Compute's cache flush adds to a short kernel beyond our harness's L2 flush, and where.

    python benchmarks/ncu_residue.py --dataset DIR [--reps 15] [--out DIR]

An experiment behind the harness, not the product. On the H100, ncu with its default
`--cache-control all` reads ~3 us RMSNorm launches 0.22 us longer than ncu with its flush off after
our L2 flush (benchmarks/README.md, third H100 run); emptied instruction caches and foreign pages
explained at most a third of that. This splits the residue two ways, in one run:

- by kernel: `kda_probe_empty` (no memory access: code, parameters, launch), `kda_probe_touch`
  (one load and one store: the first access's path through translation and L2), and the Triton
  RMSNorm at batch 7 and 170;
- by what runs before each profiled launch, under `--cache-control none`:
  `none` nothing; `l2` our L2 flush (the harness); `l2_free` a 32 MiB allocation freed back to the
  driver first (unmapping makes the driver invalidate the GPU's address translations, if it does
  so for the whole address space and not the range alone); `l2_code` 600 KB of straight-line code
  on every SM first; `l2_code_free` both. `ncu_all` is ncu's own flush, run first and last.

If `l2 + X` under ncu reads what `ncu_all` reads on every kernel, X is what our flush misses. Ours
(the bench worker's frame: CUPTI span of the call after a spin hold) is measured in the same states
in this process, so the harness's reading of each state is beside ncu's. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
KERNEL_DIR = REPO / "tests" / "data_bench" / "triton_rmsnorm"
STATES = ("none", "l2", "l2_free", "l2_code", "l2_code_free")
NCU_ORDER = ("ncu_all", "l2", "l2_free", "l2_code", "l2_code_free", "none", "ncu_all")
KERNEL_REGEX = "kda_probe|_rmsnorm_row"


@triton.jit
def kda_probe_empty(x_ptr):
    pass


@triton.jit
def kda_probe_touch(x_ptr, y_ptr):
    tl.store(y_ptr, tl.load(x_ptr) + 1)


class Probe:
    """The kernels and the states before a launch, on the current CUDA device."""

    def __init__(self, dataset: Path) -> None:
        import torch

        from kda.sandbox import harness as H
        from timing_state import code_evictor, rmsnorm_task

        self.torch, dev = torch, torch.device("cuda")
        self.dev = dev
        d, by_b = rmsnorm_task(dataset)
        rms = H.load_entry(KERNEL_DIR, "kernel.py::run", "ncu_residue_rmsnorm")
        x, y = torch.ones(1, device=dev), torch.zeros(1, device=dev)
        self.kernels: dict[str, Callable[[], Any]] = {
            "empty": lambda: kda_probe_empty[(1,)](x, num_warps=1),
            "touch": lambda: kda_probe_touch[(1,)](x, y, num_warps=1),
        }
        for b in (7, 170):
            ins, outs = H.make_inputs(d, by_b[b], 99, dev), H.alloc_outputs(d, by_b[b], dev)
            self.kernels[f"rmsnorm_b{b}"] = lambda ins=ins, outs=outs: rms(*ins, *outs)
        self.flush = H.L2Flusher(dev)
        self.libcuda = ctypes.CDLL("libcuda.so.1")  # torch's primary context is current on this thread
        self.evict_code = code_evictor(torch, dev)
        for f in (*self.kernels.values(), self.evict_code, self.flush):  # compile before any timing
            f()
        torch.cuda.synchronize()

    def free_mapping(self) -> None:
        """32 MiB allocated from the driver and freed again (cuMemAlloc, cuMemFree: torch's
        allocator would keep it), so the driver unmaps it on the GPU."""
        ptr = ctypes.c_uint64()
        for call, args in (("cuMemAlloc_v2", (ctypes.byref(ptr), ctypes.c_size_t(32 << 20))), ("cuMemFree_v2", (ptr,))):
            rc = getattr(self.libcuda, call)(*args)
            if rc:
                raise RuntimeError(f"{call} returned CUDA error {rc}")

    def prepare(self, state: str) -> None:
        if "code" in state:
            self.evict_code()
        if "free" in state:
            self.free_mapping()
        if "l2" in state:
            self.flush()
        self.torch.cuda.synchronize()


def driver(dataset: Path, state: str, reps: int) -> None:
    """The process ncu profiles: each kernel `reps` times, each launch after `state`."""
    p = Probe(dataset)
    for fn in p.kernels.values():
        for _ in range(reps):
            p.prepare(state)
            fn()
        p.torch.cuda.synchronize()


def ncu(dataset: Path, state: str, reps: int, names: list[str]) -> dict[str, list[float]]:
    from fidelity import ncu_durations_us

    drv_state = "none" if state == "ncu_all" else state
    durs, said = ncu_durations_us([sys.executable, __file__, "--dataset", str(dataset), "--driver", drv_state,
                                   "--reps", str(reps)], KERNEL_REGEX, "all" if state == "ncu_all" else "none", 600)
    # The first launch of each kernel is Probe's compile call, before the profiled reps.
    if len(durs) != (reps + 1) * len(names):
        raise RuntimeError(f"ncu ({state}) reported {len(durs)} launches, expected {(reps + 1) * len(names)}: {said}")
    out: dict[str, list[float]] = {}
    for i, us in enumerate(durs[len(names):]):
        out.setdefault(names[i // reps], []).append(us)
    return out


def ours(p: Probe, state: str, iters: int, hold_us: float) -> dict[str, dict[str, float]]:
    """The bench worker's frame: state, a spin hold, the call, a marker; CUPTI spans. With a hold far
    longer than the host's launch, the kernel waits queued behind it and its own launch gap is
    measured too (the worker adds one gap per device, probed with a one-element add)."""
    from kda.sandbox import device_trace as DT

    torch = p.torch
    hold, tracer = DT.SpinHold(p.dev), DT.Tracer()
    out = {}
    for name, fn in p.kernels.items():
        tracer.start()
        for _ in range(iters):
            p.prepare(state)
            hold(hold_us)
            fn()
            torch.cuda.synchronize()
            hold.mark()
        acts = tracer.stop()
        spans = [s for s, _, _ in tracer.spans_us(acts, iters)]
        gaps = tracer.launch_gaps_us(acts)
        out[name] = {"span_us": statistics.median(spans), "span_mean_us": DT.middle_mean(spans),
                     "gap_us": DT.middle_mean(gaps), "gap_median_us": statistics.median(gaps)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, type=Path)
    ap.add_argument("--reps", type=int, default=15, help="profiled launches per kernel and state")
    ap.add_argument("--iters", type=int, default=200, help="our timed frames per kernel and state")
    ap.add_argument("--hold-us", type=float, default=300.0, help="our spin hold before each call")
    ap.add_argument("--driver", choices=STATES, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if a.driver:
        driver(a.dataset, a.driver, a.reps)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: this experiment measures GPU timing", file=sys.stderr)
        return 2
    from fidelity import say

    p = Probe(a.dataset)
    names = list(p.kernels)
    out: dict[str, Any] = {"env": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                   "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "reps": a.reps, "iters": a.iters}, "ncu_runs": [], "ours": {}}
    from kda.sandbox import device_trace as DT
    from kda.sandbox.bench_worker import probe_launch_gap_us

    out["probe_gap_us"] = probe_launch_gap_us(DT.Tracer(), DT.SpinHold(p.dev), p.dev)
    say(f"probe launch gap {out['probe_gap_us']:.3f} us")
    for state in STATES:
        out["ours"][state] = ours(p, state, a.iters, a.hold_us)
        say(f"ours {state}: " + ", ".join(f"{k} span {v['span_us']:.3f} gap {v['gap_us']:.3f}"
                                          for k, v in out["ours"][state].items()))
    del p
    torch.cuda.empty_cache()
    for state in NCU_ORDER:
        try:
            per = ncu(a.dataset, state, a.reps, names)
        except (RuntimeError, subprocess.SubprocessError) as e:
            say(f"ncu {state}: failed: {e}")
            out["ncu_runs"].append({"state": state, "error": str(e)[-1500:]})
            continue
        out["ncu_runs"].append({"state": state, "raw_us": per})
        say(f"ncu {state}: " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in per.items()))
    table(out, names)
    p_out = Path(a.out) / f"ncu-residue-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    p_out.parent.mkdir(parents=True, exist_ok=True)
    p_out.write_text(json.dumps(out, indent=1))
    say(f"wrote {p_out}")
    return 0


def table(out: dict[str, Any], names: list[str]) -> None:
    """Medians per kernel: ncu in each state (ncu_all twice); ours in each state as the harness
    reads it (span + the probed gap); span + the kernel's own gap in that state."""
    cols = [(f"ncu {r['state']}", {k: statistics.median(v) for k, v in r["raw_us"].items()})
            for r in out["ncu_runs"] if "raw_us" in r]
    cols += [(f"ours {s}", {k: v["span_us"] + out["probe_gap_us"] for k, v in res.items()}) for s, res in out["ours"].items()]
    cols += [(f"span+own gap {s}", {k: v["span_us"] + v["gap_us"] for k, v in res.items()}) for s, res in out["ours"].items()]
    print("| kernel | " + " | ".join(c for c, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{m[n]:.3f}" if n in m else "-" for _, m in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
