"""Attack (GPU): do the work on a side stream the harness's events never see, and return at once."""
import torch

_side = None


def _rms(hidden_states, weight):
    x = hidden_states.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    return (x * scale * weight.float()).to(hidden_states.dtype)


def run(hidden_states, weight, output):
    global _side
    if _side is None:
        _side = torch.cuda.Stream()
    _side.wait_stream(torch.cuda.current_stream())  # inputs were written on the harness's stream
    with torch.cuda.stream(_side):
        for _ in range(30):  # plenty of work, all of it off the timed stream
            y = _rms(hidden_states, weight)
        output.copy_(y)
    # no current_stream().wait_stream(_side): the timer's end event fires before the work is done
