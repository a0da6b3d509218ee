"""`glm-build deploy`: the Dockerfile, the Kubernetes manifests and the KServe InferenceService, checked
offline against the Kubernetes API schemas (kubernetes-validate) and KServe's v1beta1 CRD schema
(vendored in tests/data), and against the plan they were made from."""
from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from builder import CHATGLM2_6B
from builder.cli import build_deploy_parser, main
from builder.deploy import DeployError, DeployOptions, deploy
from builder.deploy.image import CU126, TRITON_IMAGE, runs_as, torch_build
from builder.deploy.pod import SHM_PER_STUB_BYTES, pod_plan
from builder.deploy.repository import BuiltRepository
from builder.plan.placement import make_plan
from builder.plan.profiles import load_profile
from builder.build.templates import ROUTER_INSTANCES
from builder.serving.cli import build_parser as serve_parser
from builder.serving.cli import options_from_args as serve_options, parse_args as serve_args

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # bundled by kubernetes-validate 1.37.0
KSERVE_SCHEMA = Path(__file__).parent / "data" / "kserve-inferenceservice-v1beta1.schema.json"
# the real model's plans: what each profile's pod must ask for
CASES = {"p40": ("int4", 1), "p40x2": ("fp16,int8,int4", 2), "a100-80gb": ("fp16,int8,int4", 1),
         "cpu": ("int8,int4", 0)}
SHARD = 1_980_000_000  # THUDM's chatglm2-6b shards are at most ~2 GB


def spec_repository(folder: Path, gpu: str, quant: str) -> Path:
    """A repository's build.json for ChatGLM2-6B's plan on ``gpu`` (the 6B cannot be built here:
    no weights; what deploy reads is the plan and the weights' sizes)."""
    plan = make_plan(CHATGLM2_6B, quant, load_profile(gpu))
    folder.mkdir(parents=True)
    variants = {p.variant.name: {"location": "1/weights", "inside_repository": True,
                                 "quantized_at_build": p.variant.bits != 16,
                                 "bytes": p.weights_bytes,
                                 "largest_file_bytes": min(p.weights_bytes, SHARD)
                                 if p.variant.bits == 16 else p.weights_bytes}
                for p in plan.placements}
    record = {"glm_build": "0.1.0", "plan": plan.as_dict(),
              "inputs": {"quantize_at": "build", "profile": asdict(plan.profile),
                         "model": {"config": asdict(CHATGLM2_6B), "files": {}}},
              "weights": {"mode": "link", "uri": None, "files": {}, "variants": variants}}
    (folder / "build.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module", params=sorted(CASES))
def deployed(request, tmp_path_factory):
    gpu = request.param
    quant, _ = CASES[gpu]
    root = tmp_path_factory.mktemp(f"deploy-{gpu}")
    repo = spec_repository(root / "repo", gpu, quant)
    result = deploy(DeployOptions(repo=repo, out=root / "deploy", replicas=2, max_replicas=6,
                                  namespace="llm", image="registry.example/glm:0.1.0"))
    return gpu, BuiltRepository.read(repo), result


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests(out: Path) -> dict[str, dict]:
    docs = [d for f in sorted((out / "kubernetes").glob("*.yaml")) for d in documents(f)]
    return {d["kind"]: d for d in docs}


# -- schemas --------------------------------------------------------------------------------------
def test_kubernetes_manifests_validate_against_the_api_schemas(deployed):
    _, _, result = deployed
    kinds = manifests(result.out)
    assert set(kinds) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for version in KUBERNETES_VERSIONS:
        for doc in kinds.values():  # strict: an unknown field is an error, not dropped
            kubernetes_validate.validate(doc, version, strict=True)


