"""glm-build's own CPU decode kernel (builder/model/cpu_kernels.py, csrc/) against
the formula and torch's kernels, in both of its ISA variants; answers unchanged with it on or off.
Skipped where it cannot be built (no compiler, not x86-64, no AVX2)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builder import TINY_CHECKPOINT, load_chatglm2
from builder.model import cpu_kernels, cpu_quant
from builder.model.quantization import QuantizedLinear, pack_int4, quantize_weight, unpack_int4

ROOT = Path(__file__).resolve().parents[1]

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU decode kernel could not be "
                                  "built here (see the warning logged by builder.model.cpu_kernels)")


@pytest.fixture(autouse=True)
def thudm_int4(monkeypatch):
    """int4 in THUDM's layout, the one this kernel reads, whatever the load-time probe would choose."""
    monkeypatch.setenv("GLM_CPU_INT4_LAYOUT", "thudm")


def variants() -> list[str]:
    """The ISA variants this CPU runs: AVX2's two forms always, AVX-512 and AVX512-BF16 where cpuid
    has them."""
    if not cpu_kernels.available():
        return ["avx2", "avx2i16"]
    return ["avx2", "avx2i16"] + [name for name, code in (("avx512", 5), ("avx512bf16", 6))
                                  if torch.ops.glm_cpu.isa(code) == name]


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale)ᵀ in float64: x [M, K], q [N, K] int8, scale [N] or [N, groups] -> [M, N]."""
    s = scale.double()
    s = s[:, None] if s.dim() == 1 else s.repeat_interleave(q.shape[1] // s.shape[1], dim=1)
    return x.double() @ (q.double() * s).t()


# (out, in, bits, group): odd and even N, K that is no multiple of a vector step, groups
SHAPES = [(37, 256, 8, None), (64, 343, 8, None), (5, 31, 8, None), (100, 4096, 8, None),
          (37, 256, 4, None), (48, 346, 4, None), (7, 30, 4, None), (96, 4096, 4, None),
          (33, 256, 4, 32), (64, 512, 4, 64), (16, 384, 4, 128)]

BF16_SHAPES = [(37, 256), (64, 343), (5, 31), (100, 4096)]


def check_kernel(isa: str) -> None:
    """Every shape, 1-11 rows of x: within one bfloat16 rounding of the exact product."""
    os.environ["GLM_CPU_KERNEL_ISA"] = isa
    g = torch.Generator().manual_seed(25)
    for out_features, in_features, bits, group in SHAPES:
        codes, scale = quantize_weight(torch.randn(out_features, in_features, generator=g) * 0.05, bits, group)
        q = unpack_int4(codes) if bits == 4 else codes
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 11):
            x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
            y = (cpu_kernels.int8_mm if bits == 8 else cpu_kernels.int4_mm)(x, codes, scale)
            exact = reference(x, q, scale)
            assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
            # float32 sums, then one bfloat16 rounding (2^-8 relative) of each output
            err = (y.double() - exact).abs() - exact.abs() * 2 ** -8
            assert float(err.max()) <= 1e-4 * float(exact.abs().max()), (isa, out_features, in_features,
                                                                           bits, group, rows)
    for out_features, in_features in BF16_SHAPES:  # a bfloat16 weight (bf16_mm): the same bound
        weight = torch.randn(out_features, in_features, generator=g).to(torch.bfloat16)
        for rows in (1, 2, 3, 5, 8, 11):
            x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
            y = cpu_kernels.bf16_mm(x, weight)
            exact = x.double() @ weight.double().t()
            assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
            err = (y.double() - exact).abs() - exact.abs() * 2 ** -8
            assert float(err.max()) <= 1e-4 * float(exact.abs().max()), (isa, out_features, in_features, rows)


@needs_kernel
@pytest.mark.parametrize("isa", variants())
def test_kernel_matches_the_formula(isa, monkeypatch):
    monkeypatch.setenv("GLM_CPU_KERNEL_ISA", isa)
    check_kernel(isa)
    assert cpu_kernels.isa() == isa


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_the_int16_form_rounds_only_inputs_far_below_their_steps_largest(bits, monkeypatch):
    """int4 (any rows) and int8 (5 rows and more) as 16-bit integer dot products (``avx2i16``): x is
    held as integers with one power of two per 64 inputs, so an input more than 2^7 below its step's
    largest is rounded, by at most 2^-15 of that largest; everything else is as exact as the float32
    form. Outliers (x1000) and tiny inputs (x1e-4) in the same steps stay within that bound, and an
    infinity or a NaN reaches the output."""
    monkeypatch.setenv("GLM_CPU_KERNEL_ISA", "avx2i16")
    g = torch.Generator().manual_seed(16)
    N, K = 40, 4096
    codes, scale = quantize_weight(torch.randn(N, K, generator=g) * 0.05, bits, None)
    q = unpack_int4(codes) if bits == 4 else codes
    mm = cpu_kernels.int4_mm if bits == 4 else cpu_kernels.int8_mm
    for rows in ((1, 3, 8, 9) if bits == 4 else (5, 8, 13)):
        x = torch.randn(rows, K, generator=g)
        x[:, ::97] *= 1000  # an outlier in most steps
        x[:, 1::5] *= 1e-4
        x = x.to(torch.bfloat16)
        y = mm(x, codes, scale)
        exact = reference(x, q, scale)
        step_max = x.double().abs().view(rows, K // 64, 64).amax(-1).repeat_interleave(64, dim=1)
        rounding = (step_max * 2 ** -15) @ (q.double().abs() * scale.double()[:, None]).t()
        err = (y.double() - exact).abs() - exact.abs() * 2 ** -8 - rounding
        assert float(err.max()) <= 1e-4 * float(exact.abs().max()), rows
        # the bound is not vacuous: all the rounding allowed is far below the outputs
        assert float(rounding.max()) < 1e-2 * float(exact.abs().max())
    # inputs below 2^-113 (their steps take a slower path), and a step of zeros
    x = (torch.randn(6, K, generator=g) * 1e-36).to(torch.bfloat16)
    x[:, :64] = 0
    exact = reference(x, q, scale)
    err = (mm(x, codes, scale).double() - exact).abs() - exact.abs() * 2 ** -8
    assert float(err.max()) <= 1e-4 * float(exact.abs().max())
    x = torch.randn(6, K, generator=g).to(torch.bfloat16)
    x[0, 100], x[1, 4000] = float("inf"), float("nan")
    y = mm(x, codes, scale)
    assert not torch.isfinite(y[:2]).any() and torch.isfinite(y[2:]).all()
    # the form is in use: an input 2^20 below its step's largest rounds to nothing there, and not in
    # the float32 form
    x = torch.zeros(6, K, dtype=torch.bfloat16)
    x[:, 0], x[:, 1] = 2.0 ** 20, 1.0
    lone = torch.zeros(1, K, dtype=torch.int8)
    lone[0, 1] = 3
    codes1, scale1 = (pack_int4(lone) if bits == 4 else lone), torch.ones(1, dtype=torch.float16)
    assert torch.equal(mm(x, codes1, scale1), torch.zeros(6, 1, dtype=torch.bfloat16))
    monkeypatch.setenv("GLM_CPU_KERNEL_ISA", "avx2")
    assert torch.equal(mm(x, codes1, scale1), torch.full((6, 1), 3.0, dtype=torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_torchs_kernel(bits, monkeypatch):
    """The same layer through glm-build's kernel and torch's (int4: torch's layout, built with the
    kernel off): equal to bfloat16 rounding, rows 1-8."""
    g = torch.Generator().manual_seed(bits)
    weight = torch.randn(96, 512, generator=g) * 0.05
    ours = QuantizedLinear.from_float(weight, None, bits)
    monkeypatch.setenv("GLM_CPU_KERNELS", "0")
    theirs = QuantizedLinear.from_float(weight, None, bits)
    assert theirs.int4_layout == ("torch" if bits == 4 else None)
    theirs_kernel = theirs._cpu_paths()["torch_kernel"]
    monkeypatch.delenv("GLM_CPU_KERNELS")
    assert ours.int4_layout == ("thudm" if bits == 4 else None)
    assert torch.equal(ours.thudm_state()["weight"], theirs.thudm_state()["weight"])
    for rows in range(1, 9):
        x = torch.randn(rows, 512, generator=g).to(torch.bfloat16)
        a, b = ours._cpu_paths()["glm_kernel"](x).float(), theirs_kernel(x).float()
        assert torch.allclose(a, b, rtol=2 ** -7, atol=float(b.abs().max()) * 2 ** -8), rows


@needs_kernel
def test_a_process_whose_path_finds_another_ninja_does_not_rebuild():
    """Triton's stubs run with the venv's bin/ first on PATH, a plain ``.venv/bin/python`` with the
    system's: each must find the library built by the other as it is (two ninja versions log different
    command hashes, and used to rebuild it in turn, ~16 s a start)."""
    import shutil

    log = cpu_kernels.cache_dir() / ".ninja_log"
    load = "from builder.model import cpu_kernels; assert cpu_kernels.build()"
    system_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                  if Path(p).resolve() != Path(sys.executable).parent.resolve())
    venv_path = os.pathsep.join((str(Path(sys.executable).parent), system_path))
    if shutil.which("ninja", path=system_path) is None:
        system_path = venv_path  # no other ninja here: both processes find the same one
    for path in (venv_path, system_path):
        before = log.read_text() if log.exists() else ""
        subprocess.run([sys.executable, "-c", load], cwd=ROOT, env=dict(os.environ, PATH=path), check=True,
                       capture_output=True, timeout=600)
        if path is system_path:  # the first run may build; the second finds its build as it is
            assert log.read_text() == before, "the library was rebuilt"


@needs_kernel
def test_kernel_under_a_lower_torch_capability():
    """Under ``ATEN_CPU_CAPABILITY=avx2`` (torch's kernels change; ours is picked by cpuid), in a fresh
    process: the same results."""
    code = ("import sys; sys.path.insert(0, 'tests'); import torch, test_decode_kernel as t; "
            "assert torch.backends.cpu.get_cpu_capability() == 'AVX2'; "
            "[t.check_kernel(isa) for isa in t.variants()]; print('ok')")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@needs_kernel
def test_dense_path_reads_the_kernels_int4_layout():
    """A prefill of THUDM-layout int4 (per row and group-wise) gives the kernel's result."""
    g = torch.Generator().manual_seed(4)
    for group in (None, 32):
        layer = QuantizedLinear.from_float(torch.randn(80, 256, generator=g) * 0.05, None, 4, group)
        assert layer.int4_layout == "thudm" and not hasattr(layer, "weight_int4pack")
        x = torch.randn(20, 256, generator=g).to(torch.bfloat16)
        paths = layer._cpu_paths()
        dense, kernel = paths["dense"](x).float(), paths["glm_kernel"](x).float()
        assert torch.allclose(dense, kernel, rtol=0, atol=2 * float(kernel.abs().max()) * 2 ** -8)


@needs_kernel
def test_int4_is_stored_once_in_thudms_layout():
    """Only THUDM's packed codes and fp16 scales: half a byte per weight, 2 bytes per row."""
    layer = QuantizedLinear.from_float(torch.randn(64, 4096) * 0.05, None, 4)
    assert {name for name, _ in layer.named_buffers()} == {"weight", "weight_scale"}
    assert layer.resident_bytes() == 64 * 4096 // 2 + 64 * 2


@needs_kernel
@pytest.mark.parametrize("isa", variants())
@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_answers_unchanged_with_the_kernel_on_or_off(bits, isa, monkeypatch):
    """In every form of the kernel this CPU runs (int4's int16 form included)."""
    from test_kernels import IDS, _greedy

    monkeypatch.setattr(cpu_quant, "_decode_paths", {})
    monkeypatch.setenv("GLM_CPU_KERNEL_ISA", isa)
    ids = torch.tensor(IDS)
    answers = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("GLM_CPU_KERNELS", switch)
        monkeypatch.setenv("GLM_CPU_DECODE", "kernel")
        model, _ = load_chatglm2(TINY_CHECKPOINT, bits=bits, dtype=torch.bfloat16)
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.kernel.startswith("cpu")]
        assert layers and {layer.cpu_path(1) for layer in layers} == \
            {"glm_kernel" if switch == "1" else "torch_kernel"}
        answers[switch] = _greedy(model, ids, 16)
    assert torch.equal(answers["1"], answers["0"])


