"""Nsight Compute report -> normalized JSON per kernel (run as a subprocess).

    python -m kda.tools.ncu_extract REPORT.ncu-rep  > kernels.json

It runs in its own process because `ncu_report` is a large native module that may crash or
hang on a damaged file: the caller gets a clean error and a timeout instead. The module comes
from the `ncu-report` wheel, or from Nsight Compute's own `extras/python` when that install is
newer than the wheel (a newer report needs a newer reader).

Stdlib only at import time besides `ncu_report`; the output schema is documented in
`tools/profile_summary.py`, which is its only consumer besides `profile_diff`.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
EXIT_BAD_REPORT = 3
EXIT_NO_MODULE = 4

# Scalar metrics copied verbatim (when present) under their Nsight Compute names: every
# number the summary reasons with is quoted as evidence by its real metric name.
SCALARS = [
    "gpu__time_duration.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes_read.sum", "dram__bytes_write.sum",
    "sm__cycles_active.avg", "sm__cycles_elapsed.avg", "gpc__cycles_elapsed.max",
    # launch geometry and occupancy
    "launch__grid_size", "launch__block_size", "launch__grid_dim_x", "launch__grid_dim_y", "launch__grid_dim_z",
    "launch__block_dim_x", "launch__block_dim_y", "launch__block_dim_z", "launch__cluster_size",
    "launch__registers_per_thread", "launch__shared_mem_per_block_static", "launch__shared_mem_per_block_dynamic",
    "launch__shared_mem_per_block", "launch__stack_size", "launch__sm_count", "launch__thread_count",
    "launch__waves_per_multiprocessor", "launch__occupancy_limit_registers", "launch__occupancy_limit_shared_mem",
    "launch__occupancy_limit_warps", "launch__occupancy_limit_blocks", "launch__occupancy_limit_barriers",
    "sm__maximum_warps_per_active_cycle_pct", "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm__maximum_warps_avg_per_active_cycle",
    # block balance
    "sm__cycles_active.max", "sm__cycles_active.min",
    "sm__warps_active.max.pct_of_peak_sustained_active", "sm__warps_active.min.pct_of_peak_sustained_active",
    # scheduler
    "smsp__issue_active.avg.pct_of_peak_sustained_active", "sm__inst_executed.avg.per_cycle_active",
    "smsp__warps_active.avg.per_cycle_active", "smsp__warps_eligible.avg.per_cycle_active",
    "smsp__maximum_warps_avg_per_active_cycle", "smsp__average_warp_latency_per_inst_issued.ratio",
    "smsp__inst_executed.sum", "smsp__thread_inst_executed_per_inst_executed.ratio",
    # pipes
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_fp64.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_uniform.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_adu.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_cbu.avg.pct_of_peak_sustained_active",
    "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_fp64_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active",
    # memory
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "smsp__sass_average_data_bytes_per_sector_mem_global_op_ld.ratio",
    "smsp__sass_average_data_bytes_per_sector_mem_global_op_st.ratio",
    "l1tex__t_sector_hit_rate.pct", "lts__t_sector_hit_rate.pct",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
    "l1tex__t_requests_pipe_lsu_mem_dshared_op_ld.sum", "l1tex__t_requests_pipe_lsu_mem_dshared_op_st.sum",
    "smsp__sass_inst_executed_op_shared_ld.sum", "smsp__sass_inst_executed_op_shared_st.sum",
    "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum", "l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum",
    "sass__inst_executed_local_loads", "sass__inst_executed_local_stores",
    "sass__inst_executed_register_spilling", "sass__inst_executed_global_loads", "sass__inst_executed_global_stores",
    "memory_l2_theoretical_sectors_global", "memory_l2_theoretical_sectors_global_ideal",
    "derived__memory_l2_theoretical_sectors_global_excessive",
    "memory_l1_wavefronts_shared", "memory_l1_wavefronts_shared_ideal",
    "derived__memory_l1_wavefronts_shared_excessive", "memory_l2_theoretical_sectors_local",
    # device
    "device__attribute_display_name", "device__attribute_compute_capability_major",
    "device__attribute_compute_capability_minor", "device__attribute_multiprocessor_count",
    "device__attribute_max_warps_per_multiprocessor", "device__attribute_max_blocks_per_multiprocessor",
]

# Per-PC (source-correlated) metrics aggregated into hotspots.
PER_PC_SAMPLES = "smsp__pcsamp_sample_count"
PER_PC_MEMORY = {
    "excess_global_sectors": "derived__memory_l2_theoretical_sectors_global_excessive",
    "excess_shared_wavefronts": "derived__memory_l1_wavefronts_shared_excessive",
    "local_sectors": "memory_l2_theoretical_sectors_local",
}
STALL_PREFIX = "smsp__pcsamp_warps_issue_stalled_"
WARP_STALL_PREFIX = "smsp__average_warps_issue_stalled_"
WARP_STALL_SUFFIX = "_per_issue_active.ratio"
PM_SERIES = {
    "sm_inst": "TPC.TriageCompute.sm__inst_executed_realtime.avg.pct_of_peak_sustained_elapsed",
    "dram": "FBSP.TriageCompute.dramc__throughput.avg.pct_of_peak_sustained_elapsed",
    "l2": "LTS.TriageCompute.lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "tensor": "TPC.TriageCompute.sm__pipe_tensor_cycles_active_realtime.avg.pct_of_peak_sustained_elapsed",
    "ctas_launched": "FE_B.TriageCompute.gr__ctas_launched_realtime.sum",
}
TOP_LINES = 8
TOP_SASS = 3  # disassembling one PC costs ~15 ms


def _stall_name(raw: str) -> str:
    """Nsight's stall suffix -> our STALLS vocabulary name (tools/symptoms.py)."""
    fixed = {"no_instructions": "no_instruction", "dispatch_stall": "dispatch"}
    return "stall_" + fixed.get(raw, raw)


