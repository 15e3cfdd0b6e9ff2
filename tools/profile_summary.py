"""Pure-Python diagnosis over the extractor's JSON (tools/ncu_extract.py).

For each kernel: the primary bottleneck (names from tools/symptoms.py) with the metric values
that decided it; six dimensions (occupancy & launch geometry, block balance & tail, stall
reasons, tensor-core use, timeline shape, memory); at most five ranked next actions, each with
evidence, Nsight Compute's own estimated speedup where one of its rules gives one, hotspot
lines, and the wiki pages whose `symptoms` match. The classification reads only metrics,
never kernel names, so it holds for any kernel.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from .errors import BadInput
from .symptoms import BOTTLENECKS, STALLS

# The metrics a report must have to be diagnosed at all (any `--set full` / `detailed` run has them).
REQUIRED = [
    "gpu__time_duration.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
]

# Thresholds (percent of peak unless noted). Chosen from Nsight Compute's own rule thresholds
# (SOLBottleneck: 60% "high", 80% "very high"; waste ratios as in its access-pattern rules).
HIGH = 60.0
LOW = 40.0
TENSOR_BOUND = 50.0
WASTE_RATIO = 2.0          # sectors or wavefronts per ideal
LOCAL_SHARE = 0.10         # local sectors / all LSU global+local sectors
LAUNCH_NS = 5_000.0        # a kernel this short is dominated by launch cost
MAX_ACTIONS = 5
MIN_STALL_SAMPLES = 200
LIBRARY_MARKERS = ("/site-packages/", "/dist-packages/", "/triton/language/", "/include/cuda", "/cuda/include/",
                   "/cccl/", "/cutlass/include/")

M_DUR = "gpu__time_duration.sum"
M_SM = "sm__throughput.avg.pct_of_peak_sustained_elapsed"
M_MEM = "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"
M_DRAM = "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"
M_L2 = "lts__throughput.avg.pct_of_peak_sustained_elapsed"
M_L1 = "l1tex__throughput.avg.pct_of_peak_sustained_active"
M_GRID = "launch__grid_size"
M_BLOCK = "launch__block_size"
M_SMS = "launch__sm_count"
M_WAVES = "launch__waves_per_multiprocessor"
M_OCC_T = "sm__maximum_warps_per_active_cycle_pct"
M_OCC_A = "sm__warps_active.avg.pct_of_peak_sustained_active"
M_ISSUE = "smsp__issue_active.avg.pct_of_peak_sustained_active"
M_TENSOR = "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"
M_SECT = "memory_l2_theoretical_sectors_global"
M_SECT_IDEAL = "memory_l2_theoretical_sectors_global_ideal"
M_WAVEF = "memory_l1_wavefronts_shared"
M_WAVEF_IDEAL = "memory_l1_wavefronts_shared_ideal"
M_LOCAL_LD = "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum"
M_LOCAL_ST = "l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum"
M_GLD_SECT = "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"
M_GLD_REQ = "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"
M_GST_SECT = "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum"
M_GST_REQ = "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum"
M_SPILL = "sass__inst_executed_register_spilling"
PIPES = {
    "tensor": M_TENSOR,
    "fma": "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
    "alu": "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
    "fp64": "sm__inst_executed_pipe_fp64.avg.pct_of_peak_sustained_active",
    "lsu": "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
    "xu": "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "uniform": "sm__inst_executed_pipe_uniform.avg.pct_of_peak_sustained_active",
    "adu": "sm__inst_executed_pipe_adu.avg.pct_of_peak_sustained_active",
}
OCC_LIMITS = {
    "registers": "launch__occupancy_limit_registers",
    "shared memory": "launch__occupancy_limit_shared_mem",
    "warps (block size)": "launch__occupancy_limit_warps",
    "blocks per SM": "launch__occupancy_limit_blocks",
    "barriers": "launch__occupancy_limit_barriers",
}

# Nsight Compute rule -> the symptom it speaks to (its estimated speedup is quoted there).
RULE_SYMPTOM = {
    "UncoalescedGlobalAccess": "uncoalesced_global",
    "SharedMemoryConflicts": "shared_bank_conflicts",
    "UncoalescedSharedAccess": "shared_bank_conflicts",
    "TheoreticalOccupancy": "occupancy_limited",
    "AchievedOccupancy": "occupancy_limited",
    "IssueSlotUtilization": "memory_latency",
    "SOLBottleneck": None,
}

ACTIONS = {
    "uncoalesced_global": "Make neighbouring threads touch neighbouring addresses (transpose the index, stage "
                          "the tile through shared memory, or vectorize) so each request uses all 32 B of its sectors.",
    "shared_bank_conflicts": "Pad the shared tile (e.g. [32][33]) or swizzle its index so a warp's accesses hit "
                             "distinct banks.",
    "local_memory": "Keep per-thread arrays in registers: index them with compile-time constants (unroll), shrink "
                    "them, or move the data to shared memory; check spills in compile's resource report.",
    "dram_bandwidth": "Move fewer bytes: fuse neighbouring ops, use narrower dtypes, avoid re-reading inputs; "
                      "use 128-bit vector loads to stay near peak.",
    "l2_bound": "Improve L2 reuse locality (tile/block swizzle), or cut L2 traffic by keeping reused data in "
                "shared memory or registers.",
    "memory_latency": "Hide load latency: more independent loads in flight per thread (unroll, vector loads, "
                      "software pipelining / cp.async / TMA) or more warps per SM.",
    "compute_tensor": "The tensor pipe is near peak: the remaining gains are fewer MMA instructions (lower precision, "
                      "FP8) or overlapping the epilogue; check that the tile shape wastes nothing.",
    "compute_pipe": "A math pipe is saturated: cut instructions per result (fuse FMAs, cheaper math, move "
                    "matrix-shaped work to tensor cores).",
    "issue_bound": "Issue slots are busy: reduce instruction count (vectorize, hoist address math, unroll loops "
                   "with uniform bounds).",
    "launch_overhead": "The kernel is too short for its launch cost: fuse it with neighbours, batch more work per "
                       "launch, or capture the sequence in a CUDA graph.",
    "small_grid": "Launch more parallelism: split the work (more blocks per row / split-K / split-KV) so every SM "
                  "gets blocks.",
    "occupancy_limited": "Raise occupancy: fewer registers per thread (launch bounds, smaller tiles), less shared "
                         "memory per block, or a block size that fits more blocks per SM.",
    "tail_effect": "Balance the last wave: choose a grid that is a multiple of the blocks the GPU holds at once, "
                   "or a persistent kernel.",
    "no_tensor_cores": "The FMA pipe does matrix-shaped work: use tensor-core MMA (tl.dot / wgmma / mma.sync).",
}


def _m(k: dict[str, Any], name: str) -> Optional[float]:
    v = k.get("metrics", {}).get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _r(v: Optional[float], nd: int = 2) -> Optional[float]:
    return None if v is None else round(v, nd)


def _ev(k: dict[str, Any], *names: str) -> list[dict[str, Any]]:
    """Evidence: metric names with their values, the ones present only."""
    return [{"metric": n, "value": _r(_m(k, n), 3)} for n in names if _m(k, n) is not None]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b <= 0:
        return None
    return a / b


# --- wiki links ------------------------------------------------------------------------------
def wiki_pages_dir() -> Path:
    env = os.environ.get("KDA_WIKI_PAGES")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "kernelwiki" / "pages"


@lru_cache(maxsize=4)
def _wiki_index(pages_dir: str, stamp: float) -> tuple[dict[str, list[tuple[str, int]]], dict[str, set[str]]]:
    """symptom -> wiki page ids, and page id -> architectures, from each page's YAML front matter
    (cheap: no search index)."""
    import yaml

    out: dict[str, list[tuple[str, int]]] = {}
    archs: dict[str, set[str]] = {}
    for p in sorted(Path(pages_dir).glob("*.md")):
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.startswith("---"):
            continue
        end = text.find("\n---", 3)
        if end < 0:
            continue
        try:
            meta = yaml.safe_load(text[3:end]) or {}
        except yaml.YAMLError:
            continue
        pid = str(meta.get("id") or p.stem)
        archs[pid] = {str(a) for a in meta.get("architectures") or []}
        # Playbooks and technique pages answer a symptom; kernel pages mostly mention it.
        weight = {"playbook": 4, "technique": 3, "pattern": 2, "hardware": 1}.get(str(meta.get("type")), 0)
        symptoms = [str(x) for x in meta.get("symptoms") or []]
        specific = 1 if len(symptoms) <= 2 else 0  # a page about few symptoms is about this one
        for pos, sym in enumerate(symptoms):
            named = 4 if all(tok in pid for tok in sym.replace("stall_", "").split("_")) else 0
            out.setdefault(sym, []).append((pid, weight + specific + named + (2 if pos == 0 else 0)))
    return out, archs


def wiki_for(symptoms: list[str], arch: Optional[str] = None) -> list[str]:
    """Page ids whose `symptoms` list one of these, best first: the first symptom weighs most,
    then pages written for the profiled GPU's architecture."""
    d = wiki_pages_dir()
    if not d.is_dir():
        return []
    idx, archs = _wiki_index(str(d), d.stat().st_mtime)
    seen: dict[str, int] = {}
    for rank, s in enumerate(symptoms):
        for pid, weight in idx.get(s, []):
            seen[pid] = seen.get(pid, 0) + (10 if rank == 0 else 3) + weight
    if arch:
        for pid in seen:
            pa = archs.get(pid) or set()
            seen[pid] += 2 if arch in pa else 0
            seen[pid] += 1 if pa and len(pa) <= 2 and arch in pa else 0  # specific to this GPU
    return [p for p, _ in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))][:4]


