// The GEMV as bfloat16 dot products (AVX512-BF16).
#include "glm_cpu.h"

namespace glm_cpu {
namespace {

// -- decode as bfloat16 dot products (AVX512-BF16: Zen 4, Sapphire Rapids and later) -----------------
// The float GEMV above widens every code to float32 before its FMAs: ~7 vector operations per 32 int4
// codes, and per row of x one FMA per 16 codes. On a host whose cores are slow beside their memory
// (2 Zen 4 cores, 35 GB/s) that, not the memory, bounds int4 (6.3 ms per 6B layer, 16 GB/s of codes)
// and int8 with several rows of x. Here each 32 bytes of codes become exact bfloat16s in registers,
// and vdpbf16ps multiplies them with x's bfloat16 inputs, 32 per instruction, summing pairs into
// float32 lanes (2 Zen 4 cores, codes from DRAM, 27392x4096 at 1 / 8 rows: int4 2.3 / 5.3 ms against
// 2.6 / 13.9 in float32, int8 5.0 / 8.3 against 5.5 / 12.1):
// - int4 (THUDM's, per-row scales, K a multiple of 64): 64 codes, the high nibbles (even inputs) and
//   the low ones (odd) in two registers, by one zero-extension, one shift and two lookups in
//   kNibbleBf16; x is laid out once per call as [K / 64][M][32 evens, 32 odds];
// - int8 (K a multiple of 32): 32 codes by int8_bf16; x as [K / 32][M][32];
// - bfloat16 (bf16_mm: the output layer, the fp16 variant; K a multiple of 32): 32 weights as they are
//   (65024x4096 at 1 / 8 rows: 17.4 / 25.4 ms, float32 form 19.0 / 36.9, oneDNN 29.2 / 30.5).
struct DotProblem {
  const uint16_t* xs;  // x's bfloat16s, laid out as above: [K / step][M][step]
  const int8_t* w;     // [N, row_bytes] codes (or bfloat16s)
  const float* scale;  // [N] (bfloat16 weights: none)
  at::BFloat16* y;     // [M, N]
  int64_t M, N, K, row_bytes;
};

// R output rows [n, n + R) for M rows of x from m0; the next R rows are prefetched as these are read
template <int BITS, int M, int R>
GLM_AVX512_BF16 void dot_rows(const DotProblem& p, int64_t n, int64_t m0) {
  constexpr int64_t step = BITS == 4 ? 64 : 32;   // inputs per pass of the loop
  constexpr int64_t bytes = BITS == 16 ? 64 : 32;  // bytes of each weight row per pass
  const __m512i table = _mm512_load_si512(kNibbleBf16);
  const int8_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n + r) * p.row_bytes;
  const int64_t ahead = R * p.row_bytes, xstride = p.M * step;
  const uint16_t* xs = p.xs + m0 * step;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t byte = 0; byte < p.row_bytes; byte += bytes, xs += xstride) {
    if ((byte & 63) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + ahead + byte), _MM_HINT_T0);
    __m512i c[R][BITS == 4 ? 2 : 1];  // int4: even inputs, odd inputs
    for (int r = 0; r < R; ++r) {
      if constexpr (BITS == 4) {
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + byte)));
        c[r][0] = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
        c[r][1] = _mm512_permutexvar_epi16(b, table);
      } else if constexpr (BITS == 8) {
        c[r][0] = int8_bf16(w[r] + byte);
      } else {
        c[r][0] = _mm512_loadu_si512(w[r] + byte);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int h = 0; h < (BITS == 4 ? 2 : 1); ++h) {
        const __m512i xv = _mm512_loadu_si512(xs + m * step + 32 * h);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)c[r][h], (__m512bh)xv);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      p.y[(m0 + m) * p.N + n + r] =
          c10::BFloat16(_mm512_reduce_add_ps(acc[r][m]) * (BITS == 16 ? 1.0f : p.scale[n + r]));
}

// rows per tile: independent accumulators to hide vdpbf16ps's latency, within 32 registers
constexpr int dot_tile_rows(int m) { return m == 1 ? 8 : m <= 4 ? 4 : 2; }

}  // namespace


// whether dot_mm takes this weight (bits, per-row scale, K), on the CPU and isa of use_dot
bool dot_fits(int64_t bits, int64_t G, int64_t K) { return G == 1 && K % (bits == 4 ? 64 : 32) == 0; }

void dot_mm(int64_t bits, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), step = bits == 4 ? 64 : 32, steps = K / step;
  std::vector<uint16_t> xs(M * K);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* dst = xs.data() + (s * M + m) * step;
      const uint16_t* row = src + m * K + s * step;
      if (bits == 4)
        for (int j = 0; j < 32; ++j) dst[j] = row[2 * j], dst[32 + j] = row[2 * j + 1];
      else
        std::memcpy(dst, row, step * sizeof(uint16_t));
    }
  DotProblem p{xs.data(), static_cast<const int8_t*>(codes.data_ptr()),
               bits == 16 ? nullptr : scale.data_ptr<float>(), y.data_ptr<at::BFloat16>(), M, codes.size(0), K,
               codes.size(1) * codes.element_size()};
  by_row_groups(M, [&](auto m, int64_t m0) {
    constexpr int M = decltype(m)::value, R = dot_tile_rows(M);
    if (bits == 4) over_tiles(p, m0, R, &dot_rows<4, M, R>, &dot_rows<4, M, 1>);
    else if (bits == 8) over_tiles(p, m0, R, &dot_rows<8, M, R>, &dot_rows<8, M, 1>);
    else over_tiles(p, m0, R, &dot_rows<16, M, R>, &dot_rows<16, M, 1>);
  });
}

}  // namespace glm_cpu
