"""Static tripwires on a candidate's sources: things an honest kernel has no reason to do.

Warnings, not verdicts: each names file:line and what it looks like, and the benchmark and
reviewer decide what it means. Python goes through `ast` (so strings and comments do not
trip it); CUDA/C++ through line regexes with comments stripped.
"""

from __future__ import annotations

import ast
import re
from typing import Iterable

from pydantic import BaseModel

NETWORK_OR_PROCESS = {"socket", "subprocess", "urllib", "http", "requests", "httpx", "ftplib", "smtplib",
                      "telnetlib", "asyncio.subprocess", "pty", "multiprocessing.connection", "paramiko"}
THREADING = {"threading", "multiprocessing", "concurrent", "_thread"}
INTROSPECTION = {"gc", "ctypes", "inspect", "sys._getframe", "importlib", "builtins", "cffi", "pickle", "marshal"}
HOOKS = {"sys.addaudithook", "sys.setprofile", "sys.settrace", "threading.setprofile", "threading.settrace",
         "threading.setprofile_all_threads", "threading.settrace_all_threads"}
FRAME_ATTRS = {"f_back", "f_locals", "f_globals", "tb_frame", "gi_frame", "cr_frame", "ag_frame"}
TORCH_FALLBACK_ATTRS = {
    "matmul", "mm", "bmm", "addmm", "einsum", "softmax", "log_softmax", "layer_norm", "rms_norm", "group_norm",
    "conv1d", "conv2d", "linear", "scaled_dot_product_attention", "baddbmm", "tensordot", "rsqrt", "sum", "mean",
    "var", "norm", "exp", "topk", "sort", "cumsum", "silu", "gelu", "relu", "sigmoid", "tanh", "square", "pow",
}


class Tripwire(BaseModel):
    file: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}: {self.message}"


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _root(mod: str) -> str:
    return mod.split(".")[0]


