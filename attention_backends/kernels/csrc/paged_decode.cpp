// Paged decode on the CPU: each row's query heads over the keys it sees, read where they lie in the paged cache.
//
// The same visibility as the reference op and the Triton kernel (decode.py): row b sees positions
// [0, sink_b) and [lo_b, len_b) of its sequence, found through its block table. Work is split over
// (row, KV head, span of keys) so that one long sequence keeps every core busy; each piece keeps a running
// max, sum and weighted value sum per query head of its group (GQA without repeating K/V), and a second
// pass merges the pieces exactly. Keys are read either with D contiguous (longserve's cache) or with
// positions contiguous (vLLM's CPU cache, whose keys are stored transposed per block): each has a loop
// order the compiler vectorizes.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kSpan = 512;  // keys per piece of work: enough to amortise the merge, small enough to split 8k
constexpr int64_t kMaxGroup = 16;
constexpr int64_t kMaxDim = 256;
constexpr int64_t kMaxRun = 256;  // keys of one block scored together (at most the block size)

struct Strides {
  int64_t block, pos, head, dim;
};

template <typename T>
inline float as_float(T x) {
  return static_cast<float>(x);
}

// Scores of `run` consecutive positions of one block, for the group's G queries.
template <typename scalar_t>
inline void score_run(const scalar_t* __restrict k, const Strides& ks, int64_t run, const float* __restrict qf,
                      int64_t G, int64_t D, float* __restrict s) {
  if (ks.dim == 1) {  // a key's D channels contiguous: dot products along D
    for (int64_t t = 0; t < run; ++t) {
      const scalar_t* __restrict kt = k + t * ks.pos;
      for (int64_t g = 0; g < G; ++g) {
        const float* __restrict qg = qf + g * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += qg[d] * as_float(kt[d]);
        s[g * kMaxRun + t] = acc;
      }
    }
  } else if (ks.pos == 1) {  // one channel of the block's keys contiguous: accumulate along positions
    for (int64_t g = 0; g < G; ++g) std::fill(s + g * kMaxRun, s + g * kMaxRun + run, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t* __restrict kd = k + d * ks.dim;
      for (int64_t g = 0; g < G; ++g) {
        const float qd = qf[g * D + d];
        float* __restrict sg = s + g * kMaxRun;
#pragma omp simd
        for (int64_t t = 0; t < run; ++t) sg[t] += qd * as_float(kd[t]);
      }
    }
  } else {
    for (int64_t t = 0; t < run; ++t)
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += qf[g * D + d] * as_float(k[t * ks.pos + d * ks.dim]);
        s[g * kMaxRun + t] = acc;
      }
  }
}

// acc[g] += sum_t p[g][t] * v[t] for the run's values.
template <typename scalar_t>
inline void accumulate_run(const scalar_t* __restrict v, const Strides& vs, int64_t run, const float* __restrict p,
                           int64_t G, int64_t D, float* __restrict acc) {
  for (int64_t t = 0; t < run; ++t) {
    const scalar_t* __restrict vt = v + t * vs.pos;
    for (int64_t g = 0; g < G; ++g) {
      const float w = p[g * kMaxRun + t];
      float* __restrict ag = acc + g * D;
      if (vs.dim == 1) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += w * as_float(vt[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) ag[d] += w * as_float(vt[d * vs.dim]);
      }
    }
  }
}

struct Piece {
  int64_t row, head, first, last;  // keys [first, last) of the row's visible list
};

