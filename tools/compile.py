"""The compile tool's engine: build a candidate in the sandbox and say what the compiler made.

- cuda/cpp: every `.cu` goes through nvcc (`-cubin`, `-Xptxas -v`, `-lineinfo`, `-keep` for the
  PTX, one `-gencode` for the target); `.cpp/.cc/.c` files get a host syntax check. One sandboxed
  shell job runs all steps plus the disassembler (nvdisasm, else cuobjdump), so the overhead
  over plain nvcc is one sandbox start and the disassembly.
- triton: a sandboxed worker imports the candidate and runs `triton.compile` for the target
  (no GPU needed) with the signatures from `candidate.toml` `[compile.triton.<kernel>]`.
- python: a sandboxed import check.
Every candidate also gets the static tripwire scan. Results are cached by content: same sources,
flags, arch and toolchain versions give the stored result back.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, Field

from .candidate import Candidate, resolve_candidate
from .errors import BadInput, NotAvailable
from .sass import (KernelResources, SassCensus, census_sass, demangle, disassembly_argv, find_binary, findings_for,
                   is_matmul_shaped, load_width_summary, parse_ptxas_verbose)
from .store import canonical_json, new_id
from .tripwires import Tripwire, scan_candidate
from .workspace import Workspace

if TYPE_CHECKING:
    from kda.sandbox.runner import JobResult

RECORD_VERSION = 1  # bump when the record layout changes: old cache entries stop matching

ARCHES: dict[str, tuple[str, str]] = {  # arch -> (virtual arch for PTX, real arch for SASS)
    "sm_80": ("compute_80", "sm_80"), "sm_86": ("compute_86", "sm_86"), "sm_87": ("compute_87", "sm_87"),
    "sm_89": ("compute_89", "sm_89"), "sm_90": ("compute_90", "sm_90"), "sm_90a": ("compute_90a", "sm_90a"),
    "sm_100": ("compute_100", "sm_100"), "sm_100a": ("compute_100a", "sm_100a"),
    "sm_103a": ("compute_103a", "sm_103a"), "sm_120": ("compute_120", "sm_120"),
    "sm_120a": ("compute_120a", "sm_120a"),
}
DEFAULT_ARCH = "sm_90a"

# Extra nvcc flags an agent may pass: code generation and macros only; nothing that names files,
# runs other programs, or changes where output goes.
_FLAG_RULES = [
    r"-O[0-3]", r"-Xptxas=-O[0-3]", r"--?use_fast_math", r"-lineinfo", r"-G", r"--?std=c\+\+(14|17|20)",
    r"--extended-lambda", r"--expt-extended-lambda", r"--expt-relaxed-constexpr", r"--restrict",
    r"-D[A-Za-z_][A-Za-z0-9_]*(=[A-Za-z0-9_.+\-]*)?", r"-U[A-Za-z_][A-Za-z0-9_]*",
    r"--?maxrregcount=\d{1,3}", r"--ftz=(true|false)", r"--prec-div=(true|false)", r"--prec-sqrt=(true|false)",
    r"--fmad=(true|false)", r"-Xptxas=-dlcm=(ca|cg|cs)", r"-Xptxas=-warn-spills", r"-Xptxas=-warn-lmem-usage",
    r"--default-stream=per-thread", r"-Wno-deprecated-gpu-targets", r"--threads=\d{1,2}",
    r"--relocatable-device-code=(true|false)", r"-rdc=(true|false)",
]
_FLAG_RE = re.compile("|".join(f"(?:{r})" for r in _FLAG_RULES))
CUDA_SUFFIXES = (".cu",)
HOST_SUFFIXES = (".cpp", ".cc", ".c")


# --- output models -------------------------------------------------------------------------------
class Diagnostic(BaseModel):
    file: Optional[str] = Field(None, description="Workspace-relative path (absolute for system headers).")
    line: Optional[int] = None
    column: Optional[int] = None
    severity: str = Field(description="error | warning | note")
    message: str


class KernelReport(BaseModel):
    name: str
    demangled: str
    source: Optional[str] = Field(None, description="Workspace-relative file the kernel came from.")
    resources: KernelResources
    census: SassCensus
    summary: str = Field(description="One line: registers, spills, load width, tensor cores.")


class PtxPage(BaseModel):
    lines: list[str]
    offset: int
    next_offset: Optional[int]
    total_lines: int


class CompileResult(BaseModel):
    ok: bool
    status: str = Field(description="ok | failed")
    run_id: str
    cached: bool = Field(description="True when this result came from the content cache.")
    candidate: str
    candidate_hash: str
    language: str
    arch: str
    flags: list[str]
    diagnostics: list[Diagnostic]
    kernels: list[KernelReport]
    findings: list[str]
    warnings: list[Tripwire] = Field(description="Static tripwires: file:line, rule, what it looks like.")
    artifact: Optional[str] = Field(None, description="Blob id of a zip with cubin/PTX/SASS files.")
    ptx_blobs: dict[str, str] = Field(default_factory=dict, description="PTX file -> blob id")
    compile_seconds: float
    toolchain: dict[str, Optional[str]]
    isolation: str
    sandbox: str = Field(description="How the sandboxed job ended, in words.")
    headline: str
    ptx: Optional[PtxPage] = None


# --- toolchain -----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def nvcc_path() -> str | None:
    import os

    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and Path(cand).is_file():
            return cand
    return None


@lru_cache(maxsize=1)
def nvcc_version() -> str | None:
    nv = nvcc_path()
    if not nv:
        return None
    try:
        out = subprocess.run([nv, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release [\d.]+, (V[\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1] if out.strip() else None


@lru_cache(maxsize=1)
def triton_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def disassembler() -> str | None:
    return find_binary("nvdisasm", nvcc_path()) or find_binary("cuobjdump", nvcc_path())


def toolchain() -> dict[str, Optional[str]]:
    return {"nvcc": nvcc_version(), "triton": triton_version(), "disassembler": disassembler(),
            "python": sys.version.split()[0]}


_CC_TO_ARCH = {"8.0": "sm_80", "8.6": "sm_86", "8.7": "sm_87", "8.9": "sm_89", "9.0": "sm_90a",
               "10.0": "sm_100a", "10.3": "sm_103a", "12.0": "sm_120", "12.1": "sm_120"}


@lru_cache(maxsize=1)
def detect_arch() -> tuple[str, str]:
    """(arch, how): the first local GPU's arch (nvidia-smi), else sm_90a."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout.split()
            if out and out[0] in _CC_TO_ARCH:
                return _CC_TO_ARCH[out[0]], f"local GPU (compute capability {out[0]})"
        except (OSError, subprocess.SubprocessError):
            pass
    return DEFAULT_ARCH, "no local GPU; default"


