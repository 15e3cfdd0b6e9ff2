"""Attack: replace torch.cuda.Event.elapsed_time so CUDA event timing reports 100x less."""
import torch

_orig = torch.cuda.Event.elapsed_time
torch.cuda.Event.elapsed_time = lambda self, end: _orig(self, end) / 100.0


def run(hidden_states, weight, output):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    output.copy_((x * scale * weight.float()).to(hidden_states.dtype))
