"""Benchmark (not a test): the compile tool's overhead over plain nvcc, and cache-hit latency.

    python benchmarks/compile.py [--repeats 5] [--arch sm_90a]

Cold: the tool builds a ~200-line CUDA file (tests/data/compile/bench_kernel.cu) in a fresh
workspace with the cache bypassed (a new comment line each round makes new content), against the
same nvcc command (-cubin -Xptxas -v -lineinfo -gencode) run directly. Goal: overhead <= 1.1x.
Cached: the same call again, through the tool's Python API. Goal: <= 50 ms median.
Prints a table; writes benchmarks/results/compile.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL = REPO / "tests" / "data" / "compile" / "bench_kernel.cu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compile.json")
    args = ap.parse_args()

    from kda.sandbox.runner import isolation_available
    from kda.tools.compile import ARCHES, compile_candidate, nvcc_path, toolchain
    from kda.tools.task import init_workspace, resolve_task
    from kda.tools.workspace import Workspace

    nvcc = nvcc_path()
    if nvcc is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    virt, real = ARCHES[args.arch]
    source = KERNEL.read_text()
    with tempfile.TemporaryDirectory(prefix="kda-bench-") as tmp:
        root = Path(tmp) / "ws"
        init_workspace(root, resolve_task("rmsnorm_h4096", None, None, None, None))
        ws = Workspace.open(root)
        cand = ws.work_dir / "bench"
        cand.mkdir()
        (cand / "candidate.toml").write_text('language = "cuda"\nentry_point = "kernel.cu::launch_rmsnorm"\n')
        direct_dir = Path(tmp) / "direct"
        direct_dir.mkdir()

        # Warm the page cache and the toolchain version probe once, outside the timings.
        (cand / "kernel.cu").write_text(source + "\n// warm-up\n")
        compile_candidate(ws, "work/bench", arch=args.arch)

        direct, tool, cached = [], [], []
        for i in range(args.repeats):
            text = source + f"\n// round {i}\n"
            (cand / "kernel.cu").write_text(text)
            (direct_dir / "kernel.cu").write_text(text)
            t0 = time.perf_counter()
            subprocess.run([nvcc, "-cubin", "-o", str(direct_dir / "k.cubin"), "-Xptxas", "-v", "-lineinfo",
                            "-gencode", f"arch={virt},code={real}", str(direct_dir / "kernel.cu")],
                           check=True, capture_output=True)
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = compile_candidate(ws, "work/bench", arch=args.arch)
            tool.append(time.perf_counter() - t0)
            assert r.ok and not r.cached, r.headline
            for _ in range(5):
                t0 = time.perf_counter()
                again = compile_candidate(ws, "work/bench", arch=args.arch)
                cached.append(time.perf_counter() - t0)
                assert again.cached
        headline = r.headline

    med = statistics.median
    ratio = med(tool) / med(direct)
    result = {
        "kernel": str(KERNEL.relative_to(REPO)), "kernel_lines": len(source.splitlines()), "arch": args.arch,
        "repeats": args.repeats, "isolation": "bubblewrap" if isolation_available() else "rlimits-only",
        "direct_nvcc_s": {"median": med(direct), "all": direct},
        "tool_cold_s": {"median": med(tool), "all": tool},
        "overhead_ratio": ratio, "overhead_goal": 1.1,
        "cache_hit_ms": {"median": med(cached) * 1e3, "max": max(cached) * 1e3, "n": len(cached)},
        "cache_hit_goal_ms": 50, "toolchain": toolchain(), "machine": platform.node(),
        "cpu_count": __import__("os").cpu_count(), "headline": headline,
    }
    print(f"{'measure':<28}{'median':>12}{'goal':>12}")
    print(f"{'nvcc direct (s)':<28}{med(direct):>12.3f}{'':>12}")
    print(f"{'compile tool, cold (s)':<28}{med(tool):>12.3f}{'':>12}")
    print(f"{'overhead (tool / nvcc)':<28}{ratio:>11.2f}x{'<= 1.10x':>12}")
    print(f"{'cache hit (ms)':<28}{med(cached) * 1e3:>12.1f}{'<= 50':>12}")
    print(f"tool headline: {headline}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
