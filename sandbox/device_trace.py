"""Device-side time of each timed call, from CUPTI activity records (through torch's Kineto profiler).

CUDA events time what runs between them on one stream, plus the event frame itself: about a
microsecond, which is a third of a 3 us kernel. CUPTI's records carry the GPU's own start and end
timestamps for every kernel, copy and memset the process runs, on every stream, which is what
Nsight Compute's `gpu__time_duration` and Nsight Systems report. The bench worker brackets each
timed call with two of torch's spin kernels (`torch.cuda._sleep`): a hold just before it, long
enough for the host to queue the whole call behind it, and a one-cycle marker launched after the
device has been synchronized. The call's device time is the span from the first activity that
starts after the hold begins to the last end among activities that start before the marker: work
on side streams is inside the span, never outside it.

Imported only by the GPU bench worker; `Tracer.available()` says whether this torch build has
CUPTI (CPU builds do not), and the worker falls back to events when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler import profile as _Profile

# Captured before any candidate code runs; the worker checks they are still the originals.
_enter, _exit = _Profile.__enter__, _Profile.__exit__
_spin = getattr(torch.cuda, "_sleep", None)

GUARDED = [
    ("torch.autograd.profiler", "_enable_profiler"), ("torch.autograd.profiler", "_disable_profiler"),
    ("torch.autograd.profiler", "_prepare_profiler"), ("torch.autograd.profiler.profile", "__enter__"),
    ("torch.autograd.profiler.profile", "__exit__"), ("torch.cuda", "_sleep"),
]
SPIN = "spin_kernel"  # torch's kernel behind torch.cuda._sleep
DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")


class TraceError(RuntimeError):
    """The trace does not hold one hold and one marker per iteration: someone else toggled it."""


class SpinHold:
    """The hold and the marker: torch's spin kernel for a number of SM clock cycles."""

    def __init__(self, device: torch.device):
        if _spin is None:
            raise TraceError("this torch has no torch.cuda._sleep")
        # The spin counts SM clock cycles, and the clock moves (an idle GPU starts slow). A rate
        # measured below the clock the timed calls run at would make every hold too short, so
        # the rate is the fastest ever seen: measured after a spin that wakes the clock up, and
        # raised by every hold the timing loop observes (`observe`).
        self.cycles_per_us = 1.0
        self.last_cycles = 0
        _spin(20_000_000)
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            _spin(2_000_000)
            e.record()
            e.synchronize()
            self.cycles_per_us = max(self.cycles_per_us, 2_000_000 / max(1.0, s.elapsed_time(e) * 1e3))

    def __call__(self, us: float) -> None:
        self.last_cycles = int(us * self.cycles_per_us)
        _spin(self.last_cycles)

    def observe(self, held_us: float) -> None:
        """The last hold took `held_us` on the device: a faster clock than assumed raises the rate."""
        if held_us > 10.0:
            self.cycles_per_us = max(self.cycles_per_us, self.last_cycles / held_us)

    def mark(self) -> None:
        _spin(1)


@dataclass(frozen=True)
class Activity:
    name: str
    start_ns: int
    end_ns: int
    stream: int


def middle_mean(xs: list[float]) -> float:
    """Mean of the middle half (the interquartile mean): robust like a median, yet it moves
    smoothly when the samples sit on a coarse grid (timestamps step in tens of ns here), where a
    median jumps from step to step."""
    v = sorted(xs)
    if not v:
        raise TraceError("no samples to average")
    q = len(v) // 4
    mid = v[q:len(v) - q]
    return sum(mid) / len(mid)


class Tracer:
    def __init__(self) -> None:
        self._prof = None

    @staticmethod
    def available() -> bool:
        try:
            return torch.profiler.ProfilerActivity.CUDA in torch.autograd._supported_activities()
        except Exception:  # a torch build without the profiler bindings
            return False

    def start(self) -> None:
        self._prof = _Profile(use_cpu=False, use_device="cuda", use_kineto=True)
        _enter(self._prof)

    def stop(self) -> list[Activity]:
        prof, self._prof = self._prof, None
        if prof is None:
            raise TraceError("the device trace was not running")
        _exit(prof, None, None, None)
        out = []
        for e in prof.kineto_results.events():
            if e.device_type() != DeviceType.CUDA:
                continue
            kind = str(e.activity_type()).lower() if hasattr(e, "activity_type") else ""
            if kind and not any(k in kind for k in DEVICE_ACTIVITIES):
                continue  # annotations mirrored onto the GPU timeline, not work
            if not kind and getattr(e, "is_user_annotation", lambda: False)():
                continue
            out.append(Activity(e.name(), int(e.start_ns()), int(e.start_ns() + e.duration_ns()),
                                int(e.device_resource_id())))
        out.sort(key=lambda a: a.start_ns)
        return out

    def abandon(self) -> None:
        """Stop after a failed block; the records are dropped."""
        if self._prof is not None:
            try:
                _exit(self._prof, None, None, None)
            except Exception:  # the block already failed; its error is the one to report
                pass
            self._prof = None

    @staticmethod
    def launch_gaps_us(acts: list[Activity]) -> list[float]:
        """Per hold: from its end to the start of the first work queued behind it (us). With the
        work queued long before the hold ends, this is the device's own launch gap: the time a
        kernel waiting in a stream occupies the device before its first instruction, which the
        kernel's span leaves out and Nsight Compute's `gpu__time_duration` counts."""
        out = []
        for h, _, work in _frames(acts):
            first = min((w.start_ns for w in work if w.start_ns >= h.end_ns), default=None)
            if first is not None:  # a frame with no work has no gap
                out.append((first - h.end_ns) / 1e3)
        return out

    def spans_us(self, acts: list[Activity], n: int) -> list[tuple[float, int, int]]:
        """Per iteration: (device span in us, activities, distinct streams) of what ran between the
        iteration's hold and its marker. Raises TraceError unless there are exactly `n` of each."""
        spins = sum(1 for a in acts if SPIN in a.name)
        if spins != 2 * n:
            raise TraceError(f"the device trace holds {spins} spin kernels for {n} timed iterations, "
                             f"expected {2 * n} (another profiler session, or the call ran torch.cuda._sleep)")
        out = []
        for h, m, work in _frames(acts):
            if m.start_ns < h.end_ns:
                raise TraceError("a marker kernel started before its hold kernel ended")
            if work:
                out.append(((max(a.end_ns for a in work) - work[0].start_ns) / 1e3, len(work),
                            len({a.stream for a in work})))
            else:
                out.append((0.0, 0, 0))
        return out


def _frames(acts: list[Activity]) -> Iterator[tuple[Activity, Activity, list[Activity]]]:
    """Per frame of a sorted trace: its hold, its marker, and the work that started between the
    hold's start and the marker's (on any stream)."""
    spins = [a for a in acts if SPIN in a.name]
    work = [a for a in acts if SPIN not in a.name]
    j = 0
    for h, m in zip(spins[0::2], spins[1::2]):
        while j < len(work) and work[j].start_ns < h.start_ns:
            j += 1
        k = j
        while k < len(work) and work[k].start_ns < m.start_ns:
            k += 1
        yield h, m, work[j:k]
        j = k
