// Paged decode on the CPU: each row's query heads over the keys it sees, read where they lie in the paged cache.
//
// The same visibility as the reference op and the Triton kernel (decode.py): row b sees positions
// [0, sink_b) and [lo_b, len_b) of its sequence, found through its block table. Work is split over
// (row, span of keys) so that one long sequence keeps every core busy, and a piece reads every KV head of a
// block: the block's memory is then read once, front to back. A piece first scores its whole span (keys
// only), takes one max and one exponential pass per query head, then reads the values; a second pass merges
// the pieces of a row exactly. Keys are read either with D contiguous (longserve's cache) or with positions
// contiguous (vLLM's CPU cache, whose keys are stored transposed per block): each has a loop order the
// compiler vectorizes. GQA: each key or value read serves the G query heads of its KV head.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kSpan = 512;  // keys per piece of work: enough to amortise the merge, small enough to split 8k
constexpr int64_t kMaxDim = 256;
constexpr int64_t kAhead = 2;  // blocks prefetched ahead of the one being read

struct Strides {
  int64_t block, pos, head, dim;
};

template <typename T>
inline float as_float(T x) {
  return static_cast<float>(x);
}

// exp(x) for x <= 0 to about one ulp (Cephes' expf), in a form loops over it vectorize (std::exp does not):
// 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, n found by adding 1.5 * 2^23 (the sum's low bits are
// n). Below -87 the result (< 2^-125) is kept normal: against a row's sum of exponentials (>= 1) it is nothing.
inline float exp_nonpositive(float x) {
  constexpr float kRound = 12582912.0f;
  x = x < -87.0f ? -87.0f : x;
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // 0x4B400000: kRound's own bits
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// 16 floats as one value: the compiler maps it to the machine's vectors (one AVX-512 register, two AVX2, ...).
using Lanes = float __attribute__((vector_size(64)));

template <typename scalar_t>
inline Lanes load_lanes(const scalar_t* p) {
  Lanes v;
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = as_float(p[i]);
  std::memcpy(&v, f, sizeof v);
  return v;
}

inline float sum_lanes(Lanes v) {  // a halving tree of vector adds
  const auto a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const auto b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const auto c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}

// q . k over D channels, 16 at a time when D is known when compiled and a multiple of 16.
template <int64_t kD, typename scalar_t>
inline float dot(const float* __restrict q, const scalar_t* __restrict k, int64_t D) {
  if constexpr (kD > 0 && kD % 16 == 0) {
    Lanes acc = {};
    for (int64_t c = 0; c < kD; c += 16) acc += load_lanes(q + c) * load_lanes(k + c);
    return sum_lanes(acc);
  } else {
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += q[d] * as_float(k[d]);
    return acc;
  }
}

// s[g * kSpan + t] = q_g . k_t for `run` consecutive positions of one block and one KV head.
template <int64_t kD, typename scalar_t>
inline void score_run(const scalar_t* __restrict k, const Strides& ks, int64_t run, const float* __restrict qf,
                      int64_t G, int64_t D, float* __restrict s) {
  if (ks.dim == 1) {  // a key's D channels contiguous: dot products along D
    for (int64_t t = 0; t < run; ++t)
      for (int64_t g = 0; g < G; ++g) s[g * kSpan + t] = dot<kD>(qf + g * D, k + t * ks.pos, D);
  } else if (ks.pos == 1) {  // one channel of the block's keys contiguous: accumulate along positions
    for (int64_t g = 0; g < G; ++g) std::fill(s + g * kSpan, s + g * kSpan + run, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t* __restrict kd = k + d * ks.dim;
      for (int64_t g = 0; g < G; ++g) {
        const float qd = qf[g * D + d];
        float* __restrict sg = s + g * kSpan;
#pragma omp simd
        for (int64_t t = 0; t < run; ++t) sg[t] += qd * as_float(kd[t]);
      }
    }
  } else {
    for (int64_t t = 0; t < run; ++t)
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += qf[g * D + d] * as_float(k[t * ks.pos + d * ks.dim]);
        s[g * kSpan + t] = acc;
      }
  }
}

// acc[g] += sum_t p[g * kSpan + t] * v_t for `run` consecutive positions of one block and one KV head. With D
// known when compiled, a query head's D sums stay in registers over the run.
template <int64_t kD, typename scalar_t>
inline void accumulate_run(const scalar_t* __restrict v, const Strides& vs, int64_t run, const float* __restrict p,
                           int64_t G, int64_t D_, float* __restrict acc) {
  const int64_t D = kD > 0 ? kD : D_;
  for (int64_t g = 0; g < G; ++g) {
    const float* __restrict pg = p + g * kSpan;
    float* __restrict ag = acc + g * D;
    if (vs.dim == 1) {
      for (int64_t t = 0; t < run; ++t) {
        const scalar_t* __restrict vt = v + t * vs.pos;
        const float w = pg[t];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += w * as_float(vt[d]);
      }
    } else {
      for (int64_t t = 0; t < run; ++t)
        for (int64_t d = 0; d < D; ++d) ag[d] += pg[t] * as_float(v[t * vs.pos + d * vs.dim]);
    }
  }
}

struct Piece {
  int64_t row, first, last;  // keys [first, last) of the row's visible list
};

