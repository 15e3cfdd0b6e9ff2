"""compile: real nvcc, real Triton, real sandbox, real store."""

from __future__ import annotations

import io
import json
import shutil
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from kda.tools.compile import check_arch, compile_candidate, detect_arch, parse_diagnostics
from kda.tools.errors import BadInput, KdaError, PathRefused
from kda.tools.sass import census_sass, findings_for, is_matmul_shaped, parse_ptxas_verbose
from kda.tools.tripwires import scan_candidate

from conftest import REPO, mcp_client

HAS_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").is_file()
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc not installed")

VEC_KERNEL = textwrap.dedent("""\
    #include <cuda_runtime.h>

    // y = a * x, four floats per thread
    extern "C" __global__ void scale_vec4(const float4* __restrict__ x, float4* __restrict__ y, float a, int n4) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n4) {
            float4 v = x[i];
            v.x *= a; v.y *= a; v.z *= a; v.w *= a;
            y[i] = v;
        }
    }

    extern "C" __global__ void scale(const float* x, float* y, float a, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) y[i] = a * x[i];
    }
    """)

BAD_KERNEL = textwrap.dedent("""\
    #include <cuda_runtime.h>

    __global__ void broken(float* y, int n) {
        int i = threadIdx.x;
        if (i < n) {
            y[i] = smem[i];
        }
    }
    """)

TRITON_DOT = textwrap.dedent("""\
    import triton
    import triton.language as tl


    @triton.jit
    def mm_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
        b_ptrs = b_ptr + offs_k[:, None] * BN + offs_n[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc += tl.dot(tl.load(a_ptrs), tl.load(b_ptrs))
            a_ptrs += BK
            b_ptrs += BK * BN
        tl.store(c_ptr + offs_m[:, None] * BN + offs_n[None, :], acc.to(tl.float16))


    def run(a, b, c):
        pass
    """)

TRITON_DOT_TOML = textwrap.dedent("""\
    language = "triton"
    entry_point = "kernel.py::run"

    [compile.triton.mm_kernel]
    signature = { a_ptr = "*fp16", b_ptr = "*fp16", c_ptr = "*fp16", K = "i32" }
    constexprs = { BM = 128, BN = 128, BK = 64 }
    divisible_by_16 = ["K"]
    num_warps = 8
    num_stages = 3
    """)


def make_candidate(ws, name: str, files: dict[str, str], toml: str | None = None, language: str = "cuda",
                   entry: str = "kernel.cu::run") -> str:
    d = ws.work_dir / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "candidate.toml").write_text(toml or f'language = "{language}"\nentry_point = "{entry}"\n')
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return f"work/{name}"


def copy_example(ws, name: str) -> str:
    shutil.copytree(REPO / "kernels" / "examples" / "rmsnorm_h4096" / "triton_v1", ws.work_dir / name)
    return f"work/{name}"


# --- CUDA ----------------------------------------------------------------------------------------
@needs_nvcc
def test_cuda_syntax_error_points_at_file_and_line(workspace):
    path = make_candidate(workspace, "bad", {"kernel.cu": BAD_KERNEL})
    r = compile_candidate(workspace, path, arch="sm_90a")
    assert not r.ok and r.status == "failed"
    errors = [d for d in r.diagnostics if d.severity == "error"]
    expected_line = BAD_KERNEL.splitlines().index("        y[i] = smem[i];") + 1
    assert errors[0].file == "work/bad/kernel.cu" and errors[0].line == expected_line
    assert "smem" in errors[0].message
    assert r.headline.startswith(f"failed: {len(errors)} error")
    assert f"work/bad/kernel.cu:{expected_line}" in r.headline
    run = workspace.store.get_run(r.run_id)
    assert run["kind"] == "compile" and run["status"] == "failed"


@needs_nvcc
def test_a_recorded_candidate_compiles_as_it_was_recorded(workspace):
    from kda.tools.candidate import load_candidate, record_candidate

    path = make_candidate(workspace, "rec", {"kernel.cu": BAD_KERNEL})
    cid = record_candidate(workspace, load_candidate(workspace, path))
    (workspace.root / path / "kernel.cu").write_text(VEC_KERNEL)  # fixed since; the id still names the old
    r = compile_candidate(workspace, None, arch="sm_90a", candidate=cid[:10])
    assert r.candidate_hash == cid and not r.ok
    expected_line = BAD_KERNEL.splitlines().index("        y[i] = smem[i];") + 1
    assert [(d.file, d.line) for d in r.diagnostics if d.severity == "error"][0] == ("work/rec/kernel.cu", expected_line)
    now = compile_candidate(workspace, path, arch="sm_90a")
    assert now.ok and now.candidate_hash != cid


