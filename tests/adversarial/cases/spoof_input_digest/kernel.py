"""Attack: change the input in place (as an aliasing kernel does), after replacing
kda.sandbox.harness.input_digest so the digests sent to the checker are the pristine inputs'."""
import torch
from kda.sandbox import harness as H
_orig = H.input_digest
_snap = {}
def _digest(x):
    if isinstance(x, torch.Tensor) and id(x) in _snap:
        return _snap.pop(id(x))
    return _orig(x)
H.input_digest = _digest
def run(hidden_states, weight):
    _snap[id(hidden_states)] = _orig(hidden_states)
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    hidden_states.copy_((x * scale * weight.float()).to(hidden_states.dtype))
    return hidden_states