def _arch(k: dict[str, Any]) -> Optional[str]:
    major = _m(k, "device__attribute_compute_capability_major")
    minor = _m(k, "device__attribute_compute_capability_minor")
    return f"sm{int(major)}{int(minor or 0)}" if major is not None else None


# --- dimensions ------------------------------------------------------------------------------
def stall_mix(k: dict[str, Any]) -> list[dict[str, Any]]:
    """Stall reasons by share of PC samples (falls back to per-issue cycles)."""
    src = k.get("stall_samples") or {}
    metric = "smsp__pcsamp_warps_issue_stalled_*"
    # A kernel of a few microseconds yields a handful of PC samples: use the per-issue counters.
    if sum(v for v in src.values() if v) < MIN_STALL_SAMPLES:
        src = {s: v for s, v in (k.get("warp_stall_cycles") or {}).items() if v}
        metric = "smsp__average_warps_issue_stalled_*_per_issue_active.ratio"
    total = sum(v for v in src.values() if v)
    if not total:
        return []
    rows = [{"stall": s, "pct": round(100.0 * v / total, 1), "known": s in STALLS, "source": metric}
            for s, v in src.items() if v]
    return sorted(rows, key=lambda r: -r["pct"])


def occupancy_dim(k: dict[str, Any]) -> dict[str, Any]:
    limits = {name: _m(k, m) for name, m in OCC_LIMITS.items() if _m(k, m) is not None}
    limiter = min(limits, key=lambda n: limits[n]) if limits else None
    grid, sms = _m(k, M_GRID), _m(k, M_SMS)
    md = k.get("metrics", {})
    return {
        "grid": [md.get("launch__grid_dim_x"), md.get("launch__grid_dim_y"), md.get("launch__grid_dim_z")],
        "block": [md.get("launch__block_dim_x"), md.get("launch__block_dim_y"), md.get("launch__block_dim_z")],
        "blocks": grid, "block_size": _m(k, M_BLOCK), "sm_count": sms,
        "registers_per_thread": _m(k, "launch__registers_per_thread"),
        "shared_mem_per_block": _m(k, "launch__shared_mem_per_block"),
        "waves_per_sm": _r(_m(k, M_WAVES), 3),
        "theoretical_pct": _r(_m(k, M_OCC_T), 1), "achieved_pct": _r(_m(k, M_OCC_A), 1),
        "blocks_per_sm_limit": limits, "limiter": limiter,
        "blocks_per_sm_fraction": _r(_ratio(grid, sms), 3),
    }