@needs_nvcc
def test_valid_cuda_kernel_reports_registers_and_census(workspace):
    path = make_candidate(workspace, "vec", {"kernel.cu": VEC_KERNEL})
    r = compile_candidate(workspace, path, arch="sm_90a", flags=["-O3", "-DUNUSED=1"])
    assert r.ok, r.diagnostics
    by_name = {k.name: k for k in r.kernels}
    assert set(by_name) == {"scale_vec4", "scale"}
    for k in by_name.values():
        assert isinstance(k.resources.registers, int) and 0 < k.resources.registers < 255
        assert k.resources.spill_store_bytes == 0
        assert k.source == "work/vec/kernel.cu"
    assert by_name["scale_vec4"].census.global_loads == {"128": 1}
    assert by_name["scale"].census.global_loads == {"32": 1}
    assert not by_name["scale"].census.tensor_core
    assert any("scale" in f and "32-bit" in f for f in r.findings)
    assert r.headline.startswith("ok: 2 kernels;") and "regs" in r.headline
    assert r.toolchain["nvcc"] and r.artifact
    with zipfile.ZipFile(io.BytesIO(workspace.store.get_blob(r.artifact))) as z:
        names = z.namelist()
    assert "kernel.cu.cubin" in names and "kernel.cu.ptx" in names



@needs_nvcc
def test_a_non_inlined_device_function_is_not_a_kernel(workspace):
    """ptxas prints `Function properties` for __noinline__ device functions too; they are not kernels."""
    code = textwrap.dedent("""\
        __device__ __noinline__ float twice(float v) { return 2.0f * v; }
        extern "C" __global__ void doubled(float* x, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) x[i] = twice(x[i]);
        }
        """)
    path = make_candidate(workspace, "noinline", {"kernel.cu": code})
    r = compile_candidate(workspace, path, arch="sm_90a")
    assert r.ok, r.diagnostics
    assert [k.name for k in r.kernels] == ["doubled"]
    assert isinstance(r.kernels[0].resources.registers, int)
    assert r.headline.startswith("ok: 1 kernel")

@needs_nvcc
def test_cache_hit_returns_the_same_result_fast(workspace):
    path = make_candidate(workspace, "vec", {"kernel.cu": VEC_KERNEL})
    first = compile_candidate(workspace, path, arch="sm_90a")
    runs_before = len(workspace.store.list_runs(kind="compile"))
    t0 = time.perf_counter()
    again = compile_candidate(workspace, path, arch="sm_90a")
    elapsed = time.perf_counter() - t0
    assert again.cached and not first.cached
    assert again.model_dump(exclude={"cached"}) == first.model_dump(exclude={"cached"})
    assert elapsed < 0.5
    assert len(workspace.store.list_runs(kind="compile")) == runs_before
    # A different arch or flag is a different build.
    other = compile_candidate(workspace, path, arch="sm_80")
    assert not other.cached and other.arch == "sm_80"
    # Editing the source invalidates the entry.
    (workspace.work_dir / "vec" / "kernel.cu").write_text(VEC_KERNEL + "\n// touched\n")
    assert not compile_candidate(workspace, path, arch="sm_90a").cached


# --- Triton --------------------------------------------------------------------------------------
def test_triton_kernel_compiles_for_sm90a_without_gpu(workspace):
    pytest.importorskip("triton")
    path = copy_example(workspace, "tv1")
    r = compile_candidate(workspace, path, arch="sm_90a")
    assert r.ok, r.diagnostics
    (k,) = r.kernels
    assert k.name == "rmsnorm_fwd" and k.source == "work/tv1/kernel.py"
    assert k.resources.registers and k.resources.num_warps == 8 and k.resources.dynamic_smem_bytes is not None
    assert not k.census.tensor_core  # a scalar (non-dot) kernel
    assert k.census.instructions > 0
    with zipfile.ZipFile(io.BytesIO(workspace.store.get_blob(r.artifact))) as z:
        assert {"rmsnorm_fwd.cubin", "rmsnorm_fwd.ptx"} <= set(z.namelist())
    from kda.tools.compile import ptx_page

    page = ptx_page(workspace, r, 0, 40)
    assert any(".target sm_90a" in line for line in page.lines)
    assert page.total_lines > 40 and page.next_offset == 40


