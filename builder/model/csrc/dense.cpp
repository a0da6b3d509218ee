// Many rows (a prefill, a large batch): codes converted to bfloat16 in each thread's cache, then the
// AMX tile unit or a matmul.
#include "glm_cpu.h"

#include <ATen/ThreadLocalState.h>

namespace glm_cpu {
namespace {

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

// -- AMX (Sapphire Rapids and later): the same conversion, multiplied by the tile unit -----------------
// Weight rows are the tiles' A side: 16 rows of codes become 16 rows of bfloat16 in a thread's buffer
// (L2), and each 32-input chunk of them is one A tile; x, laid out once per call as B tiles (pairs of
// inputs per column, "VNNI"), stays in cache. C tile g holds y^T for 16 weight rows and 16 rows of x,
// so up to 4 groups of 16 x rows (64) share one pass over a converted block. The unit multiplies at
// several hundred flops a cycle, so up to ~16 rows cost what one does: converting and reading the codes.

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

}  // namespace

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

}  // namespace glm_cpu
