"""The CUDA path, reviewed (issue 13), checked on a CPU: loading, the bf16 guard, profiles, bias
dtype and which card profiling reads. ``torch.cuda`` is stubbed where a test needs a GPU's answers;
the meta device stands in for the GPU's memory. Extraction and the fused kernel: test_cuda_quant.py."""
from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from builder.model import checkpoint
from builder.profile import measure
from builder.model import quantization
from builder.model.checkpoint import build_empty_model, check_dtype, load_chatglm2
from builder.plan.placement import PRECISIONS, Variant
from builder.plan.profiles import (GpuProfile, ProfileError, list_profiles, load_profile, match_device,
                              profile_from_dict)
from builder.model.quantization import QuantizedLinear, make_load_hook

from conftest import SMALL

MIB, GIB = 2**20, 2**30


# -- 1. quantizing at load: on the CPU, finished tensors moved, the allocator's cache released -------
def test_load_hook_quantizes_on_the_cpu_and_moves_only_finished_tensors(monkeypatch):
    seen = []
    real = quantization.quantize_weight

    def recording(weight, *args, **kwargs):
        seen.append(weight.device.type)
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(quantization, "quantize_weight", recording)
    model = build_empty_model(SMALL, torch.float16)
    hook = make_load_hook(model, 4, device="meta")  # meta: the "GPU"
    weight = torch.randn(2 * SMALL.ffn_hidden_size, SMALL.hidden_size, dtype=torch.float16)
    assert hook("model.layers.0.mlp.gate_up_proj.weight", weight)
    layer = model.get_submodule("model.layers.0.mlp.gate_up_proj")
    assert isinstance(layer, QuantizedLinear)
    assert seen == ["cpu"]  # not the float weight moved to the device and quantized there
    assert {t.device.type for t in layer.buffers()} == {"meta"}
    assert {t.dtype for t in layer.buffers()} == {torch.int8, torch.float16}  # codes, scales


def test_from_float_quantizes_where_the_weight_is_and_moves_the_result():
    weight, bias = torch.randn(32, 64), torch.randn(32)
    layer = QuantizedLinear.from_float(weight, bias, 8, device="meta")
    here = QuantizedLinear.from_float(weight, bias, 8)
    assert layer.weight.is_meta and layer.weight_scale.is_meta and layer.bias.is_meta
    assert layer.weight.shape == here.weight.shape and layer.weight.dtype == torch.int8


def test_loading_releases_the_allocators_cache(monkeypatch, small_checkpoint):
    emptied, released = [], []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    checkpoint.release_free_memory(torch.device("cuda:0"))
    assert emptied == [True]
    real = checkpoint.release_free_memory
    monkeypatch.setattr(checkpoint, "release_free_memory",
                        lambda device: (released.append(device), real(device)))
    load_chatglm2(small_checkpoint[0], bits=8)
    assert released == [torch.device("cpu")]