def test_triton_dot_uses_hgmma_on_sm90a(workspace):
    pytest.importorskip("triton")
    path = make_candidate(workspace, "mm", {"kernel.py": TRITON_DOT}, toml=TRITON_DOT_TOML)
    r = compile_candidate(workspace, path, arch="sm_90a")
    assert r.ok, r.diagnostics
    (k,) = r.kernels
    assert k.census.tensor_core.get("HGMMA", 0) > 0, k.census
    assert "HGMMA" in r.headline


def test_triton_missing_settings_and_errors_are_diagnosed(workspace):
    pytest.importorskip("triton")
    path = make_candidate(workspace, "nocfg", {"kernel.py": TRITON_DOT}, language="triton", entry="kernel.py::run")
    r = compile_candidate(workspace, path, arch="sm_90a")
    assert not r.ok and "mm_kernel" in r.diagnostics[0].message and "[compile.triton" in r.diagnostics[0].message
    broken = TRITON_DOT.replace("acc += tl.dot(", "acc += tl.dott(")
    path = make_candidate(workspace, "broken", {"kernel.py": broken}, toml=TRITON_DOT_TOML)
    r = compile_candidate(workspace, path, arch="sm_90a")
    assert not r.ok
    d = r.diagnostics[0]
    assert d.file == "work/broken/kernel.py" and "dott" in d.message
    assert d.line == broken.splitlines().index("        acc += tl.dot(tl.load(a_ptrs), tl.load(b_ptrs))".replace("dot(", "dott(")) + 1


def test_python_candidate_import_check(workspace):
    ok_path = make_candidate(workspace, "py", {"kernel.py": "def run(x, out):\n    out.copy_(x)\n"},
                             language="python", entry="kernel.py::run")
    r = compile_candidate(workspace, ok_path)
    assert r.ok and r.headline.startswith("ok: imports cleanly") and r.kernels == []
    bad = make_candidate(workspace, "pybad", {"kernel.py": "x = 1\nraise RuntimeError('boom at import')\n"},
                         language="python", entry="kernel.py::run")
    r = compile_candidate(workspace, bad)
    assert not r.ok and r.diagnostics[0].file == "work/pybad/kernel.py" and r.diagnostics[0].line == 2
    assert "boom at import" in r.headline


# --- tripwires -----------------------------------------------------------------------------------
def test_tripwires_flag_cheats_with_file_and_line(workspace):
    src = textwrap.dedent("""\
        import torch
        import subprocess
        import ctypes
        import threading
        import torch.nn.functional as F

        torch.cuda.synchronize = lambda: None

        def run(a, b, out):
            out.copy_(torch.matmul(a, b))
            y = F.softmax(a, -1)
            z = a @ b
            open("/tmp/leak.txt", "w").write("x")
            setattr(torch, "mm", None)
        """)
    hits = scan_candidate({"kernel.py": src}, "triton", "work/cheat")
    rules = {(h.rule, h.line) for h in hits}
    assert ("network-or-subprocess", 2) in rules
    assert ("introspection", 3) in rules
    assert ("threading", 4) in rules
    assert ("monkeypatch", 7) in rules
    assert ("torch-fallback", 10) in rules and ("torch-fallback", 11) in rules and ("torch-fallback", 12) in rules
    assert ("write-outside", 13) in rules and ("monkeypatch", 14) in rules
    assert all(h.file == "work/cheat/kernel.py" for h in hits)
    # A plain python candidate may use torch: no torch-fallback warnings there.
    assert not any(h.rule == "torch-fallback" for h in scan_candidate({"kernel.py": src}, "python", "work/p"))
    # What the interpreter-sharing attacks need: hooks, frames, the worker's __main__.
    sneaky = textwrap.dedent("""\
        import sys
        sys.setprofile(lambda *a: None)
        caller = sys._getframe(1).f_back.f_locals
        w = sys.modules["__main__"]

        if __name__ == "__main__":
            pass
        """)
    found = {(h.rule, h.line) for h in scan_candidate({"kernel.py": sneaky}, "python", "work/s")}
    assert {("hooks", 2), ("introspection", 3), ("introspection", 4)} <= found
    assert not any(line == 6 for _, line in found)  # a script's own entry-point guard is fine
    cu = '#include <cstdlib>\n// system("not code")\nvoid f() { system("curl x"); FILE* f = fopen("/etc/passwd", "w"); }\n'
    chits = scan_candidate({"k.cu": cu}, "cuda", "work/c")
    assert {(h.rule, h.line) for h in chits} >= {("network-or-subprocess", 3), ("write-outside", 3)}
    assert not any(h.line == 2 for h in chits)  # comments do not trip


