"""Attack: replace the bench worker's captured timer (the module global `_perf` of the worker,
which is `__main__`) with a clock running at a quarter speed: every interval it measures shrinks 4x."""
import sys, torch
_w = sys.modules["__main__"]
_real = _w._perf
_t0 = _real()
_w._perf = lambda: _t0 + (_real() - _t0) * 0.25

def run(hidden_states, weight, output):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    output.copy_((x * scale * weight.float()).to(hidden_states.dtype))
