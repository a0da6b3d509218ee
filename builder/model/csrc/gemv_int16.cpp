// int4, and int8 with 5-8 rows, as 16-bit integer dot products (AVX2).
#include "glm_cpu.h"

#include <cmath>
#include <limits>

namespace glm_cpu {
namespace {

// -- int4 and int8 decode as 16-bit integer dot products (AVX2) ---------------------------------------
// Without AVX-512 the float GEMV widens each nibble to float32 (a sign-extension and a conversion per 8)
// before its FMAs: ~14 vector operations per 32 codes, so on a host whose cores are slow beside their
// memory int4 reads its codes no faster than int8 does; and with several rows of x, int8 is bound by
// its FMAs (8 products each). Here x is held as 16-bit integers and vpmaddwd multiplies 16 codes by 16
// inputs and sums pairs into int32 lanes: a code needs one or two shifts (int4: of its sign-extended
// byte; int8: of a 16-bit lane holding two codes), ~9 operations per 64 codes and row of x on top.
// x, bfloat16, becomes integers exactly: each step of 64 inputs shares the power of two of its largest
// (xi = x * 2^(141 - E), E its largest biased exponent), so an input within 2^7 of the step's largest
// keeps all 8 significant bits in 15; a smaller one is rounded to 2^-15 of the largest (a term below
// bfloat16's resolution of the step's largest term). A step's sum of 64 products is exact in int32 and
// goes into the float32 accumulator times the step's power of two: int4's (|sum| < 2^24) exactly, int8's
// (< 2^25) rounded at most once, by 2^-24 of it, as one float32 accumulation would.
// An infinite or NaN input makes its step's power of two a NaN, and so the output.
struct IntProblem {
  const int16_t* xs;    // [K / 64][M][64]: per 32 inputs (int4: bytes 0-15, then 16-31) the even, then odd ones
  const float* xscale;  // [K / 64][M]: each step's power of two
  const int8_t* w;      // [N, K] int8 codes, or [N, K / 2] THUDM int4 codes
  const float* scale;   // [N]
  at::BFloat16* y;      // [M, N]
  int64_t M, N, K, row_bytes;
};

#define GLM_AVX2_FN __attribute__((target("avx2,fma")))

template <int BITS, int M, int R>
GLM_AVX2_FN void int16_rows(const IntProblem& p, int64_t n, int64_t m0) {
  constexpr int64_t bytes = BITS == 4 ? 32 : 64;  // codes of a step of 64 inputs
  const int8_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n + r) * p.row_bytes;
  const int64_t ahead = R * p.row_bytes, xstride = p.M * 64;
  const int16_t* xs = p.xs + m0 * 64;
  const float* xsc = p.xscale + m0;
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t byte = 0; byte < p.row_bytes; byte += bytes, xs += xstride, xsc += p.M) {
    if ((byte & 63) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + ahead + byte), _MM_HINT_T0);
    __m256i c[R][4];  // inputs 0-31: the even ones, the odd ones; then inputs 32-63
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h) {
        if constexpr (BITS == 4) {  // 16 bytes, a byte per lane: the high nibble is the even input
          const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + byte + 16 * h)));
          c[r][2 * h] = _mm256_srai_epi16(b, 4);
          c[r][2 * h + 1] = _mm256_srai_epi16(_mm256_slli_epi16(b, 12), 12);
        } else {  // 32 bytes, two codes per lane: the low byte is the even input
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + byte + 32 * h));
          c[r][2 * h] = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8);
          c[r][2 * h + 1] = _mm256_srai_epi16(b, 8);
        }
      }
    for (int m = 0; m < M; ++m) {
      const __m256i* xv = reinterpret_cast<const __m256i*>(xs + m * 64);
      const __m256i x0 = _mm256_loadu_si256(xv), x1 = _mm256_loadu_si256(xv + 1),
                    x2 = _mm256_loadu_si256(xv + 2), x3 = _mm256_loadu_si256(xv + 3);
      const __m256 sc = _mm256_broadcast_ss(xsc + m);
      for (int r = 0; r < R; ++r) {
        __m256i s = _mm256_add_epi32(_mm256_madd_epi16(c[r][0], x0), _mm256_madd_epi16(c[r][1], x1));
        s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_madd_epi16(c[r][2], x2), _mm256_madd_epi16(c[r][3], x3)));
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) p.y[(m0 + m) * p.N + n + r] = c10::BFloat16(Avx2::sum(acc[r][m]) * p.scale[n + r]);
}

constexpr int int16_tile_rows(int m) { return m == 1 ? 4 : m <= 3 ? 2 : 1; }

