"""The GPU-side program Nsight Compute runs for the `profile` tool.

    python -m kda.sandbox.profile_target SPEC.json

SPEC: {"candidate_dir", "entry_file", "entry_symbol", "destination_passing_style",
       "definition": {...}, "workload": {...}, "warmup": 3, "seed": 0, "range": "kda_profile"}

It loads the candidate, makes inputs for the workload (flashinfer-bench semantics: random by
dtype, scalar, safetensors), warms up (compilation and autotuning happen here, outside the
profiled range), then makes exactly one call inside an NVTX range, so `ncu --nvtx
--nvtx-include kda_profile/` profiles only the candidate's kernels of that call.

Imports only the stdlib and torch (plus the candidate's own imports).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

DTYPES = {
    "float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}


def shape_of(spec: dict[str, Any], definition: dict[str, Any], axes: dict[str, int]) -> list[int]:
    dims = []
    for a in spec.get("shape") or []:
        if isinstance(a, int):
            dims.append(a)
            continue
        ax = definition["axes"].get(a, {})
        if a in axes:
            dims.append(int(axes[a]))
        elif ax.get("type") == "const":
            dims.append(int(ax["value"]))
        else:
            raise SystemExit(f"profile_target: axis {a!r} has no value in the workload")
    return dims


def make_inputs(definition: dict[str, Any], workload: dict[str, Any], device: str, seed: int,
                base_dir: Path) -> list[Any]:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    axes = workload.get("axes", {})
    out = []
    for name, spec in definition["inputs"].items():
        how = workload.get("inputs", {}).get(name, {"type": "random"})
        dtype = getattr(torch, DTYPES.get(spec.get("dtype", "float32"), "float32"))
        shape = shape_of(spec, definition, axes)
        kind = how.get("type", "random")
        if kind == "scalar":
            value = how.get("value")
            out.append(value if not shape else torch.full(shape, value, dtype=dtype, device=device))
        elif kind == "safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415

            path = Path(how["path"])
            tensors = load_file(str(path if path.is_absolute() else base_dir / path))
            out.append(tensors[how.get("tensor_key", name)].to(device))
        elif dtype.is_floating_point:
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
            out.append(t.to(dtype))
        elif dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen, device=device).bool())
        else:
            out.append(torch.randint(0, 64, shape, generator=gen, device=device, dtype=dtype))
    return out


def make_outputs(definition: dict[str, Any], workload: dict[str, Any], device: str) -> list[Any]:
    import torch

    axes = workload.get("axes", {})
    return [torch.empty(shape_of(spec, definition, axes), device=device,
                        dtype=getattr(torch, DTYPES.get(spec.get("dtype", "float32"), "float32")))
            for spec in definition["outputs"].values()]


def load_entry(candidate_dir: Path, entry_file: str, symbol: str):
    sys.path.insert(0, str(candidate_dir))
    path = candidate_dir / entry_file
    spec = importlib.util.spec_from_file_location(f"kda_candidate_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"profile_target: cannot import {entry_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    fn = getattr(module, symbol, None)
    if not callable(fn):
        raise SystemExit(f"profile_target: {entry_file} has no callable {symbol!r}")
    return fn


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    if not torch.cuda.is_available():
        print("profile_target: no CUDA device visible", file=sys.stderr)
        return 3
    device = "cuda"
    cdir = Path(spec["candidate_dir"]).resolve()
    fn = load_entry(cdir, spec["entry_file"], spec["entry_symbol"])
    definition, workload = spec["definition"], spec["workload"]
    inputs = make_inputs(definition, workload, device, int(spec.get("seed", 0)), cdir)
    dps = bool(spec.get("destination_passing_style", True))
    outputs = make_outputs(definition, workload, device) if dps else []

    def call() -> Any:
        return fn(*inputs, *outputs) if dps else fn(*inputs)

    with torch.no_grad():
        for _ in range(max(1, int(spec.get("warmup", 3)))):
            call()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(spec.get("range", "kda_profile"))
        call()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    print("profile_target: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
