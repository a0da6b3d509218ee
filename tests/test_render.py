"""The rendered repository: Triton-valid configs, the serving contract, the reports, and the
all-or-nothing write."""
import hashlib
import json
import shutil
from pathlib import Path

import jinja2
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import builder.build.pipeline
from builder import CHATGLM2_6B
from builder.plan.placement import make_plan
from builder.plan.profiles import load_profile
from builder.build.output import OutputExistsError
from builder.build.pipeline import write_repository
from builder.build.templates import TEMPLATES_DIR, TemplateValueError, pbtxt_name, pbtxt_path, pbtxt_string
from builder.build.report import ModelSource
from builder.plan.routing import RoutingTable

from conftest import SMALL

ALL3 = ["fp16", "int8", "int4"]
REPO = Path(__file__).resolve().parents[1]
pb = model_config_pb2.ModelConfig
INPUTS = [("prompt", [1]), ("history", [-1]), ("temperature", [1]), ("max_token", [1]),
          ("history_len", [1]), ("stream", [1]),  # stream: optional, set by the routers
          ("messages", [1])]  # optional: a conversation in the family's roles (tools)
OUTPUTS = [("response", [1]), ("history", [-1, 2]), ("variant", [1])]


def fake_checkpoint(path: Path, config=SMALL) -> Path:
    """What the build looks at in a checkpoint (it never reads the weights or the tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    (path / "tokenizer.model").write_bytes(b"a sentencepiece model would be here")
    (path / "model.safetensors").write_bytes(b"weights are never read by glm-build")
    return path


def parse(path: Path):
    return text_format.Parse(path.read_text(encoding="utf-8"), pb())


def params(config) -> dict:
    return {k: v.string_value for k, v in config.parameters.items()}


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture
def checkpoint(tmp_path):
    return fake_checkpoint(tmp_path / "ckpt")


@pytest.fixture
def cpu_repo(tmp_path, checkpoint):
    plan = make_plan(SMALL, ALL3, load_profile("cpu"))
    out = write_repository(plan, checkpoint=checkpoint, out=tmp_path / "repo", progress=False)
    return plan, out


# -- the configs --------------------------------------------------------------------------------
def test_every_config_parses_as_triton_model_config(cpu_repo):
    plan, out = cpu_repo
    names = sorted(p.parent.name for p in out.glob("*/config.pbtxt"))
    assert names == ["chatglm2-6b", "chatglm2-6b-fp16", "chatglm2-6b-int4", "chatglm2-6b-int8",
                     "chatglm2-6b-stream"]
    for name in names:
        config = parse(out / name / "config.pbtxt")
        assert config.name == name and config.backend == "python" and config.max_batch_size == 0
        assert [(i.name, list(i.dims)) for i in config.input] == INPUTS
        assert [(o.name, list(o.dims)) for o in config.output] == OUTPUTS
        assert {t.data_type for t in [*config.input, *config.output]} == {model_config_pb2.TYPE_STRING}


def test_variant_configs_on_cpu(cpu_repo, checkpoint):
    plan, out = cpu_repo
    for placement in plan.placements:
        config = parse(out / placement.variant.name / "config.pbtxt")
        assert config.model_transaction_policy.decoupled is True
        (group,) = config.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU and group.count == 1
        assert list(group.gpus) == []
        v = placement.variant
        assert params(config) == {
            "checkpoint": "1/weights",  # relative to the model's folder: the repository moves
            "tokenizer": "1/weights/tokenizer.model", "family": "chatglm2-6b",
            "precision": v.precision, "bits": str(v.bits), "group_size": "0",
            "quantize_at": "initialize",
            "dtype": "bfloat16",  # every precision on a CPU
            "seq_length": str(SMALL.seq_length), "max_tokens": str(placement.max_tokens),
            "kv_blocks": str(placement.kv_blocks),
            "kv_page_size": "16",  # a CPU's pages: a chat's next turn reuses its history's blocks
            "max_batch_tokens": str(min(placement.max_tokens, 512))}
        assert placement.kv_blocks >= -(-placement.max_tokens // 16)  # one request at the limit fits


def test_router_configs(cpu_repo, checkpoint):
    plan, out = cpu_repo
    for name, decoupled in (("chatglm2-6b", False), ("chatglm2-6b-stream", True)):
        config = parse(out / name / "config.pbtxt")
        assert config.model_transaction_policy.decoupled is decoupled
        (group,) = config.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert group.count == (2 if decoupled else 8)  # see builder.build.templates.ROUTER_INSTANCES
        p = params(config)
        assert set(p) == {"routing", "tokenizer", "family", "seq_length", "fallback"}
        assert p["family"] == "chatglm2-6b"
        assert p["fallback"] == "lower"
        assert RoutingTable.from_json(p["routing"]) == plan.routing_table()
        assert [r["precision"] for r in json.loads(p["routing"])] == ALL3
        assert p["tokenizer"] == "1/tokenizer.model"
        assert (out / name / "1" / "tokenizer.model").read_bytes() == (
            checkpoint / "tokenizer.model").read_bytes()


def test_gpu_placement_reaches_instance_group(tmp_path, checkpoint):
    plan = make_plan(CHATGLM2_6B, ALL3, load_profile("p40x2"))
    out = write_repository(plan, checkpoint=checkpoint, out=tmp_path / "repo", progress=False)
    for placement in plan.placements:
        config = parse(out / placement.variant.name / "config.pbtxt")
        (group,) = config.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert list(group.gpus) == [placement.device]
        assert params(config)["dtype"] == "float16"
        assert params(config)["seq_length"] == "32768"
    assert {p.device for p in plan.placements} == {0, 1}
    router = parse(out / "chatglm2-6b" / "config.pbtxt")
    assert router.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_model_py_is_thin(cpu_repo):
    _, out = cpu_repo
    for name, module in (("chatglm2-6b-int4", "variant"), ("chatglm2-6b", "router"),
                         ("chatglm2-6b-stream", "router")):
        source = (out / name / "1" / "model.py").read_text()
        compile(source, name, "exec")
        code = [line for line in source.splitlines() if line and not line.startswith(" ")
                and not line.startswith('"""')]
        assert f"from builder.serving.{module} import TritonPythonModel  # noqa: F401" in code
        assert "Generated by glm-build" in source and name in source
    assert "streaming" in (out / "chatglm2-6b-stream" / "1" / "model.py").read_text()


