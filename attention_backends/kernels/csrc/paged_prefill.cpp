// Paged prefill on the CPU: one chunk's queries over the keys each sees, read where they lie in the paged cache.
//
// The same visibility as the reference op (prefill.py): the query at position p sees key j iff j <= p and
// (j < sinks or (j >= lo and p - j < window)), so row p sees the keys [0, a) and [b, p + 1) with a = min(sinks,
// p + 1) and b = max(lo, p - window + 1). A chunk after cached context reads that context from the cache like its
// own keys: nothing is gathered and no mask tensor is built.
//
// Rows in lanes: a group's rows, (query head, position) pairs of one KV head, lie across the lanes of three
// vectors (48 rows with AVX-512, 24 with AVX2). What the online softmax keeps per row (its max, its sum, the factor
// that rescales its output) is then a vector; a tile's scores are a key's channel broadcast times the queries'
// transposed channel, so keys are read in place in any layout and never transposed; its values go the same way into
// the transposed output. A task runs up to four groups of positions over each tile of 128 keys, so a tile read from
// memory serves 192 rows with AVX-512 (eight groups, 64-key tiles, or prefetching the next tile or its values,
// measured no faster). On the embedded model's geometry it takes 0.32-0.41x the time of torch's flash attention per
// chunk with AVX-512, and about the same time with AVX2 (benchmarks/bench_prefill_kernel.py).
//
// The block table is the chunk's, or one per KV head ([H_kv, N]): InfLLM-V2's query groups read their selected blocks
// that way, at the positions those blocks take in the table. An optional keep mask ([num_blocks, block_size, H_kv]
// bool, TCA's kept tokens) hides the sink keys before the band ([0, min(sinks, band start))) that a KV head did not
// keep, as the band's mask hides keys.

#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

#include "cpu_kernels.h"

