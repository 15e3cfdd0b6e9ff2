"""Sandboxed worker: import a candidate's modules and compile its @triton.jit kernels for a GPU
target without a GPU (or just import-check a python candidate).

Run as `python -m kda.sandbox.triton_compile_worker REQUEST.json` inside the sandbox, with the
job directory as cwd. The request names the candidate directory, the entry file, the target
and the per-kernel settings; results go to `result.json` (and `<kernel>.cubin/.ptx/.sass`) in
the job directory. Imports: stdlib, triton (compile mode only).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

MAX_SASS_BYTES = 32 << 20


def _import_file(cand_dir: Path, rel: str):
    path = cand_dir / rel
    mod_name = "kda_candidate_" + rel[:-3].replace("/", "_").replace("-", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {rel}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def _error_location(exc: BaseException, cand_dir: Path, rel_prefix: str) -> tuple[str | None, int | None, int | None]:
    """The innermost traceback frame (or SyntaxError position) inside the candidate."""
    if isinstance(exc, SyntaxError) and exc.filename:
        try:
            rel = Path(exc.filename).resolve().relative_to(cand_dir.resolve()).as_posix()
            return f"{rel_prefix}/{rel}", exc.lineno, exc.offset
        except ValueError:
            pass
    found: tuple[str | None, int | None, int | None] = (None, None, None)
    for frame in traceback.extract_tb(exc.__traceback__):
        try:
            rel = Path(frame.filename).resolve().relative_to(cand_dir.resolve()).as_posix()
        except ValueError:
            continue
        found = (f"{rel_prefix}/{rel}", frame.lineno, None)
    # Triton's CompilationError carries the kernel source position in its message/attributes.
    src = getattr(exc, "src", None)
    node = getattr(exc, "node", None)
    if node is not None and hasattr(node, "lineno") and src is not None and found[0] is None:
        return None, getattr(node, "lineno", None), getattr(node, "col_offset", None)
    return found


def _diag(exc: BaseException, cand_dir: Path, rel_prefix: str, kernel: str | None = None) -> dict[str, Any]:
    file, line, col = _error_location(exc, cand_dir, rel_prefix)
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[-1] if msg else ''}".strip()
    if kernel:
        text = f"kernel {kernel}: {text}"
    return {"file": file, "line": line, "column": col, "severity": "error", "message": text[:2000],
            "detail": "".join(traceback.format_exception(exc))[-4000:]}


def _def_line(fn: Any) -> int:
    import inspect
    import re

    try:
        lines, start = inspect.getsourcelines(fn.fn)
    except (OSError, TypeError):
        return 1
    for i, line in enumerate(lines):
        if re.match(r"\s*(async\s+)?def\s", line):
            return start + i
    return start


def _find_jit(modules: list[Any]) -> dict[str, Any]:
    from triton.runtime.jit import JITFunction

    found: dict[str, Any] = {}
    for m in modules:
        for name, obj in vars(m).items():
            fn = obj
            while fn is not None and not isinstance(fn, JITFunction):
                fn = getattr(fn, "fn", None)  # autotuned / heuristics wrappers hold the JITFunction in .fn
            if fn is not None and name not in found:
                found[name] = fn
    return found


def _compile_kernel(name: str, fn: Any, cfg: dict[str, Any], arch: str, out_dir: Path, disasm: list[str] | None,
                    kernel_file: str | None) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig_in: dict[str, str] = dict(cfg.get("signature") or {})
    constexprs: dict[str, Any] = dict(cfg.get("constexprs") or {})
    arg_names = list(fn.arg_names)
    unknown = sorted((set(sig_in) | set(constexprs)) - set(arg_names))
    if unknown:
        raise ValueError(f"[compile.triton.{name}] names {unknown}, which are not parameters of {name}{tuple(arg_names)}")
    missing = [a for a in arg_names if a not in sig_in and a not in constexprs]
    if missing:
        raise ValueError(f"[compile.triton.{name}] gives no type for {missing}: add them to signature "
                         f"(e.g. x_ptr = \"*bf16\", n = \"i32\") or constexprs")
    signature = {a: ("constexpr" if a in constexprs else sig_in[a]) for a in arg_names}
    # At run time Triton specializes 16-byte-aligned pointers (every torch allocation is); mirror
    # that, plus integer arguments the candidate declares divisible by 16.
    div16 = set(cfg.get("divisible_by_16") or [])
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(arg_names)
             if a not in constexprs and (signature[a].startswith("*") or a in div16)}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    cap = int(arch[3:].rstrip("af"))
    options = {k: cfg[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in cfg}
    log = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    seconds = time.perf_counter() - t0
    md = compiled.metadata
    cubin = compiled.asm.get("cubin")
    ptx = compiled.asm.get("ptx", "")
    (out_dir / f"{name}.ptx").write_text(ptx)
    sass_file = None
    if cubin:
        (out_dir / f"{name}.cubin").write_bytes(cubin)
        if disasm:
            r = subprocess.run([*disasm, str(out_dir / f"{name}.cubin")], capture_output=True, timeout=300)
            (out_dir / f"{name}.sass").write_bytes(r.stdout[:MAX_SASS_BYTES])
            sass_file = f"{name}.sass"
    return {
        "kernel": name, "symbol": md.name, "file": kernel_file, "ptxas_log": log.getvalue()[-20000:],
        "shared": getattr(md, "shared", None), "num_warps": getattr(md, "num_warps", None),
        "num_stages": getattr(md, "num_stages", None), "arch": getattr(md, "arch", None),
        "ptx": f"{name}.ptx", "cubin": f"{name}.cubin" if cubin else None, "sass": sass_file,
        "seconds": round(seconds, 3),
    }


def main(request_path: str) -> int:
    req = json.loads(Path(request_path).read_text())
    cand_dir = Path(req["candidate_dir"])
    rel_prefix = req["rel_prefix"]
    out_dir = Path(req.get("out_dir") or ".")
    result: dict[str, Any] = {"diagnostics": [], "kernels": [], "modules": [], "discovered": []}
    sys.path.insert(0, str(cand_dir))
    modules = []
    files = [req["entry_file"]] + [f for f in req.get("python_files", []) if f != req["entry_file"]]
    for rel in files:
        try:
            modules.append(_import_file(cand_dir, rel))
            result["modules"].append(rel)
        except BaseException as e:  # noqa: BLE001 - candidate code may raise anything, SystemExit included
            result["diagnostics"].append(_diag(e, cand_dir, rel_prefix))
    entry_symbol = req.get("entry_symbol")
    if modules and entry_symbol and not callable(getattr(modules[0], entry_symbol, None)):
        result["diagnostics"].append({
            "file": f"{rel_prefix}/{req['entry_file']}", "line": None, "column": None, "severity": "error",
            "message": f"entry point {req['entry_file']}::{entry_symbol} is not a function in the module"})
    if req.get("mode") == "triton" and not result["diagnostics"]:
        jit = _find_jit(modules)
        result["discovered"] = sorted(jit)
        settings: dict[str, Any] = req.get("kernels") or {}
        if not settings:
            result["diagnostics"].append({
                "file": f"{rel_prefix}/candidate.toml", "line": None, "column": None, "severity": "error",
                "message": (f"no [compile.triton.<kernel>] table in candidate.toml; @triton.jit kernels found: "
                            f"{', '.join(sorted(jit)) or 'none'}. Add e.g. [compile.triton.{next(iter(sorted(jit)), 'my_kernel')}] "
                            "with signature = {x_ptr = \"*bf16\", n = \"i32\"}, constexprs = {BLOCK = 1024}, num_warps = 4")})
        for name, cfg in settings.items():
            if name not in jit:
                result["diagnostics"].append({
                    "file": f"{rel_prefix}/candidate.toml", "line": None, "column": None, "severity": "error",
                    "message": f"[compile.triton.{name}]: no @triton.jit function {name!r} in the candidate "
                               f"(found: {', '.join(sorted(jit)) or 'none'})"})
                continue
            fn = jit[name]
            kernel_file = None
            try:
                kernel_file = Path(fn.fn.__code__.co_filename).resolve().relative_to(cand_dir.resolve()).as_posix()
            except (AttributeError, ValueError):
                pass
            try:
                result["kernels"].append(_compile_kernel(name, fn, cfg, req["arch"], out_dir, req.get("disassembler"),
                                                         kernel_file))
            except BaseException as e:  # noqa: BLE001
                d = _diag(e, cand_dir, rel_prefix, kernel=name)
                if d["file"] is None and kernel_file:
                    d["file"] = f"{rel_prefix}/{kernel_file}"
                    # Triton numbers lines from the kernel's `def` line: make them file lines.
                    if d["line"] is not None:
                        d["line"] = d["line"] + _def_line(fn) - 1
                    if d["column"] is not None:
                        d["column"] += 1
                result["diagnostics"].append(d)
    try:
        import triton

        result["triton_version"] = triton.__version__
    except Exception:  # python candidates on machines without triton
        result["triton_version"] = None
    Path(out_dir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
