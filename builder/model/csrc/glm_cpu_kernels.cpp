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
// Many rows (dense_mm, below): a block of codes converted to bfloat16 in each thread's cache and
// multiplied there, by the AMX tile unit where the CPU has it, else by oneDNN's matmul. Built with
// -fopenmp: without it at::parallel_for (an inline OpenMP loop in ATen's headers) runs on one thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

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

// -- the problem, as the kernels see it -----------------------------------------------------------
// x is re-laid out once per call so that a step's vectors of all M rows are adjacent: one sequential
// stream, whatever K is (rows K floats apart, K a power of two, fought over the same cache sets).
struct Problem {
  const float* xs;      // [K / step][M][step] float32; int4: each step's even inputs, then its odd
  const float* xt;      // [M][K - full]: the inputs past the last whole step, in order
  const int8_t* w;      // [N, row_bytes]
  const float* scale;   // [N, G] float32 (bfloat16 weights: none)
  at::BFloat16* y;      // [M, N]
  int64_t M, N, K, full, row_bytes, G, group;  // full: inputs in whole steps; group = K / G
};

inline int8_t nibble(const int8_t* row, int64_t k) {  // element k of a THUDM int4 row
  int8_t b = row[k >> 1];
  return (k & 1) ? static_cast<int8_t>(static_cast<int8_t>(b << 4) >> 4) : static_cast<int8_t>(b >> 4);
}

template <int BITS>
inline float weight_at(const int8_t* row, int64_t k) {  // element k of a row of codes, or of bfloat16s
  if (BITS == 8) return row[k];
  if (BITS == 4) return nibble(row, k);
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(row)[k]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// R output rows [n, n + R) for M (<= kMaxRows) rows of x, x rows [m0, m0 + M). The next R rows are
// prefetched a cache line at a time as these are read (a row of 2-4 KiB is a page or less, and the
// hardware prefetcher stops at page boundaries).
#define GLM_KERNEL(ISA_ATTR, I)                                                                      \
  template <int BITS, int M, int R>                                                                  \
  __attribute__((target(ISA_ATTR))) void rows_##I(const Problem& p, int64_t n, int64_t m0,         \
                                                  int64_t Mall) {                                    \
    using V = typename I::V;                                                                         \
    constexpr int L = I::L;                                                                          \
    constexpr int64_t step = BITS == 4 ? 2 * L : L; /* inputs per vector load of codes */            \
    constexpr int64_t bytes = BITS == 16 ? 2 * L : L; /* bytes of codes per step */                 \
    constexpr int64_t lines = 64 / bytes;           /* steps per 64 bytes of codes */                \
    const int64_t K = p.K, xstride = Mall * step;                                                    \
    const float* xs = p.xs + m0 * step;                                                              \
    const int8_t* w[R];                                                                              \
    for (int r = 0; r < R; ++r) w[r] = p.w + (n + r) * p.row_bytes;                                  \
    const int64_t ahead = R * p.row_bytes;                                                           \
    V acc[R][M], total[R][M];                                                                        \
    alignas(64) int8_t sep[R][128]; /* int4: the current line's nibbles, 16 x each */                \
    constexpr float unit = BITS == 4 ? 1.0f / 16 : 1.0f; /* undoes that 16 (exact) */                \
    for (int r = 0; r < R; ++r)                                                                      \
      for (int m = 0; m < M; ++m) acc[r][m] = I::zero(), total[r][m] = I::zero();                   \
    const int64_t steps_per_group = p.G == 1 ? p.full / step : p.group / step;                      \
    int64_t s = 0;                                                                                   \
    for (int64_t g = 0; g < p.G; ++g) {                                                              \
      for (const int64_t stop = s + steps_per_group; s < stop; ++s) {                                \
        const int64_t byte = s * bytes; /* codes' offset in the row */                               \
        if (s % lines == 0)                                                                          \
          for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + ahead + byte), _MM_HINT_T0); \
        const float* xv = xs + s * xstride;                                                          \
        if (BITS != 4) {                                                                             \
          V c[R];                                                                                    \
          for (int r = 0; r < R; ++r) c[r] = BITS == 8 ? I::int8(w[r] + byte) : I::bf16(w[r] + byte);\
          for (int m = 0; m < M; ++m) {                                                              \
            V xm = I::load(xv + m * step);                                                           \
            for (int r = 0; r < R; ++r) acc[r][m] = I::fma(c[r], xm, acc[r][m]);                     \
          }                                                                                          \
        } else { /* a line's nibbles separated once (16 x each), then widened a step at a time */     \
          const int64_t at = (s % lines) * L;                                                        \
          if (at == 0)                                                                               \
            for (int r = 0; r < R; ++r) {                                                            \
              if (byte + 64 <= p.row_bytes) {                                                        \
                I::int4_line(w[r] + byte, sep[r]);                                                   \
              } else { /* the row's last, partial line */                                            \
                alignas(64) int8_t line[64] = {};                                                    \
                std::memcpy(line, w[r] + byte, p.row_bytes - byte);                                  \
                I::int4_line(line, sep[r]);                                                          \
              }                                                                                      \
            }                                                                                        \
          V hi[R], lo[R];                                                                            \
          for (int r = 0; r < R; ++r)                                                                \
            hi[r] = I::int8(sep[r] + at), lo[r] = I::int8(sep[r] + 64 + at);                         \
          for (int m = 0; m < M; ++m) {                                                              \
            V xe = I::load(xv + m * step), xo = I::load(xv + m * step + L);                          \
            for (int r = 0; r < R; ++r) {                                                            \
              acc[r][m] = I::fma(hi[r], xe, acc[r][m]);                                              \
              acc[r][m] = I::fma(lo[r], xo, acc[r][m]);                                              \
            }                                                                                        \
          }                                                                                          \
        }                                                                                            \
      }                                                                                              \
      if (p.G > 1) { /* a group's sum times its scale */                                             \
        for (int r = 0; r < R; ++r) {                                                                \
          V sc = I::set1(p.scale[(n + r) * p.G + g] * unit);                                         \
          for (int m = 0; m < M; ++m) total[r][m] = I::fma(acc[r][m], sc, total[r][m]),              \
                                      acc[r][m] = I::zero();                                         \
        }                                                                                            \
      }                                                                                              \
    }                                                                                                \
    const int64_t tail = K - p.full;                                                                 \
    for (int r = 0; r < R; ++r) {                                                                    \
      for (int m = 0; m < M; ++m) {                                                                  \
        float sum;                                                                                   \
        if (p.G > 1) {                                                                               \
          sum = I::sum(total[r][m]);                                                                 \
        } else {                                                                                     \
          sum = I::sum(acc[r][m]) * unit;                                                            \
          const float* xt = p.xt + (m0 + m) * tail;                                                  \
          for (int64_t k = p.full; k < K; ++k) /* the inputs past the last whole step */            \
            sum += xt[k - p.full] * weight_at<BITS>(w[r], k);                                        \
          if (BITS != 16) sum *= p.scale[n + r];                                                     \
        }                                                                                            \
        p.y[(m0 + m) * p.N + n + r] = c10::BFloat16(sum);                                            \
      }                                                                                              \
    }                                                                                                \
  }

