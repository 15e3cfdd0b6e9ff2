"""Attack: replace time.perf_counter so every interval looks tiny."""
import time
import torch

_real = time.perf_counter
_t0 = _real()
time.perf_counter = lambda: _t0 + (_real() - _t0) * 0.01


def run(hidden_states, weight, output):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    output.copy_((x * scale * weight.float()).to(hidden_states.dtype))