// float32 lanes (bits) times up, rounded to the nearest integer (even on a tie)
GLM_AVX2 __m256i ints(__m256i lane, __m256 up) { return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(lane), up)); }

// 64 bfloat16 inputs -> 64 integers in int16_rows's order, and their power of two
GLM_AVX2_FN void int16_step(const uint16_t* in, int16_t* dst, float* scale) {
  const __m256i* v = reinterpret_cast<const __m256i*>(in);
  const __m256i exponent = _mm256_set1_epi16(0x7F80);
  __m256i top = _mm256_max_epu16(_mm256_max_epu16(_mm256_and_si256(_mm256_loadu_si256(v), exponent),
                                                  _mm256_and_si256(_mm256_loadu_si256(v + 1), exponent)),
                                 _mm256_max_epu16(_mm256_and_si256(_mm256_loadu_si256(v + 2), exponent),
                                                  _mm256_and_si256(_mm256_loadu_si256(v + 3), exponent)));
  __m128i t = _mm_max_epu16(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  t = _mm_sub_epi16(_mm_set1_epi16(-1), t);  // the largest as the smallest of 0xFFFF - e
  const int largest = 0xFFFF - (_mm_cvtsi128_si32(_mm_minpos_epu16(t)) & 0xFFFF);
  const int E = std::max(1, largest >> 7);  // 0: zeros and subnormals, whose exponent is 1
  if (E == 255) {  // an infinity or a NaN
    std::memset(dst, 0, 64 * sizeof(int16_t));
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  *scale = std::ldexp(1.0f, E - 141);
  if (E < 14) {  // 2^(141 - E) is past float32's range: inputs below 2^-113, one at a time
    const double up = std::ldexp(1.0, 141 - E);
    for (int j = 0; j < 64; ++j) {  // input j: the (j % 32) / 2-th even or odd one of its 32
      const int at = (j / 32) * 32 + (j % 2) * 16 + (j % 32) / 2;
      uint32_t bits = static_cast<uint32_t>(in[j]) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof f);
      dst[at] = static_cast<int16_t>(std::nearbyint(f * up));
    }
    return;
  }
  // a pair of bfloat16s is one 32-bit lane: the even input its low half, the odd one its high half
  const __m256 up = _mm256_set1_ps(std::ldexp(1.0f, 141 - E));  // exact: a power of two
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int h = 0; h < 2; ++h) {  // 32 inputs: 16 evens, then 16 odds
    const __m256i a = _mm256_loadu_si256(v + 2 * h), b = _mm256_loadu_si256(v + 2 * h + 1);
    // packs interleaves 128-bit halves: the permutation puts them back in order (|ints| <= 32640)
    const __m256i even = _mm256_permute4x64_epi64(
        _mm256_packs_epi32(ints(_mm256_slli_epi32(a, 16), up), ints(_mm256_slli_epi32(b, 16), up)), 0xD8);
    const __m256i odd = _mm256_permute4x64_epi64(
        _mm256_packs_epi32(ints(_mm256_and_si256(a, high), up), ints(_mm256_and_si256(b, high), up)), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * h), even);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * h + 16), odd);
  }
}

}  // namespace

// whether int16_mm takes this call: per-row scales, K a multiple of 64; int4 always, int8 from 5 rows
// of x. Below that int8 reads its codes at about the memory's speed in float32 too, and the integer
// form's per-step conversion costs more than it saves (2 Zen 4 cores, 27392x4096 at 1 / 4 / 8 rows:
// 4.1 / 6.7 / 11.5 ms against the float32 form's 3.9 / 6.3 / 18.6).
bool int16_fits(int64_t bits, int64_t G, int64_t K, int64_t M) {
  return (bits == 4 || (bits == 8 && M > 4)) && G == 1 && K % 64 == 0;
}

void int16_mm(int64_t bits, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), steps = K / 64;
  std::vector<int16_t> xs(M * K);
  std::vector<float> xscale(M * steps);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t s = 0; s < steps; ++s)
      int16_step(src + m * K + s * 64, xs.data() + (s * M + m) * 64, xscale.data() + s * M + m);
  IntProblem p{xs.data(), xscale.data(), static_cast<const int8_t*>(codes.data_ptr()), scale.data_ptr<float>(),
               y.data_ptr<at::BFloat16>(), M, codes.size(0), K, codes.size(1)};
  by_row_groups(M, [&](auto m, int64_t m0) {
    constexpr int M = decltype(m)::value, R = int16_tile_rows(M);
    if (bits == 4) over_tiles(p, m0, R, &int16_rows<4, M, R>, &int16_rows<4, M, 1>);
    else over_tiles(p, m0, R, &int16_rows<8, M, R>, &int16_rows<8, M, 1>);
  });
}

}  // namespace glm_cpu
