"""The CUDA forward of int8/int4 layers (builder.model.cuda_quant): row-block extraction runs here on the
CPU (it is plain torch), the fused kernel's source runs here one thread per lane (g++), and on a GPU
both are checked against each other and the formula."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from builder.model import cuda_quant
from builder.plan import memory
from builder import CHATGLM2_6B
from builder.model import extraction
from builder.model.extraction import cuda_extract_bytes, cuda_extract_rows
from builder.plan.memory import estimate_breakdown
from builder.model.quantization import QuantizedLinear, dequantize, quantize_weight, unpack_int4

from test_memory import TINY

SCHEMES = [(8, None), (4, None), (4, 32)]  # int8, int4, group-wise int4


def reference(x, codes, scale, bits):
    """x @ (q · s)ᵀ in float64, q unpacked, s repeated: the formula the fast paths must meet."""
    q = unpack_int4(codes) if bits == 4 else codes
    return x.double() @ dequantize(q, scale).double().t()


def extract_layer(bits, group_size, rows=1000, cols=512, bias=True):
    """A CPU layer that keeps THUDM's codes (1000 rows: no CPU int4 kernel), forced onto the CUDA
    path's forward; its inputs and outputs are fp16 as on a GPU."""
    g = torch.Generator().manual_seed(bits)
    layer = QuantizedLinear.from_float(torch.randn(rows, cols, generator=g),
                                       torch.randn(rows, generator=g).half() if bias else None,
                                       bits, group_size)
    assert layer.kernel in ("cpu_int8", "dequantize") and hasattr(layer, "weight")
    layer.kernel = "cuda_extract"
    return layer


