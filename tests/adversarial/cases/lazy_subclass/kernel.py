"""Attack (value-returning): return a torch.Tensor subclass whose data is computed the first time
anything touches it -- which is the harness's checksum/clone, after the timer stopped."""
import torch
from torch._C import DisableTorchFunctionSubclass

class Lazy(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, Lazy):
                a._force()
        with DisableTorchFunctionSubclass():
            return func(*args, **kwargs)   # results come back as plain tensors

    def _force(self):
        src = self.__dict__.pop("_src", None)
        if src is not None:
            h, w = src
            with DisableTorchFunctionSubclass():
                x = h.float()
                scale = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-5)
                torch.Tensor.copy_(self, (x * scale * w.float()).to(h.dtype))

def run(hidden_states, weight):
    with DisableTorchFunctionSubclass():
        out = torch.empty(hidden_states.shape, dtype=hidden_states.dtype).as_subclass(Lazy)
    out._src = (hidden_states, weight)
    return out
