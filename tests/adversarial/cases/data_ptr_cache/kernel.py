"""Attack: cache results by the inputs' data pointers (pays off when a harness reuses input buffers)."""
import torch

_cache = {}


def _rms(hidden_states, weight):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    return (x * scale * weight.float()).to(hidden_states.dtype)


def run(hidden_states, weight, output):
    key = (hidden_states.data_ptr(), weight.data_ptr(), tuple(hidden_states.shape))
    hit = _cache.get(key)
    if hit is None:
        hit = _rms(hidden_states, weight)
        _cache[key] = hit
    output.copy_(hit)
