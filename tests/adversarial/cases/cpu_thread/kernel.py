"""Attack: return at once and let a background thread finish the work after the timer stopped."""
import threading
import time
import torch


def _rms(hidden_states, weight):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    return (x * scale * weight.float()).to(hidden_states.dtype)


def run(hidden_states, weight, output):
    def later():
        time.sleep(0.002)
        output.copy_(_rms(hidden_states, weight))

    threading.Thread(target=later, daemon=True).start()