def balance_dim(k: dict[str, Any]) -> dict[str, Any]:
    cmax, cmin, cavg = _m(k, "sm__cycles_active.max"), _m(k, "sm__cycles_active.min"), _m(k, "sm__cycles_active.avg")
    elapsed = _m(k, "gpc__cycles_elapsed.max")
    waves = _m(k, M_WAVES)
    last = None
    if waves is not None and waves >= 1:
        frac = waves - math.floor(waves)
        last = round(frac, 3) if frac > 1e-6 else 1.0
    return {
        "sm_active_cycles_max": cmax, "sm_active_cycles_min": cmin, "sm_active_cycles_avg": _r(cavg, 1),
        "imbalance_pct": _r(100.0 * (cmax - cavg) / cmax, 1) if cmax and cavg is not None else None,
        "sm_busy_pct": _r(100.0 * cavg / elapsed, 1) if cavg is not None and elapsed else None,
        "waves_per_sm": _r(waves, 3), "last_wave_fill": last,
    }


def tensor_dim(k: dict[str, Any]) -> dict[str, Any]:
    pipes = {p: _r(_m(k, m), 2) for p, m in PIPES.items() if _m(k, m) is not None}
    busiest = max(pipes, key=lambda p: pipes[p] or 0) if pipes else None
    return {"pipes_pct": pipes, "busiest_pipe": busiest, "tensor_pct": pipes.get("tensor"),
            "uses_tensor_cores": (pipes.get("tensor") or 0) > 1.0}


def timeline_dim(k: dict[str, Any]) -> dict[str, Any]:
    tl = k.get("timeline") or {}
    series = tl.get("series") or {}
    interval = tl.get("interval_ns")
    candidates = {n: s for n, s in series.items() if n in ("sm_inst", "dram", "tensor", "l2") and s}
    if not candidates:
        return {"samples": 0, "shape": "no PmSampling data in this report"}
    name = max(candidates, key=lambda n: sum(candidates[n]) / len(candidates[n]))
    s = candidates[name]
    n = len(s)
    if n < 4:
        return {"samples": n, "interval_ns": interval, "series": name,
                "shape": f"too short for a timeline ({n} samples at {interval} ns)"}
    level = sorted(s)[int(0.9 * (n - 1))]
    if level <= 0:
        return {"samples": n, "interval_ns": interval, "series": name, "shape": "idle"}
    half = 0.5 * level
    first = next(i for i, v in enumerate(s) if v >= half)
    last = max(i for i, v in enumerate(s) if v >= half)
    steady = s[first:last + 1]
    ramp_pct, tail_pct = 100.0 * first / n, 100.0 * (n - 1 - last) / n
    dips = sum(1 for v in steady if v < half)
    shape = "steady"
    if tail_pct >= 15:
        shape = "long tail"
    elif ramp_pct >= 15:
        shape = "slow ramp"
    elif dips > 0.2 * len(steady):
        shape = "bursty"
    return {"samples": n, "interval_ns": interval, "series": name, "level_pct": round(level, 1),
            "ramp_pct": round(ramp_pct, 1), "steady_pct": round(100.0 - ramp_pct - tail_pct, 1),
            "tail_pct": round(tail_pct, 1), "steady_mean_pct": round(sum(steady) / len(steady), 1),
            "dips_in_steady": dips, "shape": shape}


