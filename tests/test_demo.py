"""`make demo` end to end: ``builder.demo.main()`` on the embedded model, with its own Triton."""
from __future__ import annotations

import re

import pytest

import builder.demo

pytestmark = pytest.mark.server

ANSWER = "3只鸡有6条腿，2只兔子有8条腿，一共有"  # the held-out question's answer format


def test_make_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    out = tmp_path / "generated_repo"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builder.demo, "OUT", out)
    builder.demo.main()
    text = capsys.readouterr().out
    for label in ("fp32", "int8", "int4"):  # 1. locally, each precision
        assert re.search(rf"^\[{label}\] {builder.demo.QUESTION} → {ANSWER}\d+条腿。$", text, re.M)
    # 2. the 6B plans, then the build
    assert "refused, as expected: cannot place fp16+int8+int4 of ChatGLM2-6B on p40" in text
    assert "GPU 0 (24.00 GiB): fits chatglm2-6b-int8 + chatglm2-6b-int4" in text
    assert f"Wrote {out}/ (report.md, build.json, memory.png)." in text
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "chatglm2-6b", "chatglm2-6b-fp16", "chatglm2-6b-int4", "chatglm2-6b-int8",
        "chatglm2-6b-stream"]
    # 3. the deploy folder beside it
    assert f"Wrote {out.parent / 'deploy'}/: Dockerfile, README.md, kubernetes/deployment.yaml" in text
    assert (out.parent / "deploy" / "kserve" / "inferenceservice.yaml").is_file()
    # 4. served: one question through the router, one streamed
    assert re.search(r"^ready in [\d.]+ s: HTTP 127\.0\.0\.1:\d+, gRPC 127\.0\.0\.1:\d+", text, re.M)
    assert re.search(rf"^answer:  {ANSWER}\d+条腿。\nvariant: fp16\nlatency: \d+ ms$", text, re.M)
    assert re.search(r"^streamed: \.+ \S.*  \(variant fp16\)$", text, re.M)
    # ... and one through the OpenAI-compatible endpoint, with the openai SDK
    assert re.search(rf"^OpenAI endpoint ready: http://127\.0\.0\.1:\d+/v1\n", text, re.M)
    assert re.search(rf"^answer:  {ANSWER}\d+条腿。\nserved:  glm-fp16 \(finish_reason stop, \d+ tokens", text, re.M)
    # 5. the report, and nothing left running
    assert f"== memory report: {out / 'report.md'}\n# glm-build report" in text
    assert text.rstrip().endswith("== stopping the server\nstopped: no server or stub process left")
