"""The physical floor of a workload: the fewest bytes the work must move over the fastest copy.

Bytes: every input tensor read once and every output written once, from the definition's
shapes and dtypes; on a GPU, less the outputs its L2 can hold. L2 is write-back: a kernel ends
with its last writes in L2, and they reach memory after its span (the harness flushes L2 before
every timed call, so the inputs must come from memory). On an H100 a Triton RMSNorm of
4096 x 4096 fp16 (67 MB in and out) took 18.75 us: 3.58 TB/s, above the 3.35 TB/s of HBM3 and
1.23 times the measured copy bandwidth; its 34 MB of output fits in the 50 MB L2.

Bandwidth: the device's measured copy bandwidth (bytes read plus written per second), measured
once per device and kept in the store as a run of kind `calibration` (with the device's launch
gap, which the benchmark adds to its spans) under a cache key per device. A latency below
`bytes / bandwidth` cannot be real.

On a CPU the caches are not flushed between iterations, so the floor is only applied where
the data is larger than twice the last-level cache.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from .store import Store

DTYPE_BYTES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "float4_e2m1": 0.5,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}


def _shape(definition: dict[str, Any], spec: dict[str, Any], axes: dict[str, int]) -> list[int]:
    out = []
    for ax in spec.get("shape") or []:
        if isinstance(ax, int):
            out.append(ax)
            continue
        a = definition["axes"][ax]
        out.append(int(a["value"]) if a.get("type") == "const" else int(axes[ax]))
    return out


def io_bytes(definition: dict[str, Any], workload: dict[str, Any]) -> tuple[int, int]:
    """Bytes of the tensor inputs and of the tensor outputs of one workload (scalars count as nothing)."""
    axes = workload.get("axes", {})
    sizes = []
    for group in ("inputs", "outputs"):
        total = 0.0
        for spec in definition[group].values():
            if spec.get("shape") is not None:
                total += math.prod(_shape(definition, spec, axes)) * DTYPE_BYTES.get(spec["dtype"], 1)
        sizes.append(int(total))
    return sizes[0], sizes[1]


def min_bytes(definition: dict[str, Any], workload: dict[str, Any]) -> int:
    """Bytes of every tensor input and output of one workload."""
    return sum(io_bytes(definition, workload))


def floor_bytes(definition: dict[str, Any], workload: dict[str, Any], write_back_bytes: int = 0) -> int:
    """Bytes memory must move within the kernel's span: every input, and the outputs beyond the
    `write_back_bytes` a write-back cache can still hold when the kernel ends."""
    read, written = io_bytes(definition, workload)
    return read + max(0, written - max(0, write_back_bytes))


def llc_bytes() -> int | None:
    """Largest CPU cache in bytes (Linux sysfs), or None."""
    best = None
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            s = p.read_text().strip().upper()
            n = int(s.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            best = max(best or 0, n)
        except (OSError, ValueError):
            continue
    return best


# A kernel may move data faster than torch's copy_, never faster than the memory: on an H200
# copy_ measured 4.17 TB/s, an RMSNorm read+wrote at 4.26 TB/s, and the HBM3e peak is 4.8 TB/s.
# The floor assumes the measured copy bandwidth times this, which is above the peak.
COPY_TO_PEAK = 1.2


def floor_us(nbytes: int, bytes_per_s: float | None, device: str) -> float | None:
    """Fastest possible time for `nbytes` at COPY_TO_PEAK times the measured bandwidth, or None
    where it does not apply."""
    if not bytes_per_s or nbytes <= 0:
        return None
    if device == "cpu":
        llc = llc_bytes() or (32 << 20)
        if nbytes <= 2 * llc:
            return None
    return nbytes / (bytes_per_s * COPY_TO_PEAK) * 1e6


def cached_calibration(store: Store, device_key: str, measure: Callable[[], dict[str, Any]],
                       keep: bool = True, require: tuple[str, ...] = ()) -> dict[str, Any]:
    """The device's measured figures (copy bandwidth; the launch gap where CUPTI times the calls):
    from the store when measured before with every figure in `require`, else measured now and kept
    (unless `keep` is False: a read-only caller measures without recording). Measured once, they
    add no run-to-run noise. (A run whose device trace was unavailable measures no launch gap; the
    next traced run measures again rather than time without one.)"""
    key = f"calibration:{device_key}"
    run_id = store.cache_get(key)
    if run_id:
        try:
            rec = store.get_run(run_id)["record"]
        except Exception:  # the cached run is gone: measure again
            rec = None
        if rec is not None and all(rec.get(k) is not None for k in require):
            return {**rec, "run_id": run_id, "cached": True}
    rec = measure()
    rec["device_key"] = device_key
    if not keep:
        return {**rec, "run_id": None, "cached": False}
    gap = f", launch gap {rec['launch_gap_us']:.3f} us" if rec.get("launch_gap_us") is not None else ""
    run_id = store.put_run("calibration", "system", "ok",
                           f"copy bandwidth {rec['bytes_per_s'] / 1e9:.1f} GB/s{gap} on {device_key}", rec,
                           device=device_key)
    store.cache_put(key, "calibration", run_id)
    return {**rec, "run_id": run_id, "cached": False}