GLM_KERNEL("avx2,fma", Avx2)
GLM_KERNEL("avx512f,avx512bw,avx512vl,avx2,fma", Avx512)

// Output rows per tile, by x rows: enough independent accumulators to hide the FMA latency and to
// reuse each x vector, few enough to stay in registers (16 with AVX2, 32 with AVX-512).
constexpr int tile_rows(bool avx512, int bits, int m) {
  if (avx512) return m <= 2 ? 4 : m <= 4 ? 3 : bits == 4 ? 2 : 3;
  return m == 1 ? 4 : m == 2 ? 3 : m <= 4 ? 2 : 1;
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

template <int BITS, int M, int R, bool AVX512>
void rows(const Problem& p, int64_t n, int64_t m0) {
  AVX512 ? rows_Avx512<BITS, M, R>(p, n, m0, p.M) : rows_Avx2<BITS, M, R>(p, n, m0, p.M);
}

template <int BITS, bool AVX512>
void run(const Problem& p) {
  by_row_groups(p.M, [&](auto m, int64_t m0) {
    constexpr int M = decltype(m)::value, R = tile_rows(AVX512, BITS, M);
    over_tiles(p, m0, R, &rows<BITS, M, R, AVX512>, &rows<BITS, M, 1, AVX512>);
  });
}

// -- which ISA --------------------------------------------------------------------------------------
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

bool has_avx512bf16();

// isa: 0 = the best this CPU has, 2 = AVX2 (float FMAs), 3 = AVX2 with int4, and int8 from 5 rows, as
// 16-bit integer dot products (int16_mm below; the best there where the CPU lacks AVX512-BF16),
// 5 = AVX-512 (float FMAs), 6 = AVX-512 with AVX512-BF16's dot products (dot_mm below; the best where
// the CPU has it)
bool use_avx512(int64_t isa) {
  TORCH_CHECK(isa == 0 || isa == 2 || isa == 3 || isa == 5 || isa == 6,
              "glm_cpu: isa must be 0 (best), 2 (AVX2), 3 (AVX2, int16 form), 5 (AVX-512) or 6 (AVX512-BF16), got ", isa);
  TORCH_CHECK(has_avx2(), "glm_cpu: this CPU lacks AVX2+FMA");
  TORCH_CHECK(isa < 5 || has_avx512(), "glm_cpu: this CPU lacks AVX-512 (F, BW, VL)");
  TORCH_CHECK(isa != 6 || has_avx512bf16(), "glm_cpu: this CPU lacks AVX512-BF16");
  return isa >= 5 || (isa == 0 && has_avx512());
}

bool use_dot(int64_t isa) { return isa == 6 || (isa == 0 && has_avx512bf16()); }

// int16_mm measured faster than the AVX-512 float form too, on a Zen 4 without its BF16 dot products
// (27392x4096 at 1 / 8 rows: 2.3 / 9.5 ms against 2.6 / 16.0)
bool use_int16(int64_t isa) { return isa == 3 || (isa == 0 && !has_avx512bf16()); }

// -- the ops ----------------------------------------------------------------------------------------
// x [M, K] bfloat16 -> xs [full / step][M][step] float32 (int4: each step's evens, then odds) and
// xt [M][K - full], the inputs past the last whole step
void activations(const at::Tensor& x, int bits, int64_t step, int64_t full, std::vector<float>& xs,
                 std::vector<float>& xt) {
  const int64_t M = x.size(0), K = x.size(1), half = step / 2;
  xs.resize(full * M), xt.resize((K - full) * M);
  const at::BFloat16* src = x.data_ptr<at::BFloat16>();
  for (int64_t m = 0; m < M; ++m) {
    const at::BFloat16* row = src + m * K;
    for (int64_t k = 0; k < full; k += step) {
      float* dst = xs.data() + k * M + m * step;
      if (bits != 4) {
        for (int64_t j = 0; j < step; ++j) dst[j] = row[k + j];
      } else {
        for (int64_t j = 0; j < half; ++j) dst[j] = row[k + 2 * j], dst[half + j] = row[k + 2 * j + 1];
      }
    }
    for (int64_t k = full; k < K; ++k) xt[m * (K - full) + k - full] = row[k];
  }
}

bool dot_fits(int64_t bits, int64_t G, int64_t K);
bool int16_fits(int64_t bits, int64_t G, int64_t K, int64_t M);
void int16_mm(int64_t bits, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, at::Tensor& y);
void dot_mm(int64_t bits, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, at::Tensor& y);

// bits: 8 or 4 (codes int8, scale [N] or [N, groups]), or 16 (a bfloat16 weight [N, K], no scale)
at::Tensor weight_only_mm(const at::Tensor& x, const at::Tensor& codes, const c10::optional<at::Tensor>& scale,
                          int64_t bits, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "glm_cpu: x must be a 2-D bfloat16 CPU tensor");
  const int64_t M = x.size(0), N = codes.size(0), K = x.size(1);
  if (bits == 16) {
    TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kBFloat16 && codes.is_contiguous() &&
                codes.device().is_cpu(), "glm_cpu: the weight must be a contiguous 2-D bfloat16 CPU tensor");
    TORCH_CHECK(codes.size(1) == K, "glm_cpu: weight ", codes.sizes(), " does not match ", K, " inputs");
  } else {
    TORCH_CHECK(bits == 8 || bits == 4, "glm_cpu: bits must be 8 or 4, got ", bits);
    TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
                "glm_cpu: codes must be a contiguous 2-D int8 tensor");
    TORCH_CHECK(codes.size(1) * (8 / bits) == K, "glm_cpu: codes ", codes.sizes(), " do not match ", K,
                " inputs at ", bits, " bits");
    TORCH_CHECK(scale.has_value() && scale->size(0) == N && (scale->dim() == 1 || scale->dim() == 2),
                "glm_cpu: scale must be [N] or [N, groups]");
  }
  const bool avx512 = use_avx512(isa);
  const int L = avx512 ? Avx512::L : Avx2::L;
  const int64_t step = bits == 4 ? 2 * L : L;
  const int64_t G = bits != 16 && scale->dim() == 2 ? scale->size(1) : 1;
  TORCH_CHECK(K % G == 0 && (G == 1 || (K / G) % step == 0), "glm_cpu: groups of ", K / G,
              " inputs are not whole steps of ", step);
  at::Tensor xc = x.contiguous();
  at::Tensor s = bits == 16 ? at::Tensor() : scale->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (use_dot(isa) && dot_fits(bits, G, K)) {
    dot_mm(bits, xc, codes, s, y);
    return y;
  }
  if (use_int16(isa) && int16_fits(bits, G, K, M)) {
    int16_mm(bits, xc, codes, s, y);
    return y;
  }
  const int64_t full = G == 1 ? K / step * step : K;
  std::vector<float> xs, xt;
  activations(xc, static_cast<int>(bits), step, full, xs, xt);
  Problem p{xs.data(), xt.data(), static_cast<const int8_t*>(codes.data_ptr()),
            bits == 16 ? nullptr : s.data_ptr<float>(), y.data_ptr<at::BFloat16>(),
            M, N, K, full, codes.size(1) * codes.element_size(), G, K / G};
  if (bits == 8) avx512 ? run<8, true>(p) : run<8, false>(p);
  else if (bits == 4) avx512 ? run<4, true>(p) : run<4, false>(p);
  else avx512 ? run<16, true>(p) : run<16, false>(p);
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t isa) {
  return weight_only_mm(x, codes, scale, 8, isa);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t isa) {
  return weight_only_mm(x, packed, scale, 4, isa);
}