namespace longserve {
namespace {

constexpr int kVecs = 3;                   // vectors of rows in a group
constexpr int64_t kRows = kLanes * kVecs;  // rows of a group
constexpr int64_t kKeys = 128;             // keys of a tile
// Keys whose scores, or value channels whose sums, one pass keeps in registers for all rows: with the rows' own
// kVecs vectors and a broadcast value they fill the registers.
constexpr int kKeyStep = kRegisters >= 32 ? 8 : 4;
constexpr int kDimStep = kKeyStep;
constexpr int64_t kGroups = 4;             // groups of a task: each tile read serves all of them
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// One group's rows: which keys each sees ([0, a) and [b, hi)), and over all of them what a tile must meet to
// matter ([0, a_max) or [b_min, hi_max)) or lie in to need no mask ([0, a_min) or [b_max, hi_min)). Rows past the
// chunk's end or the group's size see nothing (a = b = hi = 0).
struct Group {
  alignas(64) int32_t a[kRows], b[kRows], hi[kRows];
  alignas(64) float max[kRows], sum[kRows];
  int64_t head0, heads, pos0, positions;  // its query heads [head0, head0 + heads), positions [pos0, + positions)
  int64_t a_max, b_min, hi_max, a_min, b_max, hi_min;
};

// acc[j][v] += x(j) * row[kLanes v ..] for j < kN: one rank-1 step of either product, kN broadcast values against a
// row of a group's lanes.
template <int kN, typename X>
inline void add_outer(Lanes (&acc)[kN][kVecs], const float* __restrict row, X&& x) {
  Lanes r[kVecs];
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) r[v] = load_lanes(row + kLanes * v);
#pragma GCC unroll 8
  for (int j = 0; j < kN; ++j) {
    const float xj = x(j);
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[j][v] += xj * r[v];
  }
}

template <int kN>
inline void store_rows(const Lanes (&acc)[kN][kVecs], float* __restrict dst) {
  for (int j = 0; j < kN; ++j)
    for (int v = 0; v < kVecs; ++v) std::memcpy(dst + j * kRows + kLanes * v, &acc[j][v], sizeof(Lanes));
}

// s[t][r] = sum over d of k_t[d] * qt[d][r], for n keys (a multiple of kKeyStep).
template <typename scalar_t>
inline void score_tile(const float* __restrict qt, const scalar_t* const* keys, int64_t kdim, int64_t D, int64_t n,
                       float* __restrict s) {
  for (int64_t t0 = 0; t0 < n; t0 += kKeyStep) {
    Lanes acc[kKeyStep][kVecs] = {};
    for (int64_t d = 0; d < D; ++d)
      add_outer(acc, qt + d * kRows, [&](int j) { return as_float(keys[t0 + j][d * kdim]); });
    store_rows(acc, s + t0 * kRows);
  }
}

// ot[d][r] = ot[d][r] * scale[r] + sum over t of v_t[d] * p[t][r], for channels [d0, d0 + kN).
template <int kN, typename scalar_t>
inline void add_values_pass(float* __restrict ot, const float* __restrict scale, const float* __restrict p,
                            const scalar_t* const* values, int64_t vdim, int64_t d0, int64_t n) {
  Lanes acc[kN][kVecs], f[kVecs];
  for (int v = 0; v < kVecs; ++v) f[v] = load_lanes(scale + kLanes * v);
  for (int j = 0; j < kN; ++j)
    for (int v = 0; v < kVecs; ++v) acc[j][v] = load_lanes(ot + (d0 + j) * kRows + kLanes * v) * f[v];
  for (int64_t t = 0; t < n; ++t)
    add_outer(acc, p + t * kRows, [&](int j) { return as_float(values[t][(d0 + j) * vdim]); });
  store_rows(acc, ot + d0 * kRows);
}

template <typename scalar_t>
inline void add_values_tile(float* ot, const float* scale, const float* p, const scalar_t* const* values,
                            int64_t vdim, int64_t D, int64_t n) {
  int64_t d0 = 0;
  for (; d0 + kDimStep <= D; d0 += kDimStep) add_values_pass<kDimStep>(ot, scale, p, values, vdim, d0, n);
  for (; d0 < D; ++d0) add_values_pass<1>(ot, scale, p, values, vdim, d0, n);
}

// One group over keys [k0, k0 + n) (`padded` of them scored; those past n are masked): the online softmax's step.
// `kept` (null: all) says which of the tile's keys the group's KV head kept.
template <typename scalar_t>
void attend_tile(Group& g, const float* qt, float* ot, const scalar_t* const* keys, const scalar_t* const* values,
                 int64_t kdim, int64_t vdim, int64_t D, int64_t k0, int64_t n, int64_t padded, const bool* kept,
                 float* s) {
  score_tile(qt, keys, kdim, D, padded, s);
  const int64_t k1 = k0 + n;
  const bool whole = !kept && n == padded && (k1 <= g.a_min || (k0 >= g.b_max && k1 <= g.hi_min));
  if (!whole) {
    for (int64_t t = 0; t < padded; ++t) {
      const bool hidden = t >= n || (kept && !kept[t]);
      const int32_t key = hidden ? std::numeric_limits<int32_t>::max() : static_cast<int32_t>(k0 + t);
      float* st = s + t * kRows;
#pragma omp simd
      for (int64_t r = 0; r < kRows; ++r)
        st[r] = (key < g.a[r] || (key >= g.b[r] && key < g.hi[r])) ? st[r] : kMinusInf;
    }
  }
  alignas(64) float top[kRows], base[kRows], rescale[kRows];
  std::copy(g.max, g.max + kRows, top);
  for (int64_t t = 0; t < padded; ++t) {
    const float* st = s + t * kRows;
#pragma omp simd
    for (int64_t r = 0; r < kRows; ++r) top[r] = std::max(top[r], st[r]);
  }
#pragma omp simd
  for (int64_t r = 0; r < kRows; ++r) base[r] = top[r] == kMinusInf ? 0.f : top[r];  // no key seen yet: sums stay 0
  Lanes b[kVecs], sums[kVecs] = {};
  for (int v = 0; v < kVecs; ++v) {
    b[v] = load_lanes(base + kLanes * v);
    const Lanes f = exp2_lanes(load_lanes(g.max + kLanes * v) - b[v]);
    std::memcpy(rescale + kLanes * v, &f, sizeof f);
  }
  for (int64_t t = 0; t < padded; ++t) {
    float* st = s + t * kRows;
    for (int v = 0; v < kVecs; ++v) {
      const Lanes e = exp2_lanes(load_lanes(st + kLanes * v) - b[v]);
      std::memcpy(st + kLanes * v, &e, sizeof e);
      sums[v] += e;
    }
  }
  for (int v = 0; v < kVecs; ++v) {
    const Lanes sum = load_lanes(g.sum + kLanes * v) * load_lanes(rescale + kLanes * v) + sums[v];
    std::memcpy(g.sum + kLanes * v, &sum, sizeof sum);
  }
  std::copy(top, top + kRows, g.max);
  add_values_tile(ot, rescale, s, values, vdim, D, padded);
}

template <typename scalar_t>
void prefill(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
             const torch::Tensor& table, int64_t start, int64_t sinks, int64_t lo, int64_t window, const bool* keep,
             double scale) {
  const int64_t Hq = q.size(0), T = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv;
  // A group's rows are `heads` query heads of one KV head at `positions` positions. A KV head with more query heads
  // than a group has rows (multi-query models) has them in slices, each its own tasks.
  const int64_t slices = (G + kRows - 1) / kRows, heads = (G + slices - 1) / slices, units = Hkv * slices;
  const int64_t positions = kRows / heads;
  // Fewer groups a task when a chunk has too few tasks to keep every core busy (an InfLLM-V2 query group: one task a
  // KV head): a tile then serves fewer rows, but no core waits.
  const int64_t threads = at::get_num_threads();
  int64_t task_groups = kGroups;
  while (task_groups > 1 && units * ((T + positions * task_groups - 1) / (positions * task_groups)) < 2 * threads)
    task_groups /= 2;
  const int64_t per_task = positions * task_groups;
  const int64_t tasks_per_head = (T + per_task - 1) / per_task, tasks = units * tasks_per_head;
  const Strides ks(k_cache), vs(v_cache);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int32_t* blocks = table.data_ptr<int32_t>();
  const int64_t head_table = table.dim() == 2 ? table.size(1) : 0;  // offset between KV heads' tables
  // Read once: stride() checks its dimension at every call, which in the row loops below took 13% of a 2k chunk's
  // time.
  const int64_t q0 = q.stride(0), q1 = q.stride(1), q2 = q.stride(2);
  const int64_t o0 = out.stride(0), o1 = out.stride(1), o2 = out.stride(2);
  const int64_t no_window = window > 0 ? window : start + T + 1;
  const float qscale = static_cast<float>(scale * 1.4426950408889634);  // scores in base 2: `exp2_lanes` takes them

  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    float* qt = scratch<float, 20>(kGroups * D * kRows);
    float* ot = scratch<float, 21>(kGroups * D * kRows);
    float* s = scratch<float, 22>(kKeys * kRows);
    std::vector<Group> groups(kGroups);
    const scalar_t* keys[kKeys];
    const scalar_t* values[kKeys];
    bool kept[kKeys];
    // The last positions (the most keys) first: what is left at the end is short.
    for (int64_t task; (task = next.fetch_add(1)) < tasks;) {
      const int64_t unit = task % units, h = unit / slices, chunk0 = (tasks_per_head - 1 - task / units) * per_task;
      const int64_t head0 = h * G + unit % slices * heads;
      const int32_t* head_blocks = blocks + h * head_table;
      const int64_t count = std::min(task_groups, (T - chunk0 + positions - 1) / positions);
      int64_t band_lo = std::numeric_limits<int64_t>::max(), sink_end = 0, key_end = 0;
      for (int64_t gi = 0; gi < count; ++gi) {
        Group& g = groups[gi];
        g.head0 = head0;
        g.heads = std::min(heads, (h + 1) * G - head0);
        g.pos0 = chunk0 + gi * positions;
        g.positions = std::min(positions, T - g.pos0);
        g.a_min = g.b_min = g.hi_min = std::numeric_limits<int64_t>::max();
        g.a_max = g.b_max = g.hi_max = 0;
        float* gq = qt + gi * D * kRows;
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t c = r / positions, i = r % positions;
          const bool valid = c < g.heads && i < g.positions;
          const int64_t p = start + g.pos0 + i;
          g.a[r] = valid ? static_cast<int32_t>(std::min(sinks, p + 1)) : 0;
          g.b[r] = valid ? static_cast<int32_t>(std::max({lo, p - no_window + 1, int64_t{0}})) : 0;
          g.hi[r] = valid ? static_cast<int32_t>(p + 1) : 0;
          g.max[r] = kMinusInf;
          g.sum[r] = 0.f;
          if (valid) {
            g.a_min = std::min<int64_t>(g.a_min, g.a[r]), g.a_max = std::max<int64_t>(g.a_max, g.a[r]);
            g.b_min = std::min<int64_t>(g.b_min, g.b[r]), g.b_max = std::max<int64_t>(g.b_max, g.b[r]);
            g.hi_min = std::min<int64_t>(g.hi_min, g.hi[r]), g.hi_max = std::max<int64_t>(g.hi_max, g.hi[r]);
          }
          const scalar_t* qr = valid ? qp + (g.head0 + c) * q0 + (g.pos0 + i) * q1 : nullptr;
          for (int64_t d = 0; d < D; ++d) gq[d * kRows + r] = valid ? as_float(qr[d * q2]) * qscale : 0.f;
        }
        std::fill(ot + gi * D * kRows, ot + (gi + 1) * D * kRows, 0.f);
        band_lo = std::min(band_lo, g.b_min);
        sink_end = std::max(sink_end, g.a_max);
        key_end = std::max(key_end, g.hi_max);
      }
      sink_end = std::min(sink_end, band_lo);  // sink keys the band does not cover
      // The task's keys: [0, sink_end), then [band_lo, key_end), in tiles of kKeys.
      // `masked`: the keep mask applies (the sink keys).
      auto run_tiles = [&](int64_t from, int64_t to, bool masked) {
        for (int64_t k0 = from; k0 < to; k0 += kKeys) {
          const int64_t n = std::min(kKeys, to - k0), padded = (n + kKeyStep - 1) / kKeyStep * kKeyStep;
          for (int64_t t = 0; t < padded; ++t) {
            const int64_t pos = k0 + std::min(t, n - 1);  // padding reads the last key again; it is masked
            const int64_t block = head_blocks[pos / bs], off = pos % bs;
            keys[t] = kp + block * ks.block + off * ks.pos + h * ks.head;
            values[t] = vp + block * vs.block + off * vs.pos + h * vs.head;
            if (masked) kept[t] = keep[(block * bs + off) * Hkv + h];
          }
          for (int64_t gi = 0; gi < count; ++gi) {
            Group& g = groups[gi];
            if (k0 >= g.a_max && (k0 + n <= g.b_min || k0 >= g.hi_max)) continue;  // no row of the group sees the tile
            // On the diagonal a group stops at its own last key, not the task's: up to 48 keys fewer to score.
            const int64_t seen = std::min(n, g.hi_max - k0);
            attend_tile(g, qt + gi * D * kRows, ot + gi * D * kRows, keys, values, ks.dim, vs.dim, D, k0, seen,
                        (seen + kKeyStep - 1) / kKeyStep * kKeyStep, masked ? kept : nullptr, s);
          }
        }
      };
      run_tiles(0, sink_end, keep != nullptr);
      run_tiles(band_lo, key_end, false);
      for (int64_t gi = 0; gi < count; ++gi) {
        const Group& g = groups[gi];
        const float* go = ot + gi * D * kRows;
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t c = r / positions, i = r % positions;
          if (c >= g.heads || i >= g.positions) continue;
          scalar_t* dst = op + (g.head0 + c) * o0 + (g.pos0 + i) * o1;
          const float inv = 1.f / g.sum[r];
          for (int64_t d = 0; d < D; ++d) dst[d * o2] = static_cast<scalar_t>(go[d * kRows + r] * inv);
        }
      }
    }
  });
}

}  // namespace

