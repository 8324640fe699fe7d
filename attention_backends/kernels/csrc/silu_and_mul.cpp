// The SiLU-gated product of a gated MLP, `silu(gate) * up`, from the one product over the stacked gate and up
// weights (each row: its n gate values, then its n up values): one pass over it where torch runs two ops over
// contiguous halves (or copies strided ones first), ~6 ms a layer for a 2,048-token prefill chunk here.

#include <ATen/Parallel.h>

#include "cpu_kernels.h"

namespace longserve {

torch::Tensor silu_and_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat32 && gate_up.is_contiguous() && gate_up.dim() >= 1 &&
                  gate_up.size(-1) % 2 == 0,
              "gate_up must be a contiguous float32 tensor with an even last dimension");
  const int64_t n = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * n);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = n;
  auto out = torch::empty(sizes, gate_up.options());
  const float* src = gate_up.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict gate = src + r * 2 * n;
      const float* __restrict up = gate + n;
      float* __restrict o = dst + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        // sigmoid(g) from e = exp(-|g|) <= 1, so the exponential never overflows: 1 / (1 + e) for g >= 0,
        // e / (1 + e) below.
        const float g = gate[i];
        const float e = exp_nonpositive(-std::fabs(g));
        const float sigmoid = (g >= 0.f ? 1.f : e) / (1.f + e);
        o[i] = g * sigmoid * up[i];
      }
    }
  });
  return out;
}

}  // namespace longserve