at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& weight, int64_t isa) {
  return weight_only_mm(x, weight, c10::nullopt, 16, isa);
}

// -- many rows (a prefill, a large batch): dequantize in cache, then oneDNN's matmul ------------------
// A weight-only GEMV costs in proportion to the rows; a bfloat16 matmul (oneDNN: AMX or AVX-512-BF16
// where the CPU has them) costs about the same for 1 row as for 100. So each thread takes blocks of
// weight rows, converts a block to bfloat16 into its own buffer (sized to stay in its core's L2) and
// multiplies it there: the codes are read from memory once, at 1-2x fewer bytes than a bfloat16
// weight, and the bfloat16 copy never leaves the cache.
//
// Converting: int8 codes and int4 nibbles are exact in bfloat16 (a float32's upper half). With
// group scales (int4 only) each code is multiplied by its group's scale in float32 and rounded to
// nearest-even, as c10::BFloat16 does.

// bfloat16 bits of float32 lanes: exact ones are the upper half; scaled ones round to nearest-even
GLM_AVX512 __m512i bf16_round(__m512 f) {
  __m512i b = _mm512_castps_si512(f);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), odd), 16);
}
GLM_AVX2 __m256i bf16_round(__m256 f) {
  __m256i b = _mm256_castps_si256(f);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd), 16);
}