void paged_prefill(torch::Tensor out, const torch::Tensor& q, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& table, int64_t start, int64_t sinks, int64_t lo,
                   int64_t window, double scale, const c10::optional<torch::Tensor>& keep) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [H_q, T, D] tensors of one shape");
  TORCH_CHECK(q.device().is_cpu() && out.device().is_cpu() && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu() && table.device().is_cpu(),
              "paged_prefill runs on CPU tensors");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "caches must be [num_blocks, block_size, H_kv, D]");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(),
              "q, out and the caches must share a dtype");
  TORCH_CHECK(q.size(0) % k_cache.size(2) == 0, "the KV heads must divide the query heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head dim must match the caches");
  TORCH_CHECK(table.scalar_type() == torch::kInt32 && table.is_contiguous() &&
                  (table.dim() == 1 || (table.dim() == 2 && table.size(0) == k_cache.size(2))),
              "the block table must be a contiguous int32 [N] tensor, or [H_kv, N] for a table per KV head");
  TORCH_CHECK(start >= 0 && sinks >= 0 && lo >= 0 && window >= -1 && window != 0,
              "needs start, sinks, lo >= 0 and a positive window (-1: none)");
  const int64_t end = start + q.size(1), bs = k_cache.size(1);
  TORCH_CHECK(end <= std::numeric_limits<int32_t>::max(), "positions must fit in int32");
  const int64_t width = table.size(-1), used = (end + bs - 1) / bs;
  TORCH_CHECK(used <= width, "the block table is shorter than the chunk's end");
  const int32_t* blocks = table.data_ptr<int32_t>();
  for (int64_t row = 0; row < table.numel() / width; ++row)
    for (int64_t j = 0; j < used; ++j)
      TORCH_CHECK(0 <= blocks[row * width + j] && blocks[row * width + j] < k_cache.size(0), "block id out of range");
  check_keep(keep, k_cache);
  if (q.size(1) == 0) return;
  const bool* kept = keep ? keep->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_prefill", [&] {
    prefill<scalar_t>(out, q, k_cache, v_cache, table, start, sinks, lo, window, kept, scale);
  });
}

}  // namespace longserve
