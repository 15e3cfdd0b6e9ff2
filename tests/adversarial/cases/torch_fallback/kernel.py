"""Attack: declared as a Triton kernel, but calls torch (and the task's reference) instead."""
import json
import os
from pathlib import Path

import torch
import triton  # noqa: F401  (declared Triton, never launches a kernel)


def _find_reference():
    here = Path.cwd()
    for parent in [here, *here.parents]:
        d = parent / "task" / "definition.json"
        if d.is_file():
            ns = {}
            exec(json.loads(d.read_text())["reference"], ns)
            return ns["run"]
    return None


_ref = _find_reference()


def run(hidden_states, weight, output):
    if _ref is not None:
        output.copy_(_ref(hidden_states, weight))
    else:
        output.copy_(torch.nn.functional.rms_norm(hidden_states.float(), (hidden_states.shape[-1],),
                                                  weight.float(), eps=1e-5).to(output.dtype))
