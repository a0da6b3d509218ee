"""GPU profiles: the files, the name syntax, and validation."""
import dataclasses
from pathlib import Path

import psutil
import pytest

from builder.plan import memory
from builder.plan.profiles import (PROFILES_DIR, GpuProfile, ProfileError, list_profiles, load_profile,
                              profile_from_toml)

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["p40", "t4", "v100-16gb", "v100-32gb", "a10", "a100-40gb", "a100-80gb", "l4",
            "rtx3090", "rtx4090", "h100-80gb", "h200-141gb", "cpu"]
GIB = 2**30


def test_list_has_every_required_profile_p40_first():
    names = list_profiles()
    assert names[0] == "p40"
    assert set(REQUIRED) <= set(names)


@pytest.mark.parametrize("path", sorted(PROFILES_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_file_validates(path):
    profile = profile_from_toml(path)
    assert profile.name == path.stem
    assert profile.process_overhead_bytes > 0
    if profile.kind == "gpu":
        assert profile.memory_bytes >= 16 * GIB
        assert profile.bandwidth_bytes_per_s >= 300e9


def test_p40_facts():
    p40 = load_profile("p40")
    assert p40.memory_bytes == 24 * GIB
    assert p40.compute_capability == (6, 1)
    assert p40.supports_bf16 is False
    assert p40.bandwidth_bytes_per_s == 346 * 10**9
    assert p40.kind == "gpu" and p40.count == 1
    assert 300 * 2**20 <= p40.process_overhead_bytes <= 1 * GIB


def test_count_suffix_and_case():
    two = load_profile("P40x2")
    assert two.name == "p40" and two.count == 2 and two.label == "p40x2"
    assert two.total_memory_bytes == 2 * 24 * GIB
    assert load_profile("rtx3090").count == 1  # the "x" inside the name is not a count
    assert load_profile(" RTX3090x4 ").count == 4


def test_unknown_name_lists_known_ones():
    with pytest.raises(ProfileError) as err:
        load_profile("p41")
    for name in REQUIRED:
        assert name in str(err.value)
    with pytest.raises(ProfileError, match="known: p40"):
        load_profile("notagpux2")


def test_zero_count_and_cpu_count_refused():
    with pytest.raises(ProfileError, match="count"):
        load_profile("p40x0")
    with pytest.raises(ProfileError, match="count"):
        load_profile("cpux2")


def test_cpu_uses_host_memory():
    cpu = load_profile("cpu")
    assert cpu.kind == "cpu" and cpu.compute_capability is None
    assert cpu.memory_bytes == psutil.virtual_memory().total
    assert cpu.process_overhead_bytes == memory.CPU_PROCESS_OVERHEAD


def test_table_gpu_overhead_matches_the_estimator_default():
    # THUDM measured the table on an A100-SXM4-80G; the estimator's default is that profile's.
    assert load_profile("a100-80gb").process_overhead_bytes == memory.DEFAULT_CUDA_PROCESS_OVERHEAD


def test_top_level_profiles_is_the_package_data():
    top = REPO / "profiles"
    assert top.resolve() == PROFILES_DIR
    assert PROFILES_DIR.parent.parent == REPO / "builder"  # inside the package: wheels carry it


GOOD = dict(name="x", description="a test GPU", memory_bytes=8 * GIB, compute_capability=(7, 5),
            supports_bf16=False, bandwidth_bytes_per_s=300 * 10**9,
            process_overhead_bytes=2**29)


@pytest.mark.parametrize("field,value", [
    ("name", "Bad Name"),
    ("description", ""),
    ("kind", "tpu"),
    ("memory_bytes", 0),
    ("memory_bytes", -1),
    ("compute_capability", (6,)),
    ("compute_capability", None),
    ("supports_bf16", True),  # with compute capability 7.5
    ("supports_bf16", "yes"),
    ("bandwidth_bytes_per_s", 0),
    ("process_overhead_bytes", -5),
    ("process_overhead_bytes", 9 * GIB),
    ("count", 0),
])
def test_bad_values_name_the_field(field, value):
    GpuProfile(**GOOD)  # the base is valid
    with pytest.raises(ProfileError, match=f"'{field}'") as err:
        GpuProfile(**{**GOOD, field: value})
    assert repr(value) in str(err.value)


def test_profile_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_profile("p40").memory_bytes = 1


def test_bad_files(tmp_path):
    (tmp_path / "good.toml").write_text((PROFILES_DIR / "t4.toml").read_text().replace(
        'name = "t4"', 'name = "good"'))
    assert load_profile("good", tmp_path).compute_capability == (7, 5)
    (tmp_path / "extra.toml").write_text('name = "extra"\nspeed = 3\n')
    with pytest.raises(ProfileError, match="unknown key.*speed"):
        load_profile("extra", tmp_path)
    (tmp_path / "renamed.toml").write_text((PROFILES_DIR / "t4.toml").read_text())
    with pytest.raises(ProfileError, match="must match"):
        load_profile("renamed", tmp_path)
    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile("broken", tmp_path)
    (tmp_path / "gpuhost.toml").write_text((PROFILES_DIR / "t4.toml").read_text().replace(
        'name = "t4"', 'name = "gpuhost"').replace("memory_gib = 16", 'memory_gib = "host"'))
    with pytest.raises(ProfileError, match="memory_gib"):
        load_profile("gpuhost", tmp_path)
