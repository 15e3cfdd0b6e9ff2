"""Reading what the compiler made: `ptxas -v` resource lines, a SASS instruction census per
kernel (from `cuobjdump -sass`), and plain findings drawn from both.

Pure text parsing: the binaries run inside the sandbox (see tools/compile.py); this module only
reads their output, so it is cheap and has no heavy imports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

# --- ptxas -v -------------------------------------------------------------------------------------
_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers(.*)")


class KernelResources(BaseModel):
    name: str = Field(description="Kernel symbol as in the binary (mangled for C++).")
    demangled: str = Field(description="Readable name (C++ demangled; same as name for Triton).")
    registers: int | None = None
    static_smem_bytes: int = 0
    dynamic_smem_bytes: int | None = Field(None, description="Triton: shared memory the launch requests.")
    stack_frame_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    barriers: int = 0
    num_warps: int | None = None
    num_stages: int | None = None


def parse_ptxas_verbose(text: str) -> dict[str, KernelResources]:
    """Per-kernel resources from `ptxas -v` (nvcc -Xptxas -v, or Triton's ptxas log)."""
    out: dict[str, KernelResources] = {}
    current: str | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, KernelResources(name=current, demangled=current))
            continue
        m = _PROPS.search(line)
        if m:  # kernels and non-inlined device functions alike: only an entry function is a kernel
            current = m.group(1) if m.group(1) in out else None
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            r = out[current]
            r.stack_frame_bytes, r.spill_store_bytes, r.spill_load_bytes = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            r = out[current]
            r.registers = int(m.group(1))
            rest = m.group(2)
            if b := re.search(r"used (\d+) barriers", rest):
                r.barriers = int(b.group(1))
            if s := re.search(r"(\d+) bytes smem", rest):
                r.static_smem_bytes = int(s.group(1))
    return out


