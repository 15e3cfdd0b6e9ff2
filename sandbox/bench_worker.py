"""A long-lived bench worker: `python -m kda.sandbox.bench_worker --role trusted|candidate --device cpu|cuda`.

One request per line on stdin, one JSON reply per line on a private copy of stdout (the
candidate's own prints go to stderr, so they can never forge or corrupt a reply).

Two roles, always in separate processes:
- `trusted` holds the definition's reference and the locked baseline. It times the baseline and
  is the checker: it regenerates inputs from the seeds, computes reference outputs and compares
  them with the outputs the candidate's worker wrote to files. Reference outputs never leave it.
- `candidate` imports the candidate, runs correctness trials on seeded inputs (outputs poisoned
  first), writes its outputs and its post-call inputs to a file, and times blocks of iterations.

The timer functions and the other functions the measurement relies on are captured before any
candidate code is imported; the worker times with the captured originals and reports any that
were replaced as TIMING_TAMPERED. An audit hook (which cannot be removed once installed) refuses
writes to protected paths and records them as SANDBOX_VIOLATION.
"""

from __future__ import annotations

# --- originals, captured before anything else can replace them ---------------------------------
import gc
import json
import os
import sys
import threading
import time
import traceback

_perf = time.perf_counter
_T_START = _perf()
_thread_time = time.thread_time
_os_write = os.write
_os_times = os.times
_json_dumps = json.dumps
_json_loads = json.loads

# Replies go to a private duplicate of fd 1; fd 1 itself becomes stderr for everything else.
_PROTO_FD = os.dup(1)
os.dup2(2, 1)

import argparse  # noqa: E402
import functools  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kda.sandbox import device_trace as DT  # noqa: E402
from kda.sandbox import exchange  # noqa: E402
from kda.sandbox import harness as H  # noqa: E402

WATCHED = [
    ("time", "perf_counter"), ("time", "perf_counter_ns"), ("time", "monotonic"), ("time", "time"),
    ("time", "thread_time"), ("os", "write"), ("os", "listdir"), ("json", "dumps"), ("json", "loads"),
    ("threading", "enumerate"), ("torch", "save"), ("torch", "load"), ("torch", "equal"), ("torch", "empty"),
    ("torch.Tensor", "copy_"), ("torch.Tensor", "clone"), ("torch.Tensor", "cpu"), ("torch.Tensor", "to"),
    ("torch.Tensor", "contiguous"), ("torch.Tensor", "zero_"), ("torch.Tensor", "fill_"),
    ("torch.Tensor", "normal_"), ("torch.Tensor", "random_"), ("torch.Tensor", "sum"),
    ("torch.cuda", "synchronize"), ("torch.cuda", "Event"), ("torch.cuda.Event", "record"),
    ("torch.cuda.Event", "elapsed_time"), ("torch.cuda.Event", "synchronize"), ("torch.cuda", "set_stream"),
    ("torch", "arange"), ("torch", "stack"), ("torch", "cat"), ("torch.Tensor", "view"), ("torch.Tensor", "reshape"),
    ("torch.Tensor", "tolist"), ("torch.Tensor", "detach"),
    ("torch.cuda", "current_stream"), ("kda.sandbox.exchange", "save"), ("kda.sandbox.exchange", "load"),
    *DT.GUARDED,
]


def _resolve(dotted: str, attr: str):
    obj = sys.modules.get(dotted.split(".")[0])
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part, None)
    return getattr(obj, attr, None)


_ORIGINALS = {f"{m}.{a}": _resolve(m, a) for m, a in WATCHED}
_save = exchange.save
_load = exchange.load
_cuda_sync = torch.cuda.synchronize
_Event = torch.cuda.Event
_ev_record = torch.cuda.Event.record
_ev_elapsed = torch.cuda.Event.elapsed_time
_set_stream = torch.cuda.set_stream


def _replaced() -> list[str]:
    return [k for k, v in _ORIGINALS.items() if _resolve(*k.rsplit(".", 1)) is not v]


def _int_view(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().view(-1)
    size = t.element_size()
    if t.dtype is torch.bool:
        return t.to(torch.int8)
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])


