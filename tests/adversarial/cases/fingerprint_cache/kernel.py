"""Attack: cache results by a cheap content fingerprint (pays off when a harness repeats the same inputs).
Prints CACHE-HIT to stderr whenever the cache answers, so the test can see it never does."""
import sys
import torch

_cache = {}


def _rms(hidden_states, weight):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    return (x * scale * weight.float()).to(hidden_states.dtype)


def run(hidden_states, weight, output):
    flat = hidden_states.reshape(-1)
    key = (tuple(hidden_states.shape), tuple(flat[:: max(1, flat.numel() // 16)].float().tolist()),
           tuple(weight[:4].float().tolist()))
    hit = _cache.get(key)
    if hit is not None:
        print("CACHE-HIT", file=sys.stderr)
        output.copy_(hit)
        return
    res = _rms(hidden_states, weight)
    _cache[key] = res
    output.copy_(res)