@needs_kernel
@pytest.mark.parametrize("isa", variants())
def test_bfloat16_layers_decode_on_the_kernel_and_answer_the_same(isa, monkeypatch):
    """The fp16 variant on the CPU (bfloat16): its linear layers' one-row calls take glm-build's GEMV
    when the decode choice names it, and the greedy answer equals oneDNN's, in every form of the
    kernel (a prefill widened to float32 blocks where bfloat16 is not native included)."""
    from builder.model.cpu_linear import RowsLinear
    from test_kernels import IDS, _greedy

    monkeypatch.setenv("GLM_CPU_KERNEL_ISA", isa)
    ids = torch.tensor(IDS)
    answers = {}
    for switch in ("1", "0"):
        monkeypatch.setattr(cpu_quant, "_decode_paths", {})
        monkeypatch.setenv("GLM_CPU_KERNELS", switch)
        monkeypatch.setenv("GLM_CPU_DECODE", "glm")
        model, _ = load_chatglm2(TINY_CHECKPOINT, dtype=torch.bfloat16)
        layers = [m for m in model.modules() if isinstance(m, RowsLinear)]
        assert len(layers) == 6 * model.config.num_hidden_layers + 1  # q, k, v, o, gate_up, down; lm_head
        assert {layer.decode_paths(torch.zeros(1, layer.in_features, dtype=torch.bfloat16)) is None
                for layer in layers} == {switch == "0"}
        answers[switch] = _greedy(model, ids, 16)
    assert torch.equal(answers["1"], answers["0"])


