// Decode attention on CPU: one new query token per row against that row's own cached keys.
//
//   q   [n, kv_heads, rep, d]   the rep query heads that share each KV head
//   k,v [rows, kv_heads, cap, d] the KV cache; batch row i is cache row i
//   lengths [n]                 row i attends to its positions 0..lengths[i]-1
//   k_new, v_new [n, kv_heads, d] (optional) the new token's key and value, first written
//                               to position lengths[i]-1 of row i (one op, not two
//                               index_put calls a layer)
//   out [n, kv_heads, rep, d]
//
// Each (row, KV head) pair is computed alone, over that row's positions only, with sums in
// a fixed order (fp32, 16 lanes then a fixed tree): a row's answer has the same bits in any
// batch, at any window, on any thread. One parallel region per call, where torch's plain
// product/softmax/product takes five, each of which wakes the other thread (measured: that
// wake-up, not the arithmetic, is most of decode attention's time at batch 8).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"

namespace {

using hatrack_bf16::store;
using hatrack_bf16::widen;

constexpr int LANES = 16;

// sum of x[0..d) * widen(y[0..d)), 16 lanes then a fixed tree: vectorised and the same
// order every time.
template <typename T>
inline float dot(const float* __restrict x, const T* __restrict y, int64_t d) {
  float lane[LANES] = {};
  int64_t c = 0;
  for (; c + LANES <= d; c += LANES)
    for (int l = 0; l < LANES; ++l) lane[l] += x[c + l] * widen(y[c + l]);
  for (int64_t r = 0; c < d; ++c, ++r) lane[r] += x[c] * widen(y[c]);
  for (int w = LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

// exp(x) for x <= 0: 2^(x log2 e) as 2^k * 2^f with k = round, |f| <= 1/2, and a degree-6
// Taylor polynomial of 2^f (relative error ~1e-7). Plain arithmetic, so a loop of it
// vectorises; exact zero below the float range.
inline float exp_nonpositive(float x) {
  const float z = std::max(x, -126.0f) * 1.44269504088896341f;
  const float k = std::floor(z + 0.5f);
  const float f = (z - k) * 0.69314718055994531f;  // 2^(z-k) = e^f
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

template <typename T>
void attend(const T* q, T* k, T* v, T* out, const int64_t* lengths, int64_t n, int64_t kv, int64_t rep, int64_t d,
            const int64_t ks[3], const int64_t vs[3], float scale, int64_t min_work, const T* k_new,
            const T* v_new) {
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) longest = std::max(longest, lengths[i]);
  // at least min_work query-key products per thread: below it, waking another thread costs
  // more than it saves
  const int64_t grain = std::max<int64_t>(1, min_work / std::max<int64_t>(1, longest * rep * d));
  at::parallel_for(0, n * kv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(rep * d), s(rep * longest), acc(rep * d), total(rep);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i = p / kv, h = p % kv, len = lengths[i];
      T* kp = k + i * ks[0] + h * ks[1];
      T* vp = v + i * vs[0] + h * vs[1];
      if (k_new != nullptr) {  // this pair's new position, before it is read
        std::memcpy(kp + (len - 1) * ks[2], k_new + p * d, d * sizeof(T));
        std::memcpy(vp + (len - 1) * vs[2], v_new + p * d, d * sizeof(T));
      }
      const T* qp = q + p * rep * d;
      for (int64_t c = 0; c < rep * d; ++c) qf[c] = widen(qp[c]);
      for (int64_t t = 0; t < len; ++t)
        for (int64_t r = 0; r < rep; ++r) s[r * len + t] = dot(qf.data() + r * d, kp + t * ks[2], d) * scale;
      for (int64_t r = 0; r < rep; ++r) {
        float* sr = s.data() + r * len;
        float top = -INFINITY;
        for (int64_t t = 0; t < len; ++t) top = std::max(top, sr[t]);
        for (int64_t t = 0; t < len; ++t) sr[t] = exp_nonpositive(sr[t] - top);
        float sum = 0.0f;
        for (int64_t t = 0; t < len; ++t) sum += sr[t];
        total[r] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const T* vt = vp + t * vs[2];
        for (int64_t r = 0; r < rep; ++r) {
          const float w = s[r * len + t];
          float* a = acc.data() + r * d;
          for (int64_t c = 0; c < d; ++c) a[c] += w * widen(vt[c]);
        }
      }
      T* o = out + p * rep * d;
      for (int64_t r = 0; r < rep; ++r) {
        const float inv = 1.0f / total[r];
        for (int64_t c = 0; c < d; ++c) store(o + r * d + c, acc[r * d + c] * inv);
      }
    }
  });
}

}  // namespace

void attend_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                   at::Tensor& out, double scale, int64_t min_work, const c10::optional<at::Tensor>& k_new,
                   const c10::optional<at::Tensor>& v_new) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "q must be a contiguous [n, kv_heads, rep, d]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == q.scalar_type(),
              "out must be like q");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.stride(3) == 1 && v.stride(3) == 1,
              "k and v must be [rows, kv_heads, cap, d] with contiguous head vectors");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v: one dtype");
  const int64_t n = q.size(0), kv = q.size(1), rep = q.size(2), d = q.size(3);
  TORCH_CHECK(k.size(0) >= n && k.size(1) == kv && k.size(3) == d, "k and v must hold the batch's rows and heads");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous() && lengths.numel() == n,
              "lengths must be int64 [n]");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(len[i] >= 1 && len[i] <= k.size(2), "a row's length is outside its cache");
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "k_new and v_new come together");
  if (k_new.has_value()) {
    for (const at::Tensor* t : {&*k_new, &*v_new})
      TORCH_CHECK(t->dim() == 3 && t->is_contiguous() && t->size(0) == n && t->size(1) == kv && t->size(2) == d &&
                      t->scalar_type() == q.scalar_type(),
                  "k_new and v_new must be contiguous [n, kv_heads, d] in q's dtype");
  }
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    using B = uint16_t;
    attend<B>(reinterpret_cast<const B*>(q.data_ptr()), reinterpret_cast<B*>(k.data_ptr()),
              reinterpret_cast<B*>(v.data_ptr()), reinterpret_cast<B*>(out.data_ptr()), len, n, kv, rep, d, ks, vs,
              sc, min_work, k_new ? reinterpret_cast<const B*>(k_new->data_ptr()) : nullptr,
              v_new ? reinterpret_cast<const B*>(v_new->data_ptr()) : nullptr);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "decode attention takes float32 or bfloat16");
    attend<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(), len, n, kv,
                  rep, d, ks, vs, sc, min_work, k_new ? k_new->data_ptr<float>() : nullptr,
                  v_new ? v_new->data_ptr<float>() : nullptr);
  }
}