def check_flags(flags: list[str]) -> list[str]:
    bad = [f for f in flags if not _FLAG_RE.fullmatch(f)]
    if bad:
        raise BadInput(f"flag(s) not on the allowlist: {bad}. Allowed: optimization (-O0..-O3, --use_fast_math, "
                       "--ftz/--prec-div/--prec-sqrt/--fmad=true|false), -DNAME[=VALUE], -UNAME, "
                       "--maxrregcount=N, -std=c++14|17|20, --expt-relaxed-constexpr, --extended-lambda, "
                       "-Xptxas=-O0..3, -Xptxas=-dlcm=ca|cg|cs, -Xptxas=-warn-spills, -lineinfo, -G")
    return list(flags)


def check_arch(arch: str | None) -> tuple[str, str]:
    if arch is None or arch == "":
        return detect_arch()
    a = arch.strip().lower()
    if not a.startswith("sm_"):
        a = "sm_" + a.replace(".", "")
    if a not in ARCHES:
        raise BadInput(f"unknown arch {arch!r}; accepted: {', '.join(ARCHES)}")
    return a, "requested"


# --- diagnostics ---------------------------------------------------------------------------------
_NVCC_DIAG = re.compile(r"^(?P<file>.+?)\((?P<line>\d+)\): (?P<sev>error|warning|remark|note|catastrophic error)"
                        r"(?: #[\w-]+)?: (?P<msg>.*)$")
