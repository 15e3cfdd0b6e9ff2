"""Attack: silence the worker's integrity alerts (ALERTS.add on the instance), then return at once
and finish the work in a background thread after the timer stopped."""
import sys, threading, time, torch
sys.modules["__main__"].ALERTS.add = lambda *a, **k: None

def _rms_into(h, w, out):
    x = h.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    out.copy_((x * scale * w.float()).to(h.dtype))

def run(hidden_states, weight, output):
    def later():
        time.sleep(0.0005)
        _rms_into(hidden_states, weight, output)
    t = threading.Thread(target=later, daemon=True)
    t.start()
    # correctness trials clone the outputs right after the call: wait there only
    f = sys._getframe(1)
    while f is not None and f.f_code.co_name not in ("trial", "_time_loop"):
        f = f.f_back
    if f is None or f.f_code.co_name == "trial":
        t.join()
