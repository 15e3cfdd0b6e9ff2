"""Measurement helpers shared by the bench workers (runs inside the sandbox, on GPU machines too).

Imports only the stdlib and torch (safetensors lazily, for workloads that use it). Everything
here is deterministic given a seed, so two processes that never share memory (the trusted
reference worker and the candidate's worker) build bit-identical inputs from the same seed.

Input semantics follow flashinfer-bench (`bench/utils.py::gen_inputs`): `random` inputs are
drawn by dtype (normal floats, fp8 clamped to [-2, 2], integers in fixed ranges, booleans),
`scalar` inputs are the workload's literal, `safetensors` inputs are loaded from a file.
Tolerance semantics follow `compute_error_stats`: an element fails only if its absolute
error exceeds atol AND its relative error exceeds rtol; then the matched ratio is compared
with the required one. NaN or Inf in an output always fails.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch

_sum = torch.sum  # captured before any candidate is imported

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
if hasattr(torch, "float4_e2m1fn_x2"):
    DTYPES["float4_e2m1"] = torch.float4_e2m1fn_x2

_INT_RANGES = {torch.int8: (-128, 128), torch.int16: (-1024, 1024), torch.int32: (-1024, 1024),
               torch.int64: (-1024, 1024), torch.uint8: (0, 256)}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class HarnessError(Exception):
    """A problem with the task data or the harness itself (not the candidate's fault)."""


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise HarnessError(f"dtype {name!r} is not supported by this harness ({', '.join(DTYPES)})") from None


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes and machines)."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# --- shapes ------------------------------------------------------------------------------------
def _shape(definition: dict, spec: dict, axes: dict[str, int]) -> list[int] | None:
    if spec.get("shape") is None:
        return None
    out = []
    for ax in spec["shape"]:
        if isinstance(ax, int):
            out.append(ax)
            continue
        a = definition["axes"].get(ax)
        if a is None:
            raise HarnessError(f"shape names unknown axis {ax!r}")
        if a.get("type") == "const":
            out.append(int(a["value"]))
        elif ax in axes:
            out.append(int(axes[ax]))
        else:
            raise HarnessError(f"workload gives no value for var axis {ax!r}")
    return out


def input_specs(definition: dict, workload: dict) -> list[tuple[str, list[int] | None, torch.dtype, dict]]:
    """(name, shape, dtype, workload input spec) in definition order."""
    axes = workload.get("axes", {})
    winp = workload.get("inputs", {})
    return [(n, _shape(definition, s, axes), torch_dtype(s["dtype"]), winp.get(n, {"type": "random"}))
            for n, s in definition["inputs"].items()]


def output_specs(definition: dict, workload: dict) -> list[tuple[str, list[int] | None, torch.dtype]]:
    axes = workload.get("axes", {})
    return [(n, _shape(definition, s, axes), torch_dtype(s["dtype"])) for n, s in definition["outputs"].items()]


