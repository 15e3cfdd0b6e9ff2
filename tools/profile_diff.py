"""Compare two profile summaries: duration, speed of light, stall mix, occupancy, hotspots.

Kernels are paired by name (then by order among same-named kernels); what is unmatched is
listed. Only changes larger than the noise of a single profiled call are called "moved".
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Optional

# A single Nsight Compute replay varies by a few percent; smaller changes are not news.
DURATION_MOVED_PCT = 3.0
POINTS_MOVED = 5.0


def _pair(a: list[dict[str, Any]], b: list[dict[str, Any]]):
    used: set[int] = set()
    pairs, only_a = [], []
    for ka in a:
        match = next((j for j, kb in enumerate(b) if j not in used and kb["name"] == ka["name"]), None)
        if match is None and len(a) == 1 and len(b) == 1:
            match = 0  # one kernel each: compare them even if renamed (e.g. a new Triton kernel name)
        if match is None:
            only_a.append(ka)
        else:
            used.add(match)
            pairs.append((ka, b[match]))
    only_b = [kb for j, kb in enumerate(b) if j not in used]
    return pairs, only_a, only_b


def _delta(x: Optional[float], y: Optional[float]) -> Optional[float]:
    return None if x is None or y is None else round(y - x, 2)


def diff_kernel(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    moved: list[str] = []
    da, db = a["duration_us"] or 0.0, b["duration_us"] or 0.0
    dur_pct = round(100.0 * (db - da) / da, 1) if da else None
    if dur_pct is not None and abs(dur_pct) >= DURATION_MOVED_PCT:
        moved.append(f"duration {da:.2f} -> {db:.2f} us ({dur_pct:+.1f}%, {da / db if db else 0:.2f}x)")
    sol = {}
    for key in ("sm_pct", "memory_pct", "dram_pct", "l1_pct", "l2_pct"):
        x, y = a["sol"].get(key), b["sol"].get(key)
        sol[key] = {"a": x, "b": y, "delta": _delta(x, y)}
        if sol[key]["delta"] is not None and abs(sol[key]["delta"]) >= POINTS_MOVED:
            moved.append(f"SOL {key[:-4]} {x}% -> {y}%")
    sa = {r["stall"]: r["pct"] for r in a["dimensions"]["stalls"]}
    sb = {r["stall"]: r["pct"] for r in b["dimensions"]["stalls"]}
    stalls = {s: {"a": sa.get(s, 0.0), "b": sb.get(s, 0.0), "delta": round(sb.get(s, 0.0) - sa.get(s, 0.0), 1)}
              for s in sorted(set(sa) | set(sb))}
    for s, v in sorted(stalls.items(), key=lambda kv: -abs(kv[1]["delta"])):
        if abs(v["delta"]) >= POINTS_MOVED:
            moved.append(f"{s} {v['a']}% -> {v['b']}% of samples")
    oa, ob = a["dimensions"]["occupancy"], b["dimensions"]["occupancy"]
    occ = {k: {"a": oa.get(k), "b": ob.get(k)} for k in
           ("theoretical_pct", "achieved_pct", "registers_per_thread", "shared_mem_per_block", "blocks",
            "block_size", "waves_per_sm", "limiter")}
    for k in ("theoretical_pct", "achieved_pct"):
        d = _delta(oa.get(k), ob.get(k))
        if d is not None and abs(d) >= POINTS_MOVED:
            moved.append(f"occupancy {k[:-4]} {oa.get(k)}% -> {ob.get(k)}%")
    for k in ("registers_per_thread", "blocks", "block_size"):
        if oa.get(k) != ob.get(k):
            moved.append(f"{k} {oa.get(k)} -> {ob.get(k)}")
    if a["bottleneck"]["name"] != b["bottleneck"]["name"]:
        moved.insert(0, f"bottleneck {a['bottleneck']['name']} -> {b['bottleneck']['name']}")
    # Two candidates keep their sources in different folders: a line is the same site when the
    # file name and line number agree.
    ha = {_site(h["where"]): h for h in a["hotspots"]}
    hb = {_site(h["where"]): h for h in b["hotspots"]}
    hotspots = {
        "a": [{"where": h["where"], "pct": h["samples_pct"], "text": h["text"]} for h in a["hotspots"][:3]],
        "b": [{"where": h["where"], "pct": h["samples_pct"], "text": h["text"]} for h in b["hotspots"][:3]],
        "gone": [h["where"] for k, h in list(ha.items())[:3] if k not in hb],
        "new": [h["where"] for k, h in list(hb.items())[:3] if k not in ha],
    }
    if a["hotspots"] and b["hotspots"] and _site(a["hotspots"][0]["where"]) != _site(b["hotspots"][0]["where"]):
        moved.append(f"top hotspot {a['hotspots'][0]['where']} -> {b['hotspots'][0]['where']}")
    return {
        "name_a": a["name"], "name_b": b["name"],
        "duration_us": {"a": da, "b": db, "delta_pct": dur_pct, "speedup": round(da / db, 3) if db else None},
        "bottleneck": {"a": a["bottleneck"]["name"], "b": b["bottleneck"]["name"]},
        "sol": sol, "stalls": stalls, "occupancy": occ, "hotspots": hotspots, "moved": moved,
    }


def diff(sum_a: dict[str, Any], sum_b: dict[str, Any]) -> dict[str, Any]:
    pairs, only_a, only_b = _pair(sum_a["kernels"], sum_b["kernels"])
    kernels = [diff_kernel(x, y) for x, y in pairs]
    ta = sum(k["duration_us"] or 0 for k in sum_a["kernels"])
    tb = sum(k["duration_us"] or 0 for k in sum_b["kernels"])
    total_pct = round(100.0 * (tb - ta) / ta, 1) if ta else None
    lines = [f"total kernel time {ta:.2f} -> {tb:.2f} us ({total_pct:+.1f}%)" if total_pct is not None else
             f"total kernel time {ta:.2f} -> {tb:.2f} us"]
    for k in kernels:
        name = k["name_a"] if k["name_a"] == k["name_b"] else f"{k['name_a']} -> {k['name_b']}"
        lines.append(f"{name[:70]}: " + ("; ".join(k["moved"]) if k["moved"] else "nothing moved beyond noise"))
    for k in only_a:
        lines.append(f"only in A: {k['name']} ({k['duration_us']:.2f} us)")
    for k in only_b:
        lines.append(f"only in B: {k['name']} ({k['duration_us']:.2f} us)")
    head = lines[0]
    if kernels and kernels[0]["moved"]:
        head += "; " + kernels[0]["moved"][0]
    return {"total_us": {"a": round(ta, 3), "b": round(tb, 3), "delta_pct": total_pct},
            "kernels": kernels, "only_a": [k["name"] for k in only_a], "only_b": [k["name"] for k in only_b],
            "text": "\n".join(lines), "headline": head}


def _site(where: str) -> str:
    """`work/v1/kernel.py:40` -> `kernel.py:40`."""
    path, _, line = where.rpartition(":")
    return f"{PurePosixPath(path).name}:{line}" if path else where