def memory_dim(k: dict[str, Any]) -> dict[str, Any]:
    local = (_m(k, M_LOCAL_LD) or 0.0) + (_m(k, M_LOCAL_ST) or 0.0)
    glob = (_m(k, M_GLD_SECT) or 0.0) + (_m(k, M_GST_SECT) or 0.0)
    return {
        "dram_pct": _r(_m(k, M_DRAM), 1), "l2_pct": _r(_m(k, M_L2), 1), "l1_pct": _r(_m(k, M_L1), 1),
        "global_load_sectors_per_request": _r(_ratio(_m(k, M_GLD_SECT), _m(k, M_GLD_REQ)), 2),
        "global_store_sectors_per_request": _r(_ratio(_m(k, M_GST_SECT), _m(k, M_GST_REQ)), 2),
        "global_load_bytes_per_sector": _r(_m(k, "smsp__sass_average_data_bytes_per_sector_mem_global_op_ld.ratio"), 1),
        "global_sectors_vs_ideal": _r(_ratio(_m(k, M_SECT), _m(k, M_SECT_IDEAL)), 2),
        "l1_hit_pct": _r(_m(k, "l1tex__t_sector_hit_rate.pct"), 1),
        "l2_hit_pct": _r(_m(k, "lts__t_sector_hit_rate.pct"), 1),
        "shared_wavefronts_vs_ideal": _r(_ratio(_m(k, M_WAVEF), _m(k, M_WAVEF_IDEAL)), 2),
        "shared_bank_conflicts": ((_m(k, "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum") or 0)
                                  + (_m(k, "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum") or 0)),
        "local_sectors": local, "local_share": _r(local / (local + glob), 3) if local + glob else 0.0,
        "spill_instructions": _m(k, M_SPILL),
        "dram_bytes": (_m(k, "dram__bytes_read.sum") or 0) + (_m(k, "dram__bytes_write.sum") or 0),
    }


