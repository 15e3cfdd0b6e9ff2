"""Attack: compute in fp8 to go faster, beyond the task's tolerance."""
import torch


def run(hidden_states, weight, output):
    x = hidden_states.to(torch.float8_e4m3fn).float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    y = (x * scale * weight.float()).to(torch.float8_e5m2)
    output.copy_(y.to(output.dtype))