template <typename scalar_t>
void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& tables, const torch::Tensor& ranges, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv, width = tables.size(1);
  const Strides ks{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3)};
  const Strides vs{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3)};
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lens = ranges.data_ptr<int32_t>();
  const int32_t* sinks = lens + B;
  const int32_t* los = lens + 2 * B;

  // Checked here, not in the loops: a wrong id would read outside the cache.
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] > 0 && 0 <= sinks[b] && sinks[b] <= los[b] && los[b] < lens[b],
                "row ", b, ": needs 0 <= sinks <= window start < length");
    TORCH_CHECK((lens[b] + bs - 1) / bs <= width, "row ", b, ": its block table is shorter than its length");
    for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; ++j)
      TORCH_CHECK(0 <= tp[b * width + j] && tp[b * width + j] < k_cache.size(0), "row ", b, ": block id out of range");
  }
  std::vector<Piece> pieces;
  std::vector<int64_t> first_piece(B + 1);
  for (int64_t b = 0; b < B; ++b) {
    first_piece[b] = static_cast<int64_t>(pieces.size()) / Hkv;
    const int64_t n = sinks[b] + lens[b] - los[b];
    for (int64_t f = 0; f < n; f += kSpan)
      for (int64_t h = 0; h < Hkv; ++h) pieces.push_back({b, h, f, std::min(n, f + kSpan)});
  }
  first_piece[B] = static_cast<int64_t>(pieces.size()) / Hkv;
  const int64_t P = static_cast<int64_t>(pieces.size());
  std::vector<float> acc(P * G * D), mx(P * G), sum(P * G);

  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    float qf[kMaxGroup * kMaxDim];
    float s[kMaxGroup * kMaxRun];
    for (int64_t i = begin; i < end; ++i) {
      const Piece& w = pieces[i];
      const int64_t sink = sinks[w.row], lo = los[w.row];
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = as_float(qp[(w.row * Hq + w.head * G + g) * D + d]) * static_cast<float>(scale);
      float* a = acc.data() + i * G * D;
      float* m = mx.data() + i * G;
      float* l = sum.data() + i * G;
      std::fill(a, a + G * D, 0.f);
      std::fill(m, m + G, -std::numeric_limits<float>::infinity());
      std::fill(l, l + G, 0.f);
      for (int64_t key = w.first; key < w.last;) {
        // A run: consecutive positions inside one block, on one side of the sink/band boundary.
        const int64_t pos = key < sink ? key : lo + key - sink;
        const int64_t stop = key < sink ? std::min(w.last, sink) : w.last;
        const int64_t off = pos % bs;
        const int64_t run = std::min({stop - key, bs - off, kMaxRun});
        const int64_t block = tp[w.row * width + pos / bs];
        score_run(kp + block * ks.block + off * ks.pos + w.head * ks.head, ks, run, qf, G, D, s);
        for (int64_t g = 0; g < G; ++g) {
          float* sg = s + g * kMaxRun;
          float top = m[g];
          for (int64_t t = 0; t < run; ++t) top = std::max(top, sg[t]);
          const float rescale = std::exp(m[g] - top);
          float total = 0.f;
          for (int64_t t = 0; t < run; ++t) {
            sg[t] = std::exp(sg[t] - top);
            total += sg[t];
          }
          l[g] = l[g] * rescale + total;
          m[g] = top;
          if (rescale != 1.f)
            for (int64_t d = 0; d < D; ++d) a[g * D + d] *= rescale;
        }
        accumulate_run(vp + block * vs.block + off * vs.pos + w.head * vs.head, vs, run, s, G, D, a);
        key += run;
      }
    }
  });

  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      for (int64_t g = 0; g < G; ++g) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t c = first_piece[b]; c < first_piece[b + 1]; ++c)
          top = std::max(top, mx[(c * Hkv + h) * G + g]);
        float total = 0.f;
        float o[kMaxDim] = {};
        for (int64_t c = first_piece[b]; c < first_piece[b + 1]; ++c) {
          const int64_t i = c * Hkv + h;
          const float w = std::exp(mx[i * G + g] - top);
          total += sum[i * G + g] * w;
          for (int64_t d = 0; d < D; ++d) o[d] += acc[(i * G + g) * D + d] * w;
        }
        scalar_t* dst = op + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] / total);
      }
    }
  });
}

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& tables, const torch::Tensor& ranges, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [B, H_q, D] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches must be [num_blocks, block_size, H_kv, D]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kInt32 && tables.is_contiguous(), "block tables must be contiguous int32");
  TORCH_CHECK(ranges.scalar_type() == torch::kInt32 && ranges.is_contiguous() && ranges.size(0) == 3 &&
                  ranges.size(1) == q.size(0),
              "ranges must be contiguous int32 [3, B]");
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup, "query heads per KV head must divide and be <= ", kMaxGroup);
  TORCH_CHECK(D == k_cache.size(3) && D <= kMaxDim, "head dim must match the cache and be <= ", kMaxDim);
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_decode",
                                  [&] { decode<scalar_t>(q, k_cache, v_cache, tables, ranges, scale, out); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode over sinks and a band, read in place");
}
