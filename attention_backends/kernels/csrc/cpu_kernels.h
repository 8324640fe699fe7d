// What longserve's CPU kernels share: reading a paged cache of any strides, dot products and
// exponentials in forms the compiler vectorizes, and the exact merge of partial softmax states.
//
// A cache is a `[num_blocks, block_size, H_kv, D]` tensor of any strides: longserve's own (D contiguous) or
// vLLM's CPU cache, whose keys are stored transposed per block (positions contiguous). Work is split into
// pieces of at most kSpan keys; each piece keeps, per query head, its running max, its sum of exponentials and
// its weighted sum of values, which `merge_pieces` combines exactly.

#pragma once

// torch's tensor types only: its extension header (pybind11, the C++ API) adds 10-25 s to each file's compile, and
// only bindings.cpp needs it.
#include <ATen/Parallel.h>
#include <torch/types.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace longserve {

constexpr int64_t kSpan = 512;  // keys per piece of work: enough to amortise the merge, small enough to split 8k
constexpr int64_t kMinPiece = 256;  // keys a piece holds at least when `split_even` adds pieces
constexpr int64_t kMaxDim = 256;
constexpr int64_t kMergeGrain = 64;  // query heads merged per task: a decode step's few merge on the calling thread
constexpr int64_t kMaxLinearRows = 16;  // rows `linear_rows` takes: a weight read serves all of them

// Where the kernels' prefetches put what they fetch: the second-level cache (prefetcht1) unless a build asks for the
// first (`LONGSERVE_CPU_FLAGS=-DLONGSERVE_PREFETCH_LOCALITY=3`). On a Zen 4 EPYC a layer's decode at 8k ran no faster
// prefetching into the first level than not prefetching at all; into the second, a layer's decode, Loki's op and a
// decode step's linear layers took 0.56-0.81x the time (BENCHMARKS.md). On a Zen 5 EPYC an earlier decode, which
// prefetched a whole block at once, had taken 8-10% longer prefetching into the second level than into the first.
#ifndef LONGSERVE_PREFETCH_LOCALITY
#define LONGSERVE_PREFETCH_LOCALITY 2
#endif
constexpr int kPrefetchLocality = LONGSERVE_PREFETCH_LOCALITY;

struct Strides {
  int64_t block, pos, head, dim;
  explicit Strides(const torch::Tensor& cache)
      : block(cache.stride(0)), pos(cache.stride(1)), head(cache.stride(2)), dim(cache.stride(3)) {}
};

template <typename T>
inline float as_float(T x) {
  return static_cast<float>(x);
}

// The machine's vector of floats and how many vector registers it has: AVX-512 16 and 32, AVX2 8 and 16, Arm's NEON 4
// and 32, SSE 4 and 16. A wider vector type than the machine's is kept in memory and split at every operation:
// 16-float vectors built for AVX2 made a prefill 30-40x slower and a decode 2.7-4.7x. Register-blocked loops size
// their sums by kRegisters.
#if defined(__AVX512F__)
#define LONGSERVE_LANES 16
constexpr int kRegisters = 32;
#elif defined(__AVX__)
#define LONGSERVE_LANES 8
constexpr int kRegisters = 16;
#elif defined(__aarch64__)
#define LONGSERVE_LANES 4
constexpr int kRegisters = 32;
#else
#define LONGSERVE_LANES 4
constexpr int kRegisters = 16;
#endif
constexpr int64_t kLanes = LONGSERVE_LANES;
using Lanes = float __attribute__((vector_size(4 * LONGSERVE_LANES)));
using LaneBits = int32_t __attribute__((vector_size(4 * LONGSERVE_LANES)));  // a float's bits, lane by lane

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in 9 bits
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kExpFloor = -87.0f;
constexpr float kExpRound = 12582912.0f;       // 1.5 * 2^23: x + kExpRound holds round(x) in its low bits
constexpr int32_t kExpRoundBits = 0x4B400000;  // kExpRound's own bits

// 2^n for the integer n >= -126 that `shifted` = n + 1.5 * 2^23 holds in its low bits, of a float or lane by lane.
template <typename V>
inline V pow2_of_shifted(V shifted) {
  using Bits = std::conditional_t<std::is_same_v<V, float>, int32_t, LaneBits>;
  Bits bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - kExpRoundBits + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale;
}

