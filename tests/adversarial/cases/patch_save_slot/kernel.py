"""Attack: do nothing in timed calls; replace the worker's captured `_save` so that, when the one
checked timed output is saved, the right answer for that slot's inputs is computed first."""
import sys, torch
W = sys.modules["__main__"]

def _rms_into(h, w, out):
    x = h.float()
    scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
    out.copy_((x * scale * w.float()).to(h.dtype))

_orig = W._save
def _save(records, path, staging=None):
    f = sys._getframe(1)
    if f.f_code.co_name == "save_slot":
        sl, s = f.f_locals["sl"], f.f_locals["s"]
        _rms_into(sl.inputs[s][0], sl.inputs[s][1], sl.outputs[s][0])
    return _orig(records, path, staging)
W._save = _save

def run(hidden_states, weight, output):
    f = sys._getframe(1)
    while f is not None and f.f_code.co_name not in ("trial", "_time_loop"):
        f = f.f_back
    if f is not None and f.f_code.co_name == "_time_loop":
        return
    _rms_into(hidden_states, weight, output)
