// The float32 GEMV, and weight_only_mm, which picks the form of the GEMV for a call.
#include "glm_cpu.h"

namespace glm_cpu {
namespace {

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

}  // namespace

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t isa) {
  return weight_only_mm(x, codes, scale, 8, isa);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t isa) {
  return weight_only_mm(x, packed, scale, 4, isa);
}

at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& weight, int64_t isa) {
  return weight_only_mm(x, weight, c10::nullopt, 16, isa);
}

}  // namespace glm_cpu
