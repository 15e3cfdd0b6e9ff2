"""The benchmark orchestration: correctness and timing of a candidate against the locked baseline.

Two sandboxed worker processes per run (`kda.sandbox.bench_worker`):
- the trusted worker holds the definition's reference and the locked baseline; it times the
  baseline and checks the candidate's results (reference outputs never leave it);
- the candidate's worker imports the candidate and never shares a process with the reference.

Per run: both workers start; the baseline is timed alone ("clean") on every selected workload
before the candidate is imported; then per workload: correctness trials on inputs drawn from
seeds mixed with a per-run secret (outputs poisoned; the outputs and digests of the post-call
inputs go to a file the trusted worker checks), then timing in blocks that alternate baseline and
candidate (B C C B ...), each iteration on freshly drawn inputs rotated over several buffers, L2
flushed, device synchronized, the call timed by CUPTI device timestamps where torch has them (its
span on every stream plus the device's launch gap, which Nsight Compute counts too; CUDA events
otherwise, and always as a cross-check); the outputs of one timed iteration are checked after
every candidate block. Medians with bootstrap intervals, speedups against the locked baseline,
the physical floor, the interference check (a baseline markedly slower beside the candidate than
alone is, under bubblewrap, timed alone once more after the candidate's processes have exited: it
is drift, not interference, only if it is demonstrably slower alone too), the lock re-checked at
the end. `phases_s` in the record says where the run's wall time went.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import floor as floor_mod
from . import kernel_cache
from .bench_workers import (RunDirs, WorkerClient, WorkerFailure, WorkerPair, pair_key, spares, start_worker,
                            trusted_language)
from .candidate import Candidate, record_candidate, resolve_candidate
from .errors import BadInput, KdaError, LockMismatch, NotAvailable
from .jobs import CancelToken, Lease, executor
from .store import new_id
from .workspace import Workspace

SUPPORTED_LANGUAGES = ("python", "triton", "cpp", "cuda")
# flashinfer-bench's EvaluationStatus values and ours, most severe first: the run's status is the
# most severe of its workloads'.
SEVERITY = ("SANDBOX_VIOLATION", "TIMING_TAMPERED", "BELOW_PHYSICAL_FLOOR", "INPUT_MUTATED", "COMPILE_ERROR",
            "RUNTIME_ERROR", "TIMEOUT", "INCORRECT_SHAPE", "INCORRECT_DTYPE", "INCORRECT_NUMERICAL", "PASSED")
MAX_RESTARTS = 2
# Before the baseline is timed alone a second time: how long the candidate's killed processes may
# take to exit, and a pause after, so a device clock it drove up or down settles.
EXIT_WAIT_S = 10.0
SETTLE_S = 0.5
# The launch gap is the process's, not the kernel's: fresh processes on one H100 read 0.98 to
# 1.19 us, each steady within itself (benchmarks/README.md, second run). The device's figure is the
# median over this many fresh trusted processes, so a workspace does not inherit one draw.
GAP_PROCESSES = 3
# Input sets a workload's timed iterations rotate over. Where the buffers lie in device memory
# moves a kernel's time: on an H200 (2026-11-30, benchmarks/timing_state.py) the median of one
# set differed from the next by up to 1.3% at 33-56 us and 5.7% at ~2 us, two to three times
# its own pass-to-pass spread. A GPU run therefore rotates over as many sets as fit the budget,
# so its median averages many placements; on the CPU three sets keep caches from helping.
MIN_SETS, MAX_SETS = 3, 32
GPU_SETS_BYTES = 2 << 30


def input_sets(definition: dict[str, Any], workload: dict[str, Any], device: str) -> int:
    """How many independent input sets (with their outputs) one worker keeps for timing."""
    if device == "cpu":
        return MIN_SETS
    per_set = max(1, floor_mod.min_bytes(definition, workload))
    return max(MIN_SETS, min(MAX_SETS, GPU_SETS_BYTES // per_set))


@dataclass(frozen=True)
class Settings:
    trials: int
    warmup: int
    target_s: float
    min_iters: int
    max_iters: int
    rounds: int


def settings_for(mode: str, device: str, min_trials: int) -> Settings:
    gpu = device != "cpu"
    if mode == "quick":
        return (Settings(min_trials, 10, 0.015, 20, 5000, 1) if gpu else Settings(min_trials, 2, 0.03, 5, 60, 1))
    return (Settings(max(min_trials, 5), 25, 0.15, 50, 20000, 2) if gpu
            else Settings(max(min_trials, 5), 3, 0.12, 10, 400, 2))


def set_to_check(before: int, warmup: int, timed: int, sets: int, rng: random.Random) -> int:
    """The input set whose output is checked after a candidate block. The worker rotates over
    `sets` sets call after call across blocks: `before` calls before this block, then its `warmup`
    and `timed` calls. Drawn among the sets whose last call was one of this block's timed calls
    (so the output checked is a timed one) and had been called before (so a cache keyed on the
    buffers would have answered it); among this block's timed sets when none had."""
    start = before + warmup
    last_timed = {(start + m) % sets for m in range(max(0, timed - sets), timed)}
    total = start + timed
    calls_of = [total // sets + (i < total % sets) for i in range(sets)]
    pool = sorted(i for i in last_timed if calls_of[i] >= 2) or sorted(last_timed) or [(total - 1) % sets]
    return rng.choice(pool)


# --- request ---------------------------------------------------------------------------------------
@dataclass
class BenchRequest:
    ws: Workspace
    candidate: Candidate
    workloads: list[dict[str, Any]]
    selection: str
    mode: str
    role: str
    kind: str = "benchmark"  # or "verify" (the reviewer's own integrity run)


def _var_axes(definition: dict[str, Any]) -> list[str]:
    return [k for k, a in definition["axes"].items() if a.get("type") == "var"]


def select_workloads(definition: dict[str, Any], workloads: list[dict[str, Any]], spec: str | list[str]
                     ) -> tuple[list[dict[str, Any]], str]:
    """`all`, a list of uuids, or `sample:N` (N spread evenly over the workloads ordered by their
    var axes, so the smallest and the largest are always in)."""
    if isinstance(spec, list):
        by_id = {w["uuid"]: w for w in workloads}
        unknown = [u for u in spec if u not in by_id]
        if unknown:
            raise BadInput(f"unknown workload uuid(s) {unknown[:5]}; see task_info for the list")
        if not spec:
            raise BadInput("workloads: the list of uuids is empty")
        repeated = [u for u in dict.fromkeys(spec) if spec.count(u) > 1]
        if repeated:
            raise BadInput(f"workloads: uuid(s) listed more than once: {repeated[:5]}; list each once")
        return [by_id[u] for u in spec], f"{len(spec)} listed"
    s = spec.strip()
    if s == "all":
        return list(workloads), "all"
    if s.startswith("sample:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            raise BadInput(f"workloads {spec!r}: expected sample:N with N a positive integer") from None
        if n < 1:
            raise BadInput(f"workloads {spec!r}: N must be at least 1")
        axes = _var_axes(definition)
        ordered = sorted(workloads, key=lambda w: (floor_mod.min_bytes(definition, w),
                                                   tuple(w.get("axes", {}).get(a, 0) for a in axes)))
        if n >= len(ordered):
            return ordered, f"sample:{n} (all {len(ordered)})"
        if n == 1:
            idx = [len(ordered) // 2]
        else:
            idx = sorted({round(i * (len(ordered) - 1) / (n - 1)) for i in range(n)})
        return [ordered[i] for i in idx], f"sample:{n}"
    raise BadInput(f"workloads {spec!r}: use 'all', 'sample:N' or a list of workload uuids")


def check_runnable(what: str, language: str, binding: str | None) -> None:
    """Refuse, with the reason, a candidate or baseline this machine cannot build and run."""
    if language not in SUPPORTED_LANGUAGES:
        raise NotAvailable(f"{what}: language {language!r} cannot be benchmarked; supported: "
                           f"{', '.join(SUPPORTED_LANGUAGES)}")
    if language in ("cpp", "cuda") and binding != "torch":
        raise NotAvailable(f"{what}: {language} is built as a torch extension (flashinfer-bench's torch binding): "
                           f"set binding = \"torch\" in candidate.toml and bind the entry with PYBIND11_MODULE "
                           f"(binding {binding!r} is not supported)")
    if language == "cuda" and not executor().has_gpu:
        raise NotAvailable(f"{what}: a cuda candidate needs a CUDA GPU and this machine has none "
                           "(cpp, python and triton candidates run on the CPU)")


def benchmarkable_candidate(ws: Workspace, path: str | None, candidate: str | None) -> Candidate:
    cand = resolve_candidate(ws, path, candidate)
    check_runnable(cand.path, cand.spec.language, cand.spec.binding)
    return cand


def prepare(ws: Workspace, path: str | None, candidate: str | None, workloads: str | list[str], mode: str,
            role: str, kind: str = "benchmark") -> BenchRequest:
    """Validate everything that can be validated before any process starts (nothing is written)."""
    if mode not in ("quick", "full"):
        raise BadInput(f"mode {mode!r}: use 'quick' or 'full'")
    cand = benchmarkable_candidate(ws, path, candidate)
    chosen, label = select_workloads(ws.definition(), ws.workloads(), workloads)
    base = ws.baseline_solution()
    if base is not None:
        check_runnable(f"the locked baseline {base['name']!r}", base["spec"]["language"], base["spec"].get("binding"))
    return BenchRequest(ws, cand, chosen, label, mode, role, kind)


# --- environment -----------------------------------------------------------------------------------
def gpu_snapshot(lease: Lease) -> dict[str, Any]:
    """nvidia-smi's view of the leased GPU (clocks, temperature, power), or why there is none, and
    the host's load: a baseline paced by its host launches follows the CPU, not the GPU."""
    return {**_smi_query(lease), "host_load_1m": round(os.getloadavg()[0], 2)}


def _smi_query(lease: Lease) -> dict[str, Any]:
    if lease.kind != "cuda":
        return {"device": "cpu"}
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"nvidia_smi": "not found"}
    fields = ["name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "temperature.gpu", "power.draw", "pstate", "uuid"]
    try:
        out = subprocess.run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                              "-i", str(lease.index)], capture_output=True, text=True, timeout=20).stdout
        vals = [v.strip() for v in out.strip().splitlines()[0].split(",")]
        return dict(zip(fields, vals))
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return {"nvidia_smi": f"failed: {e}"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


# --- the run ---------------------------------------------------------------------------------------
@dataclass
class WorkloadState:
    wl: dict[str, Any]
    status: str = "PASSED"
    check: str | None = None
    evidence: str = ""
    alerts: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    correctness: dict[str, Any] = field(default_factory=dict)
    clean: list[float] = field(default_factory=list)
    clean_after: list[float] = field(default_factory=list)  # alone again, the candidate's worker gone
    base: list[float] = field(default_factory=list)
    cand: list[float] = field(default_factory=list)
    cand_host: list[float] = field(default_factory=list)
    base_host: list[float] = field(default_factory=list)
    base_overhead_us: float = 0.0
    cand_ev: list[float] = field(default_factory=list)
    cand_traced: bool = True
    cand_covered: list[bool] = field(default_factory=list)
    empty_calls: int = 0
    cand_warmup: list[dict] = field(default_factory=list)
    overhead_us: float = 0.0
    timed_checks: int = 0
    sets: int = MIN_SETS

    def fail(self, status: str, check: str | None, evidence: str) -> None:
        if SEVERITY.index(status) < SEVERITY.index(self.status):
            self.status, self.check, self.evidence = status, check, evidence
        elif self.status == status and not self.evidence:
            self.check, self.evidence = check, evidence


class BenchRun:
    def __init__(self, req: BenchRequest, progress: Callable[[float, float | None, str], None],
                 cancel: CancelToken, store_calibration: bool = True):
        self.req, self.progress, self.cancel = req, progress, cancel
        self.store_calibration = store_calibration
        self.ws = req.ws
        self.pol = self.ws.policy
        self.run_id = new_id("run")
        self.secret = secrets.token_bytes(32)
        self.rng = random.Random(int.from_bytes(self.secret[:8], "little"))
        self.definition = self.ws.definition()
        self.call_timeout = float(self.pol.benchmark.call_timeout_s)
        self.states = [WorkloadState(w) for w in req.workloads]
        self.global_alerts: list[dict] = []
        self.notes: list[str] = []
        self.launch_gap_us = 0.0
        self.l2_bytes = 0  # outputs up to this may still be in L2 when a GPU kernel ends (floor.py)
        self.env_second_look: dict[str, Any] = {}  # the machine when the baseline is timed alone again
        self.trusted: WorkerClient | None = None
        self.cand: WorkerClient | None = None
        self.spare: WorkerPair | None = None
        self.dirs: RunDirs | None = None
        self.loaded: dict[str, bool] = {}  # by job directory name: its worker loaded its code
        self.restarts = 0
        self.n_exchange = 0
        self.started = time.time()
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the wall time of the block to `phases_s` in the run record (where a run's time goes)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    # -- seeds
    def seed(self, *parts: Any) -> int:
        d = hmac.new(self.secret, "|".join(map(str, parts)).encode(), hashlib.sha256).digest()
        return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)

    # -- directories and workers
    @property
    def ref_dir(self) -> Path:
        assert self.dirs is not None
        return self.dirs.ref

    @property
    def cand_dir(self) -> Path:
        assert self.dirs is not None
        return self.dirs.cand

    def _fill_dirs(self, dirs: RunDirs) -> None:
        self.dirs = dirs
        (self.ref_dir / "definition.json").write_text(json.dumps(self.definition))
        public = {k: v for k, v in self.definition.items() if k != "reference"}
        (self.cand_dir / "definition.json").write_text(json.dumps(public))
        self.req.candidate.write_to(self.cand_dir / "src")
        if self.baseline is not None:
            from kda.sandbox.harness import write_solution_sources
            write_solution_sources(self.baseline, self.ref_dir / "baseline_src")

    def _languages(self) -> tuple[str, str]:
        """The job languages of the trusted worker (the baseline's) and the candidate's worker."""
        return trusted_language(self.baseline), self.req.candidate.spec.language

    def _cache_keys(self) -> list[tuple[str, Path]]:
        """Which kept Triton cache each worker's job directory gets: its content's (kernel_cache)."""
        keys = [(f"candidate-{self.req.candidate.content_hash}", self.cand_dir)]
        if self.baseline is not None:
            digest = hashlib.sha256(json.dumps(self.baseline, sort_keys=True).encode()).hexdigest()[:32]
            keys.append((f"baseline-{digest}", self.ref_dir))
        return keys

    def _start(self, role: str, lease: Lease) -> WorkerClient:
        lang = self._languages()[0 if role == "trusted" else 1]
        return start_worker(self.ws, role, self.dirs, lease, lang, self.cancel)

    def _load_candidate(self) -> dict:
        assert self.cand is not None
        spec = self.req.candidate.spec
        protect = [str(self.ws.task_dir), str(self.ws.root / "policy.toml"), str(self.ws.kda_dir),
                   str(self.ws.work_dir)]
        # The worker's own directory is under .kda; it stays writable.
        return self.cand.request("load", self.call_timeout + 120, definition_file=str(self.cand_dir / "definition.json"),
                                 dir=str(self.cand_dir / "src"), entry_point=spec.entry_point,
                                 dps=spec.destination_passing_style, protect=protect,
                                 allow=[str(self.cand_dir)],
                                 reference_files=[str(self.ws.task_dir / "definition.json")],
                                 safetensors_root=str(self.ws.task_dir))

    def _exchange(self) -> Path:
        """The next results file. Two alternate (the candidate writes one while the trusted worker
        reads the other) and stay for the run: written again in place, their pages are reused
        (see exchange.save). A file is read only after the write the orchestrator asked for."""
        self.n_exchange += 1
        return self.cand_dir / "x" / f"{self.n_exchange % 2}.kdax"

    # -- phases
    def run(self) -> tuple[str, dict[str, Any]]:
        return self._store(self.run_unstored())

    def run_unstored(self) -> dict[str, Any]:
        """Everything but storing the run record (the reviewer's verify stores its own)."""
        self.baseline = self.ws.baseline_solution()
        lease: Lease | None = None
        try:
            with executor().lease(None, self.cancel, on_wait=lambda m: self.progress(0, None, m)) as lease:
                self.lease = lease
                pair = spares.take(pair_key(self.ws, lease, *self._languages()), lease, self.cancel)
                if pair:  # ours now: closed in `finally` whatever happens next
                    self.trusted, self.cand = pair.trusted, pair.cand
                    self.spare = pair
                self._fill_dirs(pair.dirs if pair else RunDirs.create(self.ws))
                try:
                    record = self._run_on(lease)
                except WorkerFailure as e:
                    # Only the trusted side reaches here (candidate failures are workload results).
                    raise KdaError(f"the baseline/reference worker failed, no measurement: {e.evidence}") from None
        finally:
            for w in (self.cand, self.trusted):
                if w is not None:
                    w.close()
            if self.dirs is not None:
                try:
                    if self.req.kind == "benchmark":  # the reviewer's verify writes nothing but its record
                        for key, d in self._cache_keys():
                            kernel_cache.keep(self.ws, key, d, builds_ok=self.loaded.get(d.name, False))
                except Exception:  # keeping compiled kernels is an optimisation; never lose the run for it
                    pass
                shutil.rmtree(self.dirs.root, ignore_errors=True)
            if lease is not None and not self.cancel.cancelled:
                spares.start(self.ws, lease, *self._languages())  # the next run's workers, started ahead
        return record

    def _run_on(self, lease: Lease) -> dict[str, Any]:
        self.device = "cpu" if lease.kind == "cpu" else "cuda"
        s = settings_for(self.req.mode, self.device, self.pol.correctness.min_trials)
        self.settings = s
        for st in self.states:
            st.sets = input_sets(self.definition, st.wl, self.device)
        with self.phase("gpu_snapshot"):
            env_start = gpu_snapshot(lease)
        total = len(self.states)
        self.progress(0, total, f"starting workers on {lease.label}")
        with self.phase("workers_start"):
            if self.spare is not None:
                t_env, c_env = self.spare.trusted_env, self.spare.cand_env
                self.notes.append(f"workers started ahead of the run ({time.time() - self.spare.ready_at:.1f} s "
                                  "before it), fresh processes that had loaded nothing")
            else:
                self.trusted = self._start("trusted", lease)
                self.cand = self._start("candidate", lease)
                t_env = self.trusted.ready(180)
                c_env = self.cand.ready(180)
        self.isolation = self.trusted.isolation
        with self.phase("kernel_cache"):
            restored = {d.name: kernel_cache.restore(self.ws, key, d) for key, d in self._cache_keys()}
        if any(restored.values()):
            self.notes.append("compiled kernels from an earlier run of the same content: "
                              + ", ".join(f"{n} {k} file(s)" for k, n in restored.items() if n))
        base_desc: dict[str, Any] = {"kind": "reference"}
        if self.baseline is not None:
            bs = self.baseline["spec"]
            base_desc = {"kind": "solution", "dir": str(self.ref_dir / "baseline_src"),
                         "entry_point": bs["entry_point"], "dps": bs.get("destination_passing_style", True)}
        with self.phase("baseline_load"):
            self.trusted.request("load", self.call_timeout + 120, definition_file=str(self.ref_dir / "definition.json"),
                                 baseline=base_desc, safetensors_root=str(self.ws.task_dir))
        self.loaded[self.ref_dir.name] = True
        device_key = self._device_key(lease, t_env)
        self.l2_bytes = int(t_env.get("l2_bytes") or 0)  # reported by GPU workers only
        # The launch gap is added to both sides' spans when both workers time with CUPTI; not where
        # events time the calls (their frame already carries more than that).
        traced = all(str(e.get("timing_mode", "")).startswith("CUPTI") for e in (t_env, c_env))
        with self.phase("calibration"):
            bw = floor_mod.cached_calibration(self.ws.store, device_key, lambda: self._calibrate(traced),
                                              keep=self.store_calibration,
                                              require=("launch_gap_us", "launch_gap_per_process_us") if traced else ())
        self.launch_gap_us = float(bw.get("launch_gap_us") or 0.0) if traced else 0.0
        if traced and bw.get("launch_gap_us") is None:
            self.notes.append("the device's launch gap could not be measured "
                              f"({bw.get('launch_gap_error', 'no figure')}): latencies are device spans alone")
        # Phase 1: the baseline alone, before any candidate code is loaded anywhere.
        for st in self.states:
            self.cancel.check()
            with self.phase("baseline_alone"):
                st.clean = self._time_baseline_alone(st, s, "clean")
        self.progress(0, total, f"baseline timed alone on {total} workload(s); loading the candidate")
        # Phase 2: the candidate. Correctness on every workload first (the trusted worker checks
        # one workload while the candidate's runs the next one's trials), then timing.
        with self.phase("candidate_load"):
            compile_error = self._try_load()
        if compile_error:
            for st in self.states:
                st.fail(compile_error.status, compile_error.check, compile_error.evidence)
        else:
            with self.phase("correctness"):
                self._correctness(s, total)
            for i, st in enumerate(self.states):
                self.cancel.check()
                if st.status == "PASSED":
                    self._timing(st, s)
                self.progress(i + 1, total, f"{st.wl['uuid'][:8]} {self._axes(st.wl)}: {st.status}"
                              + (f" ({st.evidence[:120]})" if st.status != "PASSED" else ""))
            suspects = self._suspects()
            if suspects:
                with self.phase("baseline_alone_again"):
                    self._recheck_alone(suspects, s, total)
        with self.phase("gpu_snapshot"):
            env_end = gpu_snapshot(lease)
        return self._finish(lease, t_env, c_env, env_start, env_end, bw)

    def _calibrate(self, traced: bool) -> dict[str, Any]:
        """The device's figures: copy bandwidth from the trusted worker; the launch gap (where CUPTI
        times the calls) the median of its reading and those of `GAP_PROCESSES - 1` more fresh
        trusted processes, started after the bandwidth measurement and killed after their probe.
        The probes run one at a time, once every process is up: a context being created elsewhere
        on the device would move a probe. Fewer figures than processes are used for this run but
        not kept as the device's (`launch_gap_per_process_us` missing: the next run measures again)."""
        assert self.trusted is not None
        out = {k: v for k, v in self.trusted.request("calibrate", 120, parts=["bandwidth"]).items()
               if k in ("bytes_per_s", "method")}
        if not traced:
            return out
        extra: list[WorkerClient] = []
        gaps: list[float] = []
        errors: list[str] = []
        try:
            for _ in range(GAP_PROCESSES - 1):
                try:  # one by one: a failed start still closes those before it
                    extra.append(self._start("trusted", self.lease))
                except Exception as e:
                    errors.append(f"a trusted process could not start: {type(e).__name__}: {str(e)[:150]}")
            up = [self.trusted]
            for w in extra:
                try:
                    w.ready(180)
                    up.append(w)
                except WorkerFailure as e:
                    errors.append(e.evidence[:200])
            for w in up:
                try:
                    r = w.request("calibrate", 120, parts=["launch_gap"])
                except WorkerFailure as e:
                    if w is self.trusted:
                        raise
                    errors.append(e.evidence[:200])
                    continue
                if r.get("launch_gap_us") is not None:
                    gaps.append(r["launch_gap_us"])
                else:
                    errors.append(str(r.get("launch_gap_error", "no figure")))
        finally:  # gone, with their contexts, before the baseline is timed alone
            if extra and not self._retire(extra):
                self.notes.append(f"calibration processes had not all exited {EXIT_WAIT_S:.0f} s after they "
                                  "were killed when the baseline was first timed alone")
        if gaps:
            out["launch_gap_us"] = statistics.median(gaps)
            out["launch_gap_per_process_us" if len(gaps) == GAP_PROCESSES else "launch_gap_partial_us"] = gaps
        if errors:
            out["launch_gap_error" if not gaps else "launch_gap_process_errors"] = "; ".join(errors)[:600]
        return out

    @staticmethod
    def _retire(workers: list[WorkerClient]) -> bool:
        """Kills `workers` before the baseline is timed alone: waits until every process of theirs
        has exited (a killed process keeps its GPU context, and the work queued on it, until then),
        then `SETTLE_S`, so a device clock they drove up or down settles. Returns whether all had."""
        gone = all([w.close(exit_wait_s=EXIT_WAIT_S) for w in workers])  # a list: close every one
        time.sleep(SETTLE_S)
        return gone

    def _time_baseline_alone(self, st: WorkloadState, s: Settings, tag: str) -> list[float]:
        """The baseline timed by itself in the trusted worker: half a block, enough for the
        interference check's interval."""
        assert self.trusted is not None
        key = st.wl["uuid"]
        self.trusted.request("prepare", 120, key=key, workload=st.wl, slots=st.sets)
        r = self.trusted.request("time", self._time_timeout(), key=key, warmup=s.warmup,
                                 min_iters=max(5, s.min_iters // 2), max_iters=s.max_iters,
                                 target_s=s.target_s / 2, max_s=max(10 * s.target_s, 5.0),
                                 seed=self.seed(key, tag))
        self.trusted.request("release", 60, key=key)
        return r["lat_us"]

    def _recheck_alone(self, suspects: list[WorkloadState], s: Settings, total: int) -> None:
        """The baseline ran markedly slower beside the candidate than alone before it. Interference,
        or did the machine slow down (a baseline paced by the host's launches follows the CPU)? The
        candidate's worker is killed and every process of it has exited (with them its GPU context
        and the work queued on it), then the baseline is timed alone again, as the first time. Only
        under bubblewrap, whose pid namespace leaves no process of the candidate behind; without it
        a double-forked process could outlive the worker and slow this measurement too."""
        if not self.pol.benchmark.interference_second_look:
            self.notes.append("the baseline ran slower beside the candidate than alone; not timed alone again "
                              "(the policy's benchmark.interference_second_look is off)")
            return
        if self.isolation != "bubblewrap":
            self.notes.append("the baseline ran slower beside the candidate than alone; not timed alone again, "
                              "since without bubblewrap the candidate's processes may outlive its worker")
            return
        self.progress(total, total, f"the baseline ran slower beside the candidate on {len(suspects)} "
                      "workload(s): timing it alone again once the candidate's worker is gone")
        if self.cand is not None and not self._retire([self.cand]):
            self.notes.append(f"the candidate's processes had not all exited {EXIT_WAIT_S:.0f} s after they were "
                              "killed: the baseline was not timed alone again")
            return
        self.cancel.check()
        self.env_second_look = gpu_snapshot(self.lease)
        for st in suspects:
            self.cancel.check()
            try:
                st.clean_after = self._time_baseline_alone(st, s, "clean_after")
            except WorkerFailure as e:  # that workload's first judgement stands
                self.notes.append(f"the baseline could not be timed alone again: {e.evidence[:200]}")
                if self.trusted is None or not self.trusted.alive():
                    return

    def _try_load(self) -> WorkerFailure | None:
        try:
            if self.cand is None or not self.cand.alive():
                self.cand = self._start("candidate", self.lease)
                self.cand.ready(180)
            self._load_candidate()
            self.loaded[self.cand_dir.name] = True
            self.global_alerts += self.cand.take_alerts()
            self.notes += self.cand.take_notes()
            return None
        except WorkerFailure as e:
            st = "COMPILE_ERROR" if e.status in ("COMPILE_ERROR", "RUNTIME_ERROR") and e.check in ("load",) else e.status
            if e.traceback:
                self.notes.append("candidate load traceback:\n" + e.traceback[-2000:])
            return WorkerFailure(st, e.check, f"the candidate could not be loaded: {e.evidence}")

    def _time_timeout(self) -> float:
        s = self.settings
        return max(10 * s.target_s, 5.0) + self.call_timeout * 2 + 30

    @staticmethod
    def _axes(wl: dict) -> str:
        return ",".join(f"{k}={v}" for k, v in wl.get("axes", {}).items())

    def _device_key(self, lease: Lease, env: dict) -> str:
        if lease.kind == "cuda":  # a new torch or CUDA may launch differently: measured again
            return (f"cuda|{env.get('gpu_name')}|{env.get('gpu_uuid') or lease.index}"
                    f"|torch {env.get('torch')}|cuda {env.get('cuda')}")
        import socket
        return f"cpu|{cpu_name()}|{socket.gethostname()}"

    def _ensure_candidate(self, st: WorkloadState) -> bool:
        assert self.cand is not None
        if self.cand.alive():
            return True
        if self.restarts >= MAX_RESTARTS:
            st.fail("RUNTIME_ERROR", "not_run", f"not run: the candidate's worker failed {self.restarts + 1} times "
                    "in this run")
            return False
        self.restarts += 1
        self.cand.close()
        err = self._try_load()
        if err:
            st.fail(err.status, err.check, err.evidence)
            return False
        return True

    def _collect(self, st: WorkloadState) -> None:
        assert self.cand is not None and self.trusted is not None
        for a in self.cand.take_alerts():
            st.alerts.append(a)
            st.fail(a["status"], a["check"], a["evidence"])
        st.notes += self.cand.take_notes()
        self.trusted.take_alerts()

    def _correctness(self, s: Settings, total: int) -> None:
        """Trials on every workload. The candidate's worker runs workload i's trials while the
        trusted worker checks workload i-1's results (neither is timed here, so they may overlap)."""
        pending: tuple[WorkloadState, list[int], Path] | None = None
        for i, st in enumerate(self.states):
            self.cancel.check()
            for a in self.global_alerts:
                st.fail(a["status"], a["check"], a["evidence"])
            if not self._ensure_candidate(st):
                continue
            cand = self.cand
            assert cand is not None
            seeds = [self.seed(st.wl["uuid"], "trial", t) for t in range(s.trials)]
            x = self._exchange()
            io_s = 2.0 * s.trials * (1 + floor_mod.min_bytes(self.definition, st.wl) / 50e6)
            rid = cand.send("trial", workload=st.wl, seeds=seeds, file=str(x),
                            census=self.req.candidate.spec.language != "python")
            if pending:
                self._check_trials(*pending)
                pending = None
            try:
                rep = cand.receive(rid, self.call_timeout + 5 + io_s, "trial")
            except WorkerFailure as e:
                self._candidate_failed(st, e)
                continue
            if rep.get("census"):
                st.notes.append("the call ran torch compute ops (a torch fallback?): "
                                + ", ".join(f"aten.{k} x{v}" for k, v in sorted(rep["census"].items())))
            self._collect(st)
            if st.status == "PASSED":
                pending = (st, seeds, x)
            self.progress(0, total, f"trials of {i + 1}/{total} workload(s) run")
        if pending:
            self._check_trials(*pending)

    def _check_trials(self, st: WorkloadState, seeds: list[int], x: Path) -> None:
        assert self.trusted is not None
        pol = self.pol.correctness
        try:
            chk = self.trusted.request("check", 300, workload=st.wl, seeds=seeds, file=str(x), atol=pol.atol,
                                       rtol=pol.rtol, ratio=pol.required_matched_ratio, label="trial")
        except WorkerFailure as e:
            if not self.trusted.alive():
                raise KdaError(f"the trusted worker died: {e.evidence}") from None
            st.fail(e.status, e.check, f"the trusted worker could not check this workload's results (the reference "
                    f"side failed, which may not be the candidate's doing): {e.evidence}")
            return
        self.trusted.take_alerts()
        st.correctness = {k: chk.get(k) for k in ("max_abs", "max_rel", "matched_ratio")}
        st.correctness["trials"] = len(seeds)
        if chk["status"] != "PASSED":
            st.fail(chk["status"], chk.get("check"), chk.get("evidence", ""))

    def _candidate_failed(self, st: WorkloadState, e: WorkerFailure) -> None:
        cand = self.cand
        assert cand is not None
        self.cancel.check()
        if e.dead or not cand.alive():
            cand.kill()
        if e.traceback:
            st.notes.append("traceback:\n" + e.traceback[-2000:])
        if cand.alive():
            self._collect(st)
        st.fail(e.status, e.check, e.evidence)
        if self.trusted is not None and not self.trusted.alive():
            raise KdaError(f"the trusted worker died: {e.evidence}") from None

    def _timing(self, st: WorkloadState, s: Settings) -> None:
        """Baseline and candidate take turns in blocks on one workload; timed outputs checked."""
        assert self.trusted is not None
        key = st.wl["uuid"]
        if not self._ensure_candidate(st):
            return
        cand = self.cand
        assert cand is not None
        pol = self.pol.correctness
        try:
            with self.phase("prepare"):
                cand.request("prepare", 300, key=key, workload=st.wl, slots=st.sets)
                self.trusted.request("prepare", 300, key=key, workload=st.wl, slots=st.sets)
            order = ["B", "C", "C", "B"] * s.rounds
            # Every candidate block gets one timed output checked (see set_to_check). Each worker
            # rotates over its sets from where its previous block stopped: `calls` counts them.
            calls = {"B": 0, "C": 0}
            seen: set[str] = set()
            for bi, who in enumerate(order):
                self.cancel.check()
                warm = s.warmup if who not in seen else 1
                seen.add(who)
                params = dict(key=key, warmup=warm, min_iters=s.min_iters, max_iters=s.max_iters, target_s=s.target_s,
                              max_s=max(10 * s.target_s, 5.0), seed=self.seed(key, "block", bi), first=calls[who])
                if who == "B":
                    cand.request("sync", 60)
                    self._collect(st)
                    with self.phase("timing"):
                        r = self.trusted.request("time", self._time_timeout(), **params)
                    st.base += r["lat_us"]
                    st.base_host += r["host_us"]
                    calls["B"] += len(r["warmup"]) + len(r["lat_us"])
                    st.base_overhead_us = r.get("overhead_us", 0.0)
                else:
                    with self.phase("timing"):
                        r = cand.request("time", self._time_timeout(), **params)
                    self.phases["trace_parse"] = self.phases.get("trace_parse", 0.0) + r.get("trace_s", 0.0)
                    st.cand += r["lat_us"]
                    st.cand_host += r["host_us"]
                    st.cand_ev += r["ev_us"]
                    st.cand_traced = st.cand_traced and r.get("trace") is not None
                    st.cand_covered += r["covered"]
                    st.empty_calls += (r.get("trace") or {}).get("empty_calls", 0)
                    st.cand_warmup += r["warmup"]
                    st.overhead_us = r.get("overhead_us", 0.0)
                    slot = set_to_check(calls["C"], len(r["warmup"]), len(r["lat_us"]), st.sets, self.rng)
                    calls["C"] += len(r["warmup"]) + len(r["lat_us"])
                    x = self._exchange()
                    with self.phase("timed_checks"):
                        saved = cand.request("save_slot", 120, key=key, slot=slot, file=str(x))
                        chk = self.trusted.request("check", 300, workload=st.wl, seeds=[saved["seed"]], file=str(x),
                                                   atol=pol.atol, rtol=pol.rtol, ratio=pol.required_matched_ratio,
                                                   inputs=False, label=f"timed iteration of block {bi}")
                    st.timed_checks += 1
                    self._collect(st)
                    if chk["status"] != "PASSED":
                        st.fail(chk["status"], "timed_outputs", chk.get("evidence", ""))
                        return
            self._collect(st)
        except WorkerFailure as e:
            self._candidate_failed(st, e)
        finally:
            # Failed workloads too: the trusted worker lives for the whole run.
            with self.phase("prepare"):
                for w in (cand, self.trusted):
                    if w is not None and w.alive():
                        try:
                            w.request("release", 60, key=key)
                        except WorkerFailure:
                            pass  # the failure that matters is already recorded

    # -- results
    def _slowdown(self, b: Any, a: Any) -> tuple[float, float] | None:
        """(baseline span beside the candidate, span alone) when the baseline ran markedly slower
        beside the candidate (median interval `b`) than alone (`a`): past the policy's ratio, with
        the intervals apart. Both intervals include the launch gap; judged on the spans, since the
        gap added to both would dilute a slowdown of small kernels."""
        gap = self.launch_gap_us
        b_span, a_span = b.value - gap, a.value - gap
        return (b_span, a_span) if b_span > self._ratio_limit() * a_span and b.lo > a.hi else None

    def _ratio_limit(self) -> float:
        return (self.pol.benchmark.interference_ratio if self.device != "cpu"
                else self.pol.benchmark.cpu_interference_ratio)

    @staticmethod
    def _wl_seed(st: WorkloadState) -> int:
        """The workload's bootstrap seed: a run's intervals are reproducible from its samples."""
        return int.from_bytes(hashlib.sha256(st.wl["uuid"].encode()).digest()[:4], "little")

    # Each sample series draws its bootstrap from its own seed, so its interval is reproducible
    # from the run's samples and independent of the others'.
    _SERIES_SEED = {"base": 0, "clean": 3, "clean_after": 5, "cand": 7}

    def _latencies(self, st: WorkloadState, series: str) -> list[float]:
        """One of `st`'s sample series (`base` beside the candidate, `clean` alone before it was
        loaded, `clean_after` alone after its worker exited, `cand`) as latencies: each device
        span plus the launch gap."""
        return [x + self.launch_gap_us for x in getattr(st, series)]

    def _latency_ci(self, st: WorkloadState, series: str) -> Any:
        """The median interval of one of `st`'s series of latencies."""
        from . import stats

        return stats.median_ci(self._latencies(st, series), seed=self._wl_seed(st) + self._SERIES_SEED[series])

    def _suspects(self) -> list[WorkloadState]:
        """Workloads whose baseline ran markedly slower beside the candidate than alone before it
        (judged as `_analyze` judges it, with the same intervals)."""
        return [st for st in self.states if st.status == "PASSED" and st.base and st.clean
                and self._slowdown(self._latency_ci(st, "base"), self._latency_ci(st, "clean"))]

    def _analyze(self, st: WorkloadState, bw: dict[str, Any]) -> dict[str, Any]:
        from . import stats

        # The samples stay device spans; the latencies reported add `launch_gap_us` to each.
        out: dict[str, Any] = {"uuid": st.wl["uuid"], "axes": st.wl.get("axes", {}), "launch_gap_us": self.launch_gap_us}
        nbytes = floor_mod.floor_bytes(self.definition, st.wl, self.l2_bytes)
        fl = floor_mod.floor_us(nbytes, bw.get("bytes_per_s"), self.device)
        out.update(bytes=nbytes, floor_us=fl, **st.correctness)
        seed = self._wl_seed(st)
        reps = None
        if st.status == "PASSED" and st.base and st.cand:
            # A latency is the call's device span plus the launch gap it waited in the stream
            # (zero where events time the calls, whose frame already carries more than that).
            gap = self.launch_gap_us
            b, c = self._latency_ci(st, "base"), self._latency_ci(st, "cand")
            c_span = c.value - gap  # the work itself: what the floor judges
            out.update(baseline_us=b.value, baseline_ci_us=b.as_list(), candidate_us=c.value,
                       candidate_ci_us=c.as_list())
            # Counted, not read off the median: a grouped median (stats) of mostly empty spans is
            # a fraction of a tick above zero.
            if 2 * sum(1 for x in st.cand if x <= 0) <= len(st.cand):
                sp, reps = stats.speedup_ci(self._latencies(st, "base"), self._latencies(st, "cand"),
                                            seed=seed + 13)
                out.update(speedup=sp.value, speedup_ci=sp.as_list())
            else:  # more than half the timed calls ran nothing on the device
                st.fail("BELOW_PHYSICAL_FLOOR", "physical_floor",
                        f"{sum(1 for x in st.cand if x <= 0)} of {len(st.cand)} timed calls ran no device "
                        f"work (median device span {c_span:.3f} us), so the work was not done in them")
            if st.clean:
                cl = self._latency_ci(st, "clean")
                out.update(clean_baseline_us=cl.value, clean_baseline_ci_us=cl.as_list())
                slow = self._slowdown(b, cl)
                ca = self._latency_ci(st, "clean_after") if st.clean_after else None
                if ca is not None:
                    out.update(clean_after_baseline_us=ca.value, clean_after_baseline_ci_us=ca.as_list())
                ca_span = None if ca is None else ca.value - gap
                if slow and ca is not None:
                    # Drift only where it shows: alone again, the baseline is slower than alone
                    # before (intervals apart), and beside the candidate within the policy's ratio of
                    # that. Anything less clear stays interference.
                    if ca.lo > cl.hi and slow[0] <= self._ratio_limit() * ca_span:
                        st.notes.insert(0, (
                            f"the baseline ran {slow[0] / slow[1]:.2f}x slower beside the candidate (device span "
                            f"{slow[0]:.2f} us) than alone before it was loaded ({slow[1]:.2f} us), and alone "
                            f"again once the candidate's worker had exited it ran {ca_span:.2f} us "
                            f"({ca_span / slow[1]:.2f}x its first figure): the machine slowed down during the run; "
                            "the speedup is the interleaved one, both sides measured through it"))
                        slow = None
                if slow:
                    st.fail("TIMING_TAMPERED", "interference",
                            f"the baseline ran {slow[0] / slow[1]:.2f}x slower beside the candidate (device span "
                            f"{slow[0]:.2f} us) than alone before it was loaded ({slow[1]:.2f} us)"
                            + (f" and alone again after its worker had exited ({ca_span:.2f} us)" if ca_span is not None
                               else "") + ": interference, not a speedup")
            if self.device != "cpu" and st.cand_traced and st.cand_ev:
                self._stream_checks(st, out)
            elif self.device != "cpu" and st.cand_host:
                # Host time of the timing frame beyond the events, less the frame's fixed cost. An
                # honest call still shows a few microseconds (launch and sync latency); the baseline,
                # timed the same way on the timed stream by construction, says how many. What the
                # candidate shows beyond that is device work the events did not see.
                def beyond(host: list[float], ev: list[float], overhead: float) -> float:
                    # A low percentile: hidden work recurs in every call, host jitter does not.
                    gaps = sorted(h - e for h, e in zip(host, ev))
                    return gaps[len(gaps) // 5] - overhead

                unaccounted = beyond(st.cand_host, st.cand, st.overhead_us)
                honest = max(0.0, beyond(st.base_host, st.base, st.base_overhead_us)) if st.base_host else 0.0
                limit = max(self.pol.benchmark.unaccounted_us, self.pol.benchmark.unaccounted_ratio * c.value)
                out["unaccounted_us"] = unaccounted
                out["baseline_unaccounted_us"] = honest
                if unaccounted - honest > limit:
                    st.fail("TIMING_TAMPERED", "side_stream",
                            f"each call kept the device busy {unaccounted:.1f} us beyond the timed stream, "
                            f"{unaccounted - honest:.1f} us more than the baseline's {honest:.1f} us (event time "
                            f"{c.value:.2f} us): work was launched where the timer does not see it")
            med = c.value
            # A sleeping call idles (wall time without CPU time) again and again; one preempted call
            # on a busy machine does not count.
            idle = [w for w in st.cand_warmup if w["idle_ms"] > 20.0 and w["idle_ms"] > 0.8 * w["wall_ms"]
                    and w["wall_ms"] * 1e3 > 10 * med]
            if len(idle) >= 2:
                worst = max(idle, key=lambda w: w["idle_ms"])
                st.fail("TIMING_TAMPERED", "warmup_idle",
                        f"{len(idle)} warm-up call(s) idled (slept) up to {worst['idle_ms']:.0f} ms against a timed "
                        f"median of {med:.1f} us: timing-dependent behaviour")
            if fl is not None and c_span < fl:
                st.fail("BELOW_PHYSICAL_FLOOR", "physical_floor",
                        f"median device time {c_span:.3f} us is below the physical floor {fl:.3f} us ({nbytes} bytes "
                        f"{'to or from memory ' if self.l2_bytes else ''}at the measured copy bandwidth "
                        f"{bw['bytes_per_s'] / 1e9:.1f} GB/s): the work cannot have been done")
        out.update(status=st.status, check=st.check, evidence=st.evidence, alerts=st.alerts,
                   notes=st.notes[:20], timed_checks=st.timed_checks,
                   samples={"clean": _r(st.clean), "baseline": _r(st.base), "candidate": _r(st.cand),
                            "candidate_events": _r(st.cand_ev), "candidate_hold_covered": st.cand_covered,
                            **({"clean_after": _r(st.clean_after)} if st.clean_after else {})})
        if st.status != "PASSED":
            for k in ("speedup", "speedup_ci"):
                out.pop(k, None)
            reps = None
        out["_reps"] = reps
        return out

    def _stream_checks(self, st: WorkloadState, out: dict[str, Any]) -> None:
        """With device timestamps, per call: the span covers work on every stream, the events only
        the timed stream. A span that outlasts the events by more than the policy allows is work the
        call left running on another stream (counted in the latency, and flagged); events that
        outlast the span are device work the trace did not record."""
        bm = self.pol.benchmark
        n = len(st.cand)

        def low(xs: list[float]) -> float:  # a low percentile: what recurs in every call
            return sorted(xs)[len(xs) // 5]

        # Side-stream work shows beyond the events only when the hold outlasted the call's launch;
        # iterations whose launch outran the hold (a slow or jittery host) would hide it.
        pairs = [(c, e) for c, e, ok in zip(st.cand, st.cand_ev, st.cand_covered) if ok]
        pairs = pairs if len(pairs) >= max(5, n // 5) else list(zip(st.cand, st.cand_ev))
        beyond = low([c - e for c, e in pairs])
        unseen = low([e - c for c, e in zip(st.cand, st.cand_ev)])
        ev_med = sorted(st.cand_ev)[n // 2]
        span_med = sorted(st.cand)[n // 2]
        out.update(beyond_timed_stream_us=beyond, event_median_us=ev_med)
        if beyond > max(bm.unaccounted_us, bm.unaccounted_ratio * ev_med):
            st.fail("TIMING_TAMPERED", "side_stream",
                    f"each call kept the device busy {beyond:.1f} us after the timed stream's end event (event "
                    f"time {ev_med:.2f} us, device span {span_med:.2f} us): work was left on another stream "
                    "the call did not join back")
        elif unseen > max(bm.unaccounted_us, bm.unaccounted_ratio * span_med):
            st.fail("TIMING_TAMPERED", "device_trace",
                    f"the events saw {unseen:.1f} us per call that the device trace did not record (span "
                    f"{span_med:.2f} us, events {ev_med:.2f} us): the trace was tampered with")
        if st.empty_calls:
            st.notes.append(f"{st.empty_calls} timed call(s) ran no device work at all")

    def _finish(self, lease: Lease, t_env: dict, c_env: dict, env_start: dict, env_end: dict,
                bw: dict[str, Any]) -> dict[str, Any]:
        from . import stats

        lock_problem = None
        try:
            self.ws.check_lock()
        except LockMismatch as e:
            lock_problem = str(e)
        rows = []
        t_analysis = time.perf_counter()
        for st in self.states:
            if lock_problem:
                st.fail("SANDBOX_VIOLATION", "lock", f"the workspace lock broke during the run: {lock_problem}")
            rows.append(self._analyze(st, bw))
        self.phases["analysis"] = time.perf_counter() - t_analysis
        passed = [r for r in rows if r["status"] == "PASSED" and r.get("_reps") is not None]
        agg: dict[str, Any] = {"passed": len(passed), "total": len(rows), "complete": len(passed) == len(rows)}
        if passed:
            vals = [r["speedup"] for r in passed]
            reps = [r["_reps"] for r in passed]
            m = stats.mean_ci(vals, reps)
            g = stats.geomean_ci(vals, reps)
            agg.update(mean_speedup=m.value, mean_speedup_ci=m.as_list(), geomean_speedup=g.value,
                       geomean_speedup_ci=g.as_list())
        for r in rows:
            r.pop("_reps", None)
        status = min((r["status"] for r in rows), key=SEVERITY.index) if rows else "PASSED"
        device_label = "cpu" if lease.kind == "cpu" else f"cuda:{t_env.get('gpu_name', lease.index)}"
        env = {"device": device_label, "lease": lease.label, "worker": t_env, "candidate_worker": c_env,
               "gpu_start": env_start, "gpu_end": env_end, "calibration": bw, "isolation": self.isolation,
               **({"gpu_second_look": self.env_second_look} if self.env_second_look else {}),
               "worker_processes": {w.name: w.proc.pid for w in (self.trusted, self.cand) if w is not None},
               "host_python": sys.version.split()[0]}
        if lease.kind == "cpu":
            env["cpu"] = cpu_name()
        flags = sorted({n for r in rows for n in r.get("notes", []) if not n.startswith("traceback")}
                       | {n for n in self.notes if not n.startswith("candidate load traceback")})
        cand = self.req.candidate
        flags += tripwire_flags(cand)
        return {
            "kind": self.req.kind, "status": status, "device": device_label, "mode": self.req.mode,
            "candidate_path": cand.path, "candidate_hash": cand.content_hash, "language": cand.spec.language,
            "baseline": self.baseline["name"] if self.baseline else "reference",
            "selection": self.req.selection, "aggregate": agg, "workloads": rows, "flags": flags,
            "lock_after": lock_problem or "ok", "env": env,
            "config": {**self.settings.__dict__, "input_sets": {st.wl["uuid"]: st.sets for st in self.states},
                       "order": "B C C B" + " B C C B" * (self.settings.rounds - 1),
                       "atol": self.pol.correctness.atol, "rtol": self.pol.correctness.rtol,
                       "required_matched_ratio": self.pol.correctness.required_matched_ratio,
                       "call_timeout_s": self.call_timeout, "interference_ratio": self.pol.benchmark.interference_ratio,
                       "cpu_interference_ratio": self.pol.benchmark.cpu_interference_ratio,
                       "interference_second_look": self.pol.benchmark.interference_second_look,
                       # Latencies are the samples (device spans) plus this, once per call.
                       "launch_gap_us": self.launch_gap_us},
            "logs": {"trusted": self.trusted.log_tail() if self.trusted else "",
                     "candidate": self.cand.log_tail() if self.cand else "",
                     "notes": self.notes[-10:]},
            "wall_s": time.time() - self.started,
            "phases_s": {k: round(v, 3) for k, v in self.phases.items()},
            "worker_ops_s": {w.name: {k: round(v, 3) for k, v in w.op_s.items()}
                             for w in (self.trusted, self.cand) if w is not None},
        }

    def _store(self, record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if self.req.kind == "benchmark":  # the writer's runs record what they measured (verify writes nothing else)
            try:
                record_candidate(self.ws, self.req.candidate)
            except (OSError, ValueError) as e:  # the run is still stored; only the id for candidate= is missing
                record.setdefault("flags", []).append(f"the candidate could not be recorded: {e}")
        headline = headline_for(record)
        record["headline"] = headline
        self.ws.store.put_run(self.req.kind, self.req.role, record["status"], headline, record,
                              candidate_path=record["candidate_path"], candidate_hash=record["candidate_hash"],
                              device=record["device"], run_id=self.run_id)
        record["run_id"] = self.run_id
        return self.run_id, record


def tripwire_flags(cand: Candidate) -> list[str]:
    """The compile helper's static tripwires on the candidate's sources (warnings, not verdicts)."""
    from .tripwires import scan_candidate

    try:
        return [f"tripwire {t}" for t in scan_candidate(cand.sources, cand.spec.language, cand.path)]
    except Exception as e:  # a scanner bug must not sink a measurement
        return [f"tripwire scan failed: {type(e).__name__}: {e}"]


def _r(xs: list[float]) -> list[float]:
    return [round(x, 4) for x in xs]


def fmt_speedup(v: float) -> str:
    # Three decimals read well from 0.1x up; below that (a CPU run against a compiled reference)
    # they keep one significant digit and hide the interval, so keep three significant digits.
    return f"{v:.3f}" if abs(v) >= 0.1 else f"{v:.3g}"


def _fmt_ci(ci: list[float] | None) -> str:
    return f"[{fmt_speedup(ci[0])}, {fmt_speedup(ci[1])}]" if ci else ""


def headline_for(rec: dict[str, Any]) -> str:
    agg = rec["aggregate"]
    n, total = agg["passed"], agg["total"]
    dev = rec["device"]
    if rec["status"] == "PASSED":
        return (f"PASSED {n}/{total} workloads on {dev}: mean speedup {fmt_speedup(agg['mean_speedup'])}x "
                f"{_fmt_ci(agg.get('mean_speedup_ci'))}, geomean {fmt_speedup(agg['geomean_speedup'])}x "
                f"{_fmt_ci(agg.get('geomean_speedup_ci'))} vs {rec['baseline']}")
    first = next((r for r in rec["workloads"] if r["status"] == rec["status"]), None)
    why = f"; {first['uuid'][:8]}: {first['check']}: {first['evidence'][:160]}" if first else ""
    part = (f" (passed ones: mean {fmt_speedup(agg['mean_speedup'])}x)" if n and "mean_speedup" in agg else "")
    return f"{rec['status']}: {n}/{total} workloads passed on {dev}{part}{why}"


def run_benchmark(req: BenchRequest, progress: Callable[[float, float | None, str], None],
                  cancel: CancelToken) -> tuple[str, dict[str, Any]]:
    return BenchRun(req, progress, cancel).run()