# --- classification --------------------------------------------------------------------------
def findings(k: dict[str, Any]) -> list[dict[str, Any]]:
    """Every symptom the metrics show, each with its deciding evidence and a strength (0..1)."""
    sm, mem = _m(k, M_SM) or 0.0, _m(k, M_MEM) or 0.0
    dram, l2 = _m(k, M_DRAM) or 0.0, _m(k, M_L2) or 0.0
    dur = _m(k, M_DUR) or 0.0
    grid, sms, waves = _m(k, M_GRID), _m(k, M_SMS), _m(k, M_WAVES)
    occ_t, occ_a = _m(k, M_OCC_T), _m(k, M_OCC_A)
    issue = _m(k, M_ISSUE) or 0.0
    tensor = _m(k, M_TENSOR) or 0.0
    mix = {r["stall"]: r["pct"] for r in stall_mix(k)}
    mem_dim = memory_dim(k)
    out: list[dict[str, Any]] = []

    def add(sym: str, strength: float, why: str, evidence: list[dict[str, Any]], **extra: Any) -> None:
        out.append({"symptom": sym, "strength": round(min(1.0, max(0.0, strength)), 3), "why": why,
                    "evidence": evidence, **extra})

    low_sol = sm < LOW and mem < LOW
    if dur and dur < LAUNCH_NS and low_sol:
        add("launch_overhead", 0.95, f"{dur / 1000:.1f} us kernel with SM {sm:.0f}% and memory {mem:.0f}% of peak",
            _ev(k, M_DUR, M_SM, M_MEM, M_GRID))
    if grid is not None and sms and grid < sms and sm < HIGH and mem < HIGH:
        add("small_grid", 0.9, f"{grid:.0f} blocks for {sms:.0f} SMs ({waves or 0:.3g} waves); SOL SM {sm:.0f}%, "
            f"memory {mem:.0f}%", _ev(k, M_GRID, M_SMS, M_WAVES, M_SM, M_MEM))

    ratio = mem_dim["global_sectors_vs_ideal"]
    if ratio is not None and ratio >= WASTE_RATIO:
        add("uncoalesced_global", min(1.0, 0.5 + ratio / 8),
            f"global accesses move {ratio:.1f}x the ideal sectors "
            f"({mem_dim['global_load_bytes_per_sector']} of 32 bytes used per load sector)",
            _ev(k, M_SECT, M_SECT_IDEAL, "smsp__sass_average_data_bytes_per_sector_mem_global_op_ld.ratio",
                M_GLD_SECT, M_GLD_REQ, M_DRAM), hotspot_key="excess_global_sectors")
    wratio = mem_dim["shared_wavefronts_vs_ideal"]
    if wratio is not None and wratio >= WASTE_RATIO:
        add("shared_bank_conflicts", min(1.0, 0.5 + wratio / 16),
            f"shared accesses take {wratio:.1f}x the ideal wavefronts",
            _ev(k, M_WAVEF, M_WAVEF_IDEAL, "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
                "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"),
            hotspot_key="excess_shared_wavefronts")
    if mem_dim["local_share"] and mem_dim["local_share"] >= LOCAL_SHARE:
        add("local_memory", min(1.0, 0.5 + mem_dim["local_share"]),
            f"{100 * mem_dim['local_share']:.0f}% of L1 load/store sectors are local memory",
            _ev(k, M_LOCAL_LD, M_LOCAL_ST, M_GLD_SECT, M_GST_SECT, M_SPILL, "launch__stack_size"),
            hotspot_key="local_sectors")

    if tensor >= TENSOR_BOUND:
        add("compute_tensor", tensor / 100, f"tensor pipe {tensor:.0f}% of peak; SM {sm:.0f}%",
            _ev(k, M_TENSOR, M_SM, M_MEM))
    pipes = tensor_dim(k)["pipes_pct"]
    math_pipes = {p: v for p, v in pipes.items() if p in ("fma", "alu", "fp64", "xu") and v is not None}
    if math_pipes:
        top = max(math_pipes, key=lambda p: math_pipes[p])
        if math_pipes[top] >= HIGH:
            add("compute_pipe", math_pipes[top] / 100, f"{top} pipe {math_pipes[top]:.0f}% of peak",
                _ev(k, PIPES[top], M_SM))
        if top == "fma" and math_pipes[top] >= LOW and tensor < 1.0 and sm >= LOW:
            add("no_tensor_cores", 0.5, f"FMA pipe {math_pipes[top]:.0f}% busy and the tensor pipe idle",
                _ev(k, PIPES["fma"], M_TENSOR))
    if issue >= 70.0:
        add("issue_bound", issue / 100, f"schedulers issue in {issue:.0f}% of cycles",
            _ev(k, M_ISSUE, "sm__inst_executed.avg.per_cycle_active"))
    if dram >= HIGH:
        add("dram_bandwidth", dram / 100, f"DRAM throughput {dram:.0f}% of peak, SM {sm:.0f}%",
            _ev(k, M_DRAM, M_MEM, M_SM, "dram__bytes_read.sum", "dram__bytes_write.sum"), stall="stall_long_scoreboard")
    elif l2 >= HIGH and l2 > sm:
        add("l2_bound", l2 / 100, f"L2 throughput {l2:.0f}% of peak with DRAM {dram:.0f}%", _ev(k, M_L2, M_DRAM, M_SM))
    if occ_t is not None and occ_t < 50.0 and sm < HIGH and mem < HIGH and grid and sms and grid >= sms:
        limiter = occupancy_dim(k)["limiter"]
        add("occupancy_limited", 0.6 * (1 - occ_t / 100) + 0.2,
            f"theoretical occupancy {occ_t:.0f}% (limited by {limiter}), achieved {occ_a or 0:.0f}%",
            _ev(k, M_OCC_T, M_OCC_A, "launch__registers_per_thread", "launch__shared_mem_per_block",
                *[OCC_LIMITS[limiter]] if limiter else []))
    if waves is not None and 1.0 <= waves < 8.0:
        frac = waves - math.floor(waves)
        if 0 < frac < 0.5:
            add("tail_effect", 0.5 * (1 - frac) / max(1.0, math.floor(waves)),
                f"{waves:.2f} waves: the last wave fills {100 * frac:.0f}% of the GPU", _ev(k, M_WAVES, M_GRID))
    ls = mix.get("stall_long_scoreboard", 0.0)
    if sm < HIGH and mem < HIGH and ls >= 30.0:
        add("memory_latency", 0.5 + ls / 200, f"{ls:.0f}% of warp samples wait on long scoreboard; "
            f"SM {sm:.0f}% and memory {mem:.0f}% both under {HIGH:.0f}%", _ev(k, M_SM, M_MEM, M_OCC_A),
            stall="stall_long_scoreboard")
    return out


# Which finding explains the kernel first. A waste pattern (uncoalesced, conflicts, local)
# outranks the throughput it inflates, because fixing it is what frees that throughput.
PRIORITY = ["launch_overhead", "small_grid", "compute_tensor", "local_memory", "uncoalesced_global",
            "shared_bank_conflicts", "compute_pipe", "issue_bound", "dram_bandwidth", "l2_bound",
            "occupancy_limited", "memory_latency", "tail_effect", "no_tensor_cores"]