_GCC_DIAG = re.compile(r"^(?P<file>[^:\s][^:]*):(?P<line>\d+):(?:(?P<col>\d+):)? (?P<sev>fatal error|error|warning|note): "
                       r"(?P<msg>.*)$")
_TOOL_DIAG = re.compile(r"^(?P<tool>ptxas|nvcc|nvlink|cicc)\s*(?P<where>[^:]*?)\s*(?P<sev>fatal|error|warning)\s*:\s*(?P<msg>.*)$")


def _relpath(ws: Workspace, raw: str, cwd: Path | None, src: tuple[Path, str] | None) -> str:
    p = Path(raw)
    if not p.is_absolute() and cwd is not None:
        p = cwd / p
    if src is not None and p.is_relative_to(src[0]):  # the build's copy of the candidate: its own name
        return f"{src[1]}/{p.relative_to(src[0]).as_posix()}"
    try:
        return ws.rel(p)
    except ValueError:
        return raw


def parse_diagnostics(ws: Workspace, text: str, sources_abs: dict[str, str], cwd: Path | None = None,
                      src: tuple[Path, str] | None = None) -> list[Diagnostic]:
    """nvcc/EDG (`file(line): error: msg`), gcc/clang (`file:line:col: error: msg`) and tool lines
    (`ptxas error : msg`, `nvcc fatal : msg`)."""
    out: list[Diagnostic] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("ptxas info") or line.startswith("    ") and "bytes stack frame" in line:
            continue
        m = _NVCC_DIAG.match(line)
        if m:
            sev = "error" if "error" in m.group("sev") else ("note" if m.group("sev") in ("note", "remark") else "warning")
            file_rel = _relpath(ws, m.group("file"), cwd, src)
            ln = int(m.group("line"))
            col = _caret_column(lines, i, sources_abs.get(file_rel), ln)
            out.append(Diagnostic(file=file_rel, line=ln, column=col, severity=sev, message=m.group("msg").strip()))
            continue
        m = _GCC_DIAG.match(line)
        if m:
            sev = "error" if "error" in m.group("sev") else m.group("sev")
            out.append(Diagnostic(file=_relpath(ws, m.group("file"), cwd, src), line=int(m.group("line")),
                                  column=int(m.group("col")) if m.group("col") else None, severity=sev,
                                  message=m.group("msg").strip()))
            continue
        m = _TOOL_DIAG.match(line.strip())
        if m:
            sev = "warning" if m.group("sev") == "warning" else "error"
            where = m.group("where").strip().rstrip(",;")
            msg = f"{m.group('tool')}: {m.group('msg').strip()}" + (f" ({where})" if where else "")
            out.append(Diagnostic(file=None, line=None, column=None, severity=sev, message=msg))
    return out


def _caret_column(lines: list[str], i: int, source: str | None, line_no: int) -> int | None:
    """nvcc echoes the (preprocessed) line and a caret under the spot; trust it only when the
    echo matches the real source line, so the column is a column of the file."""
    if source is None or i + 2 >= len(lines):
        return None
    echo, caret = lines[i + 1], lines[i + 2]
    if caret.strip() != "^":
        return None
    src_lines = source.splitlines()
    if not (0 < line_no <= len(src_lines)):
        return None
    original = src_lines[line_no - 1]
    if echo.strip() != original.strip() or not original.strip():
        return None
    offset = caret.index("^") - (len(echo) - len(echo.lstrip()))
    return len(original) - len(original.lstrip()) + offset + 1


# --- the build jobs ------------------------------------------------------------------------------
def _sandbox_job(ws: Workspace, cand_dir: Path, job_dir: Path, argv: list[str], env: dict[str, str]) -> JobResult:
    from kda.sandbox.runner import Job, run_job  # loaded on the first build, not at server start

    sb = ws.policy.sandbox
    job = Job(argv=argv, cwd=job_dir, ro_paths=[cand_dir], hide_paths=[ws.kda_dir, ws.work_dir], env=env,
              wall_timeout_s=min(sb.wall_timeout_s, 900.0), limits=sb.limits(), tail_bytes=256 * 1024)
    return run_job(job, require_isolation=sb.require_isolation)


