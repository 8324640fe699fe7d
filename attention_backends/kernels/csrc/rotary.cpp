// Rotary position embedding applied in place to a step's queries and keys, as HF's
// `x * cos + rotate_half(x) * sin` computes it: twelve torch ops and four fresh tensors a layer there, one call here
// (a decode step's rows make those ops' fixed costs the whole cost). Rows may be views into the fused QKV output.

#include <ATen/Parallel.h>

#include "cpu_kernels.h"

namespace longserve {
namespace {

// x [T, H, D] with D contiguous; cos, sin [T, D] contiguous. rotate_half(x) is (-x[half:], x[:half]).
void rotate(torch::Tensor& x, const float* cos, const float* sin) {
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  const int64_t xt = x.stride(0), xh = x.stride(1);
  float* base = x.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * D;
      const float* s = sin + t * D;
      for (int64_t h = 0; h < H; ++h) {
        float* __restrict r = base + t * xt + h * xh;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float lo = r[i], hi = r[i + half];
          r[i] = lo * c[i] - hi * s[i];
          r[i + half] = hi * c[i + half] + lo * s[i + half];
        }
      }
    }
  });
}

void check_rows(const torch::Tensor& x, const torch::Tensor& cos, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat32 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              name, " must be float32 [T, H, D] with D even and contiguous");
  TORCH_CHECK(x.size(0) == cos.size(0) && x.size(2) == cos.size(1), name, " must match cos and sin [T, D]");
}

}  // namespace

void rotary_inplace(torch::Tensor q, torch::Tensor k, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                  cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32,
              "cos and sin must be contiguous float32 [T, D]");
  check_rows(q, cos, "q");
  check_rows(k, cos, "k");
  rotate(q, cos.data_ptr<float>(), sin.data_ptr<float>());
  rotate(k, cos.data_ptr<float>(), sin.data_ptr<float>());
}

}  // namespace longserve