@needs_kernel
def test_the_output_layer_decode_probe_is_reported(monkeypatch):
    """A one-row call of a bfloat16 layer is probed like a quantized one, and the choice is named."""
    from builder.model.cpu_linear import use_row_inputs

    monkeypatch.setattr(cpu_quant, "_decode_paths", {})
    monkeypatch.setenv("GLM_CPU_DECODE", "probe")
    head = use_row_inputs(torch.nn.Sequential(torch.nn.Linear(512, 1000, bias=True))).to(torch.bfloat16)[0]
    x = torch.randn(1, 512).to(torch.bfloat16)
    with torch.inference_mode():
        y = head(x)
        expected = torch.nn.functional.linear(x.double(), head.weight.double(), head.bias.double())
        offered = head.decode_paths(x)
    assert torch.allclose(y.double(), expected, rtol=2 ** -7, atol=float(expected.abs().max()) * 2 ** -7)
    assert cpu_quant.decode_paths()["bf16 1000x512"] in ("glm_kernel", "torch_kernel", "dense")
    assert ("dense" in offered) == cpu_kernels.has_amx()  # the tile unit reads bf16 as it is


@needs_kernel
def test_int4_layout_follows_the_probe(monkeypatch):
    """THUDM's layout by default where the kernel is built; ``probe``: a one-off timing of both
    kernels chooses, and the layer follows it."""
    monkeypatch.delenv("GLM_CPU_INT4_LAYOUT")
    assert QuantizedLinear.from_float(torch.randn(64, 256) * 0.05, None, 4).int4_layout == "thudm"
    monkeypatch.setenv("GLM_CPU_INT4_LAYOUT", "probe")
    wins = cpu_kernels.int4_wins()
    layer = QuantizedLinear.from_float(torch.randn(64, 256) * 0.05, None, 4)
    assert layer.int4_layout == ("thudm" if wins else "torch")
    monkeypatch.setenv("GLM_CPU_INT4_LAYOUT", "torch")
    assert QuantizedLinear.from_float(torch.randn(64, 256) * 0.05, None, 4).int4_layout == "torch"
    monkeypatch.setenv("GLM_CPU_INT4_LAYOUT", "fastest")
    with pytest.raises(ValueError, match="GLM_CPU_INT4_LAYOUT"):
        cpu_kernels.int4_wins()