// inputs [k, K) of a row that the vector loops below leave: one at a time, rounded as c10 rounds
inline void row_tail_to_bf16(int bits, const int8_t* src, int64_t k, int64_t K, const float* scale,
                             int64_t group, uint16_t* dst) {
  for (; k < K; ++k) {
    float v = bits == 8 ? src[k] : nibble(src, k);
    if (scale) v *= scale[k / group];
    dst[k] = c10::BFloat16(v).x;
  }
}

// one weight row -> K bfloat16; scale: the row's group scales (G of them) or null
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
void row_to_bf16_avx512(int bits, const int8_t* src, int64_t K, const float* scale, int64_t G, uint16_t* dst) {
  const int64_t group = G ? K / G : K;
  int64_t k = 0;
  if (bits == 8) {
    for (; k + 16 <= K; k += 16) {
      __m512i b = _mm512_srli_epi32(_mm512_castps_si512(Avx512::int8(src + k)), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm512_cvtepi32_epi16(b));
    }
  } else if (group % 32 == 0) {  // 16 bytes: elements 2j (high nibbles) and 2j+1 (low), 32 of them
    for (; k + 32 <= K; k += 32) {
      __m512 hi, lo;
      Avx512::int4(src + k / 2, hi, lo);
      __m512i h, l;
      if (G) {
        __m512 f = _mm512_set1_ps(scale[k / group]);
        h = bf16_round(_mm512_mul_ps(hi, f)), l = bf16_round(_mm512_mul_ps(lo, f));
      } else {
        h = _mm512_srli_epi32(_mm512_castps_si512(hi), 16), l = _mm512_srli_epi32(_mm512_castps_si512(lo), 16);
      }
      _mm512_storeu_si512(dst + k, _mm512_or_si512(h, _mm512_slli_epi32(l, 16)));  // (2j, 2j+1) pairs
    }
  }
  row_tail_to_bf16(bits, src, k, K, scale, group, dst);
}

__attribute__((target("avx2,fma")))
void row_to_bf16_avx2(int bits, const int8_t* src, int64_t K, const float* scale, int64_t G, uint16_t* dst) {
  const int64_t group = G ? K / G : K;
  int64_t k = 0;
  if (bits == 8) {
    for (; k + 16 <= K; k += 16) {
      __m256i a = _mm256_srli_epi32(_mm256_castps_si256(Avx2::int8(src + k)), 16);
      __m256i b = _mm256_srli_epi32(_mm256_castps_si256(Avx2::int8(src + k + 8)), 16);
      __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);  // lanes back in order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), packed);
    }
  } else if (group % 16 == 0) {
    for (; k + 16 <= K; k += 16) {
      __m256 hi, lo;
      Avx2::int4(src + k / 2, hi, lo);
      __m256i h, l;
      if (G) {
        __m256 f = _mm256_set1_ps(scale[k / group]);
        h = bf16_round(_mm256_mul_ps(hi, f)), l = bf16_round(_mm256_mul_ps(lo, f));
      } else {
        h = _mm256_srli_epi32(_mm256_castps_si256(hi), 16), l = _mm256_srli_epi32(_mm256_castps_si256(lo), 16);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_or_si256(h, _mm256_slli_epi32(l, 16)));
    }
  }
  row_tail_to_bf16(bits, src, k, K, scale, group, dst);
}

// The same with AVX512-BF16 (Sapphire Rapids, Zen 4: every CPU with AMX has it), for int8 and
// per-row-scaled int4, ~2x fewer shuffle-port operations per code: int8 as two float vectors packed
// by one vcvtne2ps2bf16 (exact: the codes are small integers); int4 through a 16-entry table of the
// nibbles' bfloat16s (vpermw), both nibbles of a byte in one 32-bit lane.
bool has_avx512bf16() {
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return has_avx512() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
  }();
  return yes;
}

#define GLM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

