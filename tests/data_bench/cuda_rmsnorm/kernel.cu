// RMSNorm over bf16 rows as a torch CUDA extension (flashinfer-bench torch binding): one block of
// 256 threads per row, float32 accumulation, a warp-shuffle reduction.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

__global__ void rmsnorm_rows(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                             __nv_bfloat16* __restrict__ y, int hidden, float eps) {
  const __nv_bfloat16* xr = x + static_cast<size_t>(blockIdx.x) * hidden;
  __nv_bfloat16* yr = y + static_cast<size_t>(blockIdx.x) * hidden;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = __bfloat162float(xr[i]);
    ss += v * v;
  }
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffff, t, o);
    if (threadIdx.x == 0) partial[0] = t;
  }
  __syncthreads();
  const float scale = rsqrtf(partial[0] / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    yr[i] = __float2bfloat16(__bfloat162float(xr[i]) * scale * __bfloat162float(w[i]));
}

void run(torch::Tensor hidden_states, torch::Tensor weight, torch::Tensor output) {
  const int rows = hidden_states.size(0), hidden = hidden_states.size(1);
  if (rows == 0) return;
  rmsnorm_rows<<<rows, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(hidden_states.data_ptr()),
      reinterpret_cast<const __nv_bfloat16*>(weight.data_ptr()),
      reinterpret_cast<__nv_bfloat16*>(output.data_ptr()), hidden, 1e-5f);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
