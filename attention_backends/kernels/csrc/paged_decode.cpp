// Paged decode on the CPU: each row's query heads over the keys it sees, read where they lie in the paged cache.
//
// The same visibility as the reference op and the Triton kernel (decode.py): row b sees positions
// [0, sink_b) and [lo_b, len_b) of its sequence, found through its block table. Work is split over
// (row, span of keys), spans of near-equal size (`split_even`), so that one long sequence keeps every core busy
// to the end, and a piece reads every KV head of a block: the block's memory is then read once, front to back.
// A piece first scores its whole span (keys only), takes one max and one exponential pass per query head, then
// reads the values; a second pass merges the pieces of a row exactly. GQA: each key or value read serves the G
// query heads of its KV head. For float caches and D a multiple of 16, scores are summed a vector of keys at a time
// (a key's channels contiguous, longserve's layout) or one or two vectors of keys a channel at a time (vLLM's CPU
// cache, keys transposed per block), and each value row is read once for its G query heads (up to 4), their sums in
// registers: 12-20% less time a layer than the per-key forms in longserve's layout, 0.54x the time in vLLM's, with
// the same sums in the same order (benchmarks/bench_decode_kernel.py).
//
// Block tables are one per row, or one per row and KV head ([B, H_kv, N], InfLLM-V2's selected blocks): a piece then
// reads one KV head, and a step's rows and heads still share one parallel loop (one call per KV head left two cores
// with three pieces each: 2.6x the time of one call on InfLLM-V2's 24 selected blocks at 7.7k).
//
// An optional keep mask ([num_blocks, block_size, H_kv] bool, TCA's kept tokens) hides the keys of [0, sink_b) that
// a KV head did not keep: they are scored like the others and their scores set to -inf before the softmax, which
// weighs them e^-87 (`exp_nonpositive`'s floor), nothing against a sum of at least 1.

#include <ATen/Parallel.h>

#include <vector>

#include "cpu_kernels.h"

namespace longserve {
namespace {

constexpr int64_t kAhead = 1;  // the block prefetched while one is read: the next (2 or 4 ahead: 1.12-1.15x the time)

struct Piece {
  int64_t set, first, last;  // keys [first, last) of the visible list of a block table (a row, or a row's KV head)
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

template <int64_t kD, typename scalar_t>
void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& tables, const torch::Tensor& ranges, const bool* keep, double scale,
            torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv, width = tables.size(-1);
  const bool per_head = tables.dim() == 3;
  const int64_t per_row = per_head ? Hkv : 1, sets = B * per_row;  // block tables per row, in all
  const Strides ks(k_cache), vs(v_cache);
  // float values whose channels are contiguous (vLLM's too), D a multiple of 16 known when compiled, up to 4 query
  // heads per KV head: values in the register-blocked form above (`score_run` picks the scores' form itself).
  constexpr bool kBlocked = std::is_same_v<scalar_t, float> && kD > 0 && kD % 16 == 0;
  const bool blocked = kBlocked && vs.dim == 1 && G <= 4;
  const bool spread_keys = score_run_prefetches<kD, scalar_t>(ks);
  const int64_t block_bytes = bs * Hkv * D * static_cast<int64_t>(sizeof(scalar_t));  // one block of one layer
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lens = ranges.data_ptr<int32_t>();
  const int32_t* sinks = lens + B;
  const int32_t* los = lens + 2 * B;