def classify(k: dict[str, Any], found: list[dict[str, Any]]) -> dict[str, Any]:
    by = {f["symptom"]: f for f in found}
    for sym in PRIORITY:
        if sym in by:
            f = by[sym]
            return {"name": sym, "description": BOTTLENECKS[sym], "why": f["why"], "evidence": f["evidence"]}
    sm, mem = _m(k, M_SM) or 0.0, _m(k, M_MEM) or 0.0
    name = "memory_latency" if mem >= sm else "issue_bound"
    return {"name": name, "description": BOTTLENECKS[name],
            "why": f"no unit near peak (SM {sm:.0f}%, memory {mem:.0f}%); the larger is {'memory' if mem >= sm else 'SM'}",
            "evidence": _ev(k, M_SM, M_MEM, M_ISSUE)}


def _rule_speedup(k: dict[str, Any], sym: str, stall: Optional[str]) -> tuple[Optional[float], list[str]]:
    best: Optional[float] = None
    ids: list[str] = []
    for r in k.get("rules") or []:
        target = RULE_SYMPTOM.get(r.get("id") or "", "")
        title = (r.get("title") or "").lower()
        rid = r.get("id") or ""
        if rid == "MemoryCacheAccessPattern":
            target = "local_memory" if "local" in title else "uncoalesced_global"
        elif rid == "LaunchConfiguration":
            target = "tail_effect" if "tail" in title else "small_grid" if "small grid" in title else ""
        elif rid == "CPIStall":
            target = "stall_" + title.replace(" stalls", "").replace(" ", "_") if title else ""
        hit = target == sym or (stall is not None and target == stall)
        if sym in ("small_grid", "launch_overhead") and target == "small_grid":
            hit = True
        if hit and r.get("speedup_pct") is not None:
            ids.append(rid)
            best = max(best or 0.0, float(r["speedup_pct"]))
    return (round(best, 1) if best is not None else None), ids


def _hotspots_for(k: dict[str, Any], f: dict[str, Any]) -> list[dict[str, Any]]:
    hs = k.get("hotspots") or {}
    rows: list[dict[str, Any]] = []
    key = f.get("hotspot_key")
    if key:
        rows = hs.get("by_memory", {}).get(key, [])
    if not rows:
        stall = f.get("stall")
        lines = hs.get("lines", [])
        if stall:
            lines = sorted([r for r in lines if r.get(stall)], key=lambda r: -r.get(stall, 0))
        rows = lines
    total = sum(r.get("samples", 0) for r in hs.get("lines", [])) or 1
    return _user_first([_loc(r, total) for r in rows])[:3]


def _is_library(path: Optional[str]) -> bool:
    p = (path or "").replace("\\", "/")
    return any(x in p for x in LIBRARY_MARKERS)


