// The LoRA term of one decode step on CPU, for rows that each use their own adapter.
//
// Every row reads its adapter straight from the slot bank (no per-row copies):
//   xa = x[i] @ A[slot[i]]            A: [slots+1, in, m*rank]  (m modules side by side)
//   y_j[i] += xa[j*rank:(j+1)*rank] @ B_j[slot[i]]              B_j: [slots+1, rank, out_j]
// Weights may be bf16 (half the bytes of fp32: decode is bound by reading them) and are
// widened to fp32 for the arithmetic. Rows are visited grouped by slot, so rows that share
// an adapter find its weights in cache. Each row's sums run in a fixed order that does not
// depend on the other rows or on the thread that computes it: a row's answer is the same
// in any batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"

namespace {

using hatrack_bf16::narrow_bf16;
using hatrack_bf16::widen;

inline void add_to(float* y, int64_t o, float v) { y[o] += v; }
inline void add_to(uint16_t* y, int64_t o, float v) { y[o] = narrow_bf16(widen(y[o]) + v); }

// acc[0..B) += xc * w[0..B): B is a compile-time width, so acc stays in vector registers.
template <int B, typename W>
inline void axpy_block(float* __restrict acc, float xc, const W* __restrict w) {
  for (int k = 0; k < B; ++k) acc[k] += xc * widen(w[k]);
}

// xa[0..mr) = x[0..in) @ a[in, mr], 64 (then 16) columns at a time held in registers
// across the whole reduction; a remainder of fewer than 16 columns goes one by one.
template <typename W>
void shrink(const float* __restrict x, int64_t in, const W* __restrict a, int64_t mr, float* __restrict xa) {
  int64_t kb = 0;
  for (; kb + 64 <= mr; kb += 64) {
    float acc[64] = {};
    for (int64_t c = 0; c < in; ++c) axpy_block<64>(acc, x[c], a + c * mr + kb);
    std::memcpy(xa + kb, acc, sizeof acc);
  }
  for (; kb + 16 <= mr; kb += 16) {
    float acc[16] = {};
    for (int64_t c = 0; c < in; ++c) axpy_block<16>(acc, x[c], a + c * mr + kb);
    std::memcpy(xa + kb, acc, sizeof acc);
  }
  for (; kb < mr; ++kb) {
    float acc = 0.0f;
    for (int64_t c = 0; c < in; ++c) acc += x[c] * widen(a[c * mr + kb]);
    xa[kb] = acc;
  }
}

// y[0..od) += v[0..rank) @ b[rank, od], 64 outputs at a time held in registers; ranks
// whose v is 0 (padding, or a module the adapter lacks) are skipped.
template <typename W, typename X>
void expand(const float* __restrict v, int64_t rank, const W* __restrict b, int64_t od, X* __restrict y) {
  int64_t ob = 0;
  for (; ob + 64 <= od; ob += 64) {
    float acc[64] = {};
    for (int64_t k = 0; k < rank; ++k)
      if (v[k] != 0.0f) axpy_block<64>(acc, v[k], b + k * od + ob);
    for (int o = 0; o < 64; ++o) add_to(y, ob + o, acc[o]);
  }
  for (; ob < od; ++ob) {
    float acc = 0.0f;
    for (int64_t k = 0; k < rank; ++k) acc += v[k] * widen(b[k * od + ob]);
    add_to(y, ob, acc);
  }
}

template <typename W, typename X>
void run(const X* x, int64_t x_stride, int64_t in, const int64_t* slot, int64_t n, const W* A, int64_t mr,
         const std::vector<const W*>& B, const std::vector<int64_t>& out_dim, const std::vector<X*>& y,
         const std::vector<int64_t>& y_stride, int64_t rank) {
  std::vector<int64_t> order;
  order.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (slot[i] > 0) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return slot[a] < slot[b]; });
  const int64_t m = static_cast<int64_t>(B.size());

  at::parallel_for(0, static_cast<int64_t>(order.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in), xa(mr);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = order[t], s = slot[i];
      const X* xi = x + i * x_stride;
      for (int64_t c = 0; c < in; ++c) xf[c] = widen(xi[c]);
      shrink(xf.data(), in, A + s * in * mr, mr, xa.data());
      for (int64_t j = 0; j < m; ++j) {
        const float* v = xa.data() + j * rank;
        bool any = false;
        for (int64_t k = 0; k < rank; ++k) any = any || v[k] != 0.0f;
        if (any) expand(v, rank, B[j] + s * rank * out_dim[j], out_dim[j], y[j] + i * y_stride[j]);
      }
    }
  });
}

