"""A kernel that fills every SM for a fixed time (GPU only; imported lazily by the bench worker).

Launched on the timing stream just before the start event, it keeps the GPU busy while the host
launches the call, so the event pair measures the kernels and not the host's launch overhead (as
do_bench's cache flush does). Unlike a flush or a one-thread sleep it leaves no room on any SM:
every block has 1024 threads and there are enough blocks to fill every SM's thread slots, so work
a candidate puts on another stream cannot run hidden under it; it queues behind it, inside or
after the timed region, where the host-side check sees it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer


@triton.jit
def _hold(out_ptr, dur_ns):
    t0 = globaltimer()
    t = t0
    while t - t0 < dur_ns:
        t = globaltimer()
    if t == 0:  # never true: keeps the loop from being optimized away
        tl.store(out_ptr, t)


class Holder:
    def __init__(self, device: torch.device):
        p = torch.cuda.get_device_properties(device)
        per_sm = int(getattr(p, "max_threads_per_multi_processor", 2048) or 2048)
        self.grid = (p.multi_processor_count * max(1, per_sm // 1024),)
        self.out = torch.zeros(1, dtype=torch.int64, device=device)

    def __call__(self, us: float) -> None:
        _hold[self.grid](self.out, int(us * 1000), num_warps=32)
