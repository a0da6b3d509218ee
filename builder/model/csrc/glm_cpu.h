// Shared by glm-build's CPU kernels (one library, glm_cpu, registered in glm_cpu_kernels.cpp):
//   gemv.cpp           the float32 GEMV (every x86-64 host with AVX2+FMA) and the op that picks a form
//   gemv_bf16_dot.cpp  the GEMV as bfloat16 dot products (AVX512-BF16)
//   gemv_int16.cpp     int4, and int8 with 5-8 rows, as 16-bit integer dot products (AVX2)
//   dense.cpp          many rows: codes converted to bfloat16 in cache, then AMX tiles or a matmul
//   isa.cpp            what this CPU has, and which form an isa code names
//
// Weight-only int8/int4 GEMV for a few rows (a decode step), reading THUDM's codes as they are:
//   y[m, n] = bf16( sum_k x[m, k] * q[n, k] * scale[n, k / group] ),  accumulated in float32.
// int8: codes [N, K] int8. int4: [N, K/2] bytes, element 2j in the HIGH nibble, two's complement.
// The same GEMV reads a bfloat16 weight [N, K] (bf16_mm, no scale): the output layer every CPU variant
// keeps in 16 bits, and the fp16 variant's projections, where oneDNN's one-row matmul reads at about two
// thirds of the memory's speed.
//
// A decode step reads every weight once and does a few flops per byte, so the kernel must stream the
// codes at memory speed: each code is widened to float32 in registers (int8 codes and int4 nibbles are
// exact in float32) and multiplied with up to 8 rows of x at once, several output rows in flight to
// hide the FMA latency. Built without -march flags: each ISA's functions carry their own target
// attribute and one is picked at run time from cpuid (GCC's __builtin_cpu_supports), so one build runs
// on any x86-64 host with AVX2+FMA, and uses AVX-512 where the CPU has it. Where that widening, not the
// memory, is the bound, the codes are multiplied without it: as bfloat16 dot products (dot_mm, with
// AVX512-BF16), or, without them, int4 and int8 with 5-8 rows of x as 16-bit integer dot products
// (int16_mm, AVX2).
//
// Many rows (dense_mm, dense.cpp): a block of codes converted to bfloat16 in each thread's cache and
// multiplied there, by the AMX tile unit where the CPU has it, else by oneDNN's matmul. Built with
// -fopenmp: without it at::parallel_for (an inline OpenMP loop in ATen's headers) runs on one thread.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace glm_cpu {

constexpr int kMaxRows = 8;  // x rows per pass over the weight; more rows take several passes

// -- one ISA's vector operations ------------------------------------------------------------------
#define GLM_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline
#define GLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), always_inline)) inline

struct Avx2 {
  static constexpr int L = 8;  // float lanes; also bytes of codes per int8 step
  using V = __m256;
  GLM_AVX2 static V zero() { return _mm256_setzero_ps(); }
  GLM_AVX2 static V load(const float* p) { return _mm256_loadu_ps(p); }
  GLM_AVX2 static V set1(float v) { return _mm256_set1_ps(v); }
  GLM_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  GLM_AVX2 static __m256i widen(const int8_t* p) {  // L bytes -> L sign-extended int32
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  GLM_AVX2 static V int8(const int8_t* p) { return _mm256_cvtepi32_ps(widen(p)); }
  GLM_AVX2 static V bf16(const int8_t* p) {  // L bfloat16s -> float32: each in a lane's upper half
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  // L bytes -> (high nibbles, low nibbles), each signed: elements 2j and 2j+1 of 2L
  GLM_AVX2 static void int4(const int8_t* p, V& high, V& low) {
    __m256i b = widen(p);
    high = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
    low = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
  }
  // 64 bytes of int4 codes -> 64 high nibbles, then 64 low ones, each a signed byte 16 times the
  // nibble (elements 2j and 2j+1): two byte-wide ands and a shift, where widening each nibble on its
  // own took three shifts in the float lanes (the ports the conversions and FMAs need)
  GLM_AVX2 static void int4_line(const int8_t* p, int8_t* sep) {
    const __m256i mask = _mm256_set1_epi8(static_cast<char>(0xF0));
    for (int h = 0; h < 2; ++h) {
      __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sep + 32 * h), _mm256_and_si256(b, mask));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sep + 64 + 32 * h),
                          _mm256_and_si256(_mm256_slli_epi16(b, 4), mask));
    }
  }
  GLM_AVX2 static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

struct Avx512 {
  static constexpr int L = 16;
  using V = __m512;
  GLM_AVX512 static V zero() { return _mm512_setzero_ps(); }
  GLM_AVX512 static V load(const float* p) { return _mm512_loadu_ps(p); }
  GLM_AVX512 static V set1(float v) { return _mm512_set1_ps(v); }
  GLM_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  GLM_AVX512 static __m512i widen(const int8_t* p) {
    return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  GLM_AVX512 static V int8(const int8_t* p) { return _mm512_cvtepi32_ps(widen(p)); }
  GLM_AVX512 static V bf16(const int8_t* p) {
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  GLM_AVX512 static void int4(const int8_t* p, V& high, V& low) {
    __m512i b = widen(p);
    high = _mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4));
    low = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
  }
  GLM_AVX512 static void int4_line(const int8_t* p, int8_t* sep) {
    const __m512i mask = _mm512_set1_epi8(static_cast<char>(0xF0));
    __m512i b = _mm512_loadu_si512(p);
    _mm512_storeu_si512(sep, _mm512_and_si512(b, mask));
    _mm512_storeu_si512(sep + 64, _mm512_and_si512(_mm512_slli_epi16(b, 4), mask));
  }
  GLM_AVX512 static float sum(V v) { return _mm512_reduce_add_ps(v); }
};

