"""Attack: a sys.setprofile hook; the call stores its arguments and returns; the work is done on the
'c_return' event of the harness's next builtin call (the timer read that ends the interval)."""
import sys, time, torch
_pc = time.perf_counter  # the builtin the harness captured as its timer
_pending = []

def _rms_into(h, w, out):
    x = h.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    out.copy_((x * scale * w.float()).to(h.dtype))

def _prof(frame, event, arg):
    if event == "c_return" and arg is _pc and _pending:
        h, w, out = _pending.pop()
        sys.setprofile(None)
        try:
            _rms_into(h, w, out)
        finally:
            sys.setprofile(_prof)

def run(hidden_states, weight, output):
    _pending.append((hidden_states, weight, output))
    sys.setprofile(_prof)