def _version_tuple(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d{4})\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x) for x in m.groups(default="0")) if m else (0,)


def _wheel_version() -> tuple[int, ...]:
    try:
        from importlib.metadata import version

        return _version_tuple(version("ncu-report"))
    except Exception:
        return (0,)


def nsight_python_dirs() -> list[tuple[tuple[int, ...], str]]:
    """Nsight Compute installs' extras/python folders with their versions, newest first."""
    dirs: list[str] = []
    ncu = shutil.which("ncu")
    if ncu:
        dirs.append(str(Path(os.path.realpath(ncu)).parent / "extras" / "python"))
    dirs += glob.glob("/opt/nvidia/nsight-compute/*/extras/python")
    dirs += glob.glob("/usr/local/cuda*/nsight-compute*/extras/python")
    out = []
    for d in dict.fromkeys(dirs):
        if Path(d, "ncu_report.py").is_file():
            out.append((_version_tuple(str(Path(d).parent.parent)), d))
    return sorted(out, reverse=True)


READER_ENV = "KDA_NCU_READER_DIR"
_reader_dir: str | None = None  # the Nsight Compute extras/python this process reads with, if any


def import_ncu_report():
    """The newest reader available: Nsight Compute's own when newer than the wheel
    (or the one $KDA_NCU_READER_DIR names)."""
    global _reader_dir
    forced = os.environ.get(READER_ENV)
    if forced:
        _reader_dir = forced
    else:
        wheel = _wheel_version()
        _reader_dir = next((d for ver, d in nsight_python_dirs() if ver > wheel), None)
    if _reader_dir:
        sys.path.insert(0, _reader_dir)
    import ncu_report  # noqa: PLC0415

    return ncu_report


def _retry_with_other_readers(path: str) -> int | None:
    """A report newer than the default reader reads as empty: try each Nsight Compute install's
    own reader in a fresh process. Returns its exit status, or None when there is none to try."""
    if os.environ.get(READER_ENV):
        return None
    import subprocess  # noqa: PLC0415

    for _, d in nsight_python_dirs():
        if _reader_dir and os.path.realpath(d) == os.path.realpath(_reader_dir):
            continue
        # In the caller's process group: its timeout kills this reader too.
        r = subprocess.run([sys.executable, "-m", "kda.tools.ncu_extract", path],
                           env={**os.environ, READER_ENV: d}, capture_output=True, text=True)
        if r.returncode == 0:
            sys.stdout.write(r.stdout)
            return 0
    return None