def _build_cuda(ws: Workspace, cand: Candidate, cand_dir: Path, job_dir: Path, arch: str,
                flags: list[str]) -> dict[str, Any]:
    nvcc = nvcc_path()
    if nvcc is None:
        raise NotAvailable("nvcc not found (looked on PATH and in $CUDA_HOME/bin); install the CUDA toolkit")
    virt, real = ARCHES[arch]
    cuobjdump = disassembler()
    cu_files = sorted(f for f in cand.sources if f.endswith(CUDA_SUFFIXES))
    host_files = sorted(f for f in cand.sources if f.endswith(HOST_SUFFIXES))
    if not cu_files and not host_files:
        raise BadInput(f"{cand.path}: a {cand.spec.language} candidate needs at least one .cu or .cpp file")
    includes = [f"-I{cand_dir}", *_extra_includes(cand)]
    script = ["#!/bin/sh", "set -u", "mkdir -p out"]
    steps = []
    for n, rel in enumerate(cu_files):
        keep = f"keep/{n}"
        cmd = [nvcc, "-cubin", "-o", f"out/{n}.cubin", "-Xptxas", "-v", "-lineinfo",
               "-gencode", f"arch={virt},code={real}", "-keep", "-keep-dir", keep, *includes, *flags,
               str(cand_dir / rel)]
        script += [f"mkdir -p {keep}",
                   f"{shlex.join(cmd)} > out/{n}.log 2>&1; echo $? > out/{n}.rc"]
        if cuobjdump:
            script.append(f"[ -s out/{n}.cubin ] && {shlex.join(disassembly_argv(cuobjdump))} out/{n}.cubin "
                          f"> out/{n}.sass 2>/dev/null")
        steps.append({"kind": "cu", "file": rel, "n": n, "keep": keep})
    cxx = shutil.which("c++") or shutil.which("g++")
    for m, rel in enumerate(host_files):
        n = f"h{m}"
        if cxx is None:
            continue
        cmd = [cxx, "-fsyntax-only", "-std=c++17", *includes, f"-I{Path(nvcc).resolve().parent.parent / 'include'}",
               str(cand_dir / rel)]
        script.append(f"{shlex.join(cmd)} > out/{n}.log 2>&1; echo $? > out/{n}.rc")
        steps.append({"kind": "host", "file": rel, "n": n})
    script.append("exit 0")  # step outcomes are in out/*.rc; a non-zero job status means the sandbox stopped it
    (job_dir / "build.sh").write_text("\n".join(script) + "\n")
    res = _sandbox_job(ws, cand_dir, job_dir, ["/bin/sh", "build.sh"], {})
    return {"steps": steps, "job": res}


@lru_cache(maxsize=1)
def _torch_includes() -> tuple[str, ...]:
    import importlib.util
    import sysconfig

    spec = importlib.util.find_spec("torch")
    if not spec or not spec.submodule_search_locations:
        return ()
    base = Path(list(spec.submodule_search_locations)[0]) / "include"
    dirs = [base, base / "torch" / "csrc" / "api" / "include", Path(sysconfig.get_paths()["include"])]
    return tuple(f"-I{d}" for d in dirs if d.is_dir())


def _extra_includes(cand: Candidate) -> list[str]:
    # torch headers only when a source includes them (they slow the front-end a lot).
    if any(re.search(r"#\s*include\s*[<\"](torch/|ATen/|c10/)", t) for t in cand.sources.values()):
        return list(_torch_includes())
    return []


@dataclass
class _Collected:
    """What a build left behind, gathered from its job dir."""

    diags: list[Diagnostic] = field(default_factory=list)
    resources: dict[str, KernelResources] = field(default_factory=dict)
    census: dict[str, SassCensus] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # kernel -> source file
    files: dict[str, bytes] = field(default_factory=dict)  # artifact name -> bytes (cubin, sass)
    ptx: dict[str, str] = field(default_factory=dict)