# -- 3. the bfloat16 guard: the target device's compute capability ---------------------------------
def test_bfloat16_guard_reads_the_target_devices_compute_capability(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P40")
    capability = {"value": (6, 1)}

    def get_device_capability(device=None):
        asked.append(device)
        return capability["value"]

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    with pytest.raises(ValueError, match=r"bfloat16: Tesla P40 \(cuda:1, compute capability 6.1\)"
                                         r".*use float16"):
        check_dtype(torch.bfloat16, torch.device("cuda:1"))
    assert asked == [torch.device("cuda:1")]  # the target, not the current device
    check_dtype(torch.float16, torch.device("cuda:1"))
    capability["value"] = (8, 0)
    check_dtype(torch.bfloat16, torch.device("cuda:1"))


# -- 4. no profile flag that nothing reads ------------------------------------------------------------
def test_no_fast_fp16_flag_and_every_gpu_variant_serves_float16():
    assert "fast_fp16" not in {f.name for f in dataclasses.fields(GpuProfile)}
    p40 = load_profile("p40")
    raw = {"name": "p40", "description": "d", "kind": "gpu", "memory_gib": 24,
           "compute_capability": "6.1", "supports_bf16": False, "bandwidth_gb_per_s": 346,
           "process_overhead_mib": 736}
    assert profile_from_dict(raw).process_overhead_bytes == p40.process_overhead_bytes
    with pytest.raises(ProfileError, match="unknown key.*fast_fp16"):
        profile_from_dict({**raw, "fast_fp16": False})  # a stale profile says so, at once
    for name in list_profiles():
        profile = load_profile(name)
        if profile.kind == "gpu":  # what p40.toml's comment says: float16, the P40 too
            assert {Variant(p).dtype(profile) for p in PRECISIONS} == {"float16"}, name


# -- 5. quantized layers keep their bias in the load dtype ------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_bias_has_the_load_dtype(small_checkpoint, dtype):
    model, _ = load_chatglm2(small_checkpoint[0], bits=8, dtype=dtype)
    biases = {name: m.bias.dtype for name, m in model.named_modules()
              if isinstance(m, QuantizedLinear) and m.bias is not None}
    assert biases and set(biases.values()) == {dtype}, biases


def test_hook_bias_dtype_on_the_meta_model():
    model = build_empty_model(SMALL, torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.float32  # the trap
    hook = make_load_hook(model, 8, dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    hook("model.layers.0.self_attn.q_proj.bias", torch.randn(q.out_features))
    hook("model.layers.0.self_attn.q_proj.weight", torch.randn(q.out_features, q.in_features))
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16


# -- 6. profiling reads the card CUDA measures, and compares with its profile -------------------------
@pytest.fixture
def cuda_device_zero(monkeypatch):
    """CUDA's device 0 is the card at PCI 0000:3B:00.0 (on a mixed host, not NVML's index 0)."""
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: nvidia-smi answers
    return "00000000:3B:00.0"


def test_baseline_asks_for_the_card_by_pci_bus_id(monkeypatch, cuda_device_zero):
    import subprocess

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="1234\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    bus_id = measure._cuda_pci_bus_id(0)
    assert bus_id == cuda_device_zero
    assert measure._device_used_by_pci(bus_id) == 1234 * MIB
    assert calls[0][calls[0].index("-i") + 1] == "00000000:3B:00.0"  # not "1" from the env


def test_baseline_through_nvml_by_pci_bus_id(monkeypatch, cuda_device_zero):
    handles = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByPciBusId=lambda bus: handles.append(bus) or bus,
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=77 * MIB))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert measure._device_used_by_pci(measure._cuda_pci_bus_id(0)) == 77 * MIB
    assert handles == ["00000000:3B:00.0"]
    assert measure._device_used_by_pci(None) is None  # no bus id: no guessing by index


def test_overhead_is_compared_with_the_measured_cards_profile():
    p40 = ("Tesla P40", (6, 1), 24 * GIB - 400 * MIB)
    found = measure.overhead_against_profile(500 * MIB, 6 * GIB, 6 * GIB - 300 * MIB, None, p40)
    assert found["gpu_profile"] == "p40" and found["profile_match"] == "detected"
    assert found["profile_overhead_bytes"] == 736 * MIB  # the P40's, not the A100's 896 MiB
    assert found["overhead_measured_bytes"] == 800 * MIB
    assert found["overhead_error_bytes"] == 64 * MIB
    named = measure.overhead_against_profile(0, 0, 0, "t4", p40)
    assert named["gpu_profile"] == "t4" and named["profile_match"] == "named"
    unknown = measure.overhead_against_profile(0, 0, 0, None, ("NVIDIA B200", (10, 0), 180 * 10**9))
    assert unknown["gpu_profile"] is None and unknown["profile_overhead_bytes"] == 896 * MIB


@pytest.mark.parametrize("device,expected", [
    (("Tesla P40", (6, 1), 24 * GIB - 500 * MIB), "p40"),
    (("NVIDIA A10", (8, 6), int(22.5 * GIB)), "a10"),
    (("NVIDIA GeForce RTX 3090", (8, 6), 24 * GIB), "rtx3090"),
    (("NVIDIA A100-SXM4-40GB", (8, 0), int(39.5 * GIB)), "a100-40gb"),
    (("NVIDIA H100 80GB HBM3", (9, 0), int(79.2 * GIB)), "h100-80gb"),
    (("Tesla V100-SXM2-32GB", (7, 0), int(31.7 * GIB)), "v100-32gb"),
    (("NVIDIA H200", (9, 0), 143771 * MIB), "h200-141gb"),
    (("NVIDIA B200", (10, 0), 180 * 10**9), None),
])
def test_match_device(device, expected):
    found = match_device(*device)
    assert (found.name if found else None) == expected