template <typename T>
const T* cptr(const torch::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

template <typename W, typename X>
void dispatch(const torch::Tensor& x, const torch::Tensor& slots, const torch::Tensor& A,
              const std::vector<torch::Tensor>& Bs, const std::vector<torch::Tensor>& ys, int64_t rank) {
  std::vector<const W*> b;
  std::vector<X*> y;
  std::vector<int64_t> out_dim, y_stride;
  for (size_t j = 0; j < Bs.size(); ++j) {
    b.push_back(cptr<W>(Bs[j]));
    out_dim.push_back(Bs[j].size(2));
    y.push_back(mptr<X>(ys[j]));
    y_stride.push_back(ys[j].stride(0));
  }
  run<W, X>(cptr<X>(x), x.stride(0), x.size(1), slots.data_ptr<int64_t>(), slots.size(0), cptr<W>(A), A.size(2), b,
            out_dim, y, y_stride, rank);
}

}  // namespace

// x [n, in]; slots [n] int64 (0 = no adapter); A [slots+1, in, m*rank]; Bs[j] [slots+1, rank, out_j];
// ys[j] [n, out_j], updated in place. Weights fp32 or bf16; x and ys fp32 or bf16 (the same).
void lora_decode(torch::Tensor x, torch::Tensor slots, torch::Tensor A, std::vector<torch::Tensor> Bs,
                 std::vector<torch::Tensor> ys, int64_t rank) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [n, in] with contiguous rows");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.size(0) == x.size(0),
              "slots must be int64 [n]");
  TORCH_CHECK(A.dim() == 3 && A.is_contiguous() && A.size(1) == x.size(1), "A must be [slots+1, in, m*rank]");
  TORCH_CHECK(!Bs.empty() && Bs.size() == ys.size() && A.size(2) == rank * static_cast<int64_t>(Bs.size()),
              "one B and one output per module");
  for (size_t j = 0; j < Bs.size(); ++j) {
    TORCH_CHECK(Bs[j].dim() == 3 && Bs[j].is_contiguous() && Bs[j].scalar_type() == A.scalar_type() &&
                    Bs[j].size(0) == A.size(0) && Bs[j].size(1) == rank,
                "B must be [slots+1, rank, out] like A");
    TORCH_CHECK(ys[j].dim() == 2 && ys[j].stride(1) == 1 && ys[j].size(0) == x.size(0) &&
                    ys[j].size(1) == Bs[j].size(2) && ys[j].scalar_type() == x.scalar_type(),
                "outputs must be [n, out] rows in x's dtype");
  }
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.size(0); ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < A.size(0), "slot out of range");
  const bool wb = A.scalar_type() == torch::kBFloat16, xb = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((wb || A.scalar_type() == torch::kFloat32) && (xb || x.scalar_type() == torch::kFloat32),
              "weights and activations must be float32 or bfloat16");
  if (wb && xb) dispatch<uint16_t, uint16_t>(x, slots, A, Bs, ys, rank);
  else if (wb) dispatch<uint16_t, float>(x, slots, A, Bs, ys, rank);
  else if (xb) dispatch<float, uint16_t>(x, slots, A, Bs, ys, rank);
  else dispatch<float, float>(x, slots, A, Bs, ys, rank);
}

// attention_cpu.cpp
void attend_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                   at::Tensor& out, double scale, int64_t min_work, const c10::optional<at::Tensor>& k_new,
                   const c10::optional<at::Tensor>& v_new);

// The module holds both decode kernels (one build, one load).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_decode", &lora_decode, "LoRA term of a decode step, per-row adapters");
  m.def("attend_decode", &attend_decode, "decode attention, each row over its own positions", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("lengths"), py::arg("out"), py::arg("scale"), py::arg("min_work"),
        py::arg("k_new") = py::none(), py::arg("v_new") = py::none());
}
