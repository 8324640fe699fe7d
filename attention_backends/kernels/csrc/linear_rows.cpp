// A linear layer for a few rows on the CPU: y [M, out] = x [M, in] W^T (+ bias), W the plain [out, in] weight.
//
// With a handful of rows (a decode step's sequences) a linear layer reads its whole weight to do little arithmetic
// with it, so it should run at the speed the weight streams from memory, however many rows share the read. The
// output columns go in tiles of kTile weight rows: a tile is read from memory once (kR rows side by side, the next kR
// prefetched meanwhile: for one row of x on a Zen 4 EPYC, the hardware prefetcher alone took 1.24x the time) and then
// serves every group of up to 8 rows of x from the core's cache. Within a group each weight vector loaded is used by
// all the group's rows and each row vector by kR weight rows, with the M x kR sums in registers: with fewer sums in
// flight the loop waits on loads and on the sums' own latency (one accumulator per row and weight row ran 4 rows at
// half the streaming rate).

#include <ATen/Parallel.h>

#include "cpu_kernels.h"

namespace longserve {
namespace {

constexpr int64_t kGroup = 8;  // rows of x per pass over a tile
constexpr int64_t kTile = 24;  // weight rows per tile: a multiple of every kR below

// Weight rows per pass for M rows: the M * kR sums, kR weight vectors and one row vector fit the vector registers.
template <int M>
constexpr int kR = kRegisters >= 32 ? (M <= 2 ? 8 : M <= 4 ? 4 : 3) : (M <= 2 ? 4 : M <= 6 ? 2 : 1);

// y[m, o] for the M rows of x and output columns [o0, o1).
template <int M>
void columns(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t in, int64_t out,
             int64_t o0, int64_t o1) {
  constexpr int R = kR<M>;
  const int64_t body = in - in % kLanes;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    Lanes acc[M][R] = {};
    for (int64_t i = 0; i < body; i += kLanes) {
      Lanes wv[R];
      for (int r = 0; r < R; ++r) {
        wv[r] = load_lanes(w + (o + r) * in + i);
        __builtin_prefetch(w + (o + R + r) * in + i, 0, kPrefetchLocality);
      }
      for (int m = 0; m < M; ++m) {
        const Lanes xv = load_lanes(x + m * in + i);
        for (int r = 0; r < R; ++r) acc[m][r] += wv[r] * xv;
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float s = sum_lanes(acc[m][r]);
        for (int64_t i = body; i < in; ++i) s += x[m * in + i] * w[(o + r) * in + i];
        y[m * out + o + r] = s;
      }
  }
  for (; o < o1; ++o)  // the last few columns of the weight
    for (int m = 0; m < M; ++m) y[m * out + o] = dot<0>(x + m * in, w + o * in, in);
}

using Columns = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr Columns kColumns[kGroup] = {columns<1>, columns<2>, columns<3>, columns<4>,
                                      columns<5>, columns<6>, columns<7>, columns<8>};

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
  at::parallel_for(0, (out + kTile - 1) / kTile, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = t * kTile, o1 = std::min(out, o0 + kTile);
      for (int64_t m = 0; m < M; m += kGroup) {
        const int64_t rows = std::min(kGroup, M - m);
        kColumns[rows - 1](xp + m * in, wp, yp + m * out, in, out, o0, o1);
      }
    }
  });
  if (bias.has_value()) y.add_(*bias);
  return y;
}

}  // namespace longserve