// bfloat16 of the nibbles 0..7, -8..-1, twice: vpermw reads an index's low 5 bits, so dot_rows's
// lookup of a whole byte needs no mask
alignas(64) static const uint16_t kNibbleBf16[32] = {
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

GLM_AVX512_BF16 void row_to_bf16_avx512bf16(int bits, const int8_t* src, int64_t K, const float* scale, int64_t G,
                                            uint16_t* dst) {
  if (G) return row_to_bf16_avx512(bits, src, K, scale, G, dst);
  const __m512i table = _mm512_load_si512(kNibbleBf16);
  int64_t k = 0;
  if (bits == 8)
    for (; k + 32 <= K; k += 32) bf16x32<8>(src + k, dst + k, table);
  else
    for (; k + 32 <= K; k += 32) bf16x32<4>(src + k / 2, dst + k, table);
  row_tail_to_bf16(bits, src, k, K, nullptr, K, dst);
}

// one weight row -> bfloat16 with the best conversion this CPU has (avx512: the caller's ISA choice)
void row_to_bf16(bool avx512, int bits, const int8_t* src, int64_t K, const float* scale, int64_t G, uint16_t* dst) {
  if (avx512 && has_avx512bf16()) row_to_bf16_avx512bf16(bits, src, K, scale, G, dst);
  else if (avx512) row_to_bf16_avx512(bits, src, K, scale, G, dst);
  else row_to_bf16_avx2(bits, src, K, scale, G, dst);
}

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

// whether int16_mm takes this call: per-row scales, K a multiple of 64; int4 always, int8 from 5 rows
// of x. Below that int8 reads its codes at about the memory's speed in float32 too, and the integer
// form's per-step conversion costs more than it saves (2 Zen 4 cores, 27392x4096 at 1 / 4 / 8 rows:
// 4.1 / 6.7 / 11.5 ms against the float32 form's 3.9 / 6.3 / 18.6).
bool int16_fits(int64_t bits, int64_t G, int64_t K, int64_t M) {
  return (bits == 4 || (bits == 8 && M > 4)) && G == 1 && K % 64 == 0;
}

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

// -- AMX (Sapphire Rapids and later): the same conversion, multiplied by the tile unit -----------------
// Weight rows are the tiles' A side: 16 rows of codes become 16 rows of bfloat16 in a thread's buffer
// (L2), and each 32-input chunk of them is one A tile; x, laid out once per call as B tiles (pairs of
// inputs per column, "VNNI"), stays in cache. C tile g holds y^T for 16 weight rows and 16 rows of x,
// so up to 4 groups of 16 x rows (64) share one pass over a converted block. The unit multiplies at
// several hundred flops a cycle, so up to ~16 rows cost what one does: converting and reading the codes.
bool amx_ready() {
  static const bool ready = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
    // Linux hands out tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    return tile && bf16 && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ready;
}

// Up to this many rows of x go through the tile unit, and only while x's tiles (1 KiB per 32 inputs
// and 16 rows) fit in 2 MiB, an L2: each block of weight rows reads all of them. More rows (a long
// prefill) go through oneDNN below, which blocks large matmuls better. Measured on the 6B's
// projections (docs/benchmarks.md): 27392x4096 is faster here up to 98 rows and more; 4096x13696
// (1.7 MiB of x tiles at 64 rows) up to 64, and on oneDNN from ~80.
constexpr int64_t kAmxMaxRows = 128;
constexpr int64_t kAmxMaxXTiles = 2048;
bool amx_fits(int64_t M, int64_t K) { return M <= kAmxMaxRows && (K + 31) / 32 * ((M + 15) / 16) <= kAmxMaxXTiles; }

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

struct AmxProblem {
  const uint16_t* xb;   // [K32][groups][16 pairs of inputs][16 x rows][2] bfloat16 bits
  const int8_t* w;      // [N, row_bytes]: codes, or (bits 16) the bfloat16 weight itself
  const float* scale;   // per row [N] (applied to C) or groups [N, G] (applied in the conversion); bf16: null
  at::BFloat16* y;      // [M, N]
  int64_t M, N, K, K32, groups, row_bytes, G;
  int bits;
};

#define GLM_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx2,fma")))

// bfloat16s per converted weight row: whole chunks, plus one cache line so that the 16 rows of a tile
// do not all fall in one L1 set (a power-of-two row length would put them there)
inline int64_t amx_width(const AmxProblem& p) { return p.K32 * 32 + 32; }

// Tiles are not renamed: a load into a tile waits for the multiplies still reading it, and a multiply
// into C waits for the last one into C. So A (a chunk of weight rows) alternates between tiles 0 and
// 1 by chunk, B (a chunk of x rows) between 2 and 3, and with 1-2 groups of x rows each group has two
// C tiles (even and odd chunks, summed at the end): up to 4 groups (64 rows of x) per pass.
// GCC's tile intrinsics paste the tile number into the instruction's text, so it must be a literal:
// these switch on it (constant after inlining).
GLM_AMX inline void tile_load(int t, const void* base, int64_t stride) {
  switch (t) {
    case 0: _tile_loadd(0, base, stride); break;
    case 1: _tile_loadd(1, base, stride); break;
    case 2: _tile_loadd(2, base, stride); break;
    default: _tile_loadd(3, base, stride); break;
  }
}
#define GLM_DP(C, A, B) case C * 100 + A * 10 + B: _tile_dpbf16ps(C, A, B); break;
GLM_AMX inline void tile_dp(int c, int a, int b) {
  switch (c * 100 + a * 10 + b) {
    GLM_DP(4, 0, 2) GLM_DP(4, 0, 3) GLM_DP(4, 1, 2) GLM_DP(4, 1, 3)
    GLM_DP(5, 0, 2) GLM_DP(5, 0, 3) GLM_DP(5, 1, 2) GLM_DP(5, 1, 3)
    GLM_DP(6, 0, 2) GLM_DP(6, 0, 3) GLM_DP(6, 1, 2) GLM_DP(6, 1, 3)
    GLM_DP(7, 0, 2) GLM_DP(7, 0, 3) GLM_DP(7, 1, 2) GLM_DP(7, 1, 3)
  }
}
#undef GLM_DP

template <int NG>
constexpr int c_tile(int g, int q) { return NG <= 2 ? 4 + 2 * g + q : 4 + g; }

template <int NG, int Q, int G>
GLM_AMX inline void amx_group(const uint16_t* xc) {
  if constexpr (G < NG) {
    constexpr int b = 2 + (G + Q * NG) % 2;
    tile_load(b, xc + G * 512, 64);
    tile_dp(c_tile<NG>(G, Q), Q, b);
    amx_group<NG, Q, G + 1>(xc);
  }
}

GLM_AMX inline void zero_c() {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
}
GLM_AMX inline void store_c(float* c) {
  _tile_stored(4, c, 64);
  _tile_stored(5, c + 256, 64);
  _tile_stored(6, c + 512, 64);
  _tile_stored(7, c + 768, 64);
}

// y for x group g from its C tile (c: [16 weight rows][16 x rows] fp32)
GLM_AMX void amx_store(const AmxProblem& p, const float* c, int64_t n0, int64_t rows, int64_t g) {
  const int64_t m_end = std::min<int64_t>(16, p.M - g * 16);
  for (int64_t j = 0; j < m_end; ++j) {
    at::BFloat16* out = p.y + (g * 16 + j) * p.N + n0;
    for (int64_t r = 0; r < rows; ++r) {
      const float v = c[r * 16 + j];
      out[r] = c10::BFloat16(p.G || !p.scale ? v : v * p.scale[n0 + r]);
    }
  }
}

// Where a pass's A tiles (16 weight rows x 32 inputs of bfloat16) come from: a converted block, or a
// bfloat16 weight as it is (a: 16 rows, stride bytes apart); or, streamed (a null), the codes of
// `rows` weight rows at w, each chunk converted just before its multiplies into one of two 1 KiB
// buffers (abuf) that stay in L1.
//
// Streaming is for int8 and per-row-scaled int4 with up to 64 rows of x (4 groups: one pass), where
// the CPU has AVX512-BF16 (every CPU with AMX has it). The tile unit multiplies one chunk while the
// vector units convert the next, where converting a whole block first left them taking turns: 8 rows
// of 27392x4096 int8 went from 10.3 to 5.9 ms (in cache; 6.0 ms from DRAM, where the GEMV takes 9.5).
// The same conversions and the same order of multiplies: the results are equal.
struct AmxA {
  const uint16_t* a;
  int64_t stride;
  const int8_t* w;
  int64_t rows;
  uint16_t* abuf;
};

// Bytes ahead in each of the 16 weight rows the streamed pass prefetches: the hardware prefetchers do not
// follow 16 rows read 16-32 bytes at a time (int4 from DRAM: 7.3 -> 5.3 ms for 8 rows of 27392x4096;
// int8 about the same either way; 512 and more measured slower)
constexpr int64_t kAmxPrefetch = 256;
#define GLM_AMX_BF16 __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

GLM_AMX_BF16 inline void convert_chunk(const AmxProblem& p, const AmxA& A, int64_t k, uint16_t* dst) {
  const int64_t at = k * p.bits * 4;  // the chunk's first byte in each row (32 codes)
  if (at % 64 == 0 && at + kAmxPrefetch < p.row_bytes)  // 16 rows at once outrun the prefetchers
    for (int64_t r = 0; r < A.rows; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(A.w + r * p.row_bytes + at + kAmxPrefetch), _MM_HINT_T0);
  const __m512i table = _mm512_load_si512(kNibbleBf16);
  if (p.bits == 8)
    for (int64_t r = 0; r < A.rows; ++r) bf16x32<8>(A.w + r * p.row_bytes + at, dst + r * 32, table);
  else
    for (int64_t r = 0; r < A.rows; ++r) bf16x32<4>(A.w + r * p.row_bytes + at, dst + r * 32, table);
}

template <int NG, int Q>
GLM_AMX_BF16 inline void amx_chunk(const AmxProblem& p, const AmxA& A, int64_t k, int64_t g0) {
  if (A.a) {
    tile_load(Q, A.a + k * 32, A.stride);
  } else {
    convert_chunk(p, A, k, A.abuf + Q * 512);
    tile_load(Q, A.abuf + Q * 512, 64);
  }
  amx_group<NG, Q, 0>(p.xb + (k * p.groups + g0) * 512);
}

// one pass over a block of 16 weight rows for x groups g0 .. g0+NG-1; leaves y^T's tiles (fp32,
// 16 x 16) in c
template <int NG>
GLM_AMX_BF16 void amx_pass(const AmxProblem& p, const AmxA& A, int64_t g0, float* c) {
  zero_c();
  int64_t k = 0;
  for (; k + 2 <= p.K32; k += 2) {
    amx_chunk<NG, 0>(p, A, k, g0);
    amx_chunk<NG, 1>(p, A, k + 1, g0);
  }
  if (k < p.K32) amx_chunk<NG, 0>(p, A, k, g0);
  store_c(c);
  if constexpr (NG <= 2)  // tiles 4+5 (group 0), 6+7 (group 1): sum the even and odd chunks
    for (int i = 0; i < 256; ++i) c[i] += c[256 + i], c[256 + i] = c[512 + i] + c[768 + i];
}

bool amx_streams(const AmxProblem& p) {
  return (p.bits == 8 || (p.bits == 4 && p.G == 0)) && p.groups <= 4 && p.K % 32 == 0 && has_avx512bf16();
}

GLM_AMX void amx_blocks(const AmxProblem& p, int64_t b0, int64_t b1, std::vector<uint16_t>& wbuf) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
  const int64_t width = amx_width(p);
  const bool streamed = amx_streams(p);
  if (!streamed) wbuf.assign(16 * width, 0);
  alignas(64) float c[4 * 16 * 16];
  alignas(64) uint16_t abuf[2 * 512] = {};  // the streamed pass's two chunks
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 16, rows = std::min<int64_t>(16, p.N - n0);
    AmxA A{nullptr, 64, p.w + n0 * p.row_bytes, rows, abuf};
    if (streamed) {
      if (rows < 16) std::fill(abuf, abuf + 2 * 512, 0);  // the missing rows multiply as zeros
    } else if (p.bits == 16 && rows == 16 && p.K % 32 == 0) {
      A.a = reinterpret_cast<const uint16_t*>(A.w), A.stride = p.row_bytes;  // whole rows: A tiles as they are
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* src = p.w + (n0 + r) * p.row_bytes;
        if (p.bits == 16) std::memcpy(wbuf.data() + r * width, src, p.row_bytes);
        else row_to_bf16(true, p.bits, src, p.K, p.G ? p.scale + (n0 + r) * p.G : nullptr, p.G, wbuf.data() + r * width);
      }
      if (rows < 16) std::fill(wbuf.begin() + rows * width, wbuf.end(), 0);
      A.a = wbuf.data(), A.stride = width * 2;
    }
    for (int64_t g0 = 0; g0 < p.groups; g0 += 4) {
      const int64_t ng = std::min<int64_t>(4, p.groups - g0);
      switch (ng) {
        case 1: amx_pass<1>(p, A, g0, c); break;
        case 2: amx_pass<2>(p, A, g0, c); break;
        case 3: amx_pass<3>(p, A, g0, c); break;
        default: amx_pass<4>(p, A, g0, c); break;
      }
      for (int64_t g = 0; g < ng; ++g) amx_store(p, c + g * 256, n0, rows, g0 + g);
    }
  }
  _tile_release();
}

