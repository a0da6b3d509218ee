"""scripts/gpu_check.sh and scripts/gpu_bench.py, the parts that run without a GPU: the refusal,
argument handling, the order and budget of the steps (with a stand-in interpreter), the table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "scripts"))

import gpu_bench  # noqa: E402

GIB = 2**30


def check(*args, python=sys.executable, cwd=None, **env):
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PYTHON": str(python), **env})


def test_refuses_clearly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    result = check("--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr and "run it on a GPU host" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--steps", "tests,lunch"], "--steps takes a comma-separated list"),
    (["--generate", "fp8"], "--generate takes precisions"),
    (["--budget", "soon"], "--budget needs whole seconds"),
    (["--out"], "--out needs a folder"),
])
def test_bad_arguments_exit_2_naming_them(args, message):
    result = check(*args)
    assert result.returncode == 2 and message in result.stderr


def test_help_lists_every_step():
    result = check("--help")
    assert result.returncode == 0
    for word in ("pytest -m gpu", "28-layer", "encode:2048", "generate:8192", "glm-serve",
                 "KIND_GPU", "tokens/s", "8 minutes"):
        assert word in result.stdout, word


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for a Python with a CUDA torch: logs each call, answers what the script reads
echo "$*" >> "$LOG"
case "$*" in
  *"gpu_bench.py detect"*) echo p40 ;;
  *"gpu_bench.py table"*) echo "TABLE" ;;
  *"builder.cli --quant"*) mkdir -p "$OUT_DIR/repo/chatglm2-6b-int4"
                           echo 'kind: KIND_GPU' > "$OUT_DIR/repo/chatglm2-6b-int4/config.pbtxt" ;;
  *"gpu_bench.py bench "*) [ -n "$FAIL_BENCH" ] && exit 1 ;;
esac
exit 0
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def run_fake(fake_python, tmp_path, *args, **env):
    log, out = tmp_path / "calls.log", tmp_path / "out"
    result = check("--out", str(out), "--cache", str(tmp_path / "cache"), *args,
                   python=fake_python, LOG=str(log), OUT_DIR=str(out), **env)
    return result, log.read_text().splitlines()


def test_steps_run_in_order_and_end_with_the_table(fake_python, tmp_path):
    result, calls = run_fake(fake_python, tmp_path)
    assert result.returncode == 0, result.stderr
    steps = [c for c in calls if not c.startswith("-c ")]
    gpu_files = " ".join(f"tests/{p.name}" for p in sorted((REPO / "tests").glob("test_*.py"))
                         if "@pytest.mark." + "gpu" in p.read_text())
    assert steps[0] == f"-m pytest -m gpu -q -p no:cacheprovider {gpu_files}"
    assert "tests/test_cuda_quant.py" in gpu_files and "tests/test_deploy.py" not in gpu_files
    assert steps[1].startswith("scripts/gpu_bench.py checkpoint --cache")
    assert "profile --spec chatglm2-6b" in steps[2] and "--device cuda --quant fp16,int8,int4 " \
        "--workloads encode:2048" in steps[2]
    assert steps[3].startswith("scripts/gpu_bench.py bench --checkpoint") and "glm-synthetic-28l" in steps[3]
    assert steps[4] == "scripts/gpu_bench.py detect"
    assert steps[5].startswith("-m builder.cli --quant int4 --gpu p40 --out")
    assert steps[6].startswith("scripts/gpu_bench.py serve --repo")
    # the served table: the 28-layer checkpoint, quantized at build, graphs on then off
    assert steps[7].startswith("-m builder.cli --model") and "glm-synthetic-28l" in steps[7]
    assert "--quant fp16,int8,int4 --gpu p40 --quantize-at build --out" in steps[7]
    assert steps[8].startswith("scripts/gpu_served.py run --repo") and "--graphs on" in steps[8]
    assert steps[9].startswith("scripts/gpu_served.py run --repo") and "--graphs off" in steps[9]
    assert "--quant int4 --workloads generate:8192" in steps[10]
    assert steps[11].startswith("scripts/gpu_bench.py table")
    assert steps[12].startswith("scripts/gpu_served.py table") and "served-off.json" in steps[12]
    assert "TABLE" in result.stdout and (tmp_path / "out" / "table.md").is_file()


def test_a_failed_step_is_named_and_exits_1(fake_python, tmp_path):
    result, calls = run_fake(fake_python, tmp_path, FAIL_BENCH="1")
    assert result.returncode == 1
    assert "failed: bench" in result.stdout
    assert any("gpu_bench.py table" in c for c in calls)  # the table is printed all the same


def test_budget_skips_steps_that_no_longer_fit(fake_python, tmp_path):
    result, calls = run_fake(fake_python, tmp_path, "--budget", "0")
    assert result.returncode == 0
    assert ("skipped (budget): tests checkpoint profile-encode bench build serve served-build "
            "served-on served-off profile-generate") in result.stdout
    last = [c for c in calls if not c.startswith("-c ")][-2:]
    assert last[0].startswith("scripts/gpu_bench.py table")
    assert last[1].startswith("scripts/gpu_served.py table")


def test_steps_and_generate_choose_what_runs(fake_python, tmp_path):
    result, calls = run_fake(fake_python, tmp_path, "--steps", "generate",
                             "--generate", "fp16,int8")
    assert result.returncode == 0, result.stderr
    steps = [c for c in calls if not c.startswith("-c ")]
    assert len(steps) == 3 and "--quant fp16,int8 --workloads generate:8192" in steps[0]


def test_the_served_step_can_be_left_out(fake_python, tmp_path):
    result, calls = run_fake(fake_python, tmp_path, "--steps", "serve,generate")
    assert result.returncode == 0, result.stderr
    assert not any("gpu_served.py run" in c or "--quantize-at build" in c for c in calls)
    assert any("gpu_served.py table" in c for c in calls)  # says "served: not run"


# -- gpu_served.py -------------------------------------------------------------------------------
def test_served_arguments_levels_and_environment():
    import gpu_served

    args = gpu_served.build_parser().parse_args(["run", "--repo", "r", "--graphs", "off"])
    assert (args.levels, args.quant, args.max_token, args.graphs) == ("1,8,32", "fp16,int8,int4",
                                                                      32, "off")
    assert gpu_served.levels_of(args.levels) == [1, 8, 32]
    with pytest.raises(ValueError, match="positive integers"):
        gpu_served.levels_of("1,0")
    assert [gpu_served.requests_at(c) for c in (1, 8, 32)] == [4, 16, 64]
    base = {"PATH": "/bin", "GLM_BUILD_CUDA_GRAPHS": "1"}
    assert gpu_served.server_env(False, base) == {"PATH": "/bin", "GLM_BUILD_CUDA_GRAPHS": "0"}
    assert gpu_served.server_env(True, base) == {"PATH": "/bin"}
    assert [label for label, _ in gpu_served.targets(["fp16", "int4"])] == ["router", "fp16", "int4"]
    assert gpu_served.targets(["int4"])[1][1] == "chatglm2-6b-int4"


def test_served_table_puts_router_first_and_graphs_on_before_off(tmp_path, capsys):
    import gpu_served

    def row(target, graphs, c, tps):
        return {"target": target, "graphs": graphs, "concurrency": c, "requests": 2 * c, "lost": 0,
                "tokens_per_s": tps, "ttft_p50_s": 0.04, "ttft_p95_s": 0.2, "tpot_p50_s": 0.01}

    (tmp_path / "on.json").write_text(json.dumps([row("int4", True, 8, 900.0),
                                                  row("router", True, 1, 120.0)]))
    (tmp_path / "off.json").write_text(json.dumps([row("int4", False, 8, 200.0),
                                                   {"target": "glm-serve", "graphs": False,
                                                    "error": "RuntimeError: not ready"}]))
    assert gpu_served.main(["table", str(tmp_path / "on.json"), str(tmp_path / "off.json"),
                            str(tmp_path / "missing.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| router | on | 1 | 120.0 | 40 / 200 | 10.0 | 0/2 |"
    assert lines[3].startswith("| glm-serve | off | – | RuntimeError: not ready")
    assert lines[4:] == ["| int4 | on | 8 | 900.0 | 40 / 200 | 10.0 | 0/16 |",
                         "| int4 | off | 8 | 200.0 | 40 / 200 | 10.0 | 0/16 |"]
    assert gpu_served.main(["table", str(tmp_path / "missing.json")]) == 0
    assert capsys.readouterr().out.strip() == "served: not run"


def test_a_server_that_never_starts_is_a_row_not_a_crash(tmp_path, monkeypatch):
    import gpu_served

    monkeypatch.setattr(gpu_served.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no glm-serve to run
    out = tmp_path / "served.json"
    assert gpu_served.main(["run", "--repo", str(tmp_path), "--out", str(out), "--timeout", "1"]) == 1
    rows = json.loads(out.read_text())
    assert rows[0]["target"] == "glm-serve" and "FileNotFoundError" in rows[0]["error"]


# -- gpu_bench.py --------------------------------------------------------------------------------
def test_bench_parser_and_bench_one_share_options():
    parser = gpu_bench.build_parser()
    args = parser.parse_args(["bench", "--checkpoint", "c", "--batch", "4"])
    assert (args.quant, args.new_tokens, args.batch, args.gpu) == ("fp16,int8,int4", 64, 4, None)
    one = parser.parse_args(["bench-one", "--checkpoint", "c", "--precision", "int8", "--gpu", "t4"])
    assert (one.precision, one.gpu, one.new_tokens) == ("int8", "t4", 64)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench"])  # --checkpoint is required


@pytest.mark.parametrize("command", [["detect"], ["bench", "--checkpoint", "c"]])
def test_gpu_commands_refuse_without_a_gpu(command, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    assert gpu_bench.main(command) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def record(precision, phase, tokens, measured, estimated, published, overhead):
    return {"precision": precision, "phase": phase, "tokens": tokens, "measured_bytes": measured,
            "estimated_bytes": estimated, "published_bytes": published,
            "details": {"gpu": "Tesla P40", "profile_overhead_bytes": overhead}}


def test_table_puts_every_result_in_one_row_per_precision(tmp_path, capsys):
    from builder.plan.memory import DEFAULT_CUDA_PROCESS_OVERHEAD as A100

    p40 = 736 * 2**20
    encode = [record("fp16", "encode", 2048, 13 * GIB, 13 * GIB, int(13.1 * GIB), p40),
              record("int4", "encode", 2048, 5 * GIB, 5 * GIB + A100 - p40, int(5.5 * GIB), p40)]
    generate = [record("int4", "generate", 8192, int(4.5 * GIB), 5 * GIB, int(5.1 * GIB), p40)]
    for name, records in (("enc", encode), ("gen", generate)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "profile.json").write_text(json.dumps(records))
    bench = [{"precision": "fp16", "gpu": "Tesla P40", "profile": "p40", "decode_ms": 40.0,
              "kernel": "cuBLAS fp16", "batch": 8, "batched_tokens_per_s": 150.0,
              "peak_bytes": 13 * GIB, "plan_bytes": 14 * GIB, "bandwidth_share": 0.8},
             {"precision": "int4", "error": "failed: CUDA out of memory"}]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "tests.log").write_text("....\n===== 9 passed, 1 skipped in 3.1s =====\n")
    (tmp_path / "serve.json").write_text(json.dumps({"ok": True, "seconds": 0.8, "answer": "2",
                                                    "variant": "int4"}))
    assert gpu_bench.main(["table", "--profile", str(tmp_path / "enc"), str(tmp_path / "gen"),
                           str(tmp_path / "missing"), "--bench", str(tmp_path / "bench.json"),
                           "--tests", str(tmp_path / "tests.log"),
                           "--serve", str(tmp_path / "serve.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "GPU: Tesla P40 (profile p40)"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert rows["fp16"] == ("| fp16 | 13.00 / 12.84 / 13.10 | – | 40.00 (cuBLAS fp16) | – | 80% | "
                            "150.0 | 13.00 / 14.00 |")
    # the estimate is shown with the P40's per-process overhead, not the A100's
    assert rows["int4"] == ("| int4 | 5.00 / 5.00 / 5.50 | 4.50 / 4.84 / 5.10 | failed: CUDA out of "
                            "memory | – | – | – | – |")
    assert lines[-2] == "CUDA tests: 9 passed, 1 skipped in 3.1s"
    assert lines[-1] == "glm-serve round trip (KIND_GPU): ok in 0.8 s (int4): '2'"


def test_table_says_what_did_not_run(tmp_path, capsys):
    assert gpu_bench.main(["table", "--tests", str(tmp_path / "none.log"),
                           "--serve", str(tmp_path / "none.json")]) == 0
    out = capsys.readouterr().out
    assert "CUDA tests: not run" in out and "round trip (KIND_GPU): not run" in out


def test_speed_helpers_run_a_real_model(tiny):
    """What bench-one times, on the tiny model on the CPU: greedy decode, a batch decoded together."""
    model, tokenizer = tiny
    vocab = model.config.vocab_size
    assert gpu_bench._decode_ms(model, vocab, 6) > 0
    assert gpu_bench._batched_tokens_per_s(model, vocab, 3, 4) > 0
