"""compile: build a candidate in the sandbox; diagnostics, per-kernel resources, SASS census."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

# tools/compile.py imports only pydantic and the stdlib at module level: cheap at server start.
from kda.tools.compile import CompileResult, compile_candidate, ptx_page

from .toolkit import CallContext, Reply, tool


class CompileInput(BaseModel):
    path: Optional[str] = Field(None, description="Candidate directory under work/, e.g. 'work/v3'.")
    candidate: Optional[str] = Field(
        None, description=("A recorded candidate id instead of path: the candidate_hash of an earlier benchmark "
                           "(8+ hex digits)."))
    arch: Optional[str] = Field(
        None, description="Target: sm_80, sm_86, sm_89, sm_90, sm_90a, sm_100a, sm_120 ... "
                          "Default: the local GPU's arch, else sm_90a.")
    flags: list[str] = Field(default_factory=list, description="Extra nvcc flags from the allowlist "
                             "(-O0..-O3, --use_fast_math, -DNAME=VALUE, --maxrregcount=N, -std=c++17, "
                             "-Xptxas=-dlcm=ca ...). cuda/cpp candidates only.")
    ptx: bool = Field(False, description="Also return PTX lines (paginated by offset/limit).")
    offset: int = Field(0, ge=0, description="First PTX line to return (with ptx=true).")
    limit: int = Field(400, ge=1, le=5000, description="Most PTX lines to return (with ptx=true).")


@tool("compile", title="Compile a candidate", input_model=CompileInput, output_model=CompileResult,
      roles={"writer"}, read_only=False, idempotent=True, checks_lock=True)
def compile_tool(call: CallContext, args: CompileInput) -> Reply[CompileResult]:
    """Build a candidate (a directory under work/ with candidate.toml) inside the sandbox for a GPU
    target, without needing a GPU, and report what the compiler made.

    - cuda/cpp: each .cu file through nvcc (-cubin, -Xptxas -v, -lineinfo, one -gencode for the
      arch); .cpp files get a host syntax check. Diagnostics come back as {file, line, column,
      severity, message} with workspace-relative paths.
    - triton: the @triton.jit kernels are compiled with Triton's own compiler. Each kernel needs a
      table in candidate.toml:
        [compile.triton.<kernel_function_name>]
        signature = { x_ptr = "*bf16", w_ptr = "*bf16", n_cols = "i32", eps = "fp32" }
        constexprs = { BLOCK = 1024 }        # every tl.constexpr parameter
        num_warps = 4                         # optional; also num_stages, num_ctas, maxnreg
        divisible_by_16 = ["n_cols"]          # optional: integer args known to be multiples of 16
      Types: *fp16 *bf16 *fp32 *fp8e4nv *i32 ... for pointers, i32 i64 fp32 for scalars. Pointers are
      assumed 16-byte aligned, as Triton specializes them at run time.
    - python: an import check in the sandbox.
    Every candidate gets a static tripwire scan (reference calls, torch fallbacks, threads,
    monkeypatching, ctypes/gc/inspect, network/subprocess, writes outside the job) as warnings.

    Output: ok/failed, diagnostics, per-kernel registers/shared memory/stack/spills/barriers, a SASS
    census (tensor-core, TMA, global load widths, local/shared memory, barriers), findings, the
    artifact blob id, compile time and toolchain versions. Same sources, flags, arch and toolchain
    return the cached result (cached=true). ptx=true adds PTX lines, paginated by offset/limit."""
    result = compile_candidate(call.ws, args.path, arch=args.arch, flags=args.flags, role=call.role,
                               candidate=args.candidate)
    detail_lines = []
    for d in result.diagnostics[:20]:
        where = f"{d.file}:{d.line}" if d.file and d.line else (d.file or "")
        detail_lines.append(f"{d.severity}: {where + ': ' if where else ''}{d.message}")
    for k in result.kernels:
        detail_lines.append(f"kernel {k.demangled}: {k.summary}")
    detail_lines += [f"finding: {f}" for f in result.findings]
    detail_lines += [f"warning: {w}" for w in result.warnings[:20]]
    if args.ptx:
        result = result.model_copy(update={"ptx": ptx_page(call.ws, result, args.offset, args.limit)})
    headline = result.headline + (" (cached)" if result.cached else "")
    return Reply(headline, result, "\n".join(detail_lines))