// exp(x) for x <= 0 to about one ulp (Cephes' expf), of a float or lane by lane of `Lanes`, in a form loops over it
// vectorize (std::exp does not): 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, n found by adding
// 1.5 * 2^23 (the sum's low bits are n). Below -87 the result (< 2^-125) is kept normal: against a row's sum of
// exponentials (>= 1) it is nothing.
template <typename V>
inline V exp_nonpositive(V x) {
  x = x < kExpFloor ? V{} + kExpFloor : x;
  const V shifted = x * kLog2e + kExpRound;
  const V n = shifted - kExpRound;
  const V r = x - n * kLn2Hi - n * kLn2Lo;
  V p = V{} + kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  p = p * r * r + r + 1.0f;
  return p * pow2_of_shifted(shifted);
}

template <typename scalar_t>
inline Lanes load_lanes(const scalar_t* p) {
  Lanes v;
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  float f[kLanes];
  for (int i = 0; i < kLanes; ++i) f[i] = as_float(p[i]);
  std::memcpy(&v, f, sizeof v);
  return v;
}

// 2^x lane by lane for x <= 0, to about one ulp, and 0 below 2^-126 (so for -inf, a key a row does not see): 2^n * 2^f
// with n = round(x) and |f| <= 1/2, 2^f by Cephes' exp2f polynomial. Prefill keeps its scores in base 2 (its queries
// scaled by log2 e) for this: e^x through `exp_nonpositive`'s steps also multiplies by log2 e and subtracts n ln 2 in
// two parts, and the hidden keys took a compare and a blend of their own (a chunk took 1.02-1.05x the time on a Zen 4
// EPYC that way). With AVX-512, n is rounded by one instruction and 2^n applied by another (vrndscaleps, vscalefps,
// the latter masked to 0 below the floor).
constexpr float kExp2Floor = -126.0f;
constexpr float kExp2Poly[] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                               5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f};
inline Lanes exp2_lanes(Lanes x) {
#if defined(__AVX512F__)
  const __m512 v = reinterpret_cast<__m512>(x);
  const __mmask16 normal = _mm512_cmp_ps_mask(v, _mm512_set1_ps(kExp2Floor), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(v, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return reinterpret_cast<Lanes>(_mm512_maskz_scalef_ps(normal, p, n));
#else
  const Lanes v = x < kExp2Floor ? Lanes{} + kExp2Floor : x;
  const Lanes shifted = v + kExpRound;
  const Lanes n = shifted - kExpRound;
  const Lanes f = v - n;
  Lanes p = Lanes{} + kExp2Poly[0];
  for (int i = 1; i < 6; ++i) p = p * f + kExp2Poly[i];
  p = p * f + 1.0f;
  return x < kExp2Floor ? Lanes{} : p * pow2_of_shifted(shifted);
#endif
}

inline float sum_lanes(Lanes v) {  // a halving tree of vector adds
#if LONGSERVE_LANES == 16
  const auto v8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif LONGSERVE_LANES == 8
  const Lanes v8 = v;
#endif
#if LONGSERVE_LANES >= 8
  const auto v4 = __builtin_shufflevector(v8, v8, 0, 1, 2, 3) + __builtin_shufflevector(v8, v8, 4, 5, 6, 7);
#else
  const Lanes v4 = v;
#endif
  const auto v2 = __builtin_shufflevector(v4, v4, 0, 1) + __builtin_shufflevector(v4, v4, 2, 3);
  return v2[0] + v2[1];
}

// q . k over D channels (k's stride between channels is `dk`), a vector at a time when D is known when compiled, a
// multiple of 16, and k's channels are contiguous.
template <int64_t kD, typename scalar_t>
inline float dot(const float* __restrict q, const scalar_t* __restrict k, int64_t D, int64_t dk = 1) {
  if constexpr (kD > 0 && kD % 16 == 0) {
    if (dk == 1) {
      Lanes acc = {};
      for (int64_t c = 0; c < kD; c += kLanes) acc += load_lanes(q + c) * load_lanes(k + c);
      return sum_lanes(acc);
    }
  }
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc += q[d] * as_float(k[d * dk]);
  return acc;
}

// Where `score_keys` and `add_values` find row t: at a stride from a first row (the keys or values of one block), or
// through a list of pointers (kept keys, anywhere in the cache).
// A strided run may name where the same rows lie in the block read next (`ahead`): reading row t then prefetches row t
// there. Spread so, a line or a few at a time between the loads, the next block's reads overlap the arithmetic on
// this one. A whole block's prefetches issued at once (192 lines) wait for the core's few miss buffers and stall it:
// a layer's decode at 8k took 1.4x the time that way, in longserve's layout and in vLLM's alike (1.5x).
struct StridedRows {
  const float* first;
  int64_t stride;
  const float* ahead = nullptr;
  const float* operator()(int64_t t) const { return first + t * stride; }
  template <int64_t kD>
  void prefetch_ahead(int64_t t) const {
    if (ahead != nullptr)
      for (int64_t c = 0; c < kD; c += 16) __builtin_prefetch(ahead + t * stride + c, 0, kPrefetchLocality);
  }
};

struct ListedRows {
  const float* const* rows;
  const float* operator()(int64_t t) const { return rows[t]; }
  template <int64_t kD>
  void prefetch_ahead(int64_t) const {}  // kept keys are prefetched by chunks (spread as above: 1.04x the time)
};

// Scores of up to kLanes keys for one query vector: s[t] = q . row(t) for t < run, each row kD contiguous floats.
// Each key's products accumulate in one vector; the keys' vectors are then summed together by a transposing tree,
// 15 shuffle-adds for 16 keys where summing each key's lanes alone takes 64, in the same order as `sum_lanes`. The
// tree leaves key t in the lane of t's bits reversed; a last shuffle puts it back in order.
template <int64_t kD, typename Row>
inline void score_keys(const float* __restrict q, Row row, int64_t run, float* __restrict s) {
  Lanes acc[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) {
    Lanes a = {};
    if (t < run) {
      row.template prefetch_ahead<kD>(t);
      const float* __restrict k = row(t);
      for (int64_t c = 0; c < kD; c += kLanes) a += load_lanes(q + c) * load_lanes(k + c);
    }
    acc[t] = a;
  }
#if LONGSERVE_LANES == 16
  Lanes r8[8], r4[4], r2[2];
  for (int i = 0; i < 8; ++i)
    r8[i] = __builtin_shufflevector(acc[2 * i], acc[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(acc[2 * i], acc[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                    31);
  for (int i = 0; i < 4; ++i)
    r4[i] = __builtin_shufflevector(r8[2 * i], r8[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
            __builtin_shufflevector(r8[2 * i], r8[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    r2[i] = __builtin_shufflevector(r4[2 * i], r4[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
            __builtin_shufflevector(r4[2 * i], r4[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const Lanes r1 = __builtin_shufflevector(r2[0], r2[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                   __builtin_shufflevector(r2[0], r2[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  const Lanes sorted = __builtin_shufflevector(r1, r1, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
#elif LONGSERVE_LANES == 8
  Lanes r4[4], r2[2];
  for (int i = 0; i < 4; ++i)
    r4[i] = __builtin_shufflevector(acc[2 * i], acc[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
            __builtin_shufflevector(acc[2 * i], acc[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    r2[i] = __builtin_shufflevector(r4[2 * i], r4[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
            __builtin_shufflevector(r4[2 * i], r4[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  const Lanes r1 = __builtin_shufflevector(r2[0], r2[1], 0, 8, 2, 10, 4, 12, 6, 14) +
                   __builtin_shufflevector(r2[0], r2[1], 1, 9, 3, 11, 5, 13, 7, 15);
  const Lanes sorted = __builtin_shufflevector(r1, r1, 0, 4, 2, 6, 1, 5, 3, 7);
#else
  Lanes r2[2];
  for (int i = 0; i < 2; ++i)
    r2[i] = __builtin_shufflevector(acc[2 * i], acc[2 * i + 1], 0, 1, 4, 5) +
            __builtin_shufflevector(acc[2 * i], acc[2 * i + 1], 2, 3, 6, 7);
  const Lanes r1 = __builtin_shufflevector(r2[0], r2[1], 0, 4, 2, 6) +
                   __builtin_shufflevector(r2[0], r2[1], 1, 5, 3, 7);
  const Lanes sorted = __builtin_shufflevector(r1, r1, 0, 2, 1, 3);
#endif
  std::memcpy(s, &sorted, run * sizeof(float));
}

// Scores of keys [t, t + kLanes * kV) stored channel by channel (positions contiguous, channels `dk` apart: vLLM's CPU
// cache, a channel-major side table) for kG query vectors: each channel's keys are loaded once for the kG vectors,
// whose sums stay in registers over the D channels. Summed in memory instead, a store and a load per channel and
// vector, a layer's decode at 1k or 7.7k in vLLM's layout took 1.4x the time. The same sums in the same order.
template <int kG, int kV, typename scalar_t>
inline void score_channels(const scalar_t* __restrict k, int64_t dk, int64_t t, const float* __restrict qf, int64_t D,
                           float* __restrict s, int64_t s_stride, const scalar_t* ahead) {
  Lanes acc[kG][kV] = {};
  for (int64_t d = 0; d < D; ++d) {
    if (ahead != nullptr)  // the same keys of the block read next, as `StridedRows` does
      for (int v = 0; v < kV; ++v) __builtin_prefetch(ahead + d * dk + t + kLanes * v, 0, kPrefetchLocality);
    Lanes kd[kV];
    for (int v = 0; v < kV; ++v) kd[v] = load_lanes(k + d * dk + t + kLanes * v);
    for (int g = 0; g < kG; ++g) {
      const float qd = qf[g * D + d];
      for (int v = 0; v < kV; ++v) acc[g][v] += qd * kd[v];
    }
  }
  for (int g = 0; g < kG; ++g)
    for (int v = 0; v < kV; ++v) std::memcpy(s + g * s_stride + t + kLanes * v, &acc[g][v], sizeof(Lanes));
}

// The keys of a run that `score_channels` takes, two vectors' worth then one at a time; returns how many (the rest
// is under a vector).
template <int kG, typename scalar_t>
inline int64_t score_channels(const scalar_t* k, int64_t dk, int64_t run, const float* qf, int64_t D, float* s,
                              int64_t s_stride, const scalar_t* ahead) {
  int64_t t = 0;
  for (; t + 2 * kLanes <= run; t += 2 * kLanes) score_channels<kG, 2>(k, dk, t, qf, D, s, s_stride, ahead);
  if (t + kLanes <= run) score_channels<kG, 1>(k, dk, t, qf, D, s, s_stride, ahead), t += kLanes;
  return t;
}

// Whether `score_run` prefetches the rows `ahead` it is given, in the forms that score vectors of keys: float rows of
// kD channels, or channels whose positions are contiguous (vLLM's transposed keys, a channel-major side table).
// Otherwise the caller prefetches the block ahead itself.
template <int64_t kD, typename scalar_t>
inline bool score_run_prefetches(const Strides& ks) {
  return ks.pos == 1 || (std::is_same_v<scalar_t, float> && kD > 0 && kD % 16 == 0 && ks.dim == 1);
}

// s[g * s_stride + t] = q_g . k_t for `run` consecutive positions of one block and one KV head, for G query
// vectors of D channels each; `ahead`, if given, the same positions in the block read next (to prefetch).
template <int64_t kD, typename scalar_t>
inline void score_run(const scalar_t* __restrict k, const Strides& ks, int64_t run, const float* __restrict qf,
                      int64_t G, int64_t D, float* __restrict s, int64_t s_stride, const scalar_t* ahead = nullptr) {
  if constexpr (std::is_same_v<scalar_t, float> && kD > 0 && kD % 16 == 0) {
    if (ks.dim == 1) {  // float rows of kD channels: a vector of keys at a time, the same sums as `dot`'s
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < run; t += kLanes)
          score_keys<kD>(qf + g * D,
                         StridedRows{k + t * ks.pos, ks.pos, g == 0 && ahead ? ahead + t * ks.pos : nullptr},
                         std::min(kLanes, run - t), s + g * s_stride + t);
      return;
    }
  }
  if (ks.dim == 1) {  // a key's D channels contiguous: dot products along D
    for (int64_t t = 0; t < run; ++t)
      for (int64_t g = 0; g < G; ++g) s[g * s_stride + t] = dot<kD>(qf + g * D, k + t * ks.pos, D);
  } else if (ks.pos == 1) {  // one channel of the block's keys contiguous: accumulate along positions
    int64_t done = 0;
    switch (G) {  // the common GQA ratios; more would not keep their sums in registers
      case 1: done = score_channels<1>(k, ks.dim, run, qf, D, s, s_stride, ahead); break;
      case 2: done = score_channels<2>(k, ks.dim, run, qf, D, s, s_stride, ahead); break;
      case 3: done = score_channels<3>(k, ks.dim, run, qf, D, s, s_stride, ahead); break;
      case 4: done = score_channels<4>(k, ks.dim, run, qf, D, s, s_stride, ahead); break;
    }
    for (int64_t g = 0; g < G; ++g) std::fill(s + g * s_stride + done, s + g * s_stride + run, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t* __restrict kd = k + d * ks.dim;
      for (int64_t g = 0; g < G; ++g) {
        const float qd = qf[g * D + d];
        float* __restrict sg = s + g * s_stride;
#pragma omp simd
        for (int64_t t = done; t < run; ++t) sg[t] += qd * as_float(kd[t]);
      }
    }
  } else {
    for (int64_t t = 0; t < run; ++t)
      for (int64_t g = 0; g < G; ++g) s[g * s_stride + t] = dot<0>(qf + g * D, k + t * ks.pos, D, ks.dim);
  }
}

// How many of kC channel vectors one pass keeps the sums of for kG query heads, beside the value row's own vectors:
// the largest divisor of kC that fits the registers.
template <int kG>
constexpr int64_t values_slice(int64_t kC) {
  int64_t c = kC;
  while (c > 1 && (kC % c != 0 || (kG + 1) * c > kRegisters - 2)) --c;
  return c;
}

// acc[g] += sum over t < run of w[g * w_stride + t] * row(t) for kG query heads sharing their value rows (kD
// contiguous float channels each): each row is loaded once for all of them, and their sums stay in registers, over
// a slice of the channels at a time where all kD would not fit (AVX2's 16 registers).
template <int64_t kD, int kG, typename Row>
inline void add_values(float* __restrict a, const float* __restrict w, int64_t w_stride, Row row, int64_t run) {
  constexpr int64_t C = kD / kLanes, kSlice = values_slice<kG>(C);
  for (int64_t c0 = 0; c0 < C; c0 += kSlice) {
    float* __restrict out = a + c0 * kLanes;
    Lanes acc[kG][kSlice];
    for (int g = 0; g < kG; ++g)
      for (int64_t c = 0; c < kSlice; ++c) acc[g][c] = load_lanes(out + g * kD + c * kLanes);
    for (int64_t t = 0; t < run; ++t) {
      if (c0 == 0) row.template prefetch_ahead<kD>(t);
      const float* __restrict v = row(t) + c0 * kLanes;
      Lanes vt[kSlice];
      for (int64_t c = 0; c < kSlice; ++c) vt[c] = load_lanes(v + c * kLanes);
      for (int g = 0; g < kG; ++g) {
        const float wg = w[g * w_stride + t];
        for (int64_t c = 0; c < kSlice; ++c) acc[g][c] += wg * vt[c];
      }
    }
    for (int g = 0; g < kG; ++g)
      for (int64_t c = 0; c < kSlice; ++c) std::memcpy(out + g * kD + c * kLanes, &acc[g][c], sizeof(Lanes));
  }
}

// The same for G query heads, 1 to 4 (the common GQA ratios; more would not keep their sums in registers).
template <int64_t kD, typename Row>
inline void add_values(int64_t G, float* a, const float* w, int64_t w_stride, Row row, int64_t run) {
  switch (G) {
    case 1: add_values<kD, 1>(a, w, w_stride, row, run); break;
    case 2: add_values<kD, 2>(a, w, w_stride, row, run); break;
    case 3: add_values<kD, 3>(a, w, w_stride, row, run); break;
    default: add_values<kD, 4>(a, w, w_stride, row, run); break;
  }
}

// acc = x @ m for one row x of C channels (`stride` apart) and a row-major C x C matrix, summed in float: a row
// turned into another basis (Loki's keys as they are stored, its queries as they are scored).
template <typename scalar_t>
inline void rotate_row(const scalar_t* x, int64_t stride, const scalar_t* m, int64_t C, float* __restrict acc) {
  std::fill(acc, acc + C, 0.f);
  for (int64_t i = 0; i < C; ++i) {
    const float xi = as_float(x[i * stride]);
    const scalar_t* r = m + i * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) acc[j] += xi * as_float(r[j]);
  }
}

// acc[d] += w * v[d] for one value row.
template <int64_t kD, typename scalar_t>
inline void add_scaled(float* __restrict acc, float w, const scalar_t* __restrict v, int64_t D_, int64_t dv) {
  const int64_t D = kD > 0 ? kD : D_;
  if (dv == 1) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += w * as_float(v[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] += w * as_float(v[d * dv]);
  }
}

// The largest of n floats, in vectors: as std::max in an `omp simd` reduction it compiled to one float at a time.
inline float max_of(const float* __restrict s, int64_t n) {
  Lanes m = Lanes{} - std::numeric_limits<float>::infinity();
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    const Lanes x = load_lanes(s + t);
    m = x > m ? x : m;
  }
  float top = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < kLanes; ++i) top = std::max(top, m[i]);
  for (; t < n; ++t) top = std::max(top, s[t]);
  return top;
}

// Softmax state of one query head over n scores, in place: s[t] becomes exp(s[t] - max); returns (max, sum). Scores
// of -inf are hidden keys: if every one is, the state is (-inf, 0) and s all 0, which `merge_pieces` weighs 0.
inline std::pair<float, float> exponentiate(float* __restrict s, int64_t n) {
  const float top = max_of(s, n);
  if (top == -std::numeric_limits<float>::infinity()) {
    std::fill(s, s + n, 0.f);
    return {top, 0.f};
  }
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < n; ++t) {
    s[t] = exp_nonpositive(s[t] - top);
    total += s[t];
  }
  return {top, total};
}

// Room for n elements of T, owned by the calling thread and kept from call to call: a step's buffers, made afresh,
// would be zeroed and page-faulted in at every layer. Each use in a kernel names its own `kUse`: the thread that
// calls a kernel also runs pieces of its parallel loops.
// Aligned to 64 bytes, so that a vector load from it never straddles two cache lines.
template <typename T, int kUse>
inline T* scratch(int64_t n) {
  constexpr int64_t kPad = 64 / sizeof(T);
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n + kPad) buffer.resize(n + kPad);
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((address + 63) & ~std::uintptr_t{63});
}

// kLocality 2: into the second level whatever the build's choice, for what is read later still.
template <int kLocality = kPrefetchLocality>
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i, 0, kLocality);
}

// Prefetches one KV head's share of a block, `rows` positions of `width` channels from `base`: row by row where a
// position's channels are contiguous, else the span that holds them (vLLM's transposed keys, a channel-major table).
template <typename scalar_t>
inline void prefetch_head(const scalar_t* base, const Strides& st, int64_t rows, int64_t width) {
  constexpr int64_t size = sizeof(scalar_t);
  if (st.dim != 1) return prefetch(base, ((rows - 1) * st.pos + (width - 1) * st.dim + 1) * size);
  for (int64_t t = 0; t < rows; ++t) prefetch(base + t * st.pos, width * size);
}

// Splits n keys into pieces of work of near-equal size, f(first, last) for each: at most kSpan keys a piece, and as
// many pieces as a multiple of the threads where pieces of at least kMinPiece keys allow. A layer's few long rows
// then keep every core busy to the end: 7.7k keys in 15 pieces of 512 over two cores left one idle for the last.
// The split depends on n and the thread count only, not on the step's other rows.
template <typename F>
inline void split_even(int64_t n, F&& f) {
  const int64_t threads = at::get_num_threads(), least = (n + kSpan - 1) / kSpan;
  const int64_t pieces = std::max(least, std::min((least + threads - 1) / threads * threads, n / kMinPiece));
  for (int64_t j = 0; j < pieces; ++j) f(n * j / pieces, n * (j + 1) / pieces);
}

// One query head's output from the states of its pieces [first, last): the state of piece i sits at index
// i * step (max and sum) and at (i * step) * D (weighted values).
template <typename scalar_t>
inline void merge_pieces(const float* mx, const float* sum, const float* acc, int64_t first, int64_t last,
                         int64_t step, int64_t D, scalar_t* dst) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = first; i < last; ++i) top = std::max(top, mx[i * step]);
  float total = 0.f;
  float o[kMaxDim] = {};
  for (int64_t i = first; i < last; ++i) {
    const float w = std::exp(mx[i * step] - top);
    total += sum[i * step] * w;
    const float* ai = acc + i * step * D;
    for (int64_t d = 0; d < D; ++d) o[d] += ai[d] * w;
  }
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] / total);
}

// Refuses rows whose lengths or block ids would read outside the cache: checked before the loops.
inline void check_tables(const int32_t* lens, const int32_t* tables, int64_t B, int64_t width, int64_t bs,
                         int64_t num_blocks) {
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] > 0, "row ", b, ": needs a positive length");
    TORCH_CHECK((lens[b] + bs - 1) / bs <= width, "row ", b, ": its block table is shorter than its length");
    for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; ++j)
      TORCH_CHECK(0 <= tables[b * width + j] && tables[b * width + j] < num_blocks, "row ", b,
                  ": block id out of range");
  }
}

inline void check_query_and_cache(const torch::Tensor& q, const torch::Tensor& k_cache,
                                  const torch::Tensor& v_cache, const torch::Tensor& tables) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [B, H_q, D] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches must be [num_blocks, block_size, H_kv, D]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kInt32 && tables.is_contiguous() && tables.size(0) == q.size(0),
              "block tables must be contiguous int32 [B, N]");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "the KV heads must divide the query heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(2) == v_cache.size(3) && q.size(2) <= kMaxDim,
              "head dim must match the caches and be <= ", kMaxDim);
}

// A keep mask, when given: a contiguous bool [num_blocks, block_size, H_kv] beside the cache (TCA's kept tokens).
inline void check_keep(const c10::optional<torch::Tensor>& keep, const torch::Tensor& k_cache) {
  TORCH_CHECK(!keep || (keep->scalar_type() == torch::kBool && keep->is_contiguous() && keep->dim() == 3 &&
                        keep->size(0) == k_cache.size(0) && keep->size(1) == k_cache.size(1) &&
                        keep->size(2) == k_cache.size(2)),
              "keep must be a contiguous bool [num_blocks, block_size, H_kv] tensor");
}

torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& weight,
                          const c10::optional<torch::Tensor>& bias);

std::tuple<torch::Tensor, torch::Tensor> rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                                  const c10::optional<torch::Tensor>& residual);

torch::Tensor silu_and_mul(const torch::Tensor& gate_up);

void rotary_inplace(torch::Tensor q, torch::Tensor k, const torch::Tensor& cos, const torch::Tensor& sin);

void write_slots(torch::Tensor cache, const torch::Tensor& x, const torch::Tensor& slot_mapping);
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& slot_mapping, const std::optional<torch::Tensor>& key_rotation);

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& tables, const torch::Tensor& ranges, double scale,
                           const c10::optional<torch::Tensor>& keep);

void paged_prefill(torch::Tensor out, const torch::Tensor& q, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& table, int64_t start, int64_t sinks, int64_t lo,
                   int64_t window, double scale, const c10::optional<torch::Tensor>& keep);

torch::Tensor lowrank_topk_decode(const torch::Tensor& q, const torch::Tensor& low, const torch::Tensor& k_cache,
                                  const torch::Tensor& v_cache, const torch::Tensor& tables,
                                  const torch::Tensor& limits, int64_t sets, double scale,
                                  const std::optional<torch::Tensor>& query_rotation,
                                  const std::optional<torch::Tensor>& out);

torch::Tensor select_decode_pages(const torch::Tensor& q, const torch::Tensor& means, const torch::Tensor& tables,
                                  const torch::Tensor& positions, int64_t page, int64_t block, int64_t kernel,
                                  int64_t stride, int64_t init_blocks, int64_t local_blocks, int64_t k, double scale);

}  // namespace longserve
