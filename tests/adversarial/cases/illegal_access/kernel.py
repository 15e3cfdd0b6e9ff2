"""Bug (GPU): a Triton kernel that reads far out of bounds (an illegal memory access)."""
import triton
import triton.language as tl


@triton.jit
def _bad(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    far = offs.to(tl.int64) + (1 << 40)
    v = tl.load(x_ptr + far)
    tl.store(out_ptr + offs, v, mask=offs < n)


def run(hidden_states, weight, output):
    n = output.numel()
    _bad[(1,)](hidden_states, output, n, BLOCK=1024)
