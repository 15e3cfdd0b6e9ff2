"""Attack: sleep through the calls right after the correctness trials (the warm-up), behaving
differently while the harness is calibrating than while it is timing."""
import time
import torch

_calls = 0


def run(hidden_states, weight, output):
    global _calls
    _calls += 1
    if 3 < _calls <= 9:
        time.sleep(0.06)
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    output.copy_((x * scale * weight.float()).to(hidden_states.dtype))
