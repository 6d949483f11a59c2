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
//
// Head sizes that are a multiple of 16 (up to 256, up to 8 query heads a KV head) take a
// path written in 16-lane vectors (GCC/clang vector extensions: AVX-512 or two AVX2
// halves): the key and value rows are widened once for all the query heads that share
// them, the accumulators stay vectors, and exp runs 16 lanes at a time. Other sizes take
// the plain loops. Measured on an AMD EPYC with AVX-512 BF16 (2 cores, bf16, 3 KV heads x 3
// query heads, d = 64, ms a call): 8 rows of 70 positions 0.056 -> 0.024, 32 rows of 70
// 0.256 -> 0.088, 32 rows of 300 1.04 -> 0.37.
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

typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
constexpr int MAX_CHUNKS = 16;  // d <= 256
constexpr int MAX_REP = 8;

inline v16 load16(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline v16 load16(const uint16_t* p) {  // bf16 -> fp32, exact
  v16h h;
  std::memcpy(&h, p, sizeof h);
  const v16u u = __builtin_convertvector(h, v16u) << 16;
  v16 r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

// lanes rotated by w: a + rotate(a, w) for w = 8, 4, 2, 1 leaves the sum in lane 0, in a
// fixed tree
inline v16 rotate(v16 a, int w) {
#if defined(__clang__)
  switch (w) {
    case 8: return __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    case 4: return __builtin_shufflevector(a, a, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3);
    case 2: return __builtin_shufflevector(a, a, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1);
    default: return __builtin_shufflevector(a, a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0);
  }
#else
  const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return __builtin_shuffle(a, (lane + w) & 15);
#endif
}

inline float hsum(v16 a) {
  a += rotate(a, 8);
  a += rotate(a, 4);
  a += rotate(a, 2);
  a += rotate(a, 1);
  return a[0];
}

// exp_nonpositive on 16 lanes, by the same steps (floor by truncation, then one down
// where that rounded up)
inline v16 exp_nonpositive16(v16 x) {
  const v16 low = v16{} - 126.0f;
  const v16 z = (x > low ? x : low) * 1.44269504088896341f;
  const v16 half_up = z + 0.5f;
  v16 k = __builtin_convertvector(__builtin_convertvector(half_up, v16i), v16);
  k = k > half_up ? k - 1.0f : k;
  const v16 f = (z - k) * 0.69314718055994531f;
  v16 p = v16{} + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const v16i bits = (__builtin_convertvector(k, v16i) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? v16{} : p * scale;
}

// One (row, KV head) pair in vectors: d = 16 * chunks, rep <= MAX_REP. s holds rep * len
// scores; the output rows go to o [rep, d].
template <typename T>
void attend_pair_vec(const T* qp, const T* kp, const T* vp, int64_t kstride, int64_t vstride, int64_t len,
                     int64_t rep, int64_t chunks, float scale, float* s, T* o) {
  v16 qv[MAX_REP * MAX_CHUNKS], acc[MAX_REP * MAX_CHUNKS], row[MAX_CHUNKS];
  for (int64_t j = 0; j < rep * chunks; ++j) qv[j] = load16(qp + 16 * j);
  for (int64_t t = 0; t < len; ++t) {
    const T* kt = kp + t * kstride;
    for (int64_t j = 0; j < chunks; ++j) row[j] = load16(kt + 16 * j);
    for (int64_t r = 0; r < rep; ++r) {
      v16 a = qv[r * chunks] * row[0];
      for (int64_t j = 1; j < chunks; ++j) a += qv[r * chunks + j] * row[j];
      s[r * len + t] = hsum(a) * scale;
    }
  }
  for (int64_t r = 0; r < rep; ++r) {
    float* sr = s + r * len;
    float top = -INFINITY;
    for (int64_t t = 0; t < len; ++t) top = std::max(top, sr[t]);
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) {
      v16 x;
      std::memcpy(&x, sr + t, sizeof x);
      x = exp_nonpositive16(x - top);
      std::memcpy(sr + t, &x, sizeof x);
    }
    for (; t < len; ++t) sr[t] = exp_nonpositive(sr[t] - top);
  }
  for (int64_t j = 0; j < rep * chunks; ++j) acc[j] = v16{};
  for (int64_t t = 0; t < len; ++t) {
    const T* vt = vp + t * vstride;
    for (int64_t j = 0; j < chunks; ++j) row[j] = load16(vt + 16 * j);
    for (int64_t r = 0; r < rep; ++r) {
      const float w = s[r * len + t];
      for (int64_t j = 0; j < chunks; ++j) acc[r * chunks + j] += w * row[j];
    }
  }
  for (int64_t r = 0; r < rep; ++r) {
    const float* sr = s + r * len;
    float sum = 0.0f;
    for (int64_t t = 0; t < len; ++t) sum += sr[t];
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < chunks; ++j)
      for (int l = 0; l < 16; ++l) store(o + r * chunks * 16 + 16 * j + l, acc[r * chunks + j][l] * inv);
  }
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
  const bool vectors = d % 16 == 0 && d / 16 <= MAX_CHUNKS && rep <= MAX_REP;
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
      if (vectors) {
        attend_pair_vec(qp, kp, vp, ks[2], vs[2], len, rep, d / 16, scale, s.data(), out + p * rep * d);
        continue;
      }
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