def _collect_cuda(ws: Workspace, cand: Candidate, job_dir: Path, build: dict[str, Any]) -> _Collected:
    sources_abs = {f"{cand.path}/{rel}": text for rel, text in cand.sources.items()}
    got = _Collected()
    diags, resources, census, origin, files, ptx = got.diags, got.resources, got.census, got.origin, got.files, got.ptx
    out = job_dir / "out"
    for step in build["steps"]:
        n, rel = step["n"], step["file"]
        log = _read_text(out / f"{n}.log")
        rc_text = _read_text(out / f"{n}.rc").strip()
        step_diags = parse_diagnostics(ws, log, sources_abs, cwd=job_dir, src=(job_dir / "src", cand.path))
        if rc_text not in ("", "0") and not any(d.severity == "error" for d in step_diags):
            tail = "\n".join(log.strip().splitlines()[-5:])
            step_diags.append(Diagnostic(file=f"{cand.path}/{rel}", severity="error",
                                         message=f"compiler exited {rc_text}: {tail or 'no output'}"))
        elif rc_text == "":
            step_diags.append(Diagnostic(file=f"{cand.path}/{rel}", severity="error",
                                         message=f"compile step did not finish ({build['job'].reason})"))
        diags.extend(step_diags)
        if step["kind"] != "cu":
            continue
        for name, r in parse_ptxas_verbose(log).items():
            resources[name] = r
            origin[name] = f"{cand.path}/{rel}"
        stem = Path(rel).stem
        cubin = out / f"{n}.cubin"
        if cubin.is_file():
            files[f"{rel}.cubin"] = cubin.read_bytes()
        for p in sorted((job_dir / step["keep"]).glob(f"{stem}*.ptx")):
            ptx[f"{rel}.ptx"] = _read_text(p)
        sass = _read_text(out / f"{n}.sass")
        if sass:
            files[f"{rel}.sass"] = sass.encode()
            census.update(census_sass(sass))
    return got


def _read_text(p: Path, cap: int = 64 << 20) -> str:
    try:
        with open(p, "rb") as f:
            return f.read(cap).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _build_python(ws: Workspace, cand: Candidate, cand_dir: Path, job_dir: Path, arch: str, mode: str
                  ) -> dict[str, Any]:
    kernels = (cand.spec.compile.get("triton") or {}) if mode == "triton" else {}
    if not isinstance(kernels, dict) or not all(isinstance(v, dict) for v in kernels.values()):
        raise BadInput(f"{cand.path}/candidate.toml: [compile.triton] must hold one table per kernel, e.g. "
                       "[compile.triton.my_kernel] signature = {x_ptr = \"*bf16\", n = \"i32\"}")
    req = {
        "candidate_dir": str(cand_dir), "rel_prefix": cand.path, "entry_file": cand.spec.entry_file,
        "entry_symbol": cand.spec.entry_symbol, "python_files": sorted(f for f in cand.sources if f.endswith(".py")),
        "mode": mode, "arch": arch, "kernels": kernels, "out_dir": str(job_dir),
        "disassembler": disassembly_argv(disassembler()) if disassembler() else None,
    }
    (job_dir / "request.json").write_text(json.dumps(req))
    env = {"TRITON_CACHE_DIR": str(job_dir / ".triton"), "TRITON_HOME": str(job_dir)}
    res = _sandbox_job(ws, cand_dir, job_dir, [sys.executable, "-m", "kda.sandbox.triton_compile_worker",
                                               "request.json"], env)
    return {"job": res}


def _collect_python(cand: Candidate, job_dir: Path, build: dict[str, Any]) -> _Collected:
    res: JobResult = build["job"]
    got = _Collected()
    diags, resources, census, origin, files, ptx = got.diags, got.resources, got.census, got.origin, got.files, got.ptx
    try:
        result = json.loads((job_dir / "result.json").read_text())
    except (OSError, ValueError):
        tail = "\n".join(res.stderr_tail.strip().splitlines()[-8:])
        diags.append(Diagnostic(file=None, severity="error",
                                message=f"the sandboxed worker ended without a result ({res.reason}): {tail}"))
        return got
    for d in result.get("diagnostics", []):
        diags.append(Diagnostic(file=d.get("file"), line=d.get("line"), column=d.get("column"),
                                severity=d.get("severity", "error"), message=d.get("message", "")))
    for k in result.get("kernels", []):
        parsed = parse_ptxas_verbose(k.get("ptxas_log") or "")
        sym = k.get("symbol") or k["kernel"]
        r = parsed.get(sym) or KernelResources(name=sym, demangled=sym)
        r.dynamic_smem_bytes = k.get("shared")
        r.num_warps, r.num_stages = k.get("num_warps"), k.get("num_stages")
        resources[sym] = r
        origin[sym] = f"{cand.path}/{k['file']}" if k.get("file") else cand.path
        if k.get("cubin"):
            files[f"{k['kernel']}.cubin"] = (job_dir / k["cubin"]).read_bytes()
        if k.get("ptx"):
            ptx[f"{k['kernel']}.ptx"] = _read_text(job_dir / k["ptx"])
        if k.get("sass"):
            text = _read_text(job_dir / k["sass"])
            files[f"{k['kernel']}.sass"] = text.encode()
            census.update(census_sass(text))
    return got


