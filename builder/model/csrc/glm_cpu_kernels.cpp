// glm-build's CPU kernels as torch ops (torch.ops.glm_cpu.*); glm_cpu.h says which file holds what.
#include "glm_cpu.h"

#include <torch/library.h>

using namespace glm_cpu;

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