# -- values that reach config.pbtxt ------------------------------------------------------------
def test_filters_escape_or_refuse():
    value = '[{"name": "a\\b"}]'
    assert text_format.Parse(f'name: "{pbtxt_string(value)}"', pb()).name == value
    for bad in ("two\nlines", "nul\x00"):
        with pytest.raises(TemplateValueError, match="newline or control"):
            pbtxt_string(bad)
    with pytest.raises(TemplateValueError, match=r"must match \[A-Za-z0-9_.-\]\+"):
        pbtxt_name('x" }')
    assert pbtxt_path("1/weights") == "1/weights"  # relative to the model's folder
    with pytest.raises(TemplateValueError, match="inside the model's folder"):
        pbtxt_path("../chatglm2-6b-fp16/1/weights")
    with pytest.raises(TemplateValueError, match="newlines or control characters"):
        pbtxt_path("/tmp/a\nb")
    assert pbtxt_path("/tmp/模型 dir") == "/tmp/模型 dir"
    # quotes and backslashes are legal in a folder name: escaped where the path is written
    assert pbtxt_path('/tmp/a"b\\c') == '/tmp/a"b\\c'
    assert text_format.Parse(f'name: "{pbtxt_string(pbtxt_path(chr(34)))}"', pb()).name == '"'


def test_a_weights_uri_that_would_break_the_syntax_is_refused(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    plan = make_plan(SMALL, ["int4"], load_profile("cpu"))
    with pytest.raises(TemplateValueError, match="newlines"):
        write_repository(plan, checkpoint=checkpoint, out=tmp_path / "repo", progress=False,
                          weights_uri='/mnt/bad\nname')
    assert not (tmp_path / "repo").exists() and leftovers(tmp_path) == []


# -- all or nothing -----------------------------------------------------------------------------
def test_existing_output_is_refused_without_force(cpu_repo, checkpoint):
    plan, out = cpu_repo
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match="already exists.*--force"):
        write_repository(plan, checkpoint=checkpoint, out=out, progress=False)
    assert snapshot(out) == before