# --- the tool ------------------------------------------------------------------------------------
def cache_key(cand: Candidate, arch: str, flags: list[str], tools: dict[str, Optional[str]]) -> str:
    relevant = {k: tools.get(k) for k in (("triton",) if cand.spec.language in ("triton", "python") else ("nvcc",))}
    payload = {"v": RECORD_VERSION, "candidate": cand.content_hash, "arch": arch, "flags": flags, "tools": relevant,
               "disasm": tools.get("disassembler")}
    return "compile:" + hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def _kernel_summary(r: KernelResources, c: SassCensus) -> str:
    parts = [f"{r.registers} regs" if r.registers is not None else "regs unknown"]
    spilled = r.spill_store_bytes + r.spill_load_bytes
    parts.append(f"{spilled} B spills" if spilled else "0 spills")
    parts.append(load_width_summary(c))
    if c.tensor_core:
        parts.append("+".join(sorted(c.tensor_core)))
    return ", ".join(parts)


def _short(demangled: str) -> str:
    name = demangled.split("(")[0]
    return name[5:] if name.startswith("void ") else name


def _headline(ok: bool, diags: list[Diagnostic], kernels: list[KernelReport], warnings: list[Tripwire],
              language: str) -> str:
    if not ok:
        errors = [d for d in diags if d.severity == "error"]
        first = errors[0] if errors else None
        where = ""
        if first and first.file:
            where = f" at {first.file}" + (f":{first.line}" if first.line else "")
        msg = first.message if first else "unknown failure"
        return f"failed: {len(errors)} error{'s' if len(errors) != 1 else ''}, first{where}: {msg}"[:400]
    if language == "python":
        head = "ok: imports cleanly"
    else:
        shown = "; ".join(f"{_short(k.demangled)} {k.summary}" for k in kernels[:3])
        more = f"; +{len(kernels) - 3} more" if len(kernels) > 3 else ""
        head = f"ok: {len(kernels)} kernel{'s' if len(kernels) != 1 else ''}" + (f"; {shown}{more}" if shown else "")
    if warnings:
        head += f"; {len(warnings)} tripwire warning{'s' if len(warnings) != 1 else ''} (first {warnings[0].file}:{warnings[0].line} {warnings[0].rule})"
    return head


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # deterministic: same bytes, same blob
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, files[name])
    return buf.getvalue()