def _user_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidate's own lines before library lines (Triton's standard.py, CUDA headers)."""
    return sorted(rows, key=lambda r: r["library"])


def _loc(r: dict[str, Any], total: float) -> dict[str, Any]:
    stalls = {s: v for s, v in r.items() if s.startswith("stall_")}
    top = max(stalls, key=lambda s: stalls[s]) if stalls else None
    return {"file": r.get("file"), "line": r.get("line"),
            "where": f"{PurePosixPath(r.get('file') or '?').name}:{r.get('line')}",
            "text": r.get("text"), "samples": r.get("samples", 0), "library": _is_library(r.get("file")),
            "samples_pct": round(100.0 * r.get("samples", 0) / total, 1), "top_stall": top,
            **{m: r[m] for m in ("excess_global_sectors", "excess_shared_wavefronts", "local_sectors") if r.get(m)}}


def actions(k: dict[str, Any], primary: str, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ranked = []
    for f in found:
        sym = f["symptom"]
        speed, rules = _rule_speedup(k, sym, f.get("stall"))
        score = (2.0 if sym == primary else 0.0) + f["strength"] + (speed or 0.0) / 100.0
        ranked.append((score, f, speed, rules))
    ranked.sort(key=lambda t: -t[0])
    out = []
    seen: set[str] = set()
    for score, f, speed, rules in ranked:
        sym = f["symptom"]
        if sym in seen or not f["evidence"]:
            continue  # no action without evidence
        seen.add(sym)
        # The stall is the symptom's mechanism only when latency is the finding itself.
        wiki_keys = [sym] + ([f["stall"]] if f.get("stall") and sym == "memory_latency" else [])
        out.append({"rank": len(out) + 1, "symptom": sym, "action": ACTIONS[sym], "why": f["why"],
                    "evidence": f["evidence"], "ncu_est_speedup_pct": speed, "ncu_rules": rules,
                    "hotspots": _hotspots_for(k, f), "wiki": wiki_for(wiki_keys, _arch(k))})
        if len(out) == MAX_ACTIONS:
            break
    return out


def summarize_kernel(k: dict[str, Any]) -> dict[str, Any]:
    missing = [m for m in REQUIRED if _m(k, m) is None]
    if missing:
        raise BadInput(f"kernel {k.get('name')!r}: the report lacks {', '.join(missing)} - an unknown or too small "
                       "metric set; collect with `ncu --set full` (the profile tool does)")
    found = findings(k)
    primary = classify(k, found)
    if primary["name"] not in {f["symptom"] for f in found}:
        found.insert(0, {"symptom": primary["name"], "strength": 0.3, "why": primary["why"],
                         "evidence": primary["evidence"]})
    hs = k.get("hotspots") or {}
    total = sum(r.get("samples", 0) for r in hs.get("lines", [])) or 1
    notes = []
    if not hs.get("has_source"):
        notes.append("no source-line correlation in this report (build with -lineinfo, profile with "
                     "--import-source yes); hotspots are SASS only")
    rules = sorted([r for r in k.get("rules") or [] if r.get("type") in ("optimization", "warning")],
                   key=lambda r: -(r.get("speedup_pct") or 0))
    return {
        "index": k.get("index"), "name": k.get("name"),
        "duration_us": _r((_m(k, M_DUR) or 0) / 1000.0, 3),
        "bottleneck": primary,
        "sol": {"sm_pct": _r(_m(k, M_SM), 1), "memory_pct": _r(_m(k, M_MEM), 1), "dram_pct": _r(_m(k, M_DRAM), 1),
                "l1_pct": _r(_m(k, M_L1), 1), "l2_pct": _r(_m(k, M_L2), 1)},
        "dimensions": {
            "occupancy": occupancy_dim(k),
            "balance": balance_dim(k),
            "stalls": stall_mix(k)[:6],
            "tensor": tensor_dim(k),
            "timeline": timeline_dim(k),
            "memory": memory_dim(k),
        },
        "findings": [{"symptom": f["symptom"], "why": f["why"]} for f in found],
        "actions": actions(k, primary["name"], found),
        "hotspots": _user_first([_loc(r, total) for r in hs.get("lines", [])])[:5],
        "sass_hotspots": [{"sass": s.get("sass"), "samples": s.get("samples"),
                           "where": f"{PurePosixPath(s['file']).name}:{s['line']}" if s.get("file") else None}
                          for s in hs.get("sass", [])[:3]],
        "ncu_rules": [{"id": r["id"], "title": r.get("title") or r.get("name"), "speedup_pct": _r(r.get("speedup_pct"), 1)}
                      for r in rules[:6]],
        "notes": notes,
    }


def _pick(kernels: list[dict[str, Any]], kernel: Optional[str]) -> list[dict[str, Any]]:
    if kernel is None or kernel == "":
        return kernels
    if str(kernel).isdigit():
        sel = [k for k in kernels if k.get("index") == int(kernel)]
    else:
        sel = [k for k in kernels if kernel in (k.get("name") or "")]
    if not sel:
        names = ", ".join(f"{k.get('index')}:{k.get('name')}" for k in kernels[:10])
        raise BadInput(f"no kernel {kernel!r} in this report (kernels: {names})")
    return sel


def summarize(data: dict[str, Any], kernel: Optional[str] = None, detail_kernels: int = 2) -> dict[str, Any]:
    kernels = data.get("kernels") or []
    if not kernels:
        raise BadInput("the report has no profiled kernel")
    sel = _pick(kernels, kernel)
    summaries = [summarize_kernel(k) for k in sel]
    text = render_text(summaries, detail_kernels)
    return {"kernels": summaries, "text": text, "headline": headline(summaries)}


def headline(summaries: list[dict[str, Any]]) -> str:
    top = max(summaries, key=lambda s: s["duration_us"] or 0)
    hs = next((h for a in top["actions"][:1] for h in a["hotspots"][:1]), None) or (top["hotspots"] or [None])[0]
    at = f" at {hs['where']}" if hs else ""
    more = f" (+{len(summaries) - 1} more kernels)" if len(summaries) > 1 else ""
    return (f"{top['name']}: {top['bottleneck']['name']} - {top['bottleneck']['why']}; "
            f"{top['duration_us']:.1f} us{at}{more}")


def _fmt_ev(ev: list[dict[str, Any]], n: int = 4) -> str:
    return ", ".join(f"{e['metric']}={e['value']:.4g}" if isinstance(e["value"], (int, float)) else
                     f"{e['metric']}={e['value']}" for e in ev[:n])


def _na(v: Any, unit: str = "") -> str:
    return "n/a" if v is None else f"{v}{unit}"


def render_text(summaries: list[dict[str, Any]], detail_kernels: int = 2) -> str:
    lines: list[str] = []
    order = sorted(summaries, key=lambda s: -(s["duration_us"] or 0))
    if len(summaries) > 1:
        lines.append(f"{len(summaries)} kernels:")
        for s in summaries:
            lines.append(f"  [{s['index']}] {s['name'][:60]}  {s['duration_us']:.1f} us  {s['bottleneck']['name']}")
    for s in order[:detail_kernels]:
        d = s["dimensions"]
        o, b, t, tl, m = d["occupancy"], d["balance"], d["tensor"], d["timeline"], d["memory"]
        lines.append("")
        lines.append(f"== [{s['index']}] {s['name'][:80]}: {s['duration_us']:.2f} us")
        bn = s["bottleneck"]
        lines.append(f"Bottleneck: {bn['name']} ({bn['description']}). {bn['why']}. Evidence: {_fmt_ev(bn['evidence'])}")
        sol = s["sol"]
        lines.append(f"SOL: SM {_na(sol['sm_pct'], '%')}, memory {_na(sol['memory_pct'], '%')}, "
                     f"DRAM {_na(sol['dram_pct'], '%')}, L1 {_na(sol['l1_pct'], '%')}, L2 {_na(sol['l2_pct'], '%')}")
        lines.append(f"Occupancy/launch: grid {o['grid']} x block {o['block']} ({o['blocks']:.0f} blocks, "
                     f"{o['sm_count']:.0f} SMs, {o['waves_per_sm']} waves); {o['registers_per_thread']:.0f} regs, "
                     f"{o['shared_mem_per_block']:.0f} B smem/block; occupancy theoretical {o['theoretical_pct']}% "
                     f"achieved {o['achieved_pct']}% (limiter: {o['limiter']})"
                     if o["blocks"] is not None and o["sm_count"] and o["registers_per_thread"] is not None
                     and o["shared_mem_per_block"] is not None else
                     f"Occupancy/launch: theoretical {_na(o['theoretical_pct'], '%')} achieved "
                     f"{_na(o['achieved_pct'], '%')}")
        lines.append(f"Balance/tail: SMs busy {_na(b['sm_busy_pct'], '%')} of elapsed, imbalance "
                     f"{_na(b['imbalance_pct'], '%')} (max vs mean active cycles), last wave fill "
                     f"{_na(b['last_wave_fill'])}")
        lines.append("Stalls (share of samples): " +
                     (", ".join(f"{r['stall']} {r['pct']}%" for r in d["stalls"][:5]) or "no samples"))
        lines.append(f"Tensor cores: {'used' if t['uses_tensor_cores'] else 'not used'} "
                     f"(tensor {_na(t['tensor_pct'], '%')}); busiest pipe {_na(t['busiest_pipe'])}: " +
                     ", ".join(f"{p} {v}%" for p, v in sorted(t["pipes_pct"].items(), key=lambda kv: -(kv[1] or 0))[:4]))
        if tl.get("samples", 0) >= 4 and "ramp_pct" in tl:
            lines.append(f"Timeline ({tl['series']}, {tl['samples']} samples): {tl['shape']}; ramp {tl['ramp_pct']}%, "
                         f"steady {tl['steady_pct']}% at ~{tl['steady_mean_pct']}% of peak, tail {tl['tail_pct']}%")
        else:
            lines.append(f"Timeline: {tl.get('shape')}")
        lines.append(f"Memory: global load {_na(m['global_load_sectors_per_request'])} sectors/request "
                     f"({_na(m['global_load_bytes_per_sector'])} B used of 32), sectors vs ideal "
                     f"{_na(m['global_sectors_vs_ideal'], 'x')}; L1 hit {_na(m['l1_hit_pct'], '%')}, L2 hit "
                     f"{_na(m['l2_hit_pct'], '%')}; shared wavefronts vs ideal {_na(m['shared_wavefronts_vs_ideal'], 'x')}; "
                     f"local memory {100 * (m['local_share'] or 0):.0f}% of sectors, spill instructions "
                     f"{_na(m['spill_instructions'])}")
        if s["hotspots"]:
            lines.append("Hotspots (stall samples): " + "; ".join(
                f"{h['where']} {h['samples_pct']}% {h['top_stall'] or ''} `{(h['text'] or '')[:70]}`" for h in s["hotspots"][:3]))
        elif s["sass_hotspots"]:
            lines.append("SASS hotspots: " + "; ".join(f"{h['sass'][:50]} ({h['samples']:.0f})" for h in s["sass_hotspots"]))
        for n in s["notes"]:
            lines.append(f"Note: {n}")
        lines.append("Next actions:")
        for a in s["actions"]:
            sp = f" [ncu est. speedup {a['ncu_est_speedup_pct']}%]" if a["ncu_est_speedup_pct"] is not None else ""
            where = "; at " + ", ".join(f"{h['where']} `{(h['text'] or '')[:60]}`" for h in a["hotspots"][:2]) \
                if a["hotspots"] else ""
            wiki = f"; wiki: {', '.join(a['wiki'])}" if a["wiki"] else ""
            lines.append(f" {a['rank']}. {a['symptom']}{sp}: {a['action']} Evidence: {_fmt_ev(a['evidence'], 3)}{where}{wiki}")
    return "\n".join(lines).strip()