// bits 16: codes is the bfloat16 weight [N, K] and scale undefined
at::Tensor amx_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t bits) {
  const int64_t M = x.size(0), N = codes.size(0), K = x.size(1);
  const int64_t K32 = (K + 31) / 32, groups = (M + 15) / 16;
  at::Tensor y = at::empty({M, N}, x.options());
  // x as B tiles: xb[c][g][r][j][e] = x[16 g + j, 32 c + 2 r + e], zero past M and K
  std::vector<uint16_t> xb(K32 * groups * 512, 0);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      xb[((k / 32 * groups + m / 16) * 16 + (k % 32) / 2) * 32 + (m % 16) * 2 + (k & 1)] = xs[m * K + k];
  at::Tensor s = bits == 16 ? at::Tensor() : scale.to(at::kFloat).contiguous();
  AmxProblem p{xb.data(), static_cast<const int8_t*>(codes.data_ptr()), bits == 16 ? nullptr : s.data_ptr<float>(),
               y.data_ptr<at::BFloat16>(), M, N, K, K32, groups, codes.size(1) * codes.element_size(),
               bits != 16 && scale.dim() == 2 ? scale.size(1) : 0, static_cast<int>(bits)};
  const int64_t blocks = (N + 15) / 16;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<uint16_t> wbuf;
    amx_blocks(p, b0, b1, wbuf);
  });
  return y;
}