def strict(schema):
    """The CRD schema as the API server prunes: an object's unknown fields are refused."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


@pytest.fixture(scope="module")
def kserve_validator():
    return jsonschema.Draft7Validator(strict(json.loads(KSERVE_SCHEMA.read_text())))


def test_inference_service_validates_against_kserve_v1beta1(deployed, kserve_validator):
    _, _, result = deployed
    (isvc,) = documents(result.out / "kserve" / "inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    errors = [f"{list(e.path)}: {e.message}" for e in kserve_validator.iter_errors(isvc)]
    assert errors == []


def test_the_kserve_schema_check_catches_mistakes(deployed, kserve_validator):
    _, _, result = deployed
    (isvc,) = documents(result.out / "kserve" / "inferenceservice.yaml")
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["scaleMetrics"] = typo["spec"]["predictor"].pop("scaleMetric")
    wrong = copy.deepcopy(isvc)
    wrong["spec"]["predictor"]["scaleMetric"] = "qps"
    for bad in (typo, wrong):
        assert list(kserve_validator.iter_errors(bad))


# -- against the plan ------------------------------------------------------------------------------
def container(doc: dict) -> dict:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]["predictor"]
    (only,) = spec["containers"]
    return only


def test_the_pod_asks_for_what_the_plan_placed(deployed):
    gpu, built, result = deployed
    kinds = manifests(result.out)
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    resources = container(deployment)["resources"]
    _, gpus = CASES[gpu]
    assert built.gpu_count == gpus == len({p.device for p in built.plan.placements} - {None})
    if gpus:
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == str(gpus)
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
        assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "In",
                                             "values": list(load_profile(built.plan.profile.name).gpu_products)}]
    else:
        assert "nvidia.com/gpu" not in resources["limits"] and "affinity" not in pod
    memory = resources["requests"]["memory"]
    assert memory == resources["limits"]["memory"]
    mib = int(memory.removesuffix("Mi"))
    plan_bytes = sum(p.need_bytes for p in built.plan.placements) if gpu == "cpu" else sum(
        built.largest_file_bytes(p) for p in built.plan.placements)
    assert mib * 2**20 > plan_bytes
    # and not much more: a CPU pod within 25% of the plan's need (its KV pools full); a GPU pod's
    # host memory only stages weights, below what the plan puts on its GPUs
    need = sum(p.need_bytes for p in built.plan.placements)
    assert mib * 2**20 < (1.25 * need if gpu == "cpu" else need)
    stubs = len(built.plan.placements) + sum(ROUTER_INSTANCES.values())
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{stubs * SHM_PER_STUB_BYTES // 2**20}Mi"}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["glm-build/profile"] == built.plan.profile.label
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_probes_start_up_budget_and_scrape_annotations(deployed):
    _, built, result = deployed
    plan = pod_plan(built)
    deployment = manifests(result.out)["Deployment"]
    c = container(deployment)
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == plan.startup_budget_s
    assert plan.startup_budget_s >= 2 * plan.load_estimate_s
    assert [c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")] == [
        "/v2/health/live", "/v2/health/live", "/v2/health/ready"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    served = serve_args(c["args"])  # glm-serve's own parser: the ports it will listen on
    assert (served.http_port, served.grpc_port, served.metrics_port, served.openai_port) == (
        ports["http"], ports["grpc"], ports["metrics"], ports["openai"])
    assert served.address == "0.0.0.0"


def test_service_pdb_rollout_and_autoscaler_agree(deployed):
    _, _, result = deployed
    kinds = manifests(result.out)
    deployment, service = kinds["Deployment"], kinds["Service"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector == kinds["PodDisruptionBudget"]["spec"]["selector"][
        "matchLabels"]
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc", "metrics", "openai"}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {
        p["name"] for p in container(deployment)["ports"]}
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert deployment["spec"]["replicas"] == 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "glm_requests_in_flight"
    rules = yaml.safe_load((result.out / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = rules["rules"]["custom"]
    assert rule["name"]["as"] == "glm_requests_in_flight"
    assert "glm_batch_running_requests" in rule["metricsQuery"] and "glm_batch_queued_requests" in rule[
        "metricsQuery"]
    for doc in kinds.values():
        assert doc["metadata"]["namespace"] == "llm"


def test_inference_service_has_the_same_pod(deployed):
    _, _, result = deployed
    deployment = manifests(result.out)["Deployment"]
    (isvc,) = documents(result.out / "kserve" / "inferenceservice.yaml")
    predictor, c = isvc["spec"]["predictor"], container(isvc)
    assert c["resources"] == container(deployment)["resources"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        ours, theirs = container(deployment)[probe], c[probe]
        assert {**ours, "httpGet": {**ours["httpGet"], "port": 8080}} == theirs
    assert predictor["volumes"] == deployment["spec"]["template"]["spec"]["volumes"]
    assert predictor.get("affinity") == deployment["spec"]["template"]["spec"].get("affinity")
    assert (predictor["scaleMetric"], predictor["minReplicas"], predictor["maxReplicas"]) == (
        "concurrency", 2, 6)
    assert predictor["scaleTarget"] >= 1
    assert [e["name"] for e in c["env"]] == ["STORAGE_URI"]
    served = serve_args(c["args"])
    assert str(served.repo) == "/mnt/models" and served.http_port == c["ports"][0]["containerPort"] == 8080


# -- the container ---------------------------------------------------------------------------------
def dockerfile_json(text: str, instruction: str) -> list[list[str]]:
    return [json.loads(m) for m in re.findall(rf"^{instruction} (\[.*\])$", text, re.M)]


def test_dockerfile_entrypoint_is_glm_serve_with_its_restrictions(deployed, tmp_path):
    _, _, result = deployed
    text = (result.out / "Dockerfile").read_text()
    (entrypoint,) = dockerfile_json(text, "ENTRYPOINT")
    assert entrypoint == ["/opt/nvidia/nvidia_entrypoint.sh", "glm-serve"]
    runtime, baked = dockerfile_json(text, "CMD")  # the runtime stage, then the repository stage
    assert runtime[0] == "/mnt/models" and baked[0] == "/opt/glm-build/repository"
    deployment = manifests(result.out)["Deployment"]
    assert container(deployment)["args"] == baked and "command" not in container(deployment)
    for argv in (runtime, baked, container(deployment)["args"]):
        args = serve_args([str(tmp_path)] + argv[1:], serve_parser())
        options = serve_options(args)  # what glm-serve itself checks before starting
        assert options.address == "0.0.0.0" and options.restart_stubs
        assert not args.triton_args  # nothing passed through to tritonserver
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert re.search(r"^EXPOSE 8000 8001 8002 9000$", text, re.M)  # 9000: the OpenAI endpoint
    assert f"FROM {TRITON_IMAGE} AS runtime" in text and TRITON_IMAGE.endswith(":24.10-py3")
    assert "COPY glm-build /opt/glm-build/src" in text
    assert (result.out / "glm-build" / "pyproject.toml").is_file()
    assert (result.out / "glm-build" / "builder" / "serving" / "cli.py").is_file()


def test_dockerfile_pins_torch_for_the_profile(deployed):
    gpu, built, result = deployed
    text = (result.out / "Dockerfile").read_text()
    assert 'torch==2.13.0' in text
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.M).group(1)
    capability = re.search(r'glm-build\.compute-capability="([\d.]*)"', text).group(1)
    if gpu == "cpu":
        assert index == "https://download.pytorch.org/whl/cpu" and capability == ""
        return
    assert index == "https://download.pytorch.org/whl/cu126"
    assert "torch.version.cuda == '12.6'" in text  # checked when the image is built
    major, minor = built.plan.profile.compute_capability
    assert capability == f"{major}.{minor}"
    assert runs_as(torch_build(built.plan.profile), (major, minor)) is not None
    if gpu.startswith("p40"):  # Pascal: sm_61 runs the cu126 wheel's sm_60 code
        assert capability == "6.1" and runs_as(CU126, (6, 1)) == (6, 0)
        assert "sm_60" in text and "runs the sm_60 code" in text


def test_dockerfile_run_lines_are_valid_shell_and_python(deployed):
    import shlex

    _, _, result = deployed
    text = (result.out / "Dockerfile").read_text().replace("\\\n", " ")
    runs = re.findall(r"^RUN (.*)$", text, re.M)
    assert len(runs) == 2
    for run in runs:
        words = shlex.split(run)  # balanced quotes
        for i, word in enumerate(words[:-1]):
            if word == "-c" and words[i - 1] == "python3":
                compile(words[i + 1], "RUN", "exec")


def test_a_gpu_no_build_covers_is_refused():
    from dataclasses import replace

    blackwell = replace(load_profile("h100-80gb"), name="b200", compute_capability=(10, 0))
    with pytest.raises(ValueError, match="no torch 2.13.0 build here runs compute capability 10.0"):
        torch_build(blackwell)


# -- options, all or nothing, the CLI -----------------------------------------------------------------
def test_external_weights_need_a_claim_and_get_mounted(tmp_path):
    repo = spec_repository(tmp_path / "repo", "p40", "int4")
    record = json.loads((repo / "build.json").read_text())
    record["weights"]["uri"] = "/mnt/weights/chatglm2-6b"
    (repo / "build.json").write_text(json.dumps(record))
    with pytest.raises(DeployError, match="--weights-claim"):
        deploy(DeployOptions(repo=repo, out=tmp_path / "deploy"))
    assert not (tmp_path / "deploy").exists()
    result = deploy(DeployOptions(repo=repo, out=tmp_path / "deploy", weights_claim="chatglm2-weights"))
    c = container(manifests(result.out)["Deployment"])
    assert {"name": "weights", "mountPath": "/mnt/weights/chatglm2-6b", "readOnly": True} in c["volumeMounts"]
    for version in KUBERNETES_VERSIONS[:1]:
        kubernetes_validate.validate(manifests(result.out)["Deployment"], version, strict=True)


def test_written_all_or_nothing(tmp_path):
    repo = spec_repository(tmp_path / "repo", "p40", "int4")
    out = tmp_path / "deploy"
    deploy(DeployOptions(repo=repo, out=out))
    before = (out / "kubernetes" / "deployment.yaml").read_text()
    with pytest.raises(DeployError, match="--force"):
        deploy(DeployOptions(repo=repo, out=out, replicas=3))
    with pytest.raises(DeployError, match="name: 'Chat_GLM'"):
        DeployOptions(repo=repo, name="Chat_GLM")
    broken = tmp_path / "templates"
    import shutil

    from builder.deploy.manifests import TEMPLATES_DIR
    shutil.copytree(TEMPLATES_DIR, broken)
    (broken / "kubernetes" / "service.yaml.j2").write_text("spec: {{ nobody_sets_this }}\n")
    import jinja2
    with pytest.raises(jinja2.UndefinedError):
        deploy(DeployOptions(repo=repo, out=out, force=True), templates_dir=broken)
    assert (out / "kubernetes" / "deployment.yaml").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []
    deploy(DeployOptions(repo=repo, out=out, force=True, replicas=3))
    assert "replicas: 3" in (out / "kubernetes" / "deployment.yaml").read_text()


def test_cli_deploys_a_built_repository(tmp_path, capsys):
    repo = tmp_path / "generated_repo"
    assert main(["--quant", "fp16,int4", "--gpu", "p40x2", "--out", str(repo)]) == 0
    capsys.readouterr()
    status = main(["deploy", "--repo", str(repo), "--out", str(tmp_path / "deploy"), "--replicas", "3",
                   "--namespace", "llm", "--image", "registry.example/glm:1", "--target-in-flight", "6"])
    out = capsys.readouterr().out
    assert status == 0 and f"Wrote {tmp_path / 'deploy'}/" in out
    deployment = manifests(tmp_path / "deploy")["Deployment"]
    assert container(deployment)["image"] == "registry.example/glm:1"
    assert deployment["spec"]["replicas"] == 3
    hpa = manifests(tmp_path / "deploy")["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "6"
    assert main(["deploy", "--repo", str(tmp_path / "nowhere")]) == 2
    assert "no build.json" in capsys.readouterr().err
    for action in build_deploy_parser()._actions:
        assert action.help, action.dest