# --- demangling -----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _demangler() -> str | None:
    return shutil.which("cu++filt") or shutil.which("c++filt")


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable, through cu++filt/c++filt when present (names are ours to pass: they
    came from the binary and go in as stdin lines, never as arguments)."""
    mangled = [n for n in names if n.startswith("_Z")]
    out = {n: n for n in names}
    tool = _demangler()
    if not mangled or tool is None:
        return out
    try:
        r = subprocess.run([tool], input="\n".join(mangled) + "\n", capture_output=True, text=True, timeout=10)
        for src, dst in zip(mangled, r.stdout.splitlines()):
            out[src] = dst.strip() or src
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# --- SASS census ----------------------------------------------------------------------------------
# cuobjdump -sass: "Function : NAME"; nvdisasm -c: "//----- .text.NAME -----"
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)|^//-+\s*\.text\.(\S+)\s+-+")
_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:\{\s*)?(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


class SassCensus(BaseModel):
    instructions: int = 0
    tensor_core: dict[str, int] = Field(default_factory=dict, description="HMMA/HGMMA/QGMMA/IMMA/UTC*MMA ... counts")
    tma_bulk: dict[str, int] = Field(default_factory=dict, description="UTMALDG/UTMASTG/UBLKCP ... counts")
    global_loads: dict[str, int] = Field(default_factory=dict, description="LDG by width in bits: '128', '64', '32', '16', '8'")
    global_stores: dict[str, int] = Field(default_factory=dict, description="STG by width in bits")
    async_copies: int = Field(0, description="LDGSTS (cp.async) count")
    local_loads: int = Field(0, description="LDL")
    local_stores: int = Field(0, description="STL")
    shared_loads: int = Field(0, description="LDS + LDSM")
    shared_stores: int = Field(0, description="STS")
    barriers: int = Field(0, description="BAR.* (and SYNCS.* mbarrier ops counted in mbarrier_ops)")
    mbarrier_ops: int = 0


def _width(mods: list[str]) -> str:
    for w in ("256", "128", "64"):
        if w in mods:
            return w
    if any(m in ("U16", "S16") for m in mods):
        return "16"
    if any(m in ("U8", "S8") for m in mods):
        return "8"
    return "32"


def _bump(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


def census_sass(text: str) -> dict[str, SassCensus]:
    """Instruction counts per kernel from `cuobjdump -sass` or `nvdisasm -c` text."""
    out: dict[str, SassCensus] = {}
    cur: SassCensus | None = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = out.setdefault(m.group(1) or m.group(2), SassCensus())
            continue
        if cur is None:
            continue
        m = _INSN.search(line)
        if not m:
            continue
        op, *mods = m.group(1).split(".")
        cur.instructions += 1
        if "MMA" in op:
            _bump(cur.tensor_core, op)
        elif op.startswith(("UTMA", "UBLK")):
            _bump(cur.tma_bulk, op)
        elif op == "LDG":
            _bump(cur.global_loads, _width(mods))
        elif op == "STG":
            _bump(cur.global_stores, _width(mods))
        elif op == "LDGSTS":
            cur.async_copies += 1
        elif op == "LDL":
            cur.local_loads += 1
        elif op == "STL":
            cur.local_stores += 1
        elif op in ("LDS", "LDSM"):
            cur.shared_loads += 1
        elif op in ("STS", "STSM"):
            cur.shared_stores += 1
        elif op == "BAR":
            cur.barriers += 1
        elif op == "SYNCS":
            cur.mbarrier_ops += 1
    return out


# --- findings -------------------------------------------------------------------------------------
def is_matmul_shaped(definition: dict[str, Any]) -> bool:
    """GEMM-like task: op_type says so, or two inputs share an axis that no output has (a
    contraction axis, like K in A[M,K] @ B[N,K]^T)."""
    op = str(definition.get("op_type") or "").lower()
    if any(w in op for w in ("gemm", "matmul", "attention", "moe", "mla", "gqa", "mha", "bmm")):
        return True
    out_axes: set[str] = set()
    for spec in (definition.get("outputs") or {}).values():
        out_axes.update(spec.get("shape") or [])
    shapes = [set(spec.get("shape") or []) for spec in (definition.get("inputs") or {}).values()]
    for i in range(len(shapes)):
        for j in range(i + 1, len(shapes)):
            if len(shapes[i]) >= 2 and len(shapes[j]) >= 2 and (shapes[i] & shapes[j]) - out_axes:
                return True
    return False


def load_width_summary(c: SassCensus) -> str:
    if not c.global_loads:
        return "no global loads" if not c.tma_bulk else "TMA loads"
    by_count = sorted(((int(w), n) for w, n in c.global_loads.items()), key=lambda t: (-t[1], -t[0]))
    if len(by_count) == 1:
        return f"{by_count[0][0]}-bit loads"
    total = sum(n for _, n in by_count)
    mix = ", ".join(f"{w}-bit x{n}" for w, n in sorted(by_count))
    return f"mostly {by_count[0][0]}-bit loads ({mix} of {total} LDG)"


def findings_for(resources: dict[str, KernelResources], census: dict[str, SassCensus],
                 matmul_shaped: bool) -> list[str]:
    notes: list[str] = []
    if matmul_shaped and census and not any(c.tensor_core for c in census.values()):
        names = ", ".join(sorted(resources[k].demangled if k in resources else k for k in census))
        notes.append(f"matmul-shaped kernel with no tensor-core instruction ({names})")
    for name, r in resources.items():
        label = r.demangled
        spilled = r.spill_store_bytes + r.spill_load_bytes
        if spilled:
            notes.append(f"{label}: spills: {r.spill_store_bytes} B stored, {r.spill_load_bytes} B loaded")
        if r.registers is not None and r.registers >= 255:
            notes.append(f"{label}: uses all 255 registers per thread; occupancy is at its floor")
    for name, c in census.items():
        label = resources[name].demangled if name in resources else name
        loads = c.global_loads
        if loads and all(int(w) <= 32 for w in loads):
            widths = sorted({int(w) for w in loads})
            if widths == [32]:
                notes.append(f"{label}: all global loads 32-bit ({loads['32']} LDG); vectorize to 128-bit")
            else:
                notes.append(f"{label}: all global loads ≤ 32-bit ({', '.join(f'{w}-bit: {loads[str(w)]}' for w in widths)})")
        elif loads:
            narrow = sum(n for w, n in loads.items() if int(w) <= 32)
            total = sum(loads.values())
            if narrow * 2 > total:
                notes.append(f"{label}: {narrow} of {total} global loads are 32-bit or narrower; vectorize "
                             "(alignment and divisibility hints let the compiler emit 128-bit loads)")
        spilled = name in resources and (resources[name].spill_store_bytes or resources[name].spill_load_bytes)
        if (c.local_loads or c.local_stores) and not spilled:
            notes.append(f"{label}: local memory traffic without spills (LDL {c.local_loads}, STL {c.local_stores}): "
                         "an indexed per-thread array?")
    return notes


def disassembly_argv(tool: str) -> list[str]:
    """How to print a cubin's SASS with `tool` (nvdisasm is ~0.2 s faster than cuobjdump, which
    calls it; -ndf skips the dataflow analysis the census does not need)."""
    return [tool, "-c", "-ndf"] if Path(tool).name.startswith("nvdisasm") else [tool, "-sass"]


def find_binary(name: str, nvcc: str | None = None) -> str | None:
    """cuobjdump/nvdisasm/ptxas: the CUDA toolkit's copy (matching nvcc) first, else the one
    shipped in the Triton wheel (triton/backends/nvidia/bin), found without importing triton."""
    import importlib.util

    dirs: list[Path] = []
    if nvcc:
        real = Path(nvcc).resolve()
        dirs.append(real.parent)
    for root in ("/usr/local/cuda/bin",):
        dirs.append(Path(root))
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            dirs.append(Path(loc) / "backends" / "nvidia" / "bin")
    for d in dirs:
        p = d / name
        if p.is_file():
            return str(p)
    return shutil.which(name)
