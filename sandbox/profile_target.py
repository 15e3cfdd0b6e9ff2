"""The GPU-side program Nsight Compute runs for the `profile` tool.

    python -m kda.sandbox.profile_target SPEC.json

SPEC: {"candidate_dir", "entry_point": "file.py::func", "destination_passing_style",
       "definition": {...}, "workload": {...}, "safetensors_root": null, "warmup": 3, "seed": 0,
       "range": "kda_profile"}

It loads the candidate and makes its inputs exactly as the benchmark harness does
(sandbox/harness.py: flashinfer-bench input semantics), warms up (compilation and autotuning
happen here, outside the profiled range), then makes exactly one call inside an NVTX range,
so `ncu --nvtx --nvtx-include kda_profile/` profiles only the candidate's kernels of that call.

Imports only the stdlib, torch and this package (plus the candidate's own imports).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kda.sandbox.profile_target SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    from kda.sandbox import harness as H

    if not torch.cuda.is_available():
        print("profile_target: no CUDA device visible", file=sys.stderr)
        return 3
    device = torch.device("cuda")
    definition, workload = spec["definition"], spec["workload"]
    try:
        fn = H.load_entry(Path(spec["candidate_dir"]), spec["entry_point"], "kda_candidate")
        callee = H.Callee(fn, bool(spec.get("destination_passing_style", True)), definition, "candidate")
        st_cache = H.SafetensorsCache(spec.get("safetensors_root"))
        inputs = H.make_inputs(definition, workload, int(spec.get("seed", 0)), device, st_cache)
        outputs = H.alloc_outputs(definition, workload, device, poison=False) if callee.dps else None
    except H.HarnessError as e:
        print(f"profile_target: {e}", file=sys.stderr)
        return 4

    for _ in range(max(1, int(spec.get("warmup", 3)))):
        callee(workload, inputs, outputs, device)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(spec.get("range", "kda_profile"))
    callee(workload, inputs, outputs, device)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print("profile_target: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
