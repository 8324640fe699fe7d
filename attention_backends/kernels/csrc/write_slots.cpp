// Storing fresh tokens' rows (keys, values, or what a backend keeps beside them) at their cache slots: what
// `paged.write_slots` does with a few indexing ops, in one call (a decode step stores one token per layer, where those
// ops' fixed costs are the whole cost); `paged.write_kv` stores keys and values in one call, the keys rotated first
// where a backend keeps them in another basis (Loki). Slots below zero are skipped, as vLLM's writers skip its
// padding.

#include <ATen/Parallel.h>

#include "cpu_kernels.h"

namespace longserve {
namespace {

// Row x[t, h] at slot t; with a rotation ([H, C, C] contiguous), x[t, h] @ rotation[h] instead, summed in float.
template <typename scalar_t>
void store_rows(torch::Tensor& cache, const torch::Tensor& x, const int64_t* slots, const scalar_t* rotation) {
  const int64_t T = x.size(0), H = x.size(1), C = x.size(2), bs = cache.size(1);
  const Strides cs(cache);
  const int64_t xt = x.stride(0), xh = x.stride(1), xd = x.stride(2);
  scalar_t* dst = cache.data_ptr<scalar_t>();
  const scalar_t* src = x.data_ptr<scalar_t>();
  at::parallel_for(0, T, rotation ? 16 : 256, [&](int64_t begin, int64_t end) {
    float* acc = rotation ? scratch<float, 0>(C) : nullptr;
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      scalar_t* row = dst + (slots[t] / bs) * cs.block + (slots[t] % bs) * cs.pos;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* in = src + t * xt + h * xh;
        scalar_t* out = row + h * cs.head;
        if (rotation == nullptr) {
          for (int64_t d = 0; d < C; ++d) out[d * cs.dim] = in[d * xd];
          continue;
        }
        rotate_row(in, xd, rotation + h * C * C, C, acc);
        for (int64_t j = 0; j < C; ++j) out[j * cs.dim] = static_cast<scalar_t>(acc[j]);
      }
    }
  });
}

// The slot mapping, checked against the cache and the rows.
const int64_t* checked_slots(const torch::Tensor& cache, const torch::Tensor& x, const torch::Tensor& slot_mapping) {
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
  return slots;
}

}  // namespace

void write_slots(torch::Tensor cache, const torch::Tensor& x, const torch::Tensor& slot_mapping) {
  const int64_t* slots = checked_slots(cache, x, slot_mapping);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "write_slots",
                                  [&] { store_rows<scalar_t>(cache, x, slots, nullptr); });
}

void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& slot_mapping, const std::optional<torch::Tensor>& key_rotation) {
  const int64_t* slots = checked_slots(k_cache, k, slot_mapping);
  checked_slots(v_cache, v, slot_mapping);
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "keys and values must share a dtype");
  if (key_rotation) {
    const int64_t H = k.size(1), C = k.size(2);
    TORCH_CHECK(key_rotation->is_contiguous() && key_rotation->scalar_type() == k.scalar_type() &&
                    key_rotation->sizes() == torch::IntArrayRef({H, C, C}),
                "a key rotation must be contiguous [H_kv, D, D] in the keys' dtype");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "write_kv", [&] {
    store_rows<scalar_t>(k_cache, k, slots, key_rotation ? key_rotation->data_ptr<scalar_t>() : nullptr);
    store_rows<scalar_t>(v_cache, v, slots, nullptr);
  });
}

}  // namespace longserve