// y = x @ (codes * scale)^T for many rows of x: x [M, K] bfloat16; codes int8 [N, K] or THUDM int4
// [N, K/2]; scale [N] (applied to the output) or [N, groups] (int4: applied to the weight); or (bits
// 16) a bfloat16 weight [N, K], no scale. block: weight rows per conversion on the matmul path (0: 1 MiB
// of the block's dtype, >= 64 rows).
//
// The block's dtype: bfloat16 where the CPU multiplies it natively (AVX512-BF16: use_dot). Elsewhere
// (AVX2, AVX-512 without BF16) oneDNN's bfloat16 matmul widens its operands itself at a fraction of
// the float32 matmul's speed (2 Zen 4 cores under ONEDNN_MAX_CPU_ISA=AVX2: 49 GFLOPS, float32
// 111-174), so the block is widened once more, in cache, and multiplied in float32.
at::Tensor blocks_mm(const at::Tensor& xc, const at::Tensor& codes, const at::Tensor& scale, int64_t bits,
                     int64_t block, int64_t isa) {
  const bool avx512 = use_avx512(isa), f32 = !use_dot(isa);
  const int64_t M = xc.size(0), N = codes.size(0), K = xc.size(1);
  const int64_t row_bytes = codes.size(1) * codes.element_size();
  const int64_t G = bits != 16 && scale.dim() == 2 ? scale.size(1) : 0;
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y;
  const auto dtype = f32 ? at::kFloat : at::kBFloat16;
  at::Tensor xm = f32 ? xc.to(at::kFloat) : xc;
  at::Tensor group_scale = G ? scale.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor row_scale = bits == 16 || G ? at::Tensor() : scale.to(dtype).contiguous();
  // 1 MiB, and at least 64 rows: oneDNN's matmul is slow on narrower blocks
  if (block <= 0) block = std::max<int64_t>(64, (1 << 20) / (f32 ? 4 : 2) / K / 16 * 16);
  block = std::min(block, N);
  const int64_t blocks = (N + block - 1) / block;
  const int8_t* src = static_cast<const int8_t*>(codes.data_ptr());
  const float* gs = G ? group_scale.data_ptr<float>() : nullptr;
  const at::ThreadLocalState state;  // the caller's inference mode, grad mode etc., for the workers
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(state);
    // inside the parallel region ATen's ops (and oneDNN's matmul) run on this thread alone
    at::Tensor w = bits == 16 ? at::Tensor() : at::empty({block, K}, xc.options());  // converted codes
    at::Tensor wf = f32 ? at::empty({block, K}, xm.options()) : at::Tensor();
    at::Tensor out = at::empty({M, block}, xm.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * block, n = std::min(block, N - n0);
      at::Tensor rows;  // the block's weight rows, in bfloat16
      if (bits == 16) {
        rows = codes.narrow(0, n0, n);
      } else {
        uint16_t* wp = reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>());
        for (int64_t r = 0; r < n; ++r)
          row_to_bf16(avx512, static_cast<int>(bits), src + (n0 + r) * row_bytes, K,
                      G ? gs + (n0 + r) * G : nullptr, G, wp + r * K);
        rows = w.narrow(0, 0, n);
      }
      if (f32) rows = wf.narrow(0, 0, n).copy_(rows);
      at::Tensor part = n == block ? out : out.narrow(1, 0, n);
      at::mm_out(part, xm, rows.t());
      at::Tensor dst = y.narrow(1, n0, n);
      if (row_scale.defined()) at::mul_out(dst, part, row_scale.narrow(0, n0, n));
      else dst.copy_(part);
    }
  });
  return y;
}

