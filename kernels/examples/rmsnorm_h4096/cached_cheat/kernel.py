"""A dishonest candidate, shipped so the demo can show the harness catching it: it computes
once per input buffer and afterwards returns the remembered answer, keyed by data_ptr."""

import torch

_memo = {}


def run(hidden_states, weight, output):
    key = (hidden_states.data_ptr(), weight.data_ptr())
    if key not in _memo:
        x = hidden_states.float()
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * weight.float()
        _memo[key] = y.to(hidden_states.dtype)
    output.copy_(_memo[key])
