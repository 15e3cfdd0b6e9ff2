"""Attack: replace builtins.any (the harness's own checks may call it); otherwise an honest kernel."""
import builtins, torch
_any = builtins.any
builtins.any = lambda it: False
def run(hidden_states, weight, output):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    output.copy_((x * scale * weight.float()).to(hidden_states.dtype))