at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t bits,
                    int64_t block, int64_t isa) {
  TORCH_CHECK(bits == 8 || bits == 4, "glm_cpu: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "glm_cpu: x must be a 2-D bfloat16 CPU tensor");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "glm_cpu: codes must be a contiguous 2-D int8 tensor");
  const int64_t M = x.size(0), N = codes.size(0), K = x.size(1), row_bytes = codes.size(1);
  TORCH_CHECK(row_bytes * (8 / bits) == K, "glm_cpu: codes ", codes.sizes(), " do not match ", K,
              " inputs at ", bits, " bits");
  TORCH_CHECK(scale.size(0) == N && (scale.dim() == 1 || (scale.dim() == 2 && bits == 4 && K % scale.size(1) == 0)),
              "glm_cpu: scale must be [N] (int4 also [N, groups])");
  use_avx512(isa);  // checks isa
  const int64_t G = scale.dim() == 2 ? scale.size(1) : 0;
  at::Tensor xc = x.contiguous();
  if (isa == 0 && amx_fits(M, K) && amx_ready() && M > 0 && N > 0 && (G == 0 || (K / G) % 32 == 0))
    return amx_mm(xc, codes, scale, bits);
  return blocks_mm(xc, codes, scale, bits, block, isa);
}

// y = x @ weight^T, both bfloat16, for a few dozen rows: the tile unit reads the weight's rows as its
// A tiles where the CPU has AMX (isa 0), else oneDNN's bfloat16 matmul where the CPU multiplies
// bfloat16 natively, else blocks of the weight widened to float32 in cache (blocks_mm)
at::Tensor bf16_dense_mm(const at::Tensor& x, const at::Tensor& weight, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "glm_cpu: x must be a 2-D bfloat16 CPU tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
              weight.size(1) == x.size(1), "glm_cpu: the weight must be a contiguous bfloat16 [N, ", x.size(1), "]");
  use_avx512(isa);  // checks isa
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  if (isa == 0 && M > 0 && N > 0 && amx_fits(M, K) && amx_ready()) return amx_mm(x.contiguous(), weight, at::Tensor(), 16);
  if (!use_dot(isa)) return blocks_mm(x.contiguous(), weight, at::Tensor(), 16, 0, isa);
  return at::mm(x, weight.t());
}

std::string isa_name(int64_t isa) {
  if (!has_avx2()) return "none";
  if (isa == 0 && amx_ready()) return "avx512+amx";
  if (isa == 2) return "avx2";
  if (isa == 3) return "avx2i16";
  if (isa == 5) return has_avx512() ? "avx512" : "none";
  if (isa == 6) return has_avx512bf16() ? "avx512bf16" : "none";
  return has_avx512bf16() ? "avx512bf16" : has_avx512() ? "avx512" : "avx2";
}

}  // namespace

TORCH_LIBRARY(glm_cpu, m) {
  m.def("int8_mm(Tensor x, Tensor codes, Tensor scale, int isa=0) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scale, int isa=0) -> Tensor");
  m.def("bf16_mm(Tensor x, Tensor weight, int isa=0) -> Tensor");
  m.def("bf16_dense_mm(Tensor x, Tensor weight, int isa=0) -> Tensor");
  m.def("dense_mm(Tensor x, Tensor codes, Tensor scale, int bits, int block=0, int isa=0) -> Tensor");
  m.def("isa(int isa=0) -> str", &isa_name);  // no tensors: a catch-all kernel
}

TORCH_LIBRARY_IMPL(glm_cpu, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("bf16_mm", &bf16_mm);
  m.impl("bf16_dense_mm", &bf16_dense_mm);
  m.impl("dense_mm", &dense_mm);
}