def _checksum(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Exact bit-pattern sums of the outputs, left on the device (no sync needed)."""
    return [H._sum(_int_view(o), dtype=torch.int64) for o in outs]  # the sum captured before import


class Alerts:
    """Integrity findings, reported with the next reply (and kept for the final record)."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.seen: set[str] = set()

    def add(self, status: str, check: str, evidence: str) -> None:
        key = f"{status}|{check}|{evidence}"
        if key not in self.seen:
            self.seen.add(key)
            self.items.append({"status": status, "check": check, "evidence": evidence})

    def drain(self) -> list[dict]:
        out, self.items = self.items, []
        return out


ALERTS = Alerts()
NOTES: list[str] = []


class _Guard:
    """Audit hook: refuses writes to protected paths; notes reads of the task definition and gc
    introspection. Installed just before the candidate is imported; it can never be removed."""

    WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                    "os.link", "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    SOURCE_READ_EVENTS = {"shutil.copyfile", "os.link", "os.symlink"}

    HOOK_EVENTS = {"sys.addaudithook": "an audit hook", "sys.setprofile": "a profile function",
                   "sys.settrace": "a trace function"}

    def __init__(self, protected: list[str], reference_files: list[str], candidate_dirs: list[str]):
        self.protected = [os.path.abspath(p) for p in protected]
        self.candidate_dirs = [os.path.realpath(d) for d in candidate_dirs]
        self.quiet = False  # set while the harness itself starts or stops the device tracer
        # The worker's own job dir (its cwd and HOME: caches such as Triton's live there) sits under
        # the workspace's .kda/ but belongs to the candidate.
        self.allowed = [os.path.abspath(os.getcwd())]
        self.reference_files = {os.path.abspath(p) for p in reference_files}
        self.busy = threading.local()

    def _hit(self, path) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        try:
            p = os.fspath(path)
            if isinstance(p, bytes):
                p = p.decode(errors="replace")
            cands = {os.path.abspath(p), os.path.realpath(p)}
        except Exception:
            return None
        for c in cands:
            # Plain loops, not any(): the candidate may have replaced builtins (reported separately).
            mine = False
            for ok in self.allowed:
                if c == ok or c.startswith(ok + os.sep):
                    mine = True
                    break
            if mine:
                continue
            for prot in self.protected:
                if c == prot or c.startswith(prot + os.sep):
                    return c
        return None

    def __call__(self, event: str, args: tuple) -> None:
        if getattr(self.busy, "on", False):
            return
        self.busy.on = True
        try:
            if event == "open":
                path, mode, flags = (list(args) + [None, None, None])[:3]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
                if writing:
                    hit = self._hit(path)
                    if hit:
                        ALERTS.add("SANDBOX_VIOLATION", "protected_write",
                                   f"the candidate tried to open {hit} for writing during the run (refused)")
                        raise PermissionError(f"kda sandbox: {hit} is protected during a run")
                elif not isinstance(path, int) and path is not None:
                    try:
                        p = os.path.abspath(os.fspath(path))
                    except Exception:
                        return
                    if p in self.reference_files:
                        NOTES.append(f"the candidate read {p} (the task definition with the reference code)")
            elif event in self.WRITE_EVENTS:
                # A copy or a link only writes its destination; a rename or a move changes both ends.
                for a in (args[1:2] if event in self.SOURCE_READ_EVENTS else args[:2]):
                    hit = self._hit(a) if isinstance(a, (str, bytes, os.PathLike)) else None
                    if hit:
                        ALERTS.add("SANDBOX_VIOLATION", "protected_write",
                                   f"the candidate tried {event} on {hit} during the run (refused)")
                        raise PermissionError(f"kda sandbox: {hit} is protected during a run")
            elif event in self.HOOK_EVENTS:
                if not self.quiet:
                    ALERTS.add("TIMING_TAMPERED", "hooks",
                               f"the candidate installed {self.HOOK_EVENTS[event]} ({event}): code of its own "
                               "that would run inside the harness's timing and checks")
                    if event == "sys.addaudithook":
                        raise RuntimeError("kda sandbox: no audit hooks during a run")  # the hook is not added
            elif event == "sys._getframe":
                frame = args[0] if args else None
                if frame is not None and _is_harness_file(frame.f_code.co_filename):
                    asker = sys._getframe(1).f_code.co_filename  # the code that called sys._getframe
                    if self._is_candidate_file(asker):
                        ALERTS.add("TIMING_TAMPERED", "introspection",
                                   f"the candidate read the harness's frame ({frame.f_code.co_name} in "
                                   f"{os.path.basename(frame.f_code.co_filename)}): its locals say which calls "
                                   "are timed and checked")
            elif event in ("gc.get_objects", "gc.get_referrers", "gc.get_referents"):
                msg = f"the candidate called {event} (heap introspection)"
                if msg not in NOTES:
                    NOTES.append(msg)
        finally:
            self.busy.on = False


    @functools.lru_cache(maxsize=4096)
    def _is_candidate_file(self, filename: str) -> bool:
        try:
            real = os.path.realpath(filename)
        except Exception:
            return False
        for d in self.candidate_dirs:
            if real == d or real.startswith(d + os.sep):
                return True
        return False


def _python_threads() -> dict[int, str]:
    """Every thread running Python code, by ident: threading's own and those started with _thread
    (which threading.enumerate() does not list), each described by where it is."""
    out = {t.ident: t.name for t in threading.enumerate() if t.ident is not None and t.is_alive()}
    for ident, frame in sys._current_frames().items():
        out.setdefault(ident, f"thread {ident} in {frame.f_code.co_name} "
                              f"({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})")
    return out


_SANDBOX_DIR = os.path.dirname(os.path.realpath(H.__file__))


@functools.lru_cache(maxsize=4096)
def _is_harness_file(filename: str) -> bool:
    return os.path.dirname(os.path.realpath(filename)) == _SANDBOX_DIR


_GUARD: list = []  # the one guard, once armed (the harness quiets it around its own tracer)


@contextmanager
def _own_hooks():
    """The harness starting or stopping its own device tracer is not the candidate's doing."""
    for g in _GUARD:
        g.quiet = True
    try:
        yield
    finally:
        for g in _GUARD:
            g.quiet = False


# --- the census of torch ops one call runs (to flag a torch fallback) -----------------------------
_NEUTRAL_OPS = ("empty", "empty_like", "empty_strided", "view", "reshape", "_reshape_alias", "as_strided",
                "contiguous", "clone", "copy_", "detach", "alias", "t", "transpose", "permute", "expand",
                "unsqueeze", "squeeze", "select", "slice", "stride", "size", "zeros", "zeros_like", "fill_",
                "zero_", "new_empty", "new_empty_strided", "_to_copy", "to", "lift_fresh", "split",
                "chunk", "unbind", "flatten", "unflatten", "narrow", "view_as", "resize_", "set_", "_unsafe_view",
                "is_contiguous", "sym_size", "sym_stride", "numel", "dim", "item", "_local_scalar_dense",
                "full", "ones", "ones_like", "full_like", "arange", "scalar_tensor", "new_zeros", "new_full")


def op_census(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: dict[str, int] = {}

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
            seen[name] = seen.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Census():
        fn()
    compute = {k: v for k, v in seen.items() if k.rstrip("_") not in _NEUTRAL_OPS and k not in _NEUTRAL_OPS}
    return compute


# --- worker state -----------------------------------------------------------------------------
class Slots:
    def __init__(self, workload: dict, inputs: list[list], outputs: list[list | None]):
        self.workload, self.inputs, self.outputs = workload, inputs, outputs
        self.seeds: list[int | None] = [None] * len(inputs)
        self.sums: list[list | None] = [None] * len(inputs)
        self.call_us: list[float] = []  # host launch times of the timed calls, for the hold


class Parts(dict):
    """Seconds spent in the named parts of one op (replied as `parts_s`: where a run's time goes)."""

    @contextmanager
    def __call__(self, name: str):
        t0 = _perf()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + _perf() - t0


class Worker:
    def __init__(self, role: str, device_spec: str):
        self.role = role
        self.device = H.device_of(device_spec)
        self.cuda = self.device.type == "cuda"
        self.definition: dict | None = None
        self.callee: H.Callee | None = None
        self.reference: H.Callee | None = None
        self.st_cache: H.SafetensorsCache | None = None
        self.slots: dict[str, Slots] = {}
        self.flusher: H.L2Flusher | None = None
        self.stream = None
        self.tids_before_import: set[int] = set()
        self.tids_after_import: set[int] = set()
        self.py_threads_before: set[int] = set()
        self.overhead_us = 0.0
        self.holder = None
        self.tracer = None
        self.timing_mode = "host clock" if device_spec == "cpu" else "events"
        self.staging = exchange.Staging(pinned=self.cuda)  # for results files (allocated on first use)
        self._warm()

    # -- setup
    def _warm(self) -> None:
        # Create torch's thread pools and the CUDA context now, so threads that exist after the
        # candidate is imported are the candidate's.
        t0 = _perf()
        self.startup = {"imports_s": t0 - _T_START}
        a = torch.randn(256, 256)
        (a @ a).sum().item()
        if self.cuda:
            torch.cuda.init()
            x = torch.randn(1024, 1024, device=self.device)
            (x @ x).sum().item()
            self.stream = torch.cuda.current_stream(self.device)
            self.flusher = H.L2Flusher(self.device)
            t1 = _perf()
            self.tracer, self.holder, self.timing_mode = self._make_timer()
            t2 = _perf()
            self.overhead_us = self._calibrate()
            self.startup.update(cuda_init_s=t1 - t0, timer_s=t2 - t1, calibrate_s=_perf() - t2)

    def _make_timer(self):
        """(tracer, holder, description): CUPTI device timestamps behind a spin-kernel hold when this
        torch has CUPTI and a traced test frame reads back as one call per frame; else events behind
        the all-SM Triton hold kernel; else bare events."""
        why = "no CUPTI in this torch build"
        if DT.Tracer.available():
            try:
                hold, tr = DT.SpinHold(self.device), DT.Tracer()
                spans = tr.spans_us(_probe_frames(tr, hold, self.device, 2), 2)
                if not all(n == 1 for _, n, _ in spans):
                    raise DT.TraceError(f"a traced test frame read back as {spans}")
                return tr, hold, ("CUPTI device span plus the device's launch gap, behind a spin-kernel hold "
                                  "(events as a cross-check)")
            except Exception as e:  # CUPTI present but unusable here: the events time the calls
                why = f"device trace unavailable: {type(e).__name__}: {str(e)[:200]}"
        holder, mode = self._triton_holder()
        return None, holder, f"{mode}; {why}"

    def _launch_gap(self) -> float:
        """The device's launch gap (`probe_launch_gap_us`). The orchestrator adds it to every span,
        once per call, so a latency is the time the call occupies the device in a stream, as Nsight
        Compute counts a kernel. Events need no such term: their frame already carries more than that."""
        return probe_launch_gap_us(self.tracer, self.holder, self.device)

    def _triton_holder(self):
        """The all-SM hold kernel, if it compiles and holds as long as asked; else time without it."""
        try:
            from kda.sandbox.hold_kernel import Holder

            h = Holder(self.device)
            h(20.0)  # compile
            s, e = _Event(enable_timing=True), _Event(enable_timing=True)
            _cuda_sync()
            _ev_record(s, self.stream)
            h(100.0)
            _ev_record(e, self.stream)
            _cuda_sync()
            took = _ev_elapsed(s, e) * 1e3
            if not 80.0 <= took <= 5000.0:
                return None, f"events only (hold kernel held {took:.1f} us for 100 us)"
            return h, "hold kernel + events"
        except Exception as e:  # no Triton / no inline asm on this GPU: launch overhead stays in
            return None, f"events only (hold kernel unavailable: {type(e).__name__}: {str(e)[:200]})"

    def _hold_us(self, call_us: list[float]) -> float:
        """Long enough for the host to launch the call behind the hold (from the calls so far)."""
        if not self.holder:
            return 0.0
        # A high percentile of recent launches, not the median: a hold shorter than the launch lets
        # the device start the call while the host still queues it, which puts launch gaps into the
        # timing and hides work the call leaves on another stream. (Not the maximum: one slow call
        # would stretch the next sixteen holds.)
        recent = sorted(call_us[-16:]) or [30.0]
        return min(5000.0, max(20.0, 1.5 * recent[(3 * len(recent)) // 4] + 10.0))

    def _calibrate(self) -> float:
        """Median of host-minus-event time (less the hold) for a trivial op: the fixed cost of the
        timing frame, against which a candidate's off-stream work shows."""
        t = torch.zeros(1, device=self.device)
        diffs = []
        for _ in range(60):
            s, e = _Event(enable_timing=True), _Event(enable_timing=True)
            hold = self._hold_us([5.0])
            h_ev = _Event(enable_timing=True) if hold else None
            _cuda_sync()
            h0 = _perf()
            if hold:
                _ev_record(h_ev, self.stream)
                self.holder(hold)
            _ev_record(s, self.stream)
            t.add_(1)
            _ev_record(e, self.stream)
            _cuda_sync()
            h1 = _perf()
            held_us = _ev_elapsed(h_ev, s) * 1e3 if hold else 0.0
            diffs.append((h1 - h0) * 1e6 - held_us - _ev_elapsed(s, e) * 1e3)
        diffs.sort()
        return diffs[len(diffs) // 2]

    def sync(self) -> None:
        if self.cuda:
            _cuda_sync()

    def env(self) -> dict:
        info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(self.device),
                "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0], "pid": os.getpid()}
        try:  # the installed version, without importing Triton into a worker that may not need it
            from importlib.metadata import version
            info["triton"] = version("triton")
        except Exception as e:  # triton is optional for python candidates
            info["triton"] = f"unavailable ({type(e).__name__})"
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            info.update(gpu_name=p.name, sm_count=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None),
                        total_memory=p.total_memory, capability=f"{p.major}.{p.minor}",
                        gpu_uuid=str(getattr(p, "uuid", "")), timing_overhead_us=round(self.overhead_us, 3),
                        timing_mode=self.timing_mode)
        info["startup_s"] = {k: round(v, 3) for k, v in self.startup.items()}
        return info

    def load(self, p: dict) -> dict:
        self.definition = _json_loads(Path(p["definition_file"]).read_text())
        self.st_cache = H.SafetensorsCache(p.get("safetensors_root"))
        if self.role == "trusted":
            self.reference = H.Callee(H.load_source_function(self.definition["reference"], "reference.py"),
                                      False, self.definition, "reference")
            base = p.get("baseline")
            if base and base.get("kind") == "solution":
                fn = H.load_entry(Path(base["dir"]), base["entry_point"], "kda_baseline", Path.cwd() / "build")
                self.callee = H.Callee(fn, bool(base["dps"]), self.definition, "baseline")
            else:
                self.callee = self.reference
            return {"loaded": self.callee.label}
        # candidate: snapshot threads, arm the guard, import
        self.py_threads_before = _python_threads()
        self.tids_before_import = H.os_thread_ids()
        guard = _Guard(p.get("protect", []), p.get("reference_files", []), [p["dir"], str(Path.cwd() / "build")])
        sys.addaudithook(guard)
        _GUARD.append(guard)
        t0 = _perf()
        fn = H.load_entry(Path(p["dir"]), p["entry_point"], "kda_candidate", Path.cwd() / "build")
        self.callee = H.Callee(fn, bool(p["dps"]), self.definition, "candidate")
        self.tids_after_import = H.os_thread_ids()
        self._check_integrity("import")
        return {"loaded": "candidate", "import_s": _perf() - t0,
                "threads": {"before_import": len(self.tids_before_import), "after_import": len(self.tids_after_import)}}

    def _check_integrity(self, when: str) -> None:
        for name in _replaced():
            ALERTS.add("TIMING_TAMPERED", "timer_identity",
                       f"{name} is no longer the original function ({when}); the harness keeps timing with "
                       "the originals it captured before importing the candidate")
        if self.role == "candidate":
            now = _python_threads()
            new_py = {i: d for i, d in now.items() if i not in self.py_threads_before}
            if new_py and when != "import":
                ALERTS.add("TIMING_TAMPERED", "threads",
                           f"{len(new_py)} Python thread(s) started by the candidate are alive after {when}: "
                           + ", ".join(sorted(new_py.values()))[:200])

    # -- workloads
    def prepare(self, p: dict) -> dict:
        wl = p["workload"]
        k = int(p.get("slots", 3))
        ins, outs = [], []
        for s in range(k):
            ins.append(H.make_inputs(self.definition, wl, H.mix_seed("slot", s), self.device, self.st_cache))
            outs.append(H.alloc_outputs(self.definition, wl, self.device, poison=False) if self.callee.dps else None)
        self.slots[p["key"]] = Slots(wl, ins, outs)
        self.sync()
        return {"slots": k}

    def release(self, p: dict) -> dict:
        self.slots.pop(p["key"], None)
        # The caching allocator keeps freed blocks for the next workload; it hands them back only
        # when they hold more than a quarter of the device (a full collection costs 20-50 ms).
        if self.cuda and torch.cuda.memory_reserved(self.device) > torch.cuda.get_device_properties(self.device).total_memory // 4:
            gc.collect()
            torch.cuda.empty_cache()
        return {}

    def _call(self, callee: H.Callee, wl: dict, inputs: list, outputs: list | None) -> list:
        if self.cuda:
            _set_stream(self.stream)
        return callee(wl, inputs, outputs, self.device)

    def trial(self, p: dict) -> dict:
        """Correctness trials (candidate): seeded inputs, poisoned outputs, results to a file."""
        wl = p["workload"]
        records, calls, census = [], [], None
        part = Parts()
        for i, seed in enumerate(p["seeds"]):
            with part("inputs"):
                inputs = H.make_inputs(self.definition, wl, int(seed), self.device, self.st_cache)
                outs = H.alloc_outputs(self.definition, wl, self.device, poison=True) if self.callee.dps else None
                self.sync()
            tids0 = H.os_thread_ids()
            t0, c0 = _perf(), _thread_time()
            try:
                if i == 0 and p.get("census"):
                    box: list = []
                    census = op_census(lambda: box.append(self._call(self.callee, wl, inputs, outs)))
                    result = box[0]
                else:
                    result = self._call(self.callee, wl, inputs, outs)
                self.sync()
            except Exception as e:
                return {"error": {"status": "RUNTIME_ERROR", "check": "call", "trial": i,
                                  "evidence": f"trial {i}: {type(e).__name__}: {str(e)[:600]}",
                                  "traceback": traceback.format_exc()[-4000:], "fatal": _is_fatal(e)}}
            part["call"] = part.get("call", 0.0) + _perf() - t0
            new_threads = len(H.new_threads(tids0))
            calls.append({"wall_ms": (_perf() - t0) * 1e3, "cpu_ms": (_thread_time() - c0) * 1e3,
                          "new_threads": new_threads})
            if new_threads and i > 0:  # the first call may start a JIT's or a library's helper threads
                ALERTS.add("TIMING_TAMPERED", "threads",
                           f"trial {i}: the call left {new_threads} new thread(s) running after it returned "
                           "(work finished after the call, outside any timer?)")
            # Outputs are copied now (a later trial's call may reuse the buffers this one returned);
            # inputs travel as digests the checker compares with the pristine inputs it regenerates.
            with part("copy"):
                records.append({
                    "outputs": [o.detach().clone() if isinstance(o, torch.Tensor) else o for o in result],
                    "inputs": [_json_dumps(H.input_digest(x)) for x in inputs],
                })
        with part("save"):
            _save(records, p["file"], self.staging)
        self._check_integrity("the correctness trials")
        return {"calls": calls, "census": census, "parts_s": part}

    def check(self, p: dict) -> dict:
        """Trusted: compare a file of candidate results against the reference for the same seeds."""
        part = Parts()
        out = self._check(p, part)
        out["parts_s"] = part
        return out

    def _check(self, p: dict, part: Parts) -> dict:
        wl = p["workload"]
        try:
            with part("load"):
                recs = _load(p["file"], self.staging, threads=4)
        except Exception as e:
            return {"status": "RUNTIME_ERROR", "check": "results_file",
                    "evidence": f"the candidate's results file could not be read: {type(e).__name__}: {str(e)[:300]}"}
        seeds = p["seeds"]
        if not isinstance(recs, list) or len(recs) != len(seeds):
            return {"status": "RUNTIME_ERROR", "check": "results_file",
                    "evidence": f"the results file holds {len(recs) if isinstance(recs, list) else '?'} records, "
                                f"expected {len(seeds)}"}
        names = list(self.definition["outputs"])
        in_names = list(self.definition["inputs"])
        worst = {"status": "PASSED", "check": None, "evidence": "", "max_abs": 0.0, "max_rel": 0.0,
                 "matched_ratio": 1.0}
        for i, (seed, rec) in enumerate(zip(seeds, recs)):
            with part("inputs"):
                pristine = H.make_inputs(self.definition, wl, int(seed), self.device, self.st_cache)
            with part("reference"):
                ref = self._call(self.reference, wl, [x.clone() if isinstance(x, torch.Tensor) else x for x in pristine],
                                 None)
            label = p.get("label", "trial") + f" {i}"
            if p.get("inputs", True):
                got_inputs = rec.get("inputs", [])
                with part("compare"):
                    for name, got, want in zip(in_names, got_inputs, pristine):
                        try:
                            got = _json_loads(got)
                        except (TypeError, ValueError):
                            got = None
                        bad = H.compare_input_digest(name, got, want)
                        if bad:
                            return {"status": "INPUT_MUTATED", "check": "input_mutation", "trial": i,
                                    "evidence": f"{label}: {bad['evidence']}"}
            outs = rec.get("outputs", [])
            if len(outs) != len(names):
                return {"status": "INCORRECT_SHAPE", "check": "outputs", "trial": i,
                        "evidence": f"{label}: {len(outs)} outputs, the definition has {len(names)}"}
            for name, got, want in zip(names, outs, ref):
                with part("compare"):
                    r = H.compare_output(name, got, want, p["atol"], p["rtol"], p["ratio"])
                for k in ("max_abs", "max_rel"):
                    if k in r and r[k] == r[k]:
                        worst[k] = max(worst[k], r[k])
                if "matched_ratio" in r:
                    worst["matched_ratio"] = min(worst["matched_ratio"], r["matched_ratio"])
                if not r["ok"]:
                    return {**{k: v for k, v in r.items() if k != "ok"}, "trial": i,
                            "evidence": f"{label}: {r['evidence']}"}
        return worst

    # -- timing
    def time_block(self, p: dict) -> dict:
        """Time one block: after warm-up, iterate until `target_s` of timed work and `min_iters`
        (at most `max_iters`; `max_s` caps a very slow callable). Each iteration redraws a slot's
        random inputs from a fresh seed, flushes L2, synchronizes the device, then times: the
        call's device span from the CUPTI trace when there is a tracer (see device_trace), its
        event time always (the cross-check, or the timer when there is no tracer)."""
        sl = self.slots[p["key"]]
        tids_block0 = H.os_thread_ids()
        start_block = _perf()
        tracer = self.tracer
        if tracer is not None:
            with _own_hooks():
                tracer.start()
        try:
            j, ev, host, covers, warm, left_threads = self._time_loop(p, sl, start_block, tracer is not None)
        except BaseException:
            if tracer is not None:
                tracer.abandon()
            raise
        lat = ev
        trace_info, trace_s = None, 0.0
        if tracer is not None:
            t0 = _perf()
            try:
                with _own_hooks():
                    stopped = tracer.stop()
                spans = tracer.spans_us(stopped, j)
                timed = spans[len(warm):]
                lat = [sp for sp, _, _ in timed]
                trace_info = {"max_streams": max((ns for _, _, ns in spans), default=0),
                              "empty_calls": sum(1 for _, n, _ in timed if n == 0)}
            except DT.TraceError as e:
                tracer.abandon()
                if self.role != "candidate":
                    raise
                ALERTS.add("TIMING_TAMPERED", "device_trace", f"{e}: the device trace was tampered with")
            trace_s = _perf() - t0
        self.sync()
        if left_threads and self.role == "candidate":
            ALERTS.add("TIMING_TAMPERED", "threads",
                       f"a timed call left {left_threads} new thread(s) running after it returned "
                       "(work finished after the timer stopped?)")
        grown = H.new_threads(tids_block0)
        if grown and self.role == "candidate":
            ALERTS.add("TIMING_TAMPERED", "threads",
                       f"the process had {len(tids_block0)} threads before the timed block and "
                       f"{len(tids_block0) + len(grown)} after it")
        if self.role == "candidate":
            self._check_integrity("the timed block")
        return {"lat_us": lat, "ev_us": ev, "host_us": host, "covered": covers, "warmup": warm,
                "overhead_us": self.overhead_us, "block_s": _perf() - start_block, "trace_s": trace_s,
                "trace": trace_info, "threads": len(H.os_thread_ids())}

    def _time_loop(self, p: dict, sl: Slots, start_block: float, traced: bool):
        """The iterations of one block: (iterations run, event times of the timed ones, their host
        times, whether the hold covered each one's launch, the warm-up calls' wall and idle times,
        the most threads a call left behind)."""
        wl, k = sl.workload, len(sl.inputs)
        n_warm = int(p["warmup"])
        min_iters, max_iters = int(p.get("min_iters", 1)), int(p.get("max_iters", 1000))
        target_s, max_s = float(p.get("target_s", 0.0)), float(p.get("max_s", 30.0))
        flush = bool(p.get("flush", True)) and self.flusher is not None
        ev: list[float] = []
        host: list[float] = []
        covers: list[bool] = []
        warm: list[dict] = []
        left_threads = 0
        # Launch times persist across a workload's blocks, so a block's first hold is already right.
        call_us = sl.call_us
        # The rotation over the sets continues from block to block: the orchestrator counts the
        # calls and says where this block starts (it picks the set whose output gets checked).
        first = int(p.get("first", 0))
        observe = getattr(self.holder, "observe", None)
        timed_start = None
        j = 0
        while True:
            if j >= n_warm:
                if timed_start is None:
                    timed_start = _perf()
                n = len(ev)
                spent = _perf() - timed_start
                if n >= max_iters or (n >= min_iters and spent >= target_s) or (n >= 1 and _perf() - start_block > max_s):
                    break
            slot = (first + j) % k
            seed = H.mix_seed(p["seed"], j)
            H.refill_inputs_(self.definition, wl, sl.inputs[slot], seed)
            if flush:
                self.flusher()
            self.sync()
            tids0 = H.os_thread_ids()
            c0 = _thread_time()
            ch0 = _os_times()
            if self.cuda:
                s_ev, e_ev = _Event(enable_timing=True), _Event(enable_timing=True)
                hold = self._hold_us(call_us)
                h_ev = _Event(enable_timing=True) if hold else None
                _set_stream(self.stream)
                h0 = _perf()
                if hold:
                    _ev_record(h_ev, self.stream)
                    self.holder(hold)
                _ev_record(s_ev, self.stream)
                c_start = _perf()
                # The stream is set above: nothing but the call between the start event and the launch.
                res = self.callee(wl, sl.inputs[slot], sl.outputs[slot], self.device)
                t_ret = _perf()
                call_us.append((t_ret - c_start) * 1e6)
                _ev_record(e_ev, self.stream)
                _cuda_sync()
                h_end = _perf()
                if traced:
                    self.holder.mark()  # after the sync: every stream's work of this call is done
                # Host time of the frame less the hold as the device ran it (not as asked: the
                # hold kernel may overrun), so what is left beyond the events is off-stream work.
                held_us = _ev_elapsed(h_ev, s_ev) * 1e3 if hold else 0.0
                # The hold covered the launch when the host had queued the whole call (and the hold
                # and the start event before it) before the hold ended; h_ev fired at about h0.
                covered = bool(hold) and held_us >= (t_ret - h0) * 1e6
                if hold and observe is not None:
                    observe(held_us)
                h1 = h_end - held_us * 1e-6
                ev_us = _ev_elapsed(s_ev, e_ev) * 1e3
            else:
                h0 = _perf()
                res = self._call(self.callee, wl, sl.inputs[slot], sl.outputs[slot])
                h1 = _perf()
                ev_us = (h1 - h0) * 1e6
                covered = False
            # Untimed: what the call left behind.
            new = H.new_threads(tids0)
            sl.sums[slot] = _checksum(res)
            if not self.callee.dps:
                sl.outputs[slot] = res
            sl.seeds[slot] = seed
            if new:
                left_threads = max(left_threads, len(new))
            if j < n_warm:
                ch1 = _os_times()
                cpu = (_thread_time() - c0) + (ch1.children_user + ch1.children_system
                                               - ch0.children_user - ch0.children_system)
                warm.append({"wall_ms": (h1 - h0) * 1e3, "idle_ms": max(0.0, (h1 - h0) - cpu) * 1e3})
            else:
                ev.append(ev_us)
                host.append((h1 - h0) * 1e6)
                covers.append(covered)
            j += 1
        return j, ev, host, covers, warm, left_threads

    def save_slot(self, p: dict) -> dict:
        sl = self.slots[p["key"]]
        s = int(p["slot"])
        outs = sl.outputs[s]
        if outs is None or sl.seeds[s] is None:
            return {"error": {"status": "RUNTIME_ERROR", "check": "timed_outputs",
                              "evidence": f"slot {s} holds no output of a timed iteration"}}
        self.sync()
        now = _checksum(outs)
        changed = [i for i, (a, b) in enumerate(zip(now, sl.sums[s] or [])) if not torch.equal(a, b)]
        _save([{"outputs": list(outs)}], p["file"], self.staging)
        if changed and self.role == "candidate":
            ALERTS.add("TIMING_TAMPERED", "late_writes",
                       f"output(s) {changed} of a timed iteration changed after the call returned and the device "
                       "was synchronized: work was finished outside the timed region")
        return {"seed": sl.seeds[s]}

    def calibrate(self, p: dict) -> dict:
        """The device's figures, measured once per device: copy bandwidth (bytes read + written per
        second, best of a few large copies) and, where CUPTI times the calls, the launch gap
        (`parts` names a subset: "bandwidth", "launch_gap")."""
        parts = p.get("parts", ["bandwidth", "launch_gap"])
        out = self._bandwidth(p) if "bandwidth" in parts else {}
        if "launch_gap" not in parts:
            return out
        if self.tracer is not None:
            try:
                out["launch_gap_us"] = self._launch_gap()
            except Exception as e:  # the run times spans alone and says why; the next run retries
                out["launch_gap_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return out

    def _bandwidth(self, p: dict) -> dict:
        if self.cuda:
            n = int(p.get("bytes", 1 << 30))
            a = torch.empty(n // 4, dtype=torch.float32, device=self.device).fill_(1.0)
            b = torch.empty_like(a)
            best = float("inf")
            for _ in range(int(p.get("reps", 10))):
                s, e = _Event(enable_timing=True), _Event(enable_timing=True)
                _ev_record(s, self.stream)
                b.copy_(a)
                _ev_record(e, self.stream)
                _cuda_sync()
                best = min(best, _ev_elapsed(s, e) / 1e3)
            return {"bytes_per_s": 2 * n / best, "method": f"torch copy_ of {n >> 20} MiB on {torch.cuda.get_device_name()}"}
        n = int(p.get("bytes", 1 << 27))
        a = torch.ones(n // 4, dtype=torch.float32)
        b = torch.empty_like(a)
        best = float("inf")
        for _ in range(int(p.get("reps", 3))):
            t0 = _perf()
            b.copy_(a)
            best = min(best, _perf() - t0)
        return {"bytes_per_s": 2 * n / best, "method": f"torch copy_ of {n >> 20} MiB on CPU"}


def _probe_frames(tracer: DT.Tracer, hold: DT.SpinHold, device: torch.device, frames: int) -> list[DT.Activity]:
    """The trace of `frames` frames of a hold, a one-element add queued behind it, and the marker."""
    probe = torch.zeros(1, device=device)
    tracer.start()
    try:
        for _ in range(frames):
            hold(20.0)  # far longer than the host takes to queue the add behind it
            probe.add_(1)
            _cuda_sync()
            hold.mark()
        return tracer.stop()
    finally:
        tracer.abandon()  # after a failure; a no-op once stopped


def probe_launch_gap_us(tracer: DT.Tracer, hold: DT.SpinHold, device: torch.device, frames: int = 200) -> float:
    """The device's launch gap (see `Tracer.launch_gaps_us`): the middle mean over `frames` frames
    of a hold and a one-element add queued behind it, the first frame left out (it wakes the clocks)."""
    return DT.middle_mean(DT.Tracer.launch_gaps_us(_probe_frames(tracer, hold, device, frames))[1:])


def _is_fatal(e: BaseException) -> bool:
    """A CUDA error is sticky: the context is unusable afterwards and the worker must restart."""
    msg = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) is False and (
        "CUDA error" in msg or "illegal memory access" in msg or "device-side assert" in msg
        or "CUDA_ERROR" in msg or "unspecified launch failure" in msg)


def _reply(obj: dict) -> None:
    data = (_json_dumps(obj, default=_jsonable) + "\n").encode()
    view = memoryview(data)
    while view:
        n = _os_write(_PROTO_FD, view)
        view = view[n:]


def _jsonable(o):
    if isinstance(o, float):
        return o
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _identity_watch():
    """A check, built before any candidate code runs, that everything the measurement calls is
    still what it was: this module's functions, classes and objects and their methods, the other
    sandbox modules' and the builtins. The candidate shares this interpreter, so rebinding any of
    them (the saved timer, the output saver, ALERTS.add, harness.input_digest, builtins.any) would
    change what the harness measures or reports. It lives in main()'s locals, not in a global.
    Library functions (time.perf_counter, torch.Tensor.copy_ ...) are WATCHED's, by attribute lookup:
    most of torch's are not in any one class's vars()."""
    import builtins
    import types

    me = sys.modules[__name__]
    spaces = {"": me, "harness.": H, "exchange.": exchange, "device_trace.": DT, "builtins.": builtins}
    for cls in (Worker, Alerts, _Guard, Slots, Parts, H.Callee):
        spaces[f"{cls.__qualname__}."] = cls
    objects = (ALERTS, NOTES, _ORIGINALS, _GUARD)
    snap = [(label + name, ns, name, v) for label, ns in spaces.items() for name, v in list(vars(ns).items())
            if callable(v) or isinstance(v, types.ModuleType) or any(v is o for o in objects)]
    alerts, alerts_fields = ALERTS, set(vars(ALERTS))
    missing = object()

    def changed() -> list[str]:
        moved = [label for label, ns, name, v in snap if vars(ns).get(name, missing) is not v]
        if set(vars(alerts)) != alerts_fields:
            moved.append("ALERTS (an attribute set on the instance)")
        return moved

    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["trusted", "candidate"], required=True)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    try:
        w = Worker(a.role, a.device)
        _reply({"id": 0, "ok": True, "ready": True, "env": w.env()})
    except Exception as e:
        _reply({"id": 0, "ok": False, "error": {"status": "RUNTIME_ERROR", "check": "worker_start",
                                                "evidence": f"{type(e).__name__}: {e}",
                                                "traceback": traceback.format_exc()[-4000:]}})
        return 1
    ops = {"env": lambda p: w.env(), "load": w.load, "prepare": w.prepare, "release": w.release,
           "trial": w.trial, "check": w.check, "time": w.time_block, "save_slot": w.save_slot,
           "calibrate": w.calibrate, "sync": lambda p: (w.sync(), w._check_integrity("the baseline's turn"))[1] or {}}
    identity_changed = _identity_watch() if a.role == "candidate" else (lambda: [])
    alerts, drain, reported = ALERTS, Alerts.drain, set()
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            return 0
        try:
            req = _json_loads(line)
        except ValueError:
            continue
        rid, op = req.get("id"), req.get("op")
        if op == "exit":
            _reply({"id": rid, "ok": True})
            return 0
        t_op = _perf()
        try:
            if op not in ops:
                raise ValueError(f"unknown op {op!r}")
            out = ops[op](req) or {}
            err = out.pop("error", None) if isinstance(out, dict) else None
            rep = {"id": rid, "ok": err is None, **out}
            if err:
                rep["error"] = err
        except Exception as e:
            stage = "load" if op == "load" else op
            status = "COMPILE_ERROR" if op == "load" else "RUNTIME_ERROR"
            rep = {"id": rid, "ok": False, "error": {"status": status, "check": stage,
                                                     "evidence": f"{type(e).__name__}: {str(e)[:800]}",
                                                     "traceback": traceback.format_exc()[-4000:],
                                                     "fatal": _is_fatal(e)}}
        rep["op_s"] = _perf() - t_op
        rep["alerts"] = drain(alerts)
        moved = [m for m in identity_changed() if m not in reported]
        if moved:
            reported.update(moved)
            rep["alerts"].append({"status": "TIMING_TAMPERED", "check": "harness_identity",
                                  "evidence": f"the candidate replaced what the harness runs on: "
                                              f"{', '.join(moved[:8])}{' ...' if len(moved) > 8 else ''}"})
        if NOTES:
            rep["notes"] = list(NOTES)
            NOTES.clear()
        _reply(rep)


if __name__ == "__main__":
    sys.exit(main())
