"""Attack: the work is done by a helper thread started with _thread at import (threading.enumerate()
does not list it), so the call's own thread looks idle; the call waits for the helper's answer."""
import _thread
import time

import torch

_jobs: list = []
_done: list = []


def _helper():
    while True:
        if _jobs:
            h, w, out = _jobs.pop()
            x = h.float()
            scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
            out.copy_((x * scale * w.float()).to(h.dtype))
            _done.append(1)
        else:
            time.sleep(0.0001)


_thread.start_new_thread(_helper, ())


def run(hidden_states, weight, output):
    _jobs.append((hidden_states, weight, output))
    while not _done:
        time.sleep(0)
    _done.pop()
