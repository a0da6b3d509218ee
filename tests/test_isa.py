"""The kernel, quantization and loading tests again under every CPU capability this host has.

torch picks its kernels by CPU capability (DEFAULT, AVX2, AVX512 on x86) and honours
``ATEN_CPU_CAPABILITY`` to pick a lower one. A weight the AVX2 kernel reads fine has faulted the
AVX-512 one, so a suite green on one host crashed on another: here each capability the CPU offers
re-runs those tests in a child process (a crash there is a failure here, not a dead pytest).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ("tests/test_kernels.py", "tests/test_quantize.py", "tests/test_prequantized.py",
                "tests/test_checkpoint.py")
# What the CPU must offer for torch to run each capability's kernels (ATen's own checks).
NEEDS = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}


def host_capabilities() -> list[str]:
    """The capabilities this CPU can run, lowest first, from /proc/cpuinfo's flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ["default"]
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    return [name for name, needed in NEEDS.items() if needed <= flags]


def test_the_host_offers_its_own_capability():
    assert torch.backends.cpu.get_cpu_capability().lower() in host_capabilities() + ["vsx", "zvector", "sve256"]


@pytest.mark.parametrize("capability", list(NEEDS))
def test_kernel_tests_pass_under(capability):
    if capability not in host_capabilities():
        pytest.skip(f"this CPU cannot run torch's {capability} kernels")
    if capability == torch.backends.cpu.get_cpu_capability().lower():
        pytest.skip(f"{capability} is this process's own capability: the suite itself ran them")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    seen = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert seen.lower() == capability
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"under ATEN_CPU_CAPABILITY={capability} (exit {result.returncode}, "
                                    f"negative: killed by signal):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
