"""Attack: a correct result with one Inf (max-abs comparisons that skip non-finite values miss it)."""
import torch


def _rms(hidden_states, weight):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    return (x * scale * weight.float()).to(hidden_states.dtype)


def run(hidden_states, weight, output):
    output.copy_(_rms(hidden_states, weight))
    output[0, 7] = float("inf")