@needs_nvcc
def test_tripwires_reported_in_compile_output(workspace):
    src = VEC_KERNEL + '\n#include <thread>\nvoid spawn() { std::thread t([]{}); t.join(); }\n'
    path = make_candidate(workspace, "thr", {"kernel.cu": src})
    r = compile_candidate(workspace, path, arch="sm_90a")
    assert any(w.rule == "threading" and w.file == "work/thr/kernel.cu" for w in r.warnings)
    assert "tripwire" in r.headline


# --- bad input: clear error, nothing written ------------------------------------------------------
def _snapshot(ws):
    return (len(ws.store.list_runs(limit=1000)), sorted(p.name for p in ws.store.blob_dir.rglob("*")),
            (ws.kda_dir / "jobs").exists() and sorted((ws.kda_dir / "jobs").iterdir()))


def test_bad_input_is_refused_and_writes_nothing(workspace):
    ws = workspace
    before = _snapshot(ws)
    cases = []
    cases.append(make_candidate(ws, "rust", {"kernel.rs.txt": "fn main(){}"}, toml='language = "rust"\nentry_point = "k.rs::run"\n'))
    cases.append(make_candidate(ws, "noentry", {"other.cu": VEC_KERNEL}))
    big = make_candidate(ws, "big", {"kernel.cu": "// " + "x" * (1_048_576 + 10)})
    cases.append(big)
    binp = make_candidate(ws, "bin", {"kernel.cu": VEC_KERNEL})
    (ws.work_dir / "bin" / "blob.h").write_bytes(b"\x00\x01binary")
    cases.append(binp)
    for path in cases:
        with pytest.raises(KdaError):
            compile_candidate(ws, path)
    with pytest.raises(PathRefused):
        compile_candidate(ws, "task")
    with pytest.raises(PathRefused):
        compile_candidate(ws, "../elsewhere")
    good = make_candidate(ws, "good", {"kernel.cu": VEC_KERNEL})
    with pytest.raises(BadInput, match="allowlist"):
        compile_candidate(ws, good, flags=["-o/etc/evil"])
    with pytest.raises(BadInput, match="allowlist"):
        compile_candidate(ws, good, flags=["--compiler-bindir=/tmp/x"])
    with pytest.raises(BadInput, match="unknown arch"):
        compile_candidate(ws, good, arch="sm_999")
    assert _snapshot(ws) == before


def test_arch_names_and_default():
    assert check_arch("sm_90a")[0] == "sm_90a" and check_arch("90a")[0] == "sm_90a"
    assert check_arch("SM_100A")[0] == "sm_100a" and check_arch("sm_80")[0] == "sm_80"
    arch, how = detect_arch()
    assert arch in ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90a", "sm_100a", "sm_103a", "sm_120")
    if shutil.which("nvidia-smi") is None:
        assert arch == "sm_90a" and "default" in how