inline int8_t nibble(const int8_t* row, int64_t k) {  // element k of a THUDM int4 row
  int8_t b = row[k >> 1];
  return (k & 1) ? static_cast<int8_t>(static_cast<int8_t>(b << 4) >> 4) : static_cast<int8_t>(b >> 4);
}

// Every tile of R output rows on the threads (contiguous runs of tiles per thread; a small problem
// stays on one), then the rows past the last whole tile one at a time. P: a problem with N and
// row_bytes; tile and one: (p, first output row, first x row).
template <typename P>
void over_tiles(const P& p, int64_t m0, int R, void (*tile)(const P&, int64_t, int64_t),
                void (*one)(const P&, int64_t, int64_t)) {
  const int64_t tiles = p.N / R;
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(p.row_bytes * R, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile(p, t * R, m0);
  });
  for (int64_t n = tiles * R; n < p.N; ++n) one(p, n, m0);
}

// pass(std::integral_constant<int, m>(), m0) for each group of up to kMaxRows rows of x from m0,
// m its row count: the kernels are compiled per row count
template <typename F>
void by_row_groups(int64_t M, F&& pass) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    switch (std::min<int64_t>(M - m0, kMaxRows)) {
      case 1: pass(std::integral_constant<int, 1>(), m0); break;
      case 2: pass(std::integral_constant<int, 2>(), m0); break;
      case 3: pass(std::integral_constant<int, 3>(), m0); break;
      case 4: pass(std::integral_constant<int, 4>(), m0); break;
      case 5: pass(std::integral_constant<int, 5>(), m0); break;
      case 6: pass(std::integral_constant<int, 6>(), m0); break;
      case 7: pass(std::integral_constant<int, 7>(), m0); break;
      default: pass(std::integral_constant<int, 8>(), m0); break;
    }
  }
}

// -- which ISA (isa.cpp) ------------------------------------------------------------------------------
bool has_avx2();
bool has_avx512();
bool has_avx512bf16();
bool amx_ready();  // the tile unit with bfloat16, and Linux has granted this process its state
// isa: 0 = the best this CPU has, 2 = AVX2 (float FMAs), 3 = AVX2 with int4, and int8 from 5 rows, as
// 16-bit integer dot products (int16_mm below; the best there where the CPU lacks AVX512-BF16),
// 5 = AVX-512 (float FMAs), 6 = AVX-512 with AVX512-BF16's dot products (dot_mm below; the best where
// the CPU has it)
bool use_avx512(int64_t isa);  // checks isa and that the CPU has what it names
bool use_dot(int64_t isa);     // the GEMVs as bfloat16 dot products (dot_mm)
bool use_int16(int64_t isa);   // int4, and int8 with 5-8 rows, as 16-bit integer dot products (int16_mm)
std::string isa_name(int64_t isa);

// -- codes as bfloat16, with AVX512-BF16 (gemv_bf16_dot.cpp's GEMV, dense.cpp's conversions) ----------
#define GLM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

// bfloat16 of the nibbles 0..7, -8..-1, twice: vpermw reads an index's low 5 bits, so dot_rows's
// lookup of a whole byte needs no mask
alignas(64) inline constexpr uint16_t kNibbleBf16[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80};

// 32 int8 codes -> 32 bfloat16s (exact: small integers), in order
GLM_AVX512_BF16 inline __m512i int8_bf16(const int8_t* src) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(Avx512::int8(src + 16), Avx512::int8(src)));
}

// 32 codes (int8: 32 bytes; int4: 16 bytes) -> 32 bfloat16s at dst; table: kNibbleBf16, loaded by the
// caller once (the stores to dst would keep the compiler from hoisting the load)
template <int BITS>
GLM_AVX512_BF16 inline void bf16x32(const int8_t* src, uint16_t* dst, __m512i table) {
  if constexpr (BITS == 8) {
    _mm512_storeu_si512(dst, int8_bf16(src));
  } else {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    // lane j: element 2j (the high nibble) in its low word, 2j+1 (the low nibble) in its high word
    const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4),
                                        _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(15)), 16));
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(idx, table));
  }
}

// -- the forms of the GEMV, and many rows: y = x @ (codes * scale)^T, y [M, N] bfloat16 -----------------
bool dot_fits(int64_t bits, int64_t G, int64_t K);  // whether dot_mm takes this weight
void dot_mm(int64_t bits, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, at::Tensor& y);
bool int16_fits(int64_t bits, int64_t G, int64_t K, int64_t M);  // whether int16_mm takes this call
void int16_mm(int64_t bits, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, at::Tensor& y);

// the ops (glm_cpu_kernels.cpp registers them)
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t isa);
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t isa);
at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& weight, int64_t isa);
at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t bits,
                    int64_t block, int64_t isa);
at::Tensor bf16_dense_mm(const at::Tensor& x, const at::Tensor& weight, int64_t isa);

}  // namespace glm_cpu