  std::vector<int32_t> set_lens(sets);
  for (int64_t set = 0; set < sets; ++set) set_lens[set] = lens[set / per_row];
  check_tables(set_lens.data(), tp, sets, width, bs, k_cache.size(0));
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= sinks[b] && sinks[b] <= los[b] && los[b] < lens[b],
                "row ", b, ": needs 0 <= sinks <= window start < length");
  std::vector<Piece> pieces;
  std::vector<int64_t> first_piece(sets + 1);
  for (int64_t set = 0; set < sets; ++set) {
    first_piece[set] = static_cast<int64_t>(pieces.size());
    const int64_t b = set / per_row, n = sinks[b] + lens[b] - los[b];
    split_even(n, [&](int64_t first, int64_t last) { pieces.push_back({set, first, last}); });
  }
  first_piece[sets] = static_cast<int64_t>(pieces.size());
  const int64_t P = static_cast<int64_t>(pieces.size());
  // Per piece and query head: the running max, the sum of exponentials and the weighted sum of values.
  float *acc = scratch<float, 10>(P * Hq * D), *mx = scratch<float, 11>(P * Hq), *sum = scratch<float, 12>(P * Hq);

  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    float *qf = scratch<float, 13>(Hq * D), *s = scratch<float, 14>(Hq * kSpan);
    for (int64_t i = begin; i < end; ++i) {
      const Piece& w = pieces[i];
      const int64_t row = w.set / per_row, n = w.last - w.first, sink = sinks[row], lo = los[row];
      // The KV heads the piece reads, [h0, h1): all of them, or its table's.
      const int64_t h0 = per_head ? w.set % Hkv : 0, h1 = per_head ? h0 + 1 : Hkv;
      const int32_t* table = tp + w.set * width;
      for (int64_t j = h0 * G * D; j < h1 * G * D; ++j)
        qf[j] = as_float(qp[row * Hq * D + j]) * static_cast<float>(scale);
      auto prefetch_block = [&](const scalar_t* cache, const Strides& st, int64_t block) {
        if (!per_head) return prefetch(cache + block * st.block, block_bytes);
        prefetch_head(cache + block * st.block + h0 * st.head, st, bs, D);
      };
      for_each_run(w, sink, lo, bs, table, [&](int64_t block, int64_t off, int64_t run, int64_t at, int64_t ahead) {
        const scalar_t* kb = kp + block * ks.block + off * ks.pos;
        const scalar_t* ka = ahead >= 0 && spread_keys ? kp + ahead * ks.block + off * ks.pos : nullptr;
        if (ahead >= 0 && !spread_keys) prefetch_block(kp, ks, ahead);
        for (int64_t h = h0; h < h1; ++h)
          score_run<kD>(kb + h * ks.head, ks, run, qf + h * G * D, G, D, s + h * G * kSpan + at, kSpan,
                        ka ? ka + h * ks.head : nullptr);
        if (keep == nullptr || w.first + at >= sink) return;  // a run lies wholly before or after the sinks' end
        constexpr float kHidden = -std::numeric_limits<float>::infinity();
        const bool* kept = keep + (block * bs + off) * Hkv;
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t t = 0; t < run; ++t)
            if (!kept[t * Hkv + h])
              for (int64_t c = h * G; c < (h + 1) * G; ++c) s[c * kSpan + at + t] = kHidden;
      });
      for (int64_t c = h0 * G; c < h1 * G; ++c)
        std::tie(mx[i * Hq + c], sum[i * Hq + c]) = exponentiate(&s[c * kSpan], n);
      float* a = acc + i * Hq * D;
      std::fill(a + h0 * G * D, a + h1 * G * D, 0.f);
      for_each_run(w, sink, lo, bs, table, [&](int64_t block, int64_t off, int64_t run, int64_t at, int64_t ahead) {
        const scalar_t* vb = vp + block * vs.block + off * vs.pos;
        if constexpr (kBlocked) {
          if (blocked) {
            const scalar_t* va = ahead >= 0 ? vp + ahead * vs.block + off * vs.pos : nullptr;
            for (int64_t h = h0; h < h1; ++h)
              add_values<kD>(G, a + h * G * D, s + h * G * kSpan + at, kSpan,
                             StridedRows{vb + h * vs.head, vs.pos, va ? va + h * vs.head : nullptr}, run);
            return;
          }
        }
        if (ahead >= 0) prefetch_block(vp, vs, ahead);
        // With D known when compiled, a query head's D sums stay in registers over the run.
        for (int64_t c = h0 * G; c < h1 * G; ++c)
          for (int64_t t = 0; t < run; ++t)
            add_scaled<kD>(a + c * D, s[c * kSpan + at + t], vb + (c / G) * vs.head + t * vs.pos, D, vs.dim);
      });
    }
  });

  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * Hq, kMergeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / Hq, c = bc % Hq, set = b * per_row + (per_head ? c / G : 0);
      merge_pieces(mx + c, sum + c, acc + c * D, first_piece[set], first_piece[set + 1], Hq, D, op + bc * D);
    }
  });
}

}  // namespace

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& tables, const torch::Tensor& ranges, double scale,
                           const c10::optional<torch::Tensor>& keep) {
  check_query_and_cache(q, k_cache, v_cache, tables);
  check_keep(keep, k_cache);
  const bool* kept = keep ? keep->data_ptr<bool>() : nullptr;
  TORCH_CHECK(tables.dim() == 2 || (tables.dim() == 3 && tables.size(1) == k_cache.size(2)),
              "block tables must be [B, N], or [B, H_kv, N] for a table per KV head");
  TORCH_CHECK(ranges.scalar_type() == torch::kInt32 && ranges.is_contiguous() && ranges.size(0) == 3 &&
                  ranges.size(1) == q.size(0),
              "ranges must be contiguous int32 [3, B]");
  auto out = torch::empty_like(q);
  const int64_t D = q.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_decode", [&] {
    // The common head dims compiled with D fixed, so the loops over it unroll.
    if (D == 64) decode<64, scalar_t>(q, k_cache, v_cache, tables, ranges, kept, scale, out);
    else if (D == 128) decode<128, scalar_t>(q, k_cache, v_cache, tables, ranges, kept, scale, out);
    else decode<0, scalar_t>(q, k_cache, v_cache, tables, ranges, kept, scale, out);
  });
  return out;
}

}  // namespace longserve
