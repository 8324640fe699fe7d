// Loki's decode on the CPU in one call per layer: score every cached key on its first d (rotated) channels, keep
// each key set's top keys, attend exactly to those: the reference is `topk.py` (lowrank_scores, keep_top) and
// `slots.py` (slot_attention), row by row. Given a rotation per KV head, the queries are rotated here (the plugin's
// Loki hands them in as the model made them), and given `out`, the result is written there (the rows of vLLM's
// output).
//
// Row b has `len_b` keys; its first `sinks_b` and last `local_b` are always kept, and `budget_b` more of the others,
// those that score highest (all of them when fewer remain). A key set is one KV head, whose G query heads share what
// they keep and score with their queries summed (sets == H_kv), or one query head (sets == H_q). Scores over (row, span
// of keys), reading the d channels of every KV head of a block at once, 16 keys at a time, with the rows of the block
// two ahead prefetched (a block's few low-rank rows are too few for the hardware prefetchers); then, in one parallel
// loop, selection over (row, set), a histogram of the scores' bits a part at a time, each among the keys of the
// previous one's threshold bucket only, and exact attention over (row, set, span of kept keys), with the kept keys'
// rows prefetched ahead, merged exactly per query head as in paged decode. Spans are cut by `split_even`. For float
// caches with contiguous channels the exact pass takes paged decode's register-blocked forms (a vector of kept keys
// scored at a time, a value row read once for the set's query heads): 0.80-0.97x the time of a layer's decode at 8k
// with the per-key forms, the same sums in the same order (benchmarks/bench_decode_kernel.py's caches).

#include <ATen/Parallel.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "cpu_kernels.h"