def _num(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def _value(metric) -> Any:
    try:
        v = metric.value()
    except Exception:
        return None
    if isinstance(v, (int, float)):
        return _num(float(v)) if isinstance(v, float) else v
    return v if isinstance(v, str) else None


def _instances(metric) -> list[tuple[int, float]]:
    """(correlation id, value) per instance; empty when the metric has none."""
    try:
        n = metric.num_instances()
        if n == 0 or not metric.has_correlation_ids():
            return []
        ids = metric.correlation_ids()
        return [(ids.as_uint64(i), metric.as_double(i)) for i in range(n)]
    except Exception:
        return []


def _source_lines(action) -> dict[str, list[str]]:
    try:
        files = action.source_files()
        return {k: files[k].splitlines() for k in files.keys()}
    except Exception:
        return {}


def _inside(t: int, windows: list[tuple[int, int]]) -> bool:
    for s, e in windows:
        if s <= t <= e:
            return True
    return False


def _timeline(action, names: set[str]) -> dict[str, Any]:
    """PmSampling series inside the kernel's own window, reduced to ramp / steady / tail."""
    start = end = None
    for n in names:
        if n.startswith("profiler__timestamp_workload_start_"):
            idx = n.rsplit("_", 1)[1]
            s = _instances(action[n])
            e = _instances(action.metric_by_name(f"profiler__timestamp_workload_end_{idx}")) \
                if f"profiler__timestamp_workload_end_{idx}" in names else []
            if s and e:
                # Several pass groups each replay the kernel; keep all windows.
                start = start or []
                end = end or []
                start.append(s[0][0])
                end.append(e[0][0])
    windows = list(zip(start or [], end or []))
    interval = None
    if "profiler__pmsampler_interval_time" in names:
        interval = _value(action["profiler__pmsampler_interval_time"])
    series: dict[str, list[float]] = {}
    for key, name in PM_SERIES.items():
        if name not in names:
            continue
        pts = [(t, v) for t, v in _instances(action[name]) if t]
        inside = [v for t, v in pts if _inside(t, windows)]
        if inside:
            series[key] = [round(v, 3) for v in inside]
    return {
        "interval_ns": interval,
        "window_ns": [e - s for s, e in windows][:1],
        "series": series,
    }


def _hotspots(action, names: set[str], sources: dict[str, list[str]]) -> dict[str, Any]:
    pcs: dict[int, dict[str, float]] = {}
    if PER_PC_SAMPLES in names:
        for pc, v in _instances(action[PER_PC_SAMPLES]):
            pcs.setdefault(pc, {})["samples"] = v
    for n in names:
        if n.startswith(STALL_PREFIX) and not n.endswith("_not_issued"):
            reason = _stall_name(n[len(STALL_PREFIX):])
            for pc, v in _instances(action[n]):
                if v:
                    pcs.setdefault(pc, {})[reason] = v
    for key, n in PER_PC_MEMORY.items():
        if n in names:
            for pc, v in _instances(action[n]):
                if v:
                    pcs.setdefault(pc, {})[key] = v

    lines: dict[tuple[str, int], dict[str, float]] = {}
    sass: list[dict[str, Any]] = []
    with_source = 0
    for pc, vals in pcs.items():
        try:
            info = action.source_info(pc)
        except Exception:
            info = None
        loc = (info.file_name(), int(info.line())) if info is not None else None
        if loc is not None:
            with_source += 1
            agg = lines.setdefault(loc, {})
            for k, v in vals.items():
                agg[k] = agg.get(k, 0.0) + v
        if vals.get("samples"):
            sass.append({"pc": pc, **{k: v for k, v in vals.items()},
                         "file": loc[0] if loc else None, "line": loc[1] if loc else None})

    def line_rows(key: str, top: int) -> list[dict[str, Any]]:
        rows = sorted(((v.get(key, 0.0), f, ln, v) for (f, ln), v in lines.items() if v.get(key)),
                      key=lambda r: -r[0])[:top]
        out = []
        for _, f, ln, v in rows:
            text = sources.get(f, [])
            out.append({"file": f, "line": ln, "text": text[ln - 1].strip() if 0 < ln <= len(text) else None,
                        **{k: round(x, 3) for k, x in v.items()}})
        return out

    sass.sort(key=lambda r: -r.get("samples", 0))
    sass = sass[:TOP_SASS]
    # The disassembler costs ~0.5 s to start in each process: only kernels without source
    # correlation (where SASS is all the hotspot there is) get instruction text.
    for row in sass if not lines else []:
        try:
            row["sass"] = action.sass_by_pc(row["pc"]).strip()
        except Exception:
            row["sass"] = ""
    return {
        "pcs": len(pcs),
        "pcs_with_source": with_source,
        "has_source": bool(lines),
        "source_imported": bool(sources),
        "lines": line_rows("samples", TOP_LINES),
        "sass": sass,
        "by_memory": {k: line_rows(k, 3) for k in PER_PC_MEMORY},
    }


def _rules(action) -> list[dict[str, Any]]:
    out = []
    try:
        results = action.rule_results_as_dicts()
    except Exception:
        return out
    for r in results:
        msg = r.get("rule_message") or {}
        if not msg.get("message"):
            continue
        sp = r.get("speedup_estimation") or {}
        out.append({
            "id": r.get("rule_identifier"),
            "name": r.get("name"),
            "section": r.get("section_identifier"),
            "title": msg.get("title") or "",
            "message": re.sub(r"@\w+:([^:@]+):[^@]*@", r"\1", msg.get("message", "")),
            "type": {0: "none", 1: "ok", 2: "optimization", 3: "warning", 4: "error"}.get(msg.get("type"), str(msg.get("type"))),
            "speedup_pct": _num(sp.get("speedup")) if sp else None,
            "speedup_type": {1: "local", 2: "global"}.get(sp.get("type"), None) if sp else None,
            "focus_metrics": [{"name": f.get("name"), "value": _num(f.get("value"))} for f in r.get("focus_metrics", [])],
        })
    return out


def extract_action(action, index: int) -> dict[str, Any]:
    names = set(action.metric_names())
    metrics = {}
    for n in SCALARS:
        if n in names:
            metrics[n] = _value(action[n])
    stalls = {}
    for n in names:
        if n.startswith(WARP_STALL_PREFIX) and n.endswith(WARP_STALL_SUFFIX):
            raw = n[len(WARP_STALL_PREFIX):-len(WARP_STALL_SUFFIX)]
            stalls[_stall_name(raw)] = _value(action[n])
    samples = {}
    for n in names:
        if n.startswith(STALL_PREFIX) and not n.endswith("_not_issued"):
            samples[_stall_name(n[len(STALL_PREFIX):])] = _value(action[n])
    sources = _source_lines(action)
    try:
        mangled = action.name(action.NameBase_MANGLED)
    except Exception:
        mangled = None
    return {
        "index": index,
        "name": action.name(),
        "mangled": mangled,
        "metric_count": len(names),
        "metrics": metrics,
        "warp_stall_cycles": stalls,
        "stall_samples": {k: v for k, v in samples.items() if v is not None},
        "hotspots": _hotspots(action, names, sources),
        "source_files": sorted(sources),
        "timeline": _timeline(action, names),
        "rules": _rules(action),
    }


REPORT_MAGIC = b"NVR\x00"


def extract(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != REPORT_MAGIC:
        raise ValueError(f"{os.path.basename(path)} is not an Nsight Compute report (no NVR header; "
                         f"{'empty file' if not head else 'starts with ' + head.hex()})")
    ncu_report = import_ncu_report()
    try:
        report = ncu_report.load_report(path)
    except Exception as e:  # the reader raises a bare Exception with its own message
        raise ValueError(f"not a readable Nsight Compute report: {e}") from None
    kernels = []
    ranges = report.num_ranges()
    for r in range(ranges):
        rng = report.range_by_idx(r)
        for i in range(rng.num_actions()):
            k = extract_action(rng.action_by_idx(i), len(kernels))
            k["range"] = r
            kernels.append(k)
    if not kernels:
        raise ValueError(f"the report holds {ranges} range(s) and no profiled kernel: it is truncated, or "
                         "the NVTX/kernel filter matched nothing (an empty range)")
    return {"schema": SCHEMA_VERSION, "reader": getattr(ncu_report, "__file__", "ncu_report"),
            "kernels": kernels}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kda.tools.ncu_extract REPORT.ncu-rep", file=sys.stderr)
        return 2
    path = argv[0]
    if not os.path.isfile(path):
        print(f"no such report file: {path}", file=sys.stderr)
        return EXIT_BAD_REPORT
    try:
        data = extract(path)
    except ImportError as e:
        print(f"the ncu_report module is not available ({e}); install the ncu-report wheel or Nsight Compute",
              file=sys.stderr)
        return EXIT_NO_MODULE
    except ValueError as e:
        if "no profiled kernel" in str(e) and _retry_with_other_readers(path) == 0:
            return 0
        print(str(e), file=sys.stderr)
        return EXIT_BAD_REPORT
    json.dump(data, sys.stdout, separators=(",", ":"), default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
