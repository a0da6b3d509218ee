// What this CPU has, and which form of the kernels an isa code names.
#include "glm_cpu.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace glm_cpu {

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

bool has_avx512bf16() {
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return has_avx512() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
  }();
  return yes;
}

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

std::string isa_name(int64_t isa) {
  if (!has_avx2()) return "none";
  if (isa == 0 && amx_ready()) return "avx512+amx";
  if (isa == 2) return "avx2";
  if (isa == 3) return "avx2i16";
  if (isa == 5) return has_avx512() ? "avx512" : "none";
  if (isa == 6) return has_avx512bf16() ? "avx512bf16" : "none";
  return has_avx512bf16() ? "avx512bf16" : has_avx512() ? "avx512" : "avx2";
}

}  // namespace glm_cpu