namespace longserve {
namespace {

constexpr int64_t kAheadKeys = 8;  // kept keys whose rows are prefetched ahead of the one being read
constexpr int64_t kAheadBlocks = 1;  // how far ahead the scoring pass prefetches low-rank keys
constexpr int kBucketBits = 11;

// Scores as unsigned integers of the same order: a larger float gives a larger key.
inline uint32_t order_key(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// A row's scored keys, [lo, hi): those past its first `sinks` and before its last `local`.
std::pair<int64_t, int64_t> scored_range(int64_t len, int64_t sinks, int64_t local) {
  const int64_t lo = std::min(sinks, len);
  return {lo, std::max(lo, len - local)};
}

// How many keys `select` keeps: the forced ones and as many scored ones as the budget allows.
int64_t kept_count(int64_t len, int64_t sinks, int64_t local, int64_t budget) {
  const auto [lo, hi] = scored_range(len, sinks, local);
  return lo + (len - hi) + std::min(budget, hi - lo);
}

// Of the keys `order[cand[j]]`, j < n (positions ascending), those whose bits [shift, shift + width) are the
// largest: the bucket the `need`-th largest falls in, which the candidates are narrowed to (in place, in order),
// and `need` becomes the number still to take among them. A histogram per way, summed after: consecutive keys in
// one bucket would otherwise wait on each other's count.
template <int kWays>
int64_t narrow(const uint32_t* order, int32_t* cand, int64_t n, int shift, int width, int64_t& need) {
  constexpr int kMaxBuckets = 1 << kBucketBits;
  int32_t hist[kWays][kMaxBuckets];
  const uint32_t mask = (1u << width) - 1;
  for (auto& way : hist) std::fill(way, way + (mask + 1), 0);
  for (int64_t j = 0; j < n; ++j) ++hist[j % kWays][order[cand[j]] >> shift & mask];
  auto count = [&](uint32_t b) {
    int64_t c = 0;
    for (int w = 0; w < kWays; ++w) c += hist[w][b];
    return c;
  };
  uint32_t cut = mask;
  while (count(cut) < need) need -= count(cut--);
  // Kept or not is random, which a branch per key would mispredict: every candidate is written, the count moves on
  // for those in the bucket.
  int64_t kept = 0;
  for (int64_t j = 0; j < n; ++j) {
    cand[kept] = cand[j];
    kept += (order[cand[j]] >> shift & mask) == cut;
  }
  return kept;
}

// Writes to `out`, in ascending order, the row's forced keys (its first `sinks` and last `local`) and the `budget`
// highest-scoring others (`kept_count` of them); ties go to the earlier position. The others' scores, as ordered
// integers, are ranked 11, 11 and 10 bits at a time from the top (`narrow`), each time among the keys of the
// bucket the budget ends in only: the keys left then share one score, and the earliest of them are taken.
void select(const float* scores, int64_t len, int64_t sinks, int64_t local, int64_t budget, int32_t* out) {
  const auto [lo, hi] = scored_range(len, sinks, local);
  int64_t n = 0;
  for (int64_t t = 0; t < lo; ++t) out[n++] = static_cast<int32_t>(t);
  if (budget >= hi - lo) {
    for (int64_t t = lo; t < hi; ++t) out[n++] = static_cast<int32_t>(t);
  } else if (budget > 0) {
    const int64_t m = hi - lo;
    uint32_t* order = scratch<uint32_t, 0>(m);
    int32_t* cand = scratch<int32_t, 2>(m);
    for (int64_t i = 0; i < m; ++i) {
      order[i] = order_key(scores[lo + i]);
      cand[i] = static_cast<int32_t>(i);
    }
    int64_t need = budget;
    int64_t left = narrow<4>(order, cand, m, 32 - kBucketBits, kBucketBits, need);
    left = narrow<1>(order, cand, left, 32 - 2 * kBucketBits, kBucketBits, need);
    narrow<1>(order, cand, left, 0, 32 - 2 * kBucketBits, need);
    // The last key taken, in the order (score descending, position ascending): everything before it is kept.
    const int64_t last = cand[need - 1];
    const uint32_t last_key = order[last];
    // A flag per key, then eight flags at a time (again no branch per key).
    uint8_t* flags = scratch<uint8_t, 0>(m + 8);
    std::fill(flags + m, flags + m + 8, 0);
    for (int64_t i = 0; i < m; ++i) flags[i] = order[i] > last_key || (order[i] == last_key && i <= last);
    for (int64_t base = 0; base < m; base += 8) {
      uint64_t eight;
      std::memcpy(&eight, flags + base, sizeof eight);
      for (; eight; eight &= eight - 1) out[n++] = static_cast<int32_t>(lo + base + (__builtin_ctzll(eight) >> 3));
    }
  }
  for (int64_t t = hi; t < len; ++t) out[n++] = static_cast<int32_t>(t);
}

struct Piece {
  int64_t row, set, first, last;  // kept keys [first, last) of the row's set (for scoring: positions, set -1)
};

template <int64_t kD, int64_t kd, typename scalar_t>
void topk_decode(const torch::Tensor& q, const scalar_t* rotation, const torch::Tensor& low,
                 const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& tables,
                 const torch::Tensor& limits, int64_t S, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), d = low.size(3);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), width = tables.size(1);
  const int64_t per_kv = S / Hkv, heads = Hq / S;  // sets per KV head, query heads per set
  const Strides ls(low), ks(k_cache), vs(v_cache);
  const bool spread = score_run_prefetches<kd, scalar_t>(ls);  // else the low-rank rows are prefetched a block at a time
  // Float caches with contiguous channels, D a multiple of 16 known when compiled, up to 4 query heads per key set:
  // kept keys scored a vector at a time, each value row read once for the set's heads, their sums in registers.
  constexpr bool kBlocked = std::is_same_v<scalar_t, float> && kD > 0 && kD % 16 == 0;
  const bool blocked = kBlocked && ks.dim == 1 && vs.dim == 1 && heads <= 4;
  const scalar_t* lp = low.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lens = limits.data_ptr<int32_t>();
  const int32_t *sinks = lens + B, *locals = lens + 2 * B, *budgets = lens + 3 * B;
  check_tables(lens, tp, B, width, bs, k_cache.size(0));
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sinks[b] >= 0 && locals[b] >= 0 && budgets[b] >= 0, "row ", b, ": negative sinks, window or budget");
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, lens[b]);
  // How many keys each set keeps, known before selection, so its pieces of attention are planned up front.
  std::vector<int64_t> count(B * S);
  for (int64_t set = 0; set < B * S; ++set) {
    const int64_t b = set / S;
    count[set] = kept_count(lens[b], sinks[b], locals[b], budgets[b]);
    TORCH_CHECK(count[set] > 0, "row ", b, " keeps no key: it needs sinks, a local window or a budget");
  }

  // The queries in float, each rotated by its KV head's matrix when given (summed in float, as `write_kv` rotates
  // keys): a step's few rows, which a separate product per layer would take longer to launch than to compute.
  std::vector<float> qv(B * Hq * D);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  for (int64_t bc = 0; bc < B * Hq; ++bc) {
    float* row = qv.data() + bc * D;
    const scalar_t* in = qp + bc * D;
    if (rotation == nullptr)
      for (int64_t j = 0; j < D; ++j) row[j] = as_float(in[j]);
    else
      rotate_row(in, 1, rotation + (bc % Hq) / (Hq / Hkv) * D * D, D, row);
  }
  // Each set's query, summed over its heads, on the first d channels (scores rank keys: no scale needed).
  std::vector<float> qlow(B * S * d, 0.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < Hq; ++c)
      for (int64_t j = 0; j < d; ++j) qlow[(b * S + c / heads) * d + j] += qv[(b * Hq + c) * D + j];

  float* scores = scratch<float, 1>(B * S * longest);
  std::vector<Piece> spans;
  for (int64_t b = 0; b < B; ++b)
    split_even(lens[b], [&](int64_t first, int64_t last) { spans.push_back({b, -1, first, last}); });
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Piece& w = spans[i];
      const int32_t* table = tp + w.row * width;
      for (int64_t pos = w.first; pos < w.last;) {
        const int64_t off = pos % bs, run = std::min(w.last - pos, bs - off);
        const scalar_t* lb = lp + table[pos / bs] * ls.block + off * ls.pos;
        // The low-rank rows of the block kAheadBlocks on: a block's d channels of each key are too few for the
        // hardware's prefetchers to pick up the stride before the next block, elsewhere in the cache.
        const int64_t later = pos + kAheadBlocks * bs;
        const scalar_t* ahead = later < w.last ? lp + table[later / bs] * ls.block : nullptr;
        if (ahead != nullptr && !spread)
          for (int64_t h = 0; h < Hkv; ++h) prefetch_head(ahead + h * ls.head, ls, bs, d);
        for (int64_t h = 0; h < Hkv; ++h)
          score_run<kd>(lb + h * ls.head, ls, run, qlow.data() + (w.row * S + h * per_kv) * d, per_kv, d,
                        scores + (w.row * S + h * per_kv) * longest + pos, longest,
                        ahead != nullptr && spread ? ahead + off * ls.pos + h * ls.head : nullptr);
        pos += run;
      }
    }
  });

  std::vector<Piece> pieces;
  std::vector<int64_t> first_piece(B * S + 1);
  for (int64_t set = 0; set < B * S; ++set) {
    first_piece[set] = static_cast<int64_t>(pieces.size());
    split_even(count[set], [&](int64_t first, int64_t last) { pieces.push_back({set / S, set % S, first, last}); });
  }
  first_piece[B * S] = static_cast<int64_t>(pieces.size());
  const int64_t P = static_cast<int64_t>(pieces.size());
  float* acc = scratch<float, 2>(P * heads * D);
  float *mx = scratch<float, 3>(P * heads), *sum = scratch<float, 4>(P * heads);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));

  // Set j's kept keys: kept[j * longest, + count[j]).
  int32_t* kept = scratch<int32_t, 1>(B * S * longest);
  // Selections, then pieces of exact attention, taken in that order by whichever thread is free: a piece waits only
  // for its own set's selection, so no core idles while another selects a set that the cores cannot share evenly
  // (3 sets on 2 cores). Taken in order, every selection is under way before any piece waits for it.
  const int64_t selections = B * S;
  std::unique_ptr<std::atomic<bool>[]> selected(new std::atomic<bool>[selections]());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    float *qf = scratch<float, 5>(heads * D), *s = scratch<float, 6>(heads * kSpan);
    for (int64_t task; (task = next.fetch_add(1)) < selections + P;) {
      if (task < selections) {
        const int64_t b = task / S;
        select(scores + task * longest, lens[b], sinks[b], locals[b], budgets[b], kept + task * longest);
        selected[task].store(true, std::memory_order_release);
        continue;
      }
      const int64_t i = task - selections;
      const Piece& w = pieces[i];
      while (!selected[w.row * S + w.set].load(std::memory_order_acquire)) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#else
        std::this_thread::yield();
#endif
      }
      const int64_t n = w.last - w.first, h = w.set / per_kv;
      const int32_t* table = tp + w.row * width;
      const int32_t* list = kept + (w.row * S + w.set) * longest + w.first;
      const float* qs = qv.data() + (w.row * Hq + w.set * heads) * D;
      for (int64_t j = 0; j < heads * D; ++j) qf[j] = qs[j] * static_cast<float>(scale);
      auto row_of = [&](const scalar_t* cache, const Strides& st, int64_t j) {
        const int64_t pos = list[j];
        return cache + table[pos / bs] * st.block + (pos % bs) * st.pos + h * st.head;
      };
      // The kept rows' addresses, for the register-blocked loops (null: the per-key loops).
      const float** krow = nullptr;
      const float** vrow = nullptr;
      if constexpr (kBlocked) {
        if (blocked) {
          krow = scratch<const float*, 7>(2 * n);
          vrow = krow + n;
          for (int64_t j = 0; j < n; ++j) {
            krow[j] = row_of(kp, ks, j);
            vrow[j] = row_of(vp, vs, j);
          }
        }
      }
      if (krow) {
        // Keys prefetched a chunk ahead; each chunk's values into the second-level cache while its keys are scored,
        // ready for the pass over values.
        for (int64_t j = 0; j < n; j += 16) {
          for (int64_t t = j + 16; t < std::min(n, j + 32); ++t) prefetch(krow[t], row_bytes);
          for (int64_t t = j; t < std::min(n, j + 16); ++t) prefetch<2>(vrow[t], row_bytes);
          for (int64_t g = 0; g < heads; ++g)
            for (int64_t t = j; t < std::min(n, j + 16); t += kLanes)
              score_keys<kD>(qf + g * D, ListedRows{krow + t}, std::min(kLanes, n - t), s + g * kSpan + t);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          if (j + kAheadKeys < n) prefetch(row_of(kp, ks, j + kAheadKeys), row_bytes);
          const scalar_t* k = row_of(kp, ks, j);
          for (int64_t g = 0; g < heads; ++g) s[g * kSpan + j] = dot<kD>(qf + g * D, k, D, ks.dim);
        }
      }
      for (int64_t g = 0; g < heads; ++g)
        std::tie(mx[i * heads + g], sum[i * heads + g]) = exponentiate(&s[g * kSpan], n);
      float* a = acc + i * heads * D;
      std::fill(a, a + heads * D, 0.f);
      if (vrow) {
        for (int64_t j = 0; j < n; j += 16)
          add_values<kD>(heads, a, s + j, kSpan, ListedRows{vrow + j}, std::min<int64_t>(16, n - j));
      } else {
        for (int64_t j = 0; j < n; ++j) {
          if (j + kAheadKeys < n) prefetch(row_of(vp, vs, j + kAheadKeys), row_bytes);
          const scalar_t* v = row_of(vp, vs, j);
          for (int64_t g = 0; g < heads; ++g) add_scaled<kD>(a + g * D, s[g * kSpan + j], v, D, vs.dim);
        }
      }
    }
  });

  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * Hq, kMergeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / Hq, c = bc % Hq, set = b * S + c / heads, g = c % heads;
      merge_pieces(mx + g, sum + g, acc + g * D, first_piece[set], first_piece[set + 1], heads, D, op + bc * D);
    }
  });
}