def peak_live_bytes(fn) -> int:
    """The peak of bytes allocated and not yet freed while ``fn`` runs (torch.profiler's
    allocator events, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.fixture
def small_blocks(monkeypatch):
    """64 KiB extraction blocks: a 1000 × 512 layer takes 16 of 64 rows."""
    monkeypatch.setattr(extraction, "CUDA_EXTRACT_BLOCK_BYTES", 64 * 1024)
    assert cuda_extract_rows(1000, 512) == 64


@pytest.mark.parametrize("bits,group_size", SCHEMES)
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_extraction_matches_the_formula(bits, group_size, blocks, monkeypatch):
    if blocks == "many":
        monkeypatch.setattr(extraction, "CUDA_EXTRACT_BLOCK_BYTES", 64 * 1024)
    layer = extract_layer(bits, group_size)
    x = torch.randn(3, 5, 512).half()
    y = layer(x)
    assert y.dtype == torch.float16 and y.shape == (3, 5, 1000)
    want = reference(x.reshape(-1, 512), layer.weight, layer.weight_scale, bits) + layer.bias.double()
    assert (y.reshape(-1, 1000).double() - want).abs().max() / want.abs().max() < 2e-3


@pytest.mark.parametrize("bits,group_size", SCHEMES)
def test_extraction_temporaries_are_bounded_by_row_blocks_and_counted(bits, group_size,
                                                                      small_blocks, monkeypatch):
    """What the CUDA path allocates beyond its output stays within one row block's worth, which
    the estimate counts; the whole layer's fp16 weight (1 MB here) is never made."""
    # cuBLAS works in a workspace the process overhead counts; the CPU's fp16 GEMM would add its
    # own packing buffers, so only its output is allocated here
    monkeypatch.setattr(cuda_quant.F, "linear", lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    layer = extract_layer(bits, group_size, bias=False)
    tokens = 4
    x = torch.randn(tokens, 512).half()
    peak = peak_live_bytes(lambda: layer(x))
    output = tokens * 1000 * 2
    counted = cuda_extract_bytes(1000, 512, bits, tokens)  # what the estimate adds per projection
    assert counted < 1000 * 512 * 2 // 4  # a quarter of the whole fp16 weight
    # on a CPU, a mixed-dtype multiply first copies its int8 input to fp16 (CUDA casts in the
    # kernel): at most one block's fp16 bytes more here
    cpu_cast = extraction.CUDA_EXTRACT_BLOCK_BYTES
    assert peak <= counted + output + cpu_cast, (
        f"peak {peak} > counted {counted} + output {output} + CPU cast {cpu_cast}")


def test_scales_broadcast_without_repeat_interleave(monkeypatch):
    layer = extract_layer(4, 32)

    def refuse(*args, **kwargs):
        raise AssertionError("repeat_interleave copies every scale in_features/groups times")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    monkeypatch.setattr(torch, "repeat_interleave", refuse)
    layer(torch.randn(2, 512).half())


def test_the_estimate_counts_this_runtimes_extraction():
    """The 6B keeps THUDM's larger (calibrated) terms; a model whose layers fit one block counts
    this runtime's, the int4 nibble plane included."""
    rows, cols = memory.quantized_projections(CHATGLM2_6B)["dense_h_to_4h"]
    steps = memory.activation_steps(CHATGLM2_6B, 4, 2048, "encode")
    assert steps["dense_h_to_4h"] >= 2048 * (rows + cols) * 2 + cuda_extract_bytes(rows, cols, 4, 2048)
    for bits in (8, 4):
        e = estimate_breakdown(TINY, bits, 16, "generate", process_overhead=0)
        cached = max(cuda_extract_bytes(r, c, bits) for r, c in memory.quantized_projections(TINY).values())
        assert e.overhead >= cached
        step = memory.activation_steps(TINY, bits, 16, "generate")["dense_h_to_4h"]
        r, c = memory.quantized_projections(TINY)["dense_h_to_4h"]
        assert step == (c + r) * 2 + cuda_extract_bytes(r, c, bits, 1)
    assert cuda_extract_bytes(192, 64, 4) == 192 * 64 * 2 + 192 * 32  # > the fp16 weight alone


def test_fused_kernel_is_optional():
    g = torch.Generator().manual_seed(129)  # not the global RNG: other tests move it
    x = torch.randn(1, 64, generator=g).half()
    codes, scale = quantize_weight(torch.randn(16, 64, generator=g), 8)
    assert not cuda_quant.fused_applies(x, codes, 8, None)  # a CPU tensor: never
    assert cuda_quant.kernel_in_use("cpu") == "extract"
    # on a CPU linear() extracts: compare with the dequantized weight written out here, allowing
    # float16 rounding of each weight and of the sum (2^-11 each, doubled)
    weight = codes.double() * scale.double()[:, None]
    reference = x.double() @ weight.T  # [1, 16]
    slack = (x.double().abs() @ weight.abs().T + reference.abs()) * 2 ** -10
    error = (cuda_quant.linear(x, codes, scale, 8, None).double() - reference).abs()
    assert bool((error <= slack).all()), (error - slack).max()


# -- the fused kernel's own source, run on the CPU ------------------------------------------------------
HARNESS = r"""
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
template <class T> T __ldg(const T* p) { return *p; }
static std::barrier<>* warp_barrier;
static float lanes[32];
float __shfl_down_sync(unsigned, float v, int offset) {  // one warp runs at a time
    int lane = threadIdx.x & 31;
    lanes[lane] = v;
    warp_barrier->arrive_and_wait();
    float r = lane + offset < 32 ? lanes[lane + offset] : v;
    warp_barrier->arrive_and_wait();
    return r;
}
@@KERNEL@@
template <class T> std::vector<T> slurp(const char* path) {
    FILE* f = fopen(path, "rb"); fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
    std::vector<T> v(n / sizeof(T)); if (fread(v.data(), 1, n, f) != (size_t)n) exit(3); fclose(f);
    return v;
}
int main(int argc, char** argv) {
    int rows = atoi(argv[1]), cols = atoi(argv[2]), tokens = atoi(argv[3]), bits = atoi(argv[4]),
        group = atoi(argv[5]);
    auto q = slurp<int>("q.bin"); auto s = slurp<unsigned short>("s.bin");
    auto x = slurp<unsigned short>("x.bin");
    std::vector<unsigned short> y(tokens * rows, 0xFFFF);
    blockDim.x = 256;
    std::barrier<> b(32); warp_barrier = &b;
    for (int block = 0; block < (rows + 7) / 8; ++block)
        for (int warp = 0; warp < 8; ++warp) {
            std::vector<std::thread> threads;
            for (int lane = 0; lane < 32; ++lane)
                threads.emplace_back([&, block, warp, lane] {
                    blockIdx.x = block; threadIdx.x = warp * 32 + lane;
                    weight_only_gemv(q.data(), s.data(), x.data(), y.data(), rows, cols, tokens, bits,
                                     group);
                });
            for (auto& t : threads) t.join();
        }
    FILE* f = fopen("y.bin", "wb"); fwrite(y.data(), 2, y.size(), f); fclose(f);
}
"""
CPU_HALVES = """__device__ __forceinline__ float h2f(unsigned short h) { _Float16 v; memcpy(&v, &h, 2); return (float)v; }
__device__ __forceinline__ unsigned short f2h(float f) { _Float16 v = (_Float16)f; unsigned short h; memcpy(&h, &v, 2); return h; }
"""


@pytest.fixture(scope="module")
def cpu_kernel(tmp_path_factory):
    """KERNEL_SOURCE compiled with g++: 32 threads a warp, the PTX half conversions swapped for
    _Float16 ones, everything else as NVRTC compiles it."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to run the kernel's source on the CPU")
    src = cuda_quant.KERNEL_SOURCE
    kernel = src[:src.index("__device__ __forceinline__ float h2f")] + CPU_HALVES \
        + src[src.index('extern "C"'):]
    folder = tmp_path_factory.mktemp("kernel")
    (folder / "kernel.cpp").write_text(HARNESS.replace("@@KERNEL@@", kernel))
    built = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-o", "kernel", "kernel.cpp"],
                           cwd=folder, capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"g++ cannot build the harness (C++20 <barrier>, _Float16): {built.stderr[-300:]}")
    return folder


@pytest.mark.parametrize("bits,group_size,rows,cols,tokens", [
    (8, None, 24, 96, 1), (4, None, 17, 64, 3), (4, 32, 16, 128, 8), (4, 128, 9, 256, 2),
    (8, None, 8, 64, 5)])
def test_fused_kernel_source_matches_the_formula(cpu_kernel, bits, group_size, rows, cols, tokens):
    g = torch.Generator().manual_seed(rows)
    codes, scale = quantize_weight(torch.randn(rows, cols, generator=g), bits, group_size)
    x = torch.randn(tokens, cols, generator=g).half()
    for name, tensor in (("q", codes), ("s", scale), ("x", x)):
        tensor.numpy().tofile(cpu_kernel / f"{name}.bin")
    subprocess.run(["./kernel", str(rows), str(cols), str(tokens), str(bits), str(group_size or 0)],
                   cwd=cpu_kernel, check=True, timeout=120)
    y = torch.from_numpy(np.fromfile(cpu_kernel / "y.bin", dtype=np.float16)).view(tokens, rows)
    want = reference(x, codes, scale, bits)
    assert (y.double() - want).abs().max() <= 1e-3 * want.abs().max() + 1e-3


# -- on a GPU ---------------------------------------------------------------------------------------
def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,group_size", SCHEMES)
@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
def test_cuda_fused_and_extracted_match_the_formula(bits, group_size, tokens):
    g = torch.Generator().manual_seed(tokens)
    rows, cols = 4608, 4096  # q/k/v fused: one block; 27392 would take four
    codes, scale = quantize_weight(torch.randn(rows, cols, generator=g), bits, group_size)
    x = torch.randn(tokens, cols, generator=g).half()
    want = reference(x, codes, scale, bits)
    codes, scale, xc = codes.cuda(), scale.cuda(), x.cuda()
    extracted = cuda_quant.extract_linear(xc, codes, scale, bits, group_size)
    assert (extracted.double().cpu() - want).abs().max() / want.abs().max() < 2e-3
    if _has_cupy() and cuda_quant.fused_applies(xc, codes, bits, group_size):
        fused = cuda_quant.fused_linear(xc, codes, scale, bits, group_size)
        torch.cuda.synchronize()
        assert (fused.double().cpu() - want).abs().max() / want.abs().max() < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layer_forward_stays_within_the_estimate():
    """A 6B-sized dense_h_to_4h (four extraction blocks): the allocator's peak above the weights,
    input and output stays within what the estimate adds for it."""
    rows, cols = memory.quantized_projections(CHATGLM2_6B)["dense_h_to_4h"]
    for bits in (8, 4):
        codes, scale = quantize_weight(torch.randn(rows, cols), bits)
        layer = QuantizedLinear.from_thudm(codes.cuda(), scale.cuda(), None, bits)
        x = torch.randn(2048, cols, device="cuda", dtype=torch.float16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        layer(x)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - 2048 * rows * 2
        assert extra <= cuda_extract_bytes(rows, cols, bits, 2048) + 2 * 2**20
