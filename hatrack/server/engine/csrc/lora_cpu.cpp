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
#include <type_traits>
#include <vector>

#include "bf16.h"

namespace {

using hatrack_bf16::narrow_bf16;
using hatrack_bf16::widen;

inline void add_to(float* y, int64_t o, float v) { y[o] += v; }
inline void add_to(uint16_t* y, int64_t o, float v) { y[o] = narrow_bf16(widen(y[o]) + v); }

// 16 lanes of fp32 as one value: GCC keeps these in vector registers (two ymm halves on
// AVX2, one zmm on AVX-512) where a float[16] array can live on the stack.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 load16(const uint16_t* p) {  // bf16 widened exactly, as widen() does
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 u = __builtin_convertvector(h, u32x16) << 16;
  f32x16 f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// y[0..16) += v, in y's dtype: bf16 rounded as narrow_bf16() does (nearest even, NaN as
// 0x7fc0), 16 lanes at a time rather than one by one
inline void add16(float* y, f32x16 v) {
  const f32x16 sum = load16(y) + v;
  std::memcpy(y, &sum, sizeof sum);
}
inline void add16(uint16_t* y, f32x16 v) {
  const f32x16 sum = load16(y) + v;
  u32x16 u;
  std::memcpy(&u, &sum, sizeof u);
  const u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const u32x16 out = (u & 0x7fffffffu) > 0x7f800000u ? u32x16{} + 0x7fc0u : rounded;
  const u16x16 h = __builtin_convertvector(out, u16x16);
  std::memcpy(y, &h, sizeof h);
}

// Independent sums in flight per tile: a sum's adds wait on each other (4 cycles each), so
// one row alone keeps the arithmetic units idle; a tile runs several rows (and 16-column
// blocks) side by side. Each sum still adds its terms in the same order as alone, so a
// row's bits do not depend on which rows share its tile.
#ifdef __AVX512F__
constexpr int CHAINS = 8;
#else
constexpr int CHAINS = 4;  // 16 ymm registers
#endif
constexpr int MAX_TILE_ROWS = 8;
// the loops over a tile's rows and blocks unrolled, so its sums stay in registers
#define UNROLL _Pragma("GCC unroll 8")

// NB*16 consecutive weights as NB vectors. bf16 is widened two at a time: each 32-bit lane
// holds two, and one shift (or mask) widens the even (or odd) ones, half the work of
// widening 16 in order; a pair of vectors then holds columns 0,2,..,30 and 1,3,..,31 of
// its 32, and in_order() puts sums of them back in order. An odd last block is widened
// in order. fp32 weights are loaded as they lie.
template <int NB>
inline void load_blocks(const float* p, f32x16* w) {
  UNROLL for (int b = 0; b < NB; ++b) w[b] = load16(p + 16 * b);
}
template <int NB>
inline void load_blocks(const uint16_t* p, f32x16* w) {
  UNROLL for (int h = 0; h < NB / 2; ++h) {
    u32x16 u;
    std::memcpy(&u, p + 32 * h, sizeof u);
    const u32x16 even = u << 16, odd = u & 0xffff0000u;
    std::memcpy(&w[2 * h], &even, sizeof even);
    std::memcpy(&w[2 * h + 1], &odd, sizeof odd);
  }
  if constexpr (NB % 2 == 1) w[NB - 1] = load16(p + 32 * (NB / 2));
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

// sums of load_blocks' columns, in column order (a no-op for fp32 weights)
template <int NB, typename W>
inline void in_order(const f32x16* acc, f32x16* out) {
  if constexpr (std::is_same_v<W, uint16_t>) {
    const i32x16 lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const i32x16 hi = lo + 8;
    UNROLL for (int h = 0; h < NB / 2; ++h) {
      out[2 * h] = __builtin_shuffle(acc[2 * h], acc[2 * h + 1], lo);
      out[2 * h + 1] = __builtin_shuffle(acc[2 * h], acc[2 * h + 1], hi);
    }
    if constexpr (NB % 2 == 1) out[NB - 1] = acc[NB - 1];
  } else {
    UNROLL for (int b = 0; b < NB; ++b) out[b] = acc[b];
  }
}

// xa[r][kb..kb+16*NB) for the R rows of a tile: x[r] widened to fp32, a[r] its A. SHARED:
// every row has the same A, widened once per step of the sums.
template <int R, int NB, bool SHARED, typename W>
void shrink_tile(const float* const* x, int64_t in, const W* const* a, int64_t mr, int64_t kb, float* const* xa) {
  f32x16 acc[R][NB];
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int b = 0; b < NB; ++b) acc[r][b] = f32x16{};
  for (int64_t c = 0; c < in; ++c) {
    if constexpr (SHARED) {
      f32x16 w[NB];
      load_blocks<NB>(a[0] + c * mr + kb, w);
      UNROLL for (int r = 0; r < R; ++r) {
        const float xc = x[r][c];
        UNROLL for (int b = 0; b < NB; ++b) acc[r][b] += xc * w[b];
      }
    } else {
      UNROLL for (int r = 0; r < R; ++r) {
        const float xc = x[r][c];
        f32x16 w[NB];
        load_blocks<NB>(a[r] + c * mr + kb, w);
        UNROLL for (int b = 0; b < NB; ++b) acc[r][b] += xc * w[b];
      }
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    f32x16 out[NB];
    in_order<NB, W>(acc[r], out);
    std::memcpy(xa[r] + kb, out, sizeof out);
  }
}

template <int NB, bool SHARED, typename W>
void shrink_rows(int rows, const float* const* x, int64_t in, const W* const* a, int64_t mr, int64_t kb,
                 float* const* xa) {
  constexpr int R = CHAINS / NB > 0 ? CHAINS / NB : 1;
  for (int r0 = 0; r0 < rows; r0 += R) {
    const int n = std::min(R, rows - r0);
    switch (n) {  // the tail of the tile: fewer rows, the same sums
#define HATRACK_SHRINK_CASE(K) \
  case K:                      \
    if constexpr (K <= R) shrink_tile<K, NB, SHARED, W>(x + r0, in, a + r0, mr, kb, xa + r0); \
    break;
      HATRACK_SHRINK_CASE(1) HATRACK_SHRINK_CASE(2) HATRACK_SHRINK_CASE(3) HATRACK_SHRINK_CASE(4)
      HATRACK_SHRINK_CASE(5) HATRACK_SHRINK_CASE(6) HATRACK_SHRINK_CASE(7) HATRACK_SHRINK_CASE(8)
#undef HATRACK_SHRINK_CASE
    }
  }
}

// xa[r][0..mr) = x[r][0..in) @ a[r][in, mr] for the tile's rows: columns in blocks of up
// to 64 held in registers across the whole reduction, the last fewer than 16 one by one.
template <bool SHARED, typename W>
void shrink(int rows, const float* const* x, int64_t in, const W* const* a, int64_t mr, float* const* xa) {
  int64_t kb = 0;
  for (; kb + 64 <= mr; kb += 64) shrink_rows<4, SHARED, W>(rows, x, in, a, mr, kb, xa);
  const int64_t left = (mr - kb) / 16;
  if (left == 3) shrink_rows<3, SHARED, W>(rows, x, in, a, mr, kb, xa);
  if (left == 2) shrink_rows<2, SHARED, W>(rows, x, in, a, mr, kb, xa);
  if (left == 1) shrink_rows<1, SHARED, W>(rows, x, in, a, mr, kb, xa);
  kb += 16 * left;
  for (int r = 0; r < rows; ++r)
    for (int64_t k = kb; k < mr; ++k) {
      float acc = 0.0f;
      for (int64_t c = 0; c < in; ++c) acc += x[r][c] * widen(a[r][c * mr + k]);
      xa[r][k] = acc;
    }
}

// y[r][0..od) += v[r][0..rank) @ b[r][rank, od] for the tile's rows, 64 outputs at a time
// held in registers; ranks whose v is 0 (padding, or a module the adapter lacks) are
// skipped, per row. SHARED: every row has the same b, loaded once per rank.
template <int R, bool SHARED, typename W, typename X>
void expand_tile(const float* const* v, int64_t rank, const W* const* b, int64_t od, X* const* y) {
  int64_t ob = 0;
  for (; ob + 64 <= od; ob += 64) {
    f32x16 acc[R][4];
    UNROLL for (int r = 0; r < R; ++r)
      UNROLL for (int q = 0; q < 4; ++q) acc[r][q] = f32x16{};
    for (int64_t k = 0; k < rank; ++k) {
      f32x16 w[4];
      if constexpr (SHARED) load_blocks<4>(b[0] + k * od + ob, w);
      UNROLL for (int r = 0; r < R; ++r) {
        const float vk = v[r][k];
        if (vk == 0.0f) continue;
        if constexpr (!SHARED) load_blocks<4>(b[r] + k * od + ob, w);
        UNROLL for (int q = 0; q < 4; ++q) acc[r][q] += vk * w[q];
      }
    }
    UNROLL for (int r = 0; r < R; ++r) {
      f32x16 out[4];
      in_order<4, W>(acc[r], out);
      UNROLL for (int q = 0; q < 4; ++q) add16(y[r] + ob + 16 * q, out[q]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r)
    for (int64_t o = ob; o < od; ++o) {
      float acc = 0.0f;
      for (int64_t k = 0; k < rank; ++k) acc += v[r][k] * widen(b[r][k * od + o]);
      add_to(y[r], o, acc);
    }
}

template <bool SHARED, typename W, typename X>
void expand(int rows, const float* const* v, int64_t rank, const W* const* b, int64_t od, X* const* y) {
  // a row's tile is 4 blocks of 16 outputs; rows that share b share its loads too
  constexpr int R = CHAINS < 8 ? 1 : SHARED ? 4 : 2;
  int r0 = 0;
  for (; r0 + R <= rows; r0 += R) expand_tile<R, SHARED, W, X>(v + r0, rank, b + r0, od, y + r0);
  for (; r0 < rows; ++r0) expand_tile<1, SHARED, W, X>(v + r0, rank, b + r0, od, y + r0);
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

  // each thread takes whole tiles: a run of rows sharing a slot (weights read once for all),
  // else up to MAX_TILE_ROWS rows on their own adapters
  at::parallel_for(0, static_cast<int64_t>(order.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(MAX_TILE_ROWS * in), xa(MAX_TILE_ROWS * mr);
    const float* xp[MAX_TILE_ROWS];
    float* xap[MAX_TILE_ROWS];
    const W* ap[MAX_TILE_ROWS];
    const float* vp[MAX_TILE_ROWS];
    const W* bp[MAX_TILE_ROWS];
    X* yp[MAX_TILE_ROWS];
    for (int r = 0; r < MAX_TILE_ROWS; ++r) {
      xp[r] = xf.data() + r * in;
      xap[r] = xa.data() + r * mr;
    }
    for (int64_t t = begin; t < end;) {
      int64_t same = 1;
      while (t + same < end && same < MAX_TILE_ROWS && slot[order[t + same]] == slot[order[t]]) ++same;
      const bool shared = same > 1;
      int count = static_cast<int>(same);
      if (!shared)  // rows on their own adapters, up to where a run that shares one begins
        while (count < MAX_TILE_ROWS && t + count < end &&
               !(t + count + 1 < end && slot[order[t + count + 1]] == slot[order[t + count]]))
          ++count;
      for (int r = 0; r < count; ++r) {
        const int64_t i = order[t + r];
        const X* xi = x + i * x_stride;
        for (int64_t c = 0; c < in; ++c) xf[r * in + c] = widen(xi[c]);
        ap[r] = A + slot[i] * in * mr;
      }
      if (shared) shrink<true, W>(count, xp, in, ap, mr, xap);
      else shrink<false, W>(count, xp, in, ap, mr, xap);
      for (int64_t j = 0; j < m; ++j) {
        int live = 0;  // rows whose rank-j part is not all zero
        for (int r = 0; r < count; ++r) {
          const float* v = xap[r] + j * rank;
          bool any = false;
          for (int64_t k = 0; k < rank; ++k) any = any || v[k] != 0.0f;
          if (!any) continue;
          const int64_t i = order[t + r];
          vp[live] = v;
          bp[live] = B[j] + slot[i] * rank * out_dim[j];
          yp[live] = y[j] + i * y_stride[j];
          ++live;
        }
        if (shared) expand<true, W, X>(live, vp, rank, bp, out_dim[j], yp);
        else expand<false, W, X>(live, vp, rank, bp, out_dim[j], yp);
      }
      t += count;
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

// linear_cpu.cpp
bool dot_available();
at::Tensor dot_pack(const at::Tensor& w);
at::Tensor dot_linear(const at::Tensor& x, const at::Tensor& packed, int64_t block);

// The module holds the CPU kernels (one build, one load).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dot_available", &dot_available, "whether bf16 projections (dot_linear) run on this build");
  m.def("dot_pack", &dot_pack, "a bf16 [out, in] weight packed in pairs for dot_linear");
  m.def("dot_linear", &dot_linear, "bf16 rows times a dot_pack weight", py::arg("x"), py::arg("packed"),
        py::arg("block"));
  m.def("lora_decode", &lora_decode, "LoRA term of a decode step, per-row adapters");
  m.def("attend_decode", &attend_decode, "decode attention, each row over its own positions", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("lengths"), py::arg("out"), py::arg("scale"), py::arg("min_work"),
        py::arg("k_new") = py::none(), py::arg("v_new") = py::none());
}