// Calls f(block, offset in block, run, index in the piece, ahead) for the runs of consecutive positions inside
// one block, on one side of the sink/band boundary, that make up the piece's keys; `ahead` is the block read
// kAhead blocks later (-1: none), for f to prefetch: blocks lie anywhere in the cache, so the hardware cannot
// guess the next address, and a block's read takes less time than the memory's latency.
template <typename F>
inline void for_each_run(const Piece& w, int64_t sink, int64_t lo, int64_t bs, const int32_t* table, F&& f) {
  auto position = [&](int64_t key) { return key < sink ? key : lo + key - sink; };
  for (int64_t key = w.first; key < w.last;) {
    const int64_t pos = position(key);
    const int64_t stop = key < sink ? std::min(w.last, sink) : w.last;
    const int64_t off = pos % bs;
    const int64_t run = std::min(stop - key, bs - off);
    const int64_t later = key + kAhead * bs;
    const int64_t ahead = later < w.last ? table[position(later) / bs] : -1;
    f(static_cast<int64_t>(table[pos / bs]), off, run, key - w.first, ahead);
    key += run;
  }
}

inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i, 0, 2);
}

template <int64_t kD, typename scalar_t>
void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& tables, const torch::Tensor& ranges, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv, width = tables.size(1);
  const Strides ks{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3)};
  const Strides vs{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3)};
  const int64_t block_bytes = bs * Hkv * D * static_cast<int64_t>(sizeof(scalar_t));  // one block of one layer
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
    first_piece[b] = static_cast<int64_t>(pieces.size());
    const int64_t n = sinks[b] + lens[b] - los[b];
    for (int64_t f = 0; f < n; f += kSpan) pieces.push_back({b, f, std::min(n, f + kSpan)});
  }
  first_piece[B] = static_cast<int64_t>(pieces.size());
  const int64_t P = static_cast<int64_t>(pieces.size());
  // Per piece and query head: the running max, the sum of exponentials and the weighted sum of values.
  std::vector<float> acc(P * Hq * D), mx(P * Hq), sum(P * Hq);

  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Hq * D), s(Hq * kSpan);
    for (int64_t i = begin; i < end; ++i) {
      const Piece& w = pieces[i];
      const int64_t n = w.last - w.first, sink = sinks[w.row], lo = los[w.row];
      const int32_t* table = tp + w.row * width;
      for (int64_t j = 0; j < Hq * D; ++j) qf[j] = as_float(qp[w.row * Hq * D + j]) * static_cast<float>(scale);
      for_each_run(w, sink, lo, bs, table, [&](int64_t block, int64_t off, int64_t run, int64_t at, int64_t ahead) {
        if (ahead >= 0) prefetch(kp + ahead * ks.block, block_bytes);
        const scalar_t* kb = kp + block * ks.block + off * ks.pos;
        for (int64_t h = 0; h < Hkv; ++h)
          score_run<kD>(kb + h * ks.head, ks, run, qf.data() + h * G * D, G, D, s.data() + h * G * kSpan + at);
      });
      for (int64_t c = 0; c < Hq; ++c) {
        float* __restrict sc = s.data() + c * kSpan;
        float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
        for (int64_t t = 0; t < n; ++t) top = std::max(top, sc[t]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < n; ++t) {
          sc[t] = exp_nonpositive(sc[t] - top);
          total += sc[t];
        }
        mx[i * Hq + c] = top;
        sum[i * Hq + c] = total;
      }
      float* a = acc.data() + i * Hq * D;
      std::fill(a, a + Hq * D, 0.f);
      for_each_run(w, sink, lo, bs, table, [&](int64_t block, int64_t off, int64_t run, int64_t at, int64_t ahead) {
        if (ahead >= 0) prefetch(vp + ahead * vs.block, block_bytes);
        const scalar_t* vb = vp + block * vs.block + off * vs.pos;
        for (int64_t h = 0; h < Hkv; ++h)
          accumulate_run<kD>(vb + h * vs.head, vs, run, s.data() + h * G * kSpan + at, G, D, a + h * G * D);
      });
    }
  });

  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / Hq, c = bc % Hq;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t i = first_piece[b]; i < first_piece[b + 1]; ++i) top = std::max(top, mx[i * Hq + c]);
      float total = 0.f;
      float o[kMaxDim] = {};
      for (int64_t i = first_piece[b]; i < first_piece[b + 1]; ++i) {
        const float w = std::exp(mx[i * Hq + c] - top);
        total += sum[i * Hq + c] * w;
        const float* ai = acc.data() + (i * Hq + c) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += ai[d] * w;
      }
      scalar_t* dst = op + (b * Hq + c) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] / total);
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
  TORCH_CHECK(Hq % Hkv == 0, "the KV heads must divide the query heads");
  TORCH_CHECK(D == k_cache.size(3) && D <= kMaxDim, "head dim must match the cache and be <= ", kMaxDim);
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_decode",
                                  [&] {
    // The common head dims compiled with D fixed, so the loops over it unroll.
    if (D == 64) decode<64, scalar_t>(q, k_cache, v_cache, tables, ranges, scale, out);
    else if (D == 128) decode<128, scalar_t>(q, k_cache, v_cache, tables, ranges, scale, out);
    else decode<0, scalar_t>(q, k_cache, v_cache, tables, ranges, scale, out);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode over sinks and a band, read in place");
}
