// Storing fresh tokens' rows (keys, values, or what a backend keeps beside them) at their cache slots: what
// `paged.write_slots` does with a few indexing ops, in one call (a decode step stores one token per layer, where those
// ops' fixed costs are the whole cost). Slots below zero are skipped, as vLLM's writers skip its padding.

#include <ATen/Parallel.h>

#include "cpu_kernels.h"

namespace longserve {
namespace {

template <typename scalar_t>
void copy_rows(torch::Tensor& cache, const torch::Tensor& x, const int64_t* slots) {
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), bs = cache.size(1);
  const Strides cs(cache);
  const int64_t xt = x.stride(0), xh = x.stride(1), xd = x.stride(2);
  scalar_t* dst = cache.data_ptr<scalar_t>();
  const scalar_t* src = x.data_ptr<scalar_t>();
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      scalar_t* row = dst + (slots[t] / bs) * cs.block + (slots[t] % bs) * cs.pos;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) row[h * cs.head + d * cs.dim] = src[t * xt + h * xh + d * xd];
    }
  });
}

}  // namespace

void write_slots(torch::Tensor cache, const torch::Tensor& x, const torch::Tensor& slot_mapping) {
  TORCH_CHECK(cache.dim() == 4 && x.dim() == 3 && x.size(1) == cache.size(2) && x.size(2) == cache.size(3),
              "a cache [num_blocks, block_size, H, C] takes rows [T, H, C]");
  TORCH_CHECK(x.scalar_type() == cache.scalar_type(), "rows must have the cache's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == x.size(0),
              "slot mapping must be contiguous int64 [T]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t limit = cache.size(0) * cache.size(1);
  for (int64_t t = 0; t < slot_mapping.numel(); ++t)
    TORCH_CHECK(slots[t] < limit, "slot ", slots[t], " is past the cache's ", limit, " slots");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "write_slots",
                                  [&] { copy_rows<scalar_t>(cache, x, slots); });
}

}  // namespace longserve