def compile_candidate(ws: Workspace, path: str | None, arch: str | None = None, flags: list[str] | None = None,
                      role: str = "writer", candidate: str | None = None) -> CompileResult:
    """Validate, then build in the sandbox (or return the cached result). The build reads a copy
    of the sources as they were hashed (the cache key), never the live directory. Bad input
    raises before anything is written."""
    flags = check_flags(list(flags or []))
    arch_name, _ = check_arch(arch)
    cand = resolve_candidate(ws, path, candidate)
    language = cand.spec.language
    if flags and language not in ("cuda", "cpp"):
        raise BadInput(f"flags apply to cuda/cpp candidates only; {cand.path} is a {language} candidate "
                       "(Triton settings go in candidate.toml [compile.triton.<kernel>])")
    tools = toolchain()
    key = cache_key(cand, arch_name, flags, tools)
    hit = ws.store.cache_get(key)
    if hit:
        try:
            rec = ws.store.get_run(hit)["record"]
            rec["cached"] = True
            return CompileResult.model_validate(rec)
        except Exception:  # a stale or unreadable cache entry: rebuild
            pass

    warnings = scan_candidate(cand.sources, language, cand.path)
    jobs_root = ws.kda_dir / "jobs"
    jobs_root.mkdir(parents=True, exist_ok=True)
    job_dir = jobs_root / new_id("compile")
    cand_dir = job_dir / "src"
    cand.write_to(cand_dir)
    try:
        t0 = time.perf_counter()
        if language in ("cuda", "cpp"):
            build = _build_cuda(ws, cand, cand_dir, job_dir, arch_name, flags)
            got = _collect_cuda(ws, cand, job_dir, build)
        else:
            build = _build_python(ws, cand, cand_dir, job_dir, arch_name, language)
            got = _collect_python(cand, job_dir, build)
        diags, resources, census, origin, files, ptx = got.diags, got.resources, got.census, got.origin, got.files, got.ptx
        job: JobResult = build["job"]
        if not job.ok and not any(d.severity == "error" for d in diags):
            diags.append(Diagnostic(severity="error", message=f"sandboxed job failed: {job.reason}"))
        compile_seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)

    names = demangle(sorted(set(resources) | set(census)))
    kernels: list[KernelReport] = []
    for name in sorted(set(resources) | set(census), key=lambda n: (origin.get(n, ""), n)):
        r = resources.get(name) or KernelResources(name=name, demangled=name)
        r.demangled = names.get(name, name)
        c = census.get(name) or SassCensus()
        kernels.append(KernelReport(name=name, demangled=r.demangled, source=origin.get(name), resources=r,
                                    census=c, summary=_kernel_summary(r, c)))
    ok = not any(d.severity == "error" for d in diags) and job.ok
    if language in ("cuda", "cpp", "triton") and ok and not kernels and not any(f.endswith(".cubin") for f in files):
        if language == "triton" or any(f.endswith(CUDA_SUFFIXES) for f in cand.sources):
            diags.append(Diagnostic(severity="error", message="the build produced no kernel"))
            ok = False
    findings = findings_for({k.name: k.resources for k in kernels}, {k.name: k.census for k in kernels},
                            is_matmul_shaped(ws.definition())) if ok else []

    artifact = ws.store.put_blob(_zip({**files, **{k: v.encode() for k, v in ptx.items()}}), "application/zip") \
        if (files or ptx) else None
    ptx_blobs = {name: ws.store.put_blob(text.encode(), "text/plain") for name, text in ptx.items()}
    headline = _headline(ok, diags, kernels, warnings, language)
    run_id = new_id("run")
    result = CompileResult(
        ok=ok, status="ok" if ok else "failed", run_id=run_id, cached=False, candidate=cand.path,
        candidate_hash=cand.content_hash, language=language, arch=arch_name, flags=flags, diagnostics=diags[:200],
        kernels=kernels, findings=findings, warnings=warnings[:200], artifact=artifact, ptx_blobs=ptx_blobs,
        compile_seconds=round(compile_seconds, 3), toolchain=tools, isolation=job.isolation, sandbox=job.reason,
        headline=headline,
    )
    ws.store.put_run(kind="compile", role=role, status=result.status, headline=headline,
                     record=result.model_dump(mode="json"), candidate_path=cand.path,
                     candidate_hash=cand.content_hash, device=None, run_id=run_id)
    # A job the sandbox had to kill says nothing stable about the sources: do not cache it.
    if not job.timed_out and job.returncode is not None:
        ws.store.cache_put(key, "compile", run_id)
    return result


def ptx_page(ws: Workspace, result: CompileResult, offset: int, limit: int) -> PtxPage:
    lines: list[str] = []
    for name, blob in sorted(result.ptx_blobs.items()):
        lines.append(f"// ===== {name} =====")
        lines += ws.store.get_blob(blob).decode("utf-8", errors="replace").splitlines()
    page = lines[offset: offset + limit]
    nxt = offset + limit if offset + limit < len(lines) else None
    return PtxPage(lines=page, offset=offset, next_offset=nxt, total_lines=len(lines))