# --- parsers -------------------------------------------------------------------------------------
def test_parsers_on_real_formats(workspace):
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90a'
        ptxas info    : Function properties for _Z6kernelPf
            24 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 360 bytes cmem[0]
        """)
    r = parse_ptxas_verbose(log)["_Z6kernelPf"]
    assert (r.registers, r.barriers, r.static_smem_bytes, r.stack_frame_bytes, r.spill_store_bytes,
            r.spill_load_bytes) == (255, 1, 2048, 24, 24, 16)
    sass = textwrap.dedent("""\
        \t\tFunction : _Z6kernelPf
        \t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
                /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
                /*0010*/              @!P0 LDG.E R6, desc[UR4][R2.64] ;
                /*0020*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;
                /*0030*/                   UTMALDG.2D [UR8], [UR10] ;
                /*0040*/                   STL [R1], R4 ;
                /*0050*/                   LDL R4, [R1] ;
                /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
                /*0070*/                   LDSM.16.M88.4 R8, [R3] ;
        """)
    c = census_sass(sass)["_Z6kernelPf"]
    assert c.global_loads == {"128": 1, "32": 1} and c.tensor_core == {"HGMMA": 1} and c.tma_bulk == {"UTMALDG": 1}
    assert (c.local_loads, c.local_stores, c.barriers, c.shared_loads) == (1, 1, 1, 1)
    notes = findings_for({"_Z6kernelPf": r}, {"_Z6kernelPf": c}, matmul_shaped=True)
    assert any("spills: 24 B stored, 16 B loaded" in n for n in notes)
    from kda.tools.task import resolve_task  # noqa: F401 - the gemm definition ships with the package

    gemm = json.loads((REPO / "kernels" / "definitions" / "gemm" / "gemm_n4096_k4096.json").read_text())
    assert is_matmul_shaped(gemm) and not is_matmul_shaped(workspace.definition())
    scalar = census_sass("\t\tFunction : k\n        /*0000*/   LDG.E R6, desc[UR4][R2.64] ;\n")
    assert any("no tensor-core instruction" in n for n in findings_for({}, scalar, matmul_shaped=True))
    diag_text = (f"{workspace.root}/work/v/k.cu(12): error: identifier \"smem\" is undefined\n"
                 f"{workspace.root}/work/v/k.cu:3:5: warning: unused variable 'x'\n"
                 "ptxas fatal   : Unresolved extern function 'foo'\n")
    ds = parse_diagnostics(workspace, diag_text, {})
    assert [(d.file, d.line, d.column, d.severity) for d in ds] == [
        ("work/v/k.cu", 12, None, "error"), ("work/v/k.cu", 3, 5, "warning"), (None, None, None, "error")]


# --- through MCP ---------------------------------------------------------------------------------
@needs_nvcc
@pytest.mark.anyio
async def test_compile_through_mcp(workspace):
    path = make_candidate(workspace, "vec", {"kernel.cu": VEC_KERNEL})
    async with mcp_client(workspace, "writer") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "compile" in tools
        res = await client.call_tool("compile", {"path": path, "arch": "sm_90a", "ptx": True, "limit": 5})
        assert not res.is_error
        text = res.content[0].text
        assert text.startswith("ok: 2 kernels;")
        sc = res.structured_content
        assert sc["ok"] and sc["arch"] == "sm_90a" and len(sc["ptx"]["lines"]) == 5
        again = await client.call_tool("compile", {"path": path, "arch": "sm_90a"})
        assert again.structured_content["cached"] and again.content[0].text.splitlines()[0].endswith("(cached)")
        bad = await client.call_tool("compile", {"candidate": "cand_123"})
        assert bad.is_error and "pass path" in bad.content[0].text
        bad = await client.call_tool("compile", {"path": path, "flags": ["-Xcompiler=-fplugin=evil.so"]})
        assert bad.is_error and "allowlist" in bad.content[0].text
    async with mcp_client(workspace, "reviewer") as client:
        assert "compile" not in {t.name for t in (await client.list_tools()).tools}


# --- GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_default_arch_matches_the_gpu():
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    arch, how = detect_arch()
    assert arch.startswith(f"sm_{major}{minor}") and "local GPU" in how


@pytest.mark.gpu
@needs_nvcc
def test_compiled_cubin_loads_and_runs_on_the_gpu(workspace):
    import ctypes

    import torch

    path = make_candidate(workspace, "gpu", {"kernel.cu": VEC_KERNEL})
    r = compile_candidate(workspace, path)  # default arch: the local GPU's
    assert r.ok, r.diagnostics
    with zipfile.ZipFile(io.BytesIO(workspace.store.get_blob(r.artifact))) as z:
        cubin = z.read("kernel.cu.cubin")
    x = torch.arange(4096, dtype=torch.float32, device="cuda")
    y = torch.zeros_like(x)
    torch.cuda.synchronize()  # makes torch's primary context current on this thread
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(rc: int, what: str) -> None:
        assert rc == 0, f"{what} failed with CUresult {rc}"

    module, fn = ctypes.c_void_p(), ctypes.c_void_p()
    check(cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(cubin)), "cuModuleLoadData")
    check(cuda.cuModuleGetFunction(ctypes.byref(fn), module, b"scale_vec4"), "cuModuleGetFunction")
    args = [ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), ctypes.c_float(2.5), ctypes.c_int(1024)]
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    check(cuda.cuLaunchKernel(fn, 4, 1, 1, 256, 1, 1, 0, None, params, None), "cuLaunchKernel")
    check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    torch.testing.assert_close(y, x * 2.5)
    cuda.cuModuleUnload(module)
