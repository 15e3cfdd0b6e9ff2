"""Attack (GPU): after each call, leave a long-running kernel behind (launched from a thread once the
call has returned) so the baseline's turns run on a busy device."""
import threading
import time

import torch


def _rms(hidden_states, weight):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    return (x * scale * weight.float()).to(hidden_states.dtype)


def _hog(device):
    time.sleep(0.001)  # after the harness has synchronized and moved on
    s = torch.cuda.Stream(device=device)
    with torch.cuda.stream(s):
        a = torch.randn(4096, 4096, device=device)
        for _ in range(40):
            a = torch.tanh(a @ a)


def run(hidden_states, weight, output):
    output.copy_(_rms(hidden_states, weight))
    threading.Thread(target=_hog, args=(hidden_states.device,), daemon=True).start()
