// A linear layer for a few rows on the CPU: y [M, out] = x [M, in] W^T (+ bias), W the plain [out, in] weight.
//
// With a handful of rows (a decode step's sequences) a linear layer reads its whole weight to do little arithmetic
// with it, so it runs at the speed the weight streams from memory. Each weight row is read once, front to back,
// for every row of x at once; a few weight rows go side by side, sequential streams the hardware prefetcher
// follows (software prefetch measured slower). The output rows are split over the cores.

#include <ATen/Parallel.h>

#include "cpu_kernels.h"

namespace longserve {
namespace {

using Lanes8 = float __attribute__((vector_size(32)));  // one AVX2 register, two SSE or NEON ones

inline Lanes8 load8(const float* p) {
  Lanes8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float sum8(Lanes8 v) {
  const auto a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return a[0] + a[1] + a[2] + a[3];
}

// Output columns [o0, o1) for all M rows of x, R weight rows at a time.
template <int M, int R>
void columns(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t in, int64_t out,
             int64_t o0, int64_t o1) {
  const int64_t body = in - in % 8;
  for (int64_t o = o0; o < o1; o += R) {
    const int64_t n = std::min<int64_t>(R, o1 - o);
    Lanes8 acc[M][R] = {};
    for (int64_t i = 0; i < body; i += 8) {
      for (int r = 0; r < R; ++r) {
        if (r == n) break;
        const Lanes8 wv = load8(w + (o + r) * in + i);
        for (int m = 0; m < M; ++m) acc[m][r] += wv * load8(x + m * in + i);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < n; ++r) {
        float s = sum8(acc[m][r]);
        for (int64_t i = body; i < in; ++i) s += x[m * in + i] * w[(o + r) * in + i];
        y[m * out + o + r] = s;
      }
  }
}

template <int M, int R>
void run(const float* x, const float* w, float* y, int64_t in, int64_t out) {
  at::parallel_for(0, (out + R - 1) / R, 32, [&](int64_t begin, int64_t end) {
    columns<M, R>(x, w, y, in, out, begin * R, std::min(out, end * R));
  });
}

}  // namespace

torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& weight,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32,
              "x must be contiguous float32 [M, in]");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == torch::kFloat32 &&
                  weight.size(1) == x.size(1),
              "the weight must be contiguous float32 [out, in]");
  const int64_t M = x.size(0), in = x.size(1), out = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxLinearRows, "linear_rows takes 1 to ", kMaxLinearRows, " rows, got ", M);
  auto y = torch::empty({M, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Accumulators M x R stay within the 16 vector registers of AVX2.
  switch (M) {
    case 1: run<1, 4>(xp, wp, yp, in, out); break;
    case 2: run<2, 4>(xp, wp, yp, in, out); break;
    case 3: run<3, 2>(xp, wp, yp, in, out); break;
    case 4: run<4, 2>(xp, wp, yp, in, out); break;
    case 5: run<5, 1>(xp, wp, yp, in, out); break;
    case 6: run<6, 1>(xp, wp, yp, in, out); break;
    case 7: run<7, 1>(xp, wp, yp, in, out); break;
    default: run<8, 1>(xp, wp, yp, in, out); break;
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}

}  // namespace longserve
