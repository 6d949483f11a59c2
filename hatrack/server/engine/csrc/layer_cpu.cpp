// A decoder layer's RMSNorm on CPU, one call where torch runs six ops (each a dispatch, and
// for a prompt's rows a parallel region):
//
//   rms_norm(x, w, eps)          Hugging Face's RMSNorm: fp32 x * rsqrt(mean(x^2) + eps),
//                                rounded to x's dtype, times w (rounded again)
//   add_rms_norm(x, a, w, eps)   (x + a rounded to x's dtype, rms_norm of that): the
//                                residual add before a norm
//
// x, a: contiguous [n, d] rows, float32 or bfloat16, w [d] in the same dtype. Each
// row is computed alone, its sum of squares in a fixed order (16 lanes, then a fixed tree),
// so a row has the same bits in any company and on any thread. Every step but that sum is
// the same rounding as torch's ops; the sum's order is this kernel's own, so a norm can
// differ from torch's in the last bit of a few elements. Measured on an AMD EPYC with
// AVX-512 BF16 (2 cores, bf16, d = 576, us a call): 8 rows 23.8 -> 3.5, 32 rows 32.2 -> 8.1,
// 306 rows 141 -> 44. (SiLU times up was tried here too, and lost to torch's two ops: the
// exp of <cmath> does not vectorise.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "bf16.h"

namespace {

using hatrack_bf16::store;
using hatrack_bf16::widen;

constexpr int LANES = 16;
constexpr int64_t MIN_ELEMENTS = 32768;  // per thread: below it a wake-up of the other thread costs more

template <typename T>
T rounded(float v) {
  T out;
  store(&out, v);
  return out;
}

// rows [begin, end) of x (+ a, kept in sum) normalised into out
template <typename T>
void norm_rows(const T* x, const T* a, const T* w, T* sum, T* out, int64_t d, float eps, int64_t begin,
               int64_t end) {
  std::vector<float> row(d);
  for (int64_t i = begin; i < end; ++i) {
    const T* xi = x + i * d;
    if (a != nullptr) {  // the residual add, rounded as torch's add rounds it
      const T* ai = a + i * d;
      T* si = sum + i * d;
      for (int64_t c = 0; c < d; ++c) {
        si[c] = rounded<T>(widen(xi[c]) + widen(ai[c]));
        row[c] = widen(si[c]);
      }
    } else {
      for (int64_t c = 0; c < d; ++c) row[c] = widen(xi[c]);
    }
    // lane l sums positions l, l + 16, ... in order, then a fixed tree: the same order for
    // every row, in vectors
    float lane[LANES] = {};
    int64_t c = 0;
    for (; c + LANES <= d; c += LANES)
      for (int l = 0; l < LANES; ++l) lane[l] += row[c + l] * row[c + l];
    for (int l = 0; c < d; ++c, ++l) lane[l] += row[c] * row[c];
    for (int span = LANES / 2; span > 0; span /= 2)
      for (int l = 0; l < span; ++l) lane[l] += lane[l + span];
    const float inv = 1.0f / std::sqrt(lane[0] / static_cast<float>(d) + eps);
    T* oi = out + i * d;
    for (int64_t k = 0; k < d; ++k) store(oi + k, widen(w[k]) * widen(rounded<T>(row[k] * inv)));
  }
}

template <typename T>
void norm_all(const T* x, const T* a, const T* w, T* sum, T* out, int64_t n, int64_t d, float eps) {
  const int64_t grain = std::max<int64_t>(1, MIN_ELEMENTS / std::max<int64_t>(1, d));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { norm_rows(x, a, w, sum, out, d, eps, begin, end); });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be contiguous [n, d] rows");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

void check_weight(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type(),
              "the norm's weight must be a contiguous [d] in x's dtype");
}

at::Tensor norm_into(const at::Tensor& x, const at::Tensor* a, const at::Tensor& w, double eps, at::Tensor* sum) {
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.size(0), d = x.size(1);
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kBFloat16) {
    using B = uint16_t;
    norm_all<B>(reinterpret_cast<const B*>(x.data_ptr()), a ? reinterpret_cast<const B*>(a->data_ptr()) : nullptr,
                reinterpret_cast<const B*>(w.data_ptr()), sum ? reinterpret_cast<B*>(sum->data_ptr()) : nullptr,
                reinterpret_cast<B*>(out.data_ptr()), n, d, e);
  } else {
    norm_all<float>(x.data_ptr<float>(), a ? a->data_ptr<float>() : nullptr, w.data_ptr<float>(),
                    sum ? sum->data_ptr<float>() : nullptr, out.data_ptr<float>(), n, d, e);
  }
  return out;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "x");
  check_weight(x, w);
  return norm_into(x, nullptr, w, eps, nullptr);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& a, const at::Tensor& w,
                                                double eps) {
  check_rows(x, "x");
  check_weight(x, w);
  TORCH_CHECK(a.sizes() == x.sizes() && a.is_contiguous() && a.scalar_type() == x.scalar_type(),
              "the residual must be like x");
  at::Tensor sum = at::empty_like(x);
  at::Tensor out = norm_into(x, &a, w, eps, &sum);
  return {sum, out};
}