# --- inputs ------------------------------------------------------------------------------------
def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def fill_random_(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Overwrite `t` in place with flashinfer-bench's distribution for its dtype."""
    g = _generator(t.device, seed)
    dt = t.dtype
    if dt in _FLOATS:
        return t.normal_(generator=g)
    if dt in _FP8:
        tmp = torch.empty(t.shape, dtype=torch.float32, device=t.device).normal_(generator=g).clamp_(-2.0, 2.0)
        return t.copy_(tmp)
    if dt is torch.bool:
        tmp = torch.empty(t.shape, dtype=torch.int8, device=t.device).random_(0, 2, generator=g)
        return t.copy_(tmp)
    if dt in _INT_RANGES:
        lo, hi = _INT_RANGES[dt]
        return t.random_(lo, hi, generator=g)
    raise HarnessError(f"cannot generate random values of dtype {dt}")


def is_random(wspec: dict) -> bool:
    return wspec.get("type", "random") == "random"


class SafetensorsCache:
    """Loads each safetensors file once per process; paths resolve against `root`."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self.files: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, name: str, wspec: dict, shape: list[int] | None, dtype: torch.dtype) -> torch.Tensor:
        path = Path(wspec["path"])
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        key = str(path)
        if key not in self.files:
            try:
                import safetensors.torch as st
            except ImportError:
                raise HarnessError(f"input {name!r} is a safetensors input but `safetensors` is not installed") from None
            self.files[key] = st.load_file(key)
        tensors = self.files[key]
        tk = wspec.get("tensor_key")
        if tk not in tensors:
            raise HarnessError(f"input {name!r}: key {tk!r} missing in {path}")
        t = tensors[tk]
        if shape is not None and list(t.shape) != list(shape):
            raise HarnessError(f"input {name!r}: expected shape {shape}, file has {list(t.shape)}")
        if t.dtype != dtype:
            raise HarnessError(f"input {name!r}: expected dtype {dtype}, file has {t.dtype}")
        return t


def make_inputs(definition: dict, workload: dict, seed: int, device: torch.device,
                st_cache: SafetensorsCache | None = None) -> list[Any]:
    """Fresh inputs in definition order; input i of seed s is drawn from seed mix(s, i)."""
    out: list[Any] = []
    for i, (name, shape, dtype, wspec) in enumerate(input_specs(definition, workload)):
        kind = wspec.get("type", "random")
        if kind == "scalar":
            out.append(wspec["value"])
        elif kind == "safetensors":
            if st_cache is None:
                raise HarnessError(f"input {name!r} needs a safetensors file and no loader was given")
            out.append(st_cache.get(name, wspec, shape, dtype).to(device).clone())
        elif shape is None:
            t = fill_random_(torch.empty((), dtype=dtype, device=device), mix_seed(seed, i))
            out.append(t.item())
        else:
            out.append(fill_random_(torch.empty(shape, dtype=dtype, device=device), mix_seed(seed, i)))
    return out


def refill_inputs_(definition: dict, workload: dict, inputs: list[Any], seed: int) -> None:
    """Redraw the random tensor inputs of an existing slot in place (same values as make_inputs)."""
    for i, (_, shape, _, wspec) in enumerate(input_specs(definition, workload)):
        if is_random(wspec) and shape is not None:
            fill_random_(inputs[i], mix_seed(seed, i))


# --- outputs -----------------------------------------------------------------------------------
def poison_value(dtype: torch.dtype) -> Any:
    if dtype.is_floating_point:
        return float("nan")
    if dtype is torch.bool:
        return None  # no value a bool cannot legitimately hold
    return torch.iinfo(dtype).min


def alloc_outputs(definition: dict, workload: dict, device: torch.device, poison: bool = True) -> list[torch.Tensor]:
    outs = []
    for _, shape, dtype in output_specs(definition, workload):
        t = torch.empty(shape or [], dtype=dtype, device=device)
        pv = poison_value(dtype) if poison else None
        if pv is not None:
            if dtype in _FP8:
                t.copy_(torch.full(t.shape, float("nan"), device=device))
            else:
                t.fill_(pv)
        outs.append(t)
    return outs


def normalize_result(definition: dict, workload: dict, result: Any, device: torch.device) -> list[torch.Tensor]:
    """A value-returning callable's result as a list of tensors in definition order."""
    specs = output_specs(definition, workload)
    names = [n for n, _, _ in specs]

    def as_tensor(v: Any, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            # A subclass can run its own code (__torch_function__) whenever the harness reads the
            # output, after the timer stopped: only plain tensors count as results.
            if type(v) is not torch.Tensor:
                raise TypeError(f"returned a {type(v).__module__}.{type(v).__qualname__}, a torch.Tensor "
                                "subclass; outputs must be plain torch.Tensor")
            return v
        return torch.tensor(v, dtype=dtype, device=device)

    if isinstance(result, dict):
        missing = [n for n in names if n not in result]
        if missing:
            raise ValueError(f"returned dict lacks outputs {missing}")
        return [as_tensor(result[n], d) for n, _, d in specs]
    if isinstance(result, (tuple, list)):
        if len(result) != len(specs):
            raise ValueError(f"returned {len(result)} values but the definition has {len(specs)} outputs")
        return [as_tensor(v, d) for v, (_, _, d) in zip(result, specs)]
    if len(specs) != 1:
        raise ValueError(f"returned a single value but the definition has {len(specs)} outputs")
    return [as_tensor(result, specs[0][2])]


class Callee:
    """A loaded callable with its calling convention."""

    def __init__(self, fn: Callable[..., Any], dps: bool, definition: dict, label: str):
        self.fn, self.dps, self.definition, self.label = fn, dps, definition, label

    def __call__(self, workload: dict, inputs: list[Any], outputs: list[torch.Tensor] | None,
                 device: torch.device) -> list[torch.Tensor]:
        if self.dps:
            assert outputs is not None
            self.fn(*inputs, *outputs)
            return outputs
        with torch.no_grad():
            result = self.fn(*inputs)
        return normalize_result(self.definition, workload, result, device)


# --- loading code ------------------------------------------------------------------------------
NATIVE_SUFFIXES = (".cu", ".cpp", ".cc", ".c")  # the compiled ones of tools/candidate.py SOURCE_SUFFIXES


def load_entry(source_dir: Path, entry_point: str, package: str, build_dir: Path | None = None
               ) -> Callable[..., Any]:
    """Import `file.py::symbol` from a directory as package `package` (relative imports work), or,
    for a C++/CUDA entry file, build the directory's sources as a torch extension (see
    `build_torch_extension`) and return its `symbol`."""
    file, _, symbol = entry_point.partition("::")
    rel = Path(file)
    if rel.suffix in NATIVE_SUFFIXES:
        return build_torch_extension(Path(source_dir), symbol, Path(build_dir or Path(source_dir).parent / "build"))
    if rel.suffix != ".py":
        raise HarnessError(f"entry file {file!r} is neither a Python file nor C++/CUDA "
                           f"({', '.join(NATIVE_SUFFIXES)})")
    source_dir = Path(source_dir).resolve()
    pkg = types.ModuleType(package)
    pkg.__path__ = [str(source_dir)]  # type: ignore[attr-defined]
    pkg.__file__ = str(source_dir / "__init__.py")
    sys.modules[package] = pkg
    if str(source_dir) not in sys.path:
        sys.path.insert(0, str(source_dir))  # sibling absolute imports, as in a plain script dir
    mod = importlib.import_module(package + "." + ".".join(rel.with_suffix("").parts))
    fn = getattr(mod, symbol, None)
    if fn is None or not callable(fn):
        raise HarnessError(f"entry point {entry_point!r}: no callable {symbol!r} in {file}")
    return fn


def build_torch_extension(source_dir: Path, symbol: str, build_dir: Path) -> Callable[..., Any]:
    """flashinfer-bench's torch binding: every C/C++/CUDA file of the directory built with
    torch.utils.cpp_extension into one module (the sources bind `symbol` with PYBIND11_MODULE),
    with CUDA when there is a .cu file among them. The module's name hashes the sources, the torch
    version and the CUDA target, so a build kept from an earlier run of the same content
    (`build_dir/<name>/<name>.so`) is imported as it is."""
    sources = sorted(p for p in source_dir.rglob("*") if p.is_file() and p.suffix in NATIVE_SUFFIXES)
    if not sources:
        raise HarnessError(f"no C/C++/CUDA sources ({', '.join(NATIVE_SUFFIXES)}) in the candidate")
    with_cuda = any(p.suffix == ".cu" for p in sources)
    # The build is for this torch, this CUDA and this GPU's architecture (a kept build must not be
    # imported on another kind of GPU).
    arch = (f"{torch.version.cuda}|{torch.cuda.get_device_capability()}|{os.environ.get('TORCH_CUDA_ARCH_LIST')}"
            if with_cuda else "cpu")
    h = hashlib.sha256(f"{torch.__version__}|{arch}".encode())
    for p in sources:
        h.update(str(p.relative_to(source_dir)).encode() + b"\0" + p.read_bytes() + b"\0")
    name = f"kda_ext_{h.hexdigest()[:16]}"
    out = build_dir / name
    built = out / f"{name}.so"
    if built.is_file():
        spec = importlib.util.spec_from_file_location(name, built)  # an extension module loader, for a .so
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        from torch.utils.cpp_extension import load

        out.mkdir(parents=True, exist_ok=True)
        try:
            mod = load(name=name, sources=[str(p) for p in sources], extra_include_paths=[str(source_dir)],
                       with_cuda=with_cuda, build_directory=str(out), verbose=False)
        except Exception as e:  # the compiler's own words: its error lines, paths relative to the sources
            text = str(e)
            errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()
                      and not ln.lstrip().startswith("[") and "Error building extension" not in ln]
            msg = "\n".join(errors[:12]) if errors else text[-1500:]
            raise HarnessError("building the torch extension failed: " + msg.replace(f"{source_dir}/", "")) from None
    fn = getattr(mod, symbol, None)
    if fn is None or not callable(fn):
        raise HarnessError(f"the built extension has no callable {symbol!r} (bind it in PYBIND11_MODULE)")
    return fn


def load_source_function(code: str, filename: str, symbol: str = "run") -> Callable[..., Any]:
    """A function from source text (the definition's reference). Written to a file so tools
    that read source (inspect, Triton's JIT) work on it."""
    path = Path(filename)
    path.write_text(code)
    name = f"kda_ref_{hashlib.sha256(code.encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    fn = getattr(mod, symbol, None)
    if fn is None:
        raise HarnessError(f"reference code defines no {symbol!r}")
    return fn


def write_solution_sources(solution: dict, dest: Path) -> None:
    """Materialize a flashinfer-bench Solution's sources under `dest` (refusing path escapes)."""
    dest = Path(dest).resolve()
    for src in solution.get("sources", []):
        target = (dest / src["path"]).resolve()
        if not target.is_relative_to(dest):
            raise HarnessError(f"solution source path {src['path']!r} escapes its directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(src["content"])


# --- comparison --------------------------------------------------------------------------------
def _index(flat_idx: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for d in reversed(shape):
        out.append(flat_idx % d if d else 0)
        flat_idx //= d if d else 1
    return list(reversed(out))


def compare_output(name: str, got: Any, ref: torch.Tensor, atol: float, rtol: float,
                   required_ratio: float) -> dict[str, Any]:
    """One output against its reference. Returns {ok, status, check, evidence, max_abs, ...}."""
    res: dict[str, Any] = {"ok": False, "output": name}
    if not isinstance(got, torch.Tensor):
        return {**res, "status": "INCORRECT_SHAPE", "check": "type",
                "evidence": f"output {name!r} is {type(got).__name__}, not a tensor"}
    if tuple(got.shape) != tuple(ref.shape):
        return {**res, "status": "INCORRECT_SHAPE", "check": "shape",
                "evidence": f"output {name!r} has shape {list(got.shape)}, expected {list(ref.shape)}"}
    if got.dtype != ref.dtype:
        return {**res, "status": "INCORRECT_DTYPE", "check": "dtype",
                "evidence": f"output {name!r} has dtype {str(got.dtype).replace('torch.', '')}, "
                            f"expected {str(ref.dtype).replace('torch.', '')}"}
    # Integers compare in float64: float32 would merge values above 2**24 (indices, counts).
    wide = torch.float32 if ref.dtype.is_floating_point else torch.float64
    # Copy first, widen on the device: a copy that also changes the dtype converts on the host.
    x = got.detach().to(device=ref.device).to(wide)
    y = ref.detach().to(wide)
    total = x.numel()
    if total == 0:
        return {**res, "ok": True, "status": "PASSED", "check": None, "max_abs": 0.0, "max_rel": 0.0,
                "matched_ratio": 1.0, "evidence": ""}
    abs_err = (x - y).abs()
    rel_err = abs_err / (y.abs() + 1e-8)
    exceeds = (abs_err > atol) & (rel_err > rtol)
    flat_abs = abs_err.flatten()
    # NaN/Inf masks (all False for integers, which have neither).
    if got.dtype.is_floating_point:
        nan, inf = torch.isnan(x), torch.isinf(x)
    else:
        nan = inf = torch.zeros_like(x, dtype=torch.bool)
    # Every figure in one transfer: each .item() of its own would wait for the device again.
    figures = [nan.sum(), inf.sum(), exceeds.sum(), flat_abs.argmax(), flat_abs.max(), rel_err.max()]
    n_nan, n_inf, n_bad, i_max, max_abs, max_rel = torch.stack([f.double() for f in figures]).tolist()
    n_nan, n_inf, n_bad, i_max = int(n_nan), int(n_inf), int(n_bad), int(i_max)
    if n_nan or n_inf:
        bad = (nan | inf).flatten().nonzero()
        first = _index(int(bad[0]), tuple(x.shape)) if len(bad) else []
        what = " and ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if p)
        return {**res, "status": "INCORRECT_NUMERICAL", "check": "nan_inf", "nan_count": n_nan,
                "inf_count": n_inf, "max_abs": float("nan"), "max_rel": float("nan"), "matched_ratio": 0.0,
                "evidence": f"output {name!r}: {what} of {total} elements (first at {first}); "
                            "NaN/Inf always fails (poisoned outputs left unwritten read as NaN)"}
    matched = max(0.0, min(1.0, 1.0 - n_bad / total))
    where = _index(i_max, tuple(x.shape))
    res.update(max_abs=max_abs, max_rel=max_rel, matched_ratio=matched, mismatched=n_bad, elements=total)
    if matched < required_ratio:
        return {**res, "status": "INCORRECT_NUMERICAL", "check": "tolerance",
                "evidence": (f"output {name!r}: {n_bad} of {total} elements exceed atol {atol:g} and rtol {rtol:g} "
                             f"(matched ratio {matched:.6f} < required {required_ratio:g}); max abs error "
                             f"{max_abs:.4g} at {where} (got {float(x.flatten()[i_max]):.6g}, expected "
                             f"{float(y.flatten()[i_max]):.6g})")}
    return {**res, "ok": True, "status": "PASSED", "check": None, "evidence": ""}


def input_digest(x: Any) -> Any:
    """What the trusted side needs to tell whether a call changed an input, without shipping it:
    scalars as they are; a tensor as its dtype, shape and three integer sums of its bytes (all of
    them, by row of 4096 words weighted by row, by column weighted by column). A change to any
    element changes a sum; so does moving elements between rows or columns. Integer sums wrap
    the same way in any order, so the candidate's device and the checker's agree bit for bit."""
    if not isinstance(x, torch.Tensor):
        return {"v": x}
    t = x.detach().contiguous().reshape(-1)
    raw = t.view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
    words = raw.to(torch.int64) if raw.numel() % 4 else raw.view(torch.int32).to(torch.int64)
    cols = 4096
    pad = (-words.numel()) % cols
    if pad:
        words = torch.cat([words, words.new_zeros(pad)])
    grid = words.view(-1, cols)
    rows, colsum = grid.sum(dim=1), grid.sum(dim=0)
    r_w = torch.arange(1, rows.numel() + 1, device=t.device, dtype=torch.int64)
    c_w = torch.arange(1, cols + 1, device=t.device, dtype=torch.int64)
    sums = torch.stack([rows.sum(), (rows * r_w).sum(), (colsum * c_w).sum()]).tolist()
    return {"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape), "sums": sums}


def compare_input_digest(name: str, got: Any, pristine: Any) -> dict[str, Any] | None:
    """None when the digest of the input after the call matches the pristine input's, else the evidence."""
    want = input_digest(pristine)
    if got == want:
        return None
    if "v" in want:
        return {"input": name, "evidence": f"scalar input {name!r} changed"}
    if not isinstance(got, dict) or got.get("shape") != want["shape"] or got.get("dtype") != want["dtype"]:
        return {"input": name, "evidence": f"input {name!r} was replaced by a different tensor type/shape"}
    return {"input": name, "evidence": f"input {name!r} changed by the call (its contents no longer match the "
                                       f"pristine input: byte sums {got.get('sums')} vs {want['sums']})"}


# --- device helpers ----------------------------------------------------------------------------
def device_of(spec: str) -> torch.device:
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise HarnessError("a CUDA device was requested but torch sees none")
    return torch.device("cuda", torch.cuda.current_device())


class L2Flusher:
    """Evicts the GPU's L2 before each timed iteration by reading a buffer twice its size.

    Reading, not writing (do_bench zeroes its buffer), leaves the L2 full of clean lines: the timed
    kernel's misses then evict for free, as after Nsight Compute's cache flush. A written buffer
    leaves dirty lines that the timed kernel would pay to write back."""

    def __init__(self, device: torch.device):
        self.buf = None
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            l2 = int(getattr(props, "L2_cache_size", 0) or 0) or 64 * 2**20
            self.buf = torch.ones(2 * l2 // 4, dtype=torch.int32, device=device)
            self.acc = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self) -> None:
        if self.buf is not None:
            _sum(self.buf, dim=0, out=self.acc)


def os_thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: fall back to Python's view
        import threading
        return {t.ident or 0 for t in threading.enumerate()}


def new_threads(before: set[int]) -> set[int]:
    """Threads alive now that were not in `before`, leaving out the CUDA driver's own helper
    threads (named cuda-EvtHandlr, cuda0000..., created by the driver, never by a candidate)."""
    out = set()
    for tid in os_thread_ids() - before:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("cuda"):
                    continue
        except OSError:
            continue  # already gone
        out.add(tid)
    return out