# -- many rows: dense_mm (a block of codes converted in a thread's cache; AMX where the CPU has it) ---
def dense_variants() -> list[str]:
    """``GLM_CPU_KERNEL_ISA`` values whose dense path differs: the best (AMX where there), AVX-512
    and AVX2 (oneDNN's matmul on blocks converted with that ISA)."""
    return [""] + variants()


def check_dense(x: torch.Tensor, bits: int, group: int | None, out_features: int,
                g: torch.Generator, label) -> None:
    """``dense_mm`` on random codes against the formula: float32 sums of bfloat16-exact codes, one
    bfloat16 rounding (group-wise: each weight rounded to bfloat16 first)."""
    in_features = x.shape[1]
    low, high = (-128, 128) if bits == 8 else (-8, 8)
    q = torch.randint(low, high, (out_features, in_features), generator=g, dtype=torch.int8)
    shape = (out_features,) if group is None else (out_features, in_features // group)
    scale = (torch.rand(shape, generator=g) * 0.01 + 1e-3).to(torch.float16)
    codes = q if bits == 8 else pack_int4(q)
    y = cpu_kernels.dense_mm(x, codes, scale, bits)
    exact = reference(x, q, scale)
    if group is None and cpu_kernels.has_amx():  # the scale multiplies the tile unit's float32 sum
        slack = exact.abs() * 2 ** -7
    else:  # group-wise, each weight is rounded to bfloat16 first; without AMX, oneDNN's bfloat16
        # matmul rounds partial sums to bfloat16 too (AVX512-BF16 Zen 4: 2^-8 of |exact| measured)
        per_weight = reference_abs(q, scale if group else scale[:, None])
        slack = (x.double().abs() @ per_weight.t()) * 2 ** -8 + exact.abs() * 2 ** -7
    err = (y.double() - exact).abs() - slack
    assert float(err.max()) <= 1e-3 * float(exact.abs().max()), (label, bits, group)


@needs_kernel
@pytest.mark.parametrize("isa", dense_variants())
def test_dense_path_matches_the_formula(isa, monkeypatch):
    """int8, int4 and group-wise int4 on odd shapes, 1 to 130 rows (the tile unit takes up to 128,
    oneDNN more); and a bfloat16 weight (``bf16_dense_mm``)."""
    monkeypatch.setenv("GLM_CPU_KERNEL_ISA", isa)
    g, gw = torch.Generator().manual_seed(3), torch.Generator().manual_seed(16)
    for out_features, in_features in ((37, 96), (200, 512), (65, 200), (16, 4096)):
        for rows in (1, 5, 17, 65, 128, 130):
            x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
            for bits, group in ((8, None), (4, None), (4, 32)):
                if bits == 4 and (in_features % 2 or (group and in_features % group)):
                    continue
                check_dense(x, bits, group, out_features, g, (isa, out_features, in_features, rows))
            weight = torch.randn(out_features, in_features, generator=gw).to(torch.bfloat16)  # bf16_dense_mm
            y, exact = cpu_kernels.bf16_dense_mm(x, weight).double(), x.double() @ weight.double().t()
            err = (y - exact).abs() - exact.abs() * 2 ** -8
            assert float(err.max()) <= 1e-4 * float(exact.abs().max()), (isa, out_features, in_features, rows)


@needs_kernel
@pytest.mark.parametrize("isa", variants())
def test_a_bfloat16_prefill_widens_to_float32_where_bfloat16_is_not_native(isa, monkeypatch):
    """A bfloat16 layer (the fp16 variant's projections) called with more rows than a decode step
    takes float32 blocks of its weight (``bf16_dense_mm``) exactly where the ISA in use does not
    multiply bfloat16 natively, and keeps oneDNN's bfloat16 matmul where it does; either way the
    result is the formula's to one bfloat16 rounding."""
    from builder.model.cpu_linear import RowsLinear

    monkeypatch.setenv("GLM_CPU_KERNEL_ISA", isa)
    g = torch.Generator().manual_seed(32)
    layer = RowsLinear(512, 96, bias=True).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 512, generator=g))
        layer.bias.copy_(torch.randn(96, generator=g))
    x = torch.randn(2, 20, 512, generator=g).to(torch.bfloat16)
    rows = x.reshape(-1, 512)
    assert layer.widened(rows) == (isa not in ("avx512bf16",))
    assert not layer.widened(rows[:8])  # a decode step: the GEMVs
    with torch.inference_mode():
        y = layer(x)
    exact = (x.double() @ layer.weight.double().t()).add(layer.bias.double())
    err = (y.double() - exact).abs() - exact.abs() * 2 ** -7
    assert y.shape == (2, 20, 96) and float(err.max()) <= 1e-3 * float(exact.abs().max())


