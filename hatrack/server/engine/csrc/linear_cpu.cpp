// bf16 projections y = x @ W^T on CPUs with AVX-512 BF16, for the decoder's products.
//
// Why: a decode step's projections run a few rows against every weight, so they are bound
// by reading the weights; oneDNN's packed kernels read them at about half the machine's
// memory speed at 1..16 rows (bench/RESULTS.md). Here a weight is packed once in pairs,
// Wp[n/16][k/2][16] (the 16 outputs' weights for inputs 2k and 2k+1 side by side), and each
// output is one fp32 lane that VDPBF16PS adds two products to per step: every weight is
// read once per tile of up to 8 rows.
//
// Bits: each output sums its input pairs in order, in blocks of `block` pairs (0: one
// block), each block summed from zero and added to the running total, then rounded to bf16
// once. That is how oneDNN's bf16 kernels sum on an AMD EPYC with AVX-512 BF16 (blocks of
// 512 inputs for 576 inputs, 1024 for 1536), so with the block the Python side probes for,
// the products have F.linear's bits. A row's sums never depend on the other rows, so any
// batch gives a row the same bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t LANES = 16;
constexpr int MAX_ROWS = 8;  // rows of a tile: 8 rows x 2 blocks of 16 outputs = 16 accumulators
constexpr int BLOCKS = 2;    // 16-output blocks of a column chunk (the unit of work of a thread)

#ifdef __AVX512BF16__

// y[r][nb*16 ..) for R rows and NB blocks of 16 outputs, over all input pairs
template <int R, int NB>
void tile(const uint16_t* x, int64_t x_stride, int64_t pairs, const uint32_t* wp, int64_t nb0, int64_t block,
          uint16_t* y, int64_t y_stride) {
  __m512 total[R][NB];
  const int64_t step = block > 0 ? block : pairs;
  for (int64_t k0 = 0; k0 < pairs; k0 += step) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
    const int64_t k1 = std::min(pairs, k0 + step);
    for (int64_t k = k0; k < k1; ++k) {
      __m512i w[NB];
      for (int b = 0; b < NB; ++b) w[b] = _mm512_loadu_si512(wp + ((nb0 + b) * pairs + k) * LANES);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + r * x_stride + 2 * k, sizeof pair);
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xb, (__m512bh)w[b]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) total[r][b] = k0 == 0 ? acc[r][b] : _mm512_add_ps(total[r][b], acc[r][b]);
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) {
      const __m256bh h = _mm512_cvtneps_pbh(total[r][b]);  // round to nearest even, as torch does
      std::memcpy(y + r * y_stride + (nb0 + b) * LANES, &h, sizeof h);
    }
}

template <int NB>
void rows_of_chunk(int64_t m, const uint16_t* x, int64_t x_stride, int64_t pairs, const uint32_t* wp, int64_t nb0,
                   int64_t block, uint16_t* y, int64_t y_stride) {
  for (int64_t r0 = 0; r0 < m; r0 += MAX_ROWS) {
    const uint16_t* xr = x + r0 * x_stride;
    uint16_t* yr = y + r0 * y_stride;
    switch (std::min<int64_t>(MAX_ROWS, m - r0)) {  // the last tile: fewer rows, the same sums
#define HATRACK_TILE_CASE(R) \
  case R:                    \
    tile<R, NB>(xr, x_stride, pairs, wp, nb0, block, yr, y_stride); \
    break;
      HATRACK_TILE_CASE(1) HATRACK_TILE_CASE(2) HATRACK_TILE_CASE(3) HATRACK_TILE_CASE(4)
      HATRACK_TILE_CASE(5) HATRACK_TILE_CASE(6) HATRACK_TILE_CASE(7) HATRACK_TILE_CASE(8)
#undef HATRACK_TILE_CASE
    }
  }
}

#endif  // __AVX512BF16__

}  // namespace

bool dot_available() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

// w [out, in] bf16 (out a multiple of 16, in even) -> the same bytes in pairs, as a bf16
// tensor of w's shape (so code that reads a projection's shape and dtype still works)
at::Tensor dot_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "w must be bf16 [out, in]");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(n % LANES == 0 && k % 2 == 0, "w needs a multiple of 16 outputs and an even number of inputs");
  const at::Tensor src = w.contiguous();
  at::Tensor out = at::empty({n, k}, w.options());
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src.data_ptr());
  uint32_t* d = reinterpret_cast<uint32_t*>(out.data_ptr());
  const int64_t pairs = k / 2;
  for (int64_t nb = 0; nb < n / LANES; ++nb)
    for (int64_t p = 0; p < pairs; ++p)
      for (int64_t l = 0; l < LANES; ++l) {
        const uint16_t* row = s + (nb * LANES + l) * k + 2 * p;
        d[(nb * pairs + p) * LANES + l] = uint32_t(row[0]) | (uint32_t(row[1]) << 16);
      }
  return out;
}

// x [m, in] bf16 with contiguous rows; packed from dot_pack; block: input pairs summed per
// block (0: all at once). Returns [m, out] bf16.
at::Tensor dot_linear(const at::Tensor& x, const at::Tensor& packed, int64_t block) {
  TORCH_CHECK(dot_available(), "this build has no AVX-512 BF16 product");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16, "x must be bf16 [m, in] rows");
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 &&
                  packed.size(1) == x.size(1),
              "packed must be dot_pack's [out, in] for x's inputs");
  TORCH_CHECK(block >= 0, "block must be >= 0");
  const int64_t m = x.size(0), n = packed.size(0), pairs = x.size(1) / 2;
  at::Tensor y = at::empty({m, n}, x.options());
#ifdef __AVX512BF16__
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t x_stride = x.stride(0), nbs = n / LANES;
  const int64_t chunks = (nbs + BLOCKS - 1) / BLOCKS;
  if (m > 0)
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t nb0 = c * BLOCKS;
        if (nb0 + BLOCKS <= nbs) rows_of_chunk<BLOCKS>(m, xp, x_stride, pairs, wp, nb0, block, yp, n);
        else rows_of_chunk<1>(m, xp, x_stride, pairs, wp, nb0, block, yp, n);
      }
    });
#endif
  return y;
}
