// InfLLM-V2's block selection for a step's decoding rows in one call per layer: the reference is `block_sparse.py`'s
// `compress`, `kernel_probs`, `select_blocks` and `block_pages` for one query per row, ~20 small torch ops a row
// and layer (0.77-1.06 ms at 7.7k on vLLM's 32-token pages, against 36-51 us for this call).
//
// For row b and KV head h: tier-1 and tier-2 compressed keys are means of consecutive page means; the G query
// heads of h score them (scaled), are normalised by their tier-2 logsumexp (tier 1's when no tier-2 key exists
// yet, 0 when neither does) and summed; a selection block's score is the largest tier-1 probability among the
// keys that overlap it, 0 where its window runs past the pooled keys (the reference's zero padding); init and
// local blocks and the current one are forced in; the top k in the order (score descending, block ascending)
// are the reference's stable sort, so the ties adjacent blocks get from a shared tier-1 key go the same way.
// Their pages, ascending, are the output.

#include <ATen/Parallel.h>

#include <numeric>
#include <vector>

#include "cpu_kernels.h"

namespace longserve {
namespace {

constexpr int64_t kCoarse = 4;  // tier 2's kernel and stride are this multiple of tier 1's (block_sparse.COARSE)

struct Geometry {
  int64_t page, block, kernel, stride, init_blocks, local_blocks, k;
};

// Logits [G, n] of the G queries on keys pooled from a row's page means, each key the mean of `kernel` pages at a
// stride of `stride` pages, from the queries' dot products with each page mean `dots` [G, pages]: a key's logit is
// the mean of its pages' dot products. The reference takes the dot product of the mean: the same up to rounding, at
// a tenth of the work, since the pages' dot products serve both tiers and every key overlapping them. Returns n.
int64_t pooled_logits(const float* dots, int64_t pages, int64_t kernel, int64_t stride, int64_t G,
                      std::vector<float>& logits) {
  const int64_t n = pages >= kernel ? (pages - kernel) / stride + 1 : 0;
  logits.resize(G * n);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < n; ++i) {
      float sum = 0.f;
      for (int64_t p = i * stride; p < i * stride + kernel; ++p) sum += dots[g * pages + p];
      logits[g * n + i] = sum / static_cast<float>(kernel);
    }
  return n;
}

float logsumexp(const float* x, int64_t n) {
  const float top = max_of(x, n);
  if (!std::isfinite(top)) return top;
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(x[i] - top);
  return top + std::log(sum);
}

// The k selection blocks, ascending, that row b's KV head h attends to.
template <int64_t kD>
void select_row(const float* qs, int64_t G, int64_t D, const float* means, int64_t mean_stride, const int32_t* table,
                int64_t pos, const Geometry& geo, int32_t* blocks) {
  const int64_t pages = (pos + 1) / geo.page;  // full pages: the only ones with means
  const int64_t kp = geo.kernel / geo.page, sp = geo.stride / geo.page;
  thread_local std::vector<float> dots, fine, coarse, probs, scores;
  dots.resize(G * pages);
  for (int64_t p = 0; p < pages; ++p) {
    const float* m = means + table[p] * mean_stride;
    for (int64_t g = 0; g < G; ++g) dots[g * pages + p] = dot<kD>(qs + g * D, m, D);
  }
  const int64_t n1 = pooled_logits(dots.data(), pages, kp, sp, G, fine);
  const int64_t n2 = pooled_logits(dots.data(), pages, kCoarse * kp, kCoarse * sp, G, coarse);
  probs.assign(n1, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    float lse = n2 ? logsumexp(coarse.data() + g * n2, n2) : n1 ? logsumexp(fine.data() + g * n1, n1) : 0.f;
    for (int64_t i = 0; i < n1; ++i) probs[i] += std::exp(fine[g * n1 + i] - lse);
  }

  // Block j overlaps tier-1 keys [r*j - a + 1, r*j + r - 1].
  const int64_t a = geo.kernel / geo.stride, r = geo.block / geo.stride, cur = pos / geo.block, nb = cur + 1;
  scores.resize(nb);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t lo = r * j - a + 1, hi = r * j + r - 1;
    float best = lo < 0 || hi >= n1 ? 0.f : -std::numeric_limits<float>::infinity();
    for (int64_t i = std::max<int64_t>(lo, 0); i <= std::min(hi, n1 - 1); ++i) best = std::max(best, probs[i]);
    const bool forced = j < geo.init_blocks || j >= cur - geo.local_blocks;
    // A NaN (from a NaN query) would break the ordering below: it ranks like a forced block.
    scores[j] = forced || std::isnan(best) ? std::numeric_limits<float>::infinity() : best;
  }
  thread_local std::vector<int32_t> order;
  order.resize(nb);
  std::iota(order.begin(), order.end(), 0);
  std::nth_element(order.begin(), order.begin() + (geo.k - 1), order.end(), [&](int32_t x, int32_t y) {
    return scores[x] != scores[y] ? scores[x] > scores[y] : x < y;
  });
  std::copy(order.begin(), order.begin() + geo.k, blocks);
  std::sort(blocks, blocks + geo.k);
}

}  // namespace