@needs_kernel
def test_the_streamed_tile_pass_matches_the_formula_for_every_group_count():
    """Where the CPU has AMX, int8 and per-row int4 with up to 64 rows (1-4 groups of 16 x rows) and
    K a multiple of 32 convert each chunk of codes just before its multiplies; a partial last block of
    weight rows multiplies zeros. Elsewhere this checks the dense path on the same shapes."""
    g = torch.Generator().manual_seed(40)
    for out_features, in_features in ((37, 96), (16, 4096)):
        for rows in (3, 20, 40, 64):
            x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
            for bits in (8, 4):
                check_dense(x, bits, None, out_features, g, (out_features, in_features, rows))


def reference_abs(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|q * scale| [N, K] in float64 (group-wise scale [N, groups])."""
    return (q.double() * scale.double().repeat_interleave(q.shape[1] // scale.shape[1], dim=1)).abs()


@needs_kernel
def test_dense_path_uses_amx_where_the_cpu_has_it(monkeypatch):
    """The tile unit is named where cpuid and the OS grant it, and AVX-512 / AVX2 leave it out."""
    amx = torch.ops.glm_cpu.isa(0) == "avx512+amx"
    flags = open("/proc/cpuinfo").read()
    assert amx == ("amx_bf16" in flags and "amx_tile" in flags)
    for isa in variants():
        monkeypatch.setenv("GLM_CPU_KERNEL_ISA", isa)
        assert cpu_kernels.isa() == isa


def test_probe_times_a_bucket_at_its_largest_row_count():
    """A 5-8-row bucket first seen with 5 rows is timed with 8 (x's rows repeated); 1 row stays 1; the
    open bucket times x as it is."""
    x = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)
    rows = cpu_quant.probe_rows(x, cpu_quant.rows_bucket(5))
    assert rows.shape == (8, 3) and torch.equal(rows[:5], x) and torch.equal(rows[5:], x[:3])
    assert cpu_quant.probe_rows(x[:1], cpu_quant.rows_bucket(1)).shape == (1, 3)
    assert cpu_quant.probe_rows(x[:2], cpu_quant.rows_bucket(2)).shape == (4, 3)
    many = torch.zeros(12, 3)
    assert cpu_quant.probe_rows(many, cpu_quant.rows_bucket(12)) is many