template <int64_t kD, typename scalar_t>
void dispatch_rank(const torch::Tensor& q, const scalar_t* rotation, const torch::Tensor& low,
                   const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& tables,
                   const torch::Tensor& limits, int64_t S, double scale, torch::Tensor& out) {
  // Loki's default rank (a quarter of the head dim) compiled with d fixed.
  if (low.size(3) == kD / 4)
    topk_decode<kD, kD / 4, scalar_t>(q, rotation, low, k_cache, v_cache, tables, limits, S, scale, out);
  else
    topk_decode<kD, 0, scalar_t>(q, rotation, low, k_cache, v_cache, tables, limits, S, scale, out);
}

}  // namespace

torch::Tensor lowrank_topk_decode(const torch::Tensor& q, const torch::Tensor& low, const torch::Tensor& k_cache,
                                  const torch::Tensor& v_cache, const torch::Tensor& tables,
                                  const torch::Tensor& limits, int64_t sets, double scale,
                                  const std::optional<torch::Tensor>& query_rotation,
                                  const std::optional<torch::Tensor>& out) {
  check_query_and_cache(q, k_cache, v_cache, tables);
  TORCH_CHECK(low.dim() == 4 && low.size(0) == k_cache.size(0) && low.size(1) == k_cache.size(1) &&
                  low.size(2) == k_cache.size(2) && low.size(3) >= 1 && low.size(3) <= q.size(2),
              "low-rank keys must be [num_blocks, block_size, H_kv, d] beside the cache, d <= D");
  TORCH_CHECK(low.scalar_type() == q.scalar_type(), "low-rank keys and q must share a dtype");
  TORCH_CHECK(limits.scalar_type() == torch::kInt32 && limits.is_contiguous() && limits.size(0) == 4 &&
                  limits.size(1) == q.size(0),
              "limits must be contiguous int32 [4, B]");
  const int64_t Hq = q.size(1), Hkv = k_cache.size(2), D = q.size(2);
  TORCH_CHECK(sets > 0 && sets % Hkv == 0 && Hq % sets == 0, "key sets must be a multiple of the KV heads dividing "
              "the query heads");
  TORCH_CHECK(!query_rotation || (query_rotation->is_contiguous() && query_rotation->scalar_type() == q.scalar_type() &&
                                  query_rotation->sizes() == torch::IntArrayRef({Hkv, D, D})),
              "a query rotation must be contiguous [H_kv, D, D] in q's dtype");
  TORCH_CHECK(!out || (out->is_contiguous() && out->sizes() == q.sizes() && out->scalar_type() == q.scalar_type() &&
                       out->device().is_cpu()),
              "out must be contiguous and of q's shape and dtype");
  torch::Tensor result = out ? *out : torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lowrank_topk_decode", [&] {
    const scalar_t* rotation = query_rotation ? query_rotation->data_ptr<scalar_t>() : nullptr;
    if (D == 64) dispatch_rank<64, scalar_t>(q, rotation, low, k_cache, v_cache, tables, limits, sets, scale, result);
    else if (D == 128)
      dispatch_rank<128, scalar_t>(q, rotation, low, k_cache, v_cache, tables, limits, sets, scale, result);
    else topk_decode<0, 0, scalar_t>(q, rotation, low, k_cache, v_cache, tables, limits, sets, scale, result);
  });
  return result;
}

}  // namespace longserve