torch::Tensor select_decode_pages(const torch::Tensor& q, const torch::Tensor& means, const torch::Tensor& tables,
                                  const torch::Tensor& positions, int64_t page, int64_t block, int64_t kernel,
                                  int64_t stride, int64_t init_blocks, int64_t local_blocks, int64_t k, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == torch::kFloat32,
              "q must be a contiguous float32 [B, H_q, D] tensor");
  TORCH_CHECK(means.dim() == 3 && means.is_contiguous() && means.scalar_type() == torch::kFloat32 &&
                  means.size(2) == q.size(2) && q.size(2) <= kMaxDim && q.size(1) % means.size(1) == 0,
              "means must be a contiguous float32 [num_blocks, H_kv, D] tensor whose H_kv divides q's heads");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == torch::kInt32 && tables.is_contiguous() &&
                  tables.size(0) == q.size(0),
              "block tables must be contiguous int32 [B, N]");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == torch::kInt32 && positions.is_contiguous() &&
                  positions.size(0) == q.size(0),
              "positions must be contiguous int32 [B]");
  TORCH_CHECK(page > 0 && stride % page == 0 && kernel % stride == 0 && block % stride == 0 && stride > 0 &&
                  block >= page && k > init_blocks + local_blocks && init_blocks >= 0 && local_blocks >= 0,
              "selection geometry: stride a multiple of the page, kernel and block of the stride, k past the forced "
              "blocks");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = means.size(1), G = Hq / Hkv;
  const int64_t width = tables.size(1), ppb = block / page;
  const int32_t* pos = positions.data_ptr<int32_t>();
  std::vector<int32_t> lens(B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] / block >= k - 1, "row ", b, ": position ", pos[b], " has fewer than k = ", k,
                " blocks to choose from");
    lens[b] = pos[b] + 1;
  }
  check_tables(lens.data(), tables.data_ptr<int32_t>(), B, width, page, means.size(0));

  const Geometry geo{page, block, kernel, stride, init_blocks, local_blocks, k};
  auto out = torch::empty({B, Hkv, k * ppb}, tables.options());
  const float *qp = q.data_ptr<float>(), *mp = means.data_ptr<float>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> blocks(k);
    std::vector<float> scaled(G * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      for (int64_t i = 0; i < G * D; ++i) scaled[i] = qp[(b * Hq + h * G) * D + i] * static_cast<float>(scale);
      const int32_t* table = tp + b * width;
      if (D == 64) select_row<64>(scaled.data(), G, D, mp + h * D, Hkv * D, table, pos[b], geo, blocks.data());
      else if (D == 128) select_row<128>(scaled.data(), G, D, mp + h * D, Hkv * D, table, pos[b], geo, blocks.data());
      else select_row<0>(scaled.data(), G, D, mp + h * D, Hkv * D, table, pos[b], geo, blocks.data());
      int32_t* dst = op + task * k * ppb;
      for (int64_t i = 0; i < k; ++i)
        for (int64_t p = 0; p < ppb; ++p) {
          const int64_t at = blocks[i] * ppb + p;
          dst[i * ppb + p] = at < width ? table[at] : 0;  // past the table: the null block, as `padded_table` pads
        }
    }
  });
  return out;
}

}  // namespace longserve