class _PyScan(ast.NodeVisitor):
    def __init__(self, file: str, language: str):
        self.file, self.language = file, language
        self._in_main_guard = False
        self.hits: list[Tripwire] = []
        self.aliases: dict[str, str] = {}  # local name -> module dotted path

    def hit(self, node: ast.AST, rule: str, msg: str) -> None:
        self.hits.append(Tripwire(file=self.file, line=getattr(node, "lineno", 0), rule=rule, message=msg))

    def _check_module(self, node: ast.AST, mod: str) -> None:
        root = _root(mod)
        if mod in NETWORK_OR_PROCESS or root in NETWORK_OR_PROCESS:
            self.hit(node, "network-or-subprocess", f"imports {mod}")
        elif root in THREADING:
            self.hit(node, "threading", f"imports {mod}: kernels are launched from one thread")
        elif mod in INTROSPECTION or root in INTROSPECTION:
            self.hit(node, "introspection", f"imports {mod} (gc/ctypes/inspect tricks can reach the harness)")
        if "reference" in mod.split(".") or root in ("task", "definition"):
            self.hit(node, "reference-call", f"imports {mod}: candidates must not use the task's reference code")
        if root == "flashinfer_bench":
            self.hit(node, "harness-access", f"imports {mod}: the candidate should not touch the benchmark harness")

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            self._check_module(node, a.name)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if node.level == 0:
            self._check_module(node, mod)
            for a in node.names:
                full = f"{mod}.{a.name}"
                self.aliases[a.asname or a.name] = full
                if full in INTROSPECTION:
                    self.hit(node, "introspection", f"imports {full}")
        self.generic_visit(node)

    def _resolve(self, dotted: str) -> str:
        head, _, rest = dotted.partition(".")
        base = self.aliases.get(head, head)
        return f"{base}.{rest}" if rest else base

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func)
        if name:
            full = self._resolve(name)
            parts = full.split(".")
            if parts[0] == "torch" and self.language in ("triton", "cuda", "cpp"):
                if parts[-1] in TORCH_FALLBACK_ATTRS or full.startswith("torch.nn.functional") or \
                        full.startswith("torch.ops.aten"):
                    self.hit(node, "torch-fallback", f"calls {full} inside a {self.language} candidate: the "
                             "work should be in the kernel")
            if full in ("setattr", "delattr") and node.args:
                target = _dotted(node.args[0])
                if target and _root(self._resolve(target)) in {"torch", "time", "triton"}:
                    self.hit(node, "monkeypatch", f"{full}() on {self._resolve(target)}")
            if full in ("open", "io.open", "os.open", "pathlib.Path.write_text") and node.args:
                arg = node.args[0]
                mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
                writing = isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax+")
                if writing and isinstance(arg, ast.Constant) and isinstance(arg.value, str) and \
                        (arg.value.startswith("/") or ".." in arg.value):
                    self.hit(node, "write-outside", f"opens {arg.value!r} for writing, outside the job directory")
            if full in ("os.system", "os.popen", "os.fork", "os.execv", "os.execve", "os.spawnv", "pty.spawn"):
                self.hit(node, "network-or-subprocess", f"calls {full}")
            if full in ("eval", "exec", "compile", "__import__"):
                self.hit(node, "dynamic-code", f"calls {full}(): hides what runs from this scan")
        self.generic_visit(node)

    def _check_store_target(self, target: ast.AST) -> None:
        if isinstance(target, ast.Attribute):
            dotted = _dotted(target)
            if dotted:
                full = self._resolve(dotted)
                if _root(full) in {"torch", "time", "triton", "numpy", "flashinfer_bench", "builtins", "sys"} \
                        and "." in full:
                    self.hit(target, "monkeypatch", f"assigns to {full}")

    def visit_Assign(self, node: ast.Assign) -> None:
        for t in node.targets:
            self._check_store_target(t)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._check_store_target(node.target)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.MatMult) and self.language in ("triton", "cuda", "cpp"):
            self.hit(node, "torch-fallback", "uses the @ operator on tensors inside a "
                     f"{self.language} candidate: the matmul should be in the kernel")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = _dotted(node)
        if dotted:
            full = self._resolve(dotted)
            if full in ("sys._getframe", "sys.modules", "gc.get_objects", "gc.get_referrers", "inspect.stack",
                        "inspect.currentframe", "builtins.__dict__"):
                self.hit(node, "introspection", f"uses {full}")
            elif full in HOOKS:
                self.hit(node, "hooks", f"uses {full}: its code would run inside the harness")
        if node.attr in FRAME_ATTRS:
            self.hit(node, "introspection", f"reads .{node.attr}: a frame's callers and locals are the harness's")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id == "__main__" or (node.id in self.aliases and self.aliases[node.id] == "__main__"):
            self.hit(node, "introspection", "uses __main__ (in a benchmark, that is the harness's worker)")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if node.value == "__main__" and not self._in_main_guard:
            self.hit(node, "introspection", "names '__main__' (in a benchmark, that is the harness's worker)")
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        # `if __name__ == "__main__":` is a script's own entry point, not a reach into the harness.
        t = node.test
        guard = (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__")
        if guard:
            self._in_main_guard = True
            self.visit(node.test)
            self._in_main_guard = False
            for n in node.body + node.orelse:
                self.visit(n)
        else:
            self.generic_visit(node)


def scan_python(file: str, text: str, language: str) -> list[Tripwire]:
    try:
        tree = ast.parse(text, filename=file)
    except SyntaxError:
        return []  # the compile/import check reports syntax errors with their own diagnostic
    s = _PyScan(file, language)
    s.visit(tree)
    return s.hits


_C_RULES: list[tuple[str, re.Pattern[str], str]] = [
    ("network-or-subprocess", re.compile(r"\b(socket|connect|popen|system|fork|execv[pe]?|execl[pe]?)\s*\("),
     "calls {0}()"),
    ("network-or-subprocess", re.compile(r"#\s*include\s*<(sys/socket\.h|netinet/[^>]+|arpa/inet\.h|netdb\.h)>"),
     "includes <{0}>"),
    ("threading", re.compile(r"#\s*include\s*<(thread|pthread\.h|future)>|\bstd::(thread|async)\b|\bpthread_create\b"),
     "uses threads ({0})"),
    ("introspection", re.compile(r"\b(dlopen|dlsym|LD_PRELOAD|cuGetProcAddress|cudaGetDriverEntryPoint)\b"),
     "uses {0}: symbol interposition can reach the harness"),
    ("write-outside", re.compile(r"\b(?:fopen|std::ofstream|open)\s*\(\s*\"(/[^\"]*|[^\"]*\.\./[^\"]*)\"\s*(?:,\s*\"[wa])?"),
     "opens \"{0}\" (outside the job directory)"),
    ("torch-fallback", re.compile(r"\b(?:torch|at)::(matmul|mm|bmm|addmm|einsum|softmax|layer_norm|rms_norm|linear|"
                                  r"scaled_dot_product_attention|conv\w*|sum|mean|rsqrt|exp|baddbmm)\s*\("),
     "calls torch/ATen {0}() inside the candidate: the work should be in the kernel"),
    ("torch-fallback", re.compile(r"\.(matmul|mm|bmm|addmm|softmax|rsqrt)\s*\("),
     "calls tensor method .{0}(): a torch fallback?"),
    ("timing", re.compile(r"\b(clock_gettime|gettimeofday|std::chrono|cudaEventElapsedTime)\b"),
     "reads the clock ({0}): kernels have no reason to time themselves"),
]


def _strip_c_comments(text: str) -> str:
    def blank(m: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    return re.sub(r"//[^\n]*|/\*.*?\*/", blank, text, flags=re.S)


def scan_c(file: str, text: str) -> list[Tripwire]:
    hits: list[Tripwire] = []
    for no, line in enumerate(_strip_c_comments(text).splitlines(), 1):
        for rule, pat, msg in _C_RULES:
            for m in pat.finditer(line):
                what = next((g for g in m.groups() if g), m.group(0)) if m.groups() else m.group(0)
                hits.append(Tripwire(file=file, line=no, rule=rule, message=msg.format(what)))
    return hits


C_SUFFIXES = {".cu", ".cuh", ".cpp", ".cc", ".c", ".h", ".hpp"}


def scan_candidate(sources: dict[str, str], language: str, rel_dir: str) -> list[Tripwire]:
    """Every tripwire in a candidate, once each, with workspace-relative file paths."""
    out: list[Tripwire] = []
    for rel, text in sorted(sources.items()):
        path = f"{rel_dir}/{rel}"
        if rel.endswith(".py"):
            out += scan_python(path, text, language)
        elif any(rel.endswith(s) for s in C_SUFFIXES):
            out += scan_c(path, text)
    return dedupe(out)


def dedupe(hits: Iterable[Tripwire]) -> list[Tripwire]:
    seen, out = set(), []
    for h in hits:
        k = (h.file, h.line, h.rule, h.message)
        if k not in seen:
            seen.add(k)
            out.append(h)
    return out