def test_force_replaces_and_keeps_the_git_readme(tmp_path, checkpoint):
    out = tmp_path / "generated_repo"
    out.mkdir()
    (out / "README.md").write_text("kept in git\n")
    first = make_plan(SMALL, ALL3, load_profile("cpu"))
    write_repository(first, checkpoint=checkpoint, out=out, progress=False)  # README only: free
    assert (out / "README.md").read_text() == "kept in git\n"
    second = make_plan(SMALL, ["int4"], load_profile("cpu"))
    write_repository(second, checkpoint=checkpoint, out=out, force=True, progress=False)
    assert not (out / "chatglm2-6b-fp16").exists() and (out / "chatglm2-6b-int4").is_dir()
    assert (out / "README.md").read_text() == "kept in git\n"
    assert leftovers(tmp_path) == []


def test_force_never_replaces_a_folder_that_is_not_a_build(tmp_path, checkpoint):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    plan = make_plan(SMALL, ["int4"], load_profile("cpu"))
    with pytest.raises(OutputExistsError, match="not a glm-build output"):
        write_repository(plan, checkpoint=checkpoint, out=out, force=True, progress=False)
    assert (out / "thesis.tex").read_text() == "precious"


def test_a_template_with_an_undefined_value_leaves_the_old_output(tmp_path, cpu_repo, checkpoint):
    plan, out = cpu_repo
    before = snapshot(out)
    broken = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, broken)
    with (broken / "router.config.pbtxt.j2").open("a") as f:
        f.write("# {{ not_a_value_anyone_passes }}\n")
    with pytest.raises(jinja2.UndefinedError, match="not_a_value_anyone_passes"):
        write_repository(plan, checkpoint=checkpoint, out=out, force=True,
                          templates_dir=broken, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_failure_midway_leaves_the_old_output(tmp_path, cpu_repo, checkpoint, monkeypatch):
    plan, out = cpu_repo
    before = snapshot(out)

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(builder.build.pipeline, "write_report", fail)
    with pytest.raises(OSError, match="simulated"):
        write_repository(plan, checkpoint=checkpoint, out=out, force=True, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []


# -- build.json, report.md, memory.png ---------------------------------------------------------
def test_build_json_records_inputs_versions_plan(cpu_repo, checkpoint):
    plan, out = cpu_repo
    record = json.loads((out / "build.json").read_text())
    files = record["inputs"]["model"]["files"]
    assert set(files) == {"config.json", "tokenizer.model", "model.safetensors"}
    for name, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    templates = record["inputs"]["templates"]
    assert "variant.config.pbtxt.j2" in templates and "router.model.py.j2" in templates
    assert set(record["versions"]) >= {"torch", "transformers", "builder", "python"}
    assert record["plan"] == plan.as_dict()
    cells = record["estimates"]["chatglm2_6b_vs_published"]
    assert {(c["precision"], c["phase"]) for c in cells} == {
        (p, ph) for p in ALL3 for ph in ("encode", "generate")}
    assert all(abs(c["error"]) <= 0.10 for c in cells)


def test_report_compares_with_the_table_and_says_it_is_the_demo(tmp_path, checkpoint):
    plan = make_plan(SMALL, ["fp16", "int4"], load_profile("cpu"))
    source = ModelSource(SMALL, "the embedded demo model (a tiny ChatGLM2, not ChatGLM2-6B)", "",
                         checkpoint, is_demo=True)
    profiles = tmp_path / "profiling"
    profiles.mkdir()
    (profiles / "profile.md").write_text("# profile\n")
    out = write_repository(plan, checkpoint=checkpoint, out=tmp_path / "repo", source=source,
                            profile_dir=profiles, progress=False)
    report = (out / "report.md").read_text()
    assert "embedded demo model" in report and "NOT ChatGLM2-6B" in report
    assert "GiB (2^30 bytes)" in report
    assert "| fp16 | encode 2048 | 13.1 |" in report and "| int4 | generate 8192 | 5.1 |" in report
    assert "## ChatGLM2-6B on cpu" in report
    assert "[profile.md](../profiling/profile.md)" in report
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "demo model" in (out / "chatglm2-6b-int4" / "config.pbtxt").read_text()


def test_quantize_at_build_points_variants_at_the_saved_weights(tmp_path, checkpoint,
                                                                monkeypatch):
    import builder.model.checkpoint

    calls = []

    def save_quantized(src, dst, bits, group_size=None, progress=None, dtype=None):
        calls.append((Path(src), Path(dst).relative_to(Path(dst).parents[2]).as_posix(), bits,
                      group_size, str(dtype)))
        Path(dst).mkdir(parents=True)
        (Path(dst) / "model.safetensors").write_bytes(b"quantized")

    monkeypatch.setattr(builder.model.checkpoint, "save_quantized", save_quantized)
    plan = make_plan(SMALL, ALL3, load_profile("cpu"))
    out = write_repository(plan, checkpoint=checkpoint, out=tmp_path / "repo",
                            quantize_at="build", progress=False)
    # the float tensors in what the variants compute in: bfloat16 on a CPU
    assert calls == [(checkpoint.resolve(), "chatglm2-6b-int8/1/weights", 8, None, "torch.bfloat16"),
                     (checkpoint.resolve(), "chatglm2-6b-int4/1/weights", 4, None, "torch.bfloat16")]
    int4 = params(parse(out / "chatglm2-6b-int4" / "config.pbtxt"))
    assert int4["checkpoint"] == "1/weights" and int4["quantize_at"] == "build"
    assert (out / "chatglm2-6b-int4" / "1" / "weights" / "model.safetensors").is_file()
    fp16 = params(parse(out / "chatglm2-6b-fp16" / "config.pbtxt"))
    assert fp16["checkpoint"] == "1/weights" and fp16["quantize_at"] == "initialize"
    assert snapshot(out / "chatglm2-6b-fp16" / "1" / "weights") == snapshot(checkpoint)
    assert not (out / "weights").exists()  # Triton refuses a top-level folder that is no model


def test_quantize_at_build_writes_loadable_thudm_weights(tmp_path):
    """The real quantizer, on the embedded checkpoint: the variant's weights load as they are."""
    import json

    from builder import TINY_CHECKPOINT, load_chatglm2
    from builder.model.config import ChatGLM2Config

    config = ChatGLM2Config.from_json(TINY_CHECKPOINT / "config.json")
    plan = make_plan(config, ["int4"], load_profile("cpu"))
    out = write_repository(plan, checkpoint=TINY_CHECKPOINT, out=tmp_path / "repo",
                            quantize_at="build", progress=False)
    weights = out / "chatglm2-6b-int4" / params(parse(out / "chatglm2-6b-int4" / "config.pbtxt"))["checkpoint"]
    assert weights == out / "chatglm2-6b-int4" / "1" / "weights"
    assert json.loads((weights / "config.json").read_text())["quantization_bit"] == 4
    model, _ = load_chatglm2(weights)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    assert leftovers(tmp_path) == []


def test_variants_link_points_into_the_package():
    link = REPO / "variants"
    assert link.is_symlink() and link.resolve() == TEMPLATES_DIR


def test_the_fallback_policy_reaches_the_routers(tmp_path, checkpoint):
    from builder.build.pipeline import BuildError, BuildOptions, build

    out = build(BuildOptions(quant=("int8", "int4"), gpu="cpu", model=str(checkpoint), out=tmp_path / "r",
                             fallback="none"), progress=False).out
    for name in ("chatglm2-6b", "chatglm2-6b-stream"):
        assert params(parse(out / name / "config.pbtxt"))["fallback"] == "none"
    with pytest.raises(BuildError, match="fallback: must be one of none, lower, any, got 'up'"):
        BuildOptions(quant=("int4",), gpu="cpu", fallback="up")
