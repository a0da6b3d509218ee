#!/usr/bin/env bash
# The GPU check: one command, under 8 minutes on one GPU, one table at the end.
#
#   scripts/gpu_check.sh [--out DIR] [--cache DIR] [--steps LIST] [--generate LIST] [--gpu NAME]
#                        [--budget SECONDS]
#
# Steps (--steps, default all of tests,checkpoint,encode,bench,serve,served,generate), in order, each
# capped so that the whole stays inside --budget (default 470 s; a step that no longer fits is
# skipped and the table says so). The table reads every result under --out (default out/gpu-check),
# so a later `--steps generate --generate fp16,int8` adds the cells a first run had no time for:
#   1. the CUDA tests (pytest -m gpu);
#   2. a 28-layer checkpoint with ChatGLM2-6B's shapes and random weights (12.5 GB, written once
#      into --cache, where `glm-build profile --spec chatglm2-6b` finds it again);
#   3. glm-build profile --device cuda, fp16/int8/int4 at encode:2048 (the published table's);
#   4. decode ms/token (fused kernel and row-block extraction), batched tokens/s and peak memory
#      against the plan, per precision (scripts/gpu_bench.py bench);
#   5. one glm-serve round trip on KIND_GPU: the embedded tiny model built for --gpu (default: the
#      detected card's profile, else a100-80gb), one chat request;
#   6. the served table: the 28-layer checkpoint built for the GPU with --quantize-at build
#      (fp16, int8, int4), glm-serve through the router and each variant, c = 1, 8, 32: tokens/s,
#      TTFT p50/p95, time per output token, with CUDA graphs on and off (GLM_BUILD_CUDA_GRAPHS=0)
#      (scripts/gpu_served.py); skip it with --steps leaving out served;
#   7. glm-build profile at generate:8192 for --generate (default int4: ~8,200 decode steps per
#      precision, 2-3 minutes each with its load, do not fit 8 minutes for all three).
# Exit status: 0 every step ran and passed, 1 one did not (the table says which), 2 no GPU or a
# bad argument. Python: $PYTHON, else .venv/bin/python, else python3.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here" || exit 2
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3; fi

out=out/gpu-check  # /out/ is git-ignored
cache="${TMPDIR:-/tmp}"
generate=int4
gpu=""
budget=470
steps=tests,checkpoint,encode,bench,serve,served,generate

usage() { sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || die "--out needs a folder"; out="$2"; shift 2 ;;
        --cache) [[ $# -ge 2 ]] || die "--cache needs a folder"; cache="$2"; shift 2 ;;
        --generate) [[ $# -ge 2 ]] || die "--generate needs a list (or none)"; generate="$2"; shift 2 ;;
        --gpu) [[ $# -ge 2 ]] || die "--gpu needs a profile name"; gpu="$2"; shift 2 ;;
        --budget) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--budget needs whole seconds, got '${2:-}'"
                  budget="$2"; shift 2 ;;
        --steps) [[ "${2:-}" =~ ^(tests|checkpoint|encode|bench|serve|served|generate)(,(tests|checkpoint|encode|bench|serve|served|generate))*$ ]] \
                     || die "--steps takes a comma-separated list of tests,checkpoint,encode,bench,serve,served,generate, got '${2:-}'"
                 steps="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) sed -n '4,5p' "$0" | sed 's/^#/usage:/' >&2; die "unknown argument '$1' (--help says more)" ;;
    esac
done
[[ "$generate" =~ ^(fp16|int8|int4|int4-g128)(,(fp16|int8|int4|int4-g128))*$ ]] \
    || die "--generate takes precisions such as int4 or fp16,int8, got '$generate'"
wants() { [[ ",$steps," == *",$1,"* ]]; }

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    version="$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not importable')"
    die "no CUDA GPU: torch ($version, from $py) sees none. This check needs one NVIDIA GPU and a CUDA build of torch; run it on a GPU host (PYTHON=... to pick the interpreter)."
fi

mkdir -p "$out" || die "cannot create $out"
failed=()
skipped=()
# step NAME MIN CAP COMMAND...: runs COMMAND for at most CAP seconds (less if the budget is short;
# skipped when less than MIN is left)
step() {
    local name="$1" min="$2" cap="$3"; shift 3
    local left=$(( budget - SECONDS ))
    if (( left < min )); then skipped+=("$name"); echo "== $name: skipped (${left} s left)" >&2; return 0; fi
    (( cap > left )) && cap=$left
    echo "== $name (at most ${cap} s)" >&2
    if ! timeout --signal=INT --kill-after=15 "$cap" "$@" >"$out/$name.log" 2>&1; then
        failed+=("$name"); echo "   failed or timed out: see $out/$name.log" >&2
    fi
}

checkpoint="$cache/glm-synthetic-28l"  # builder.profile.SYNTHETIC_DIR
# Only the files that hold GPU tests are collected: collecting them all would need the dev-only
# packages (kubernetes-validate, jsonschema) that a GPU host serving the model has no use for.
mapfile -t gpu_tests < <(grep -l '@pytest\.mark\.gpu' tests/test_*.py)
wants tests && step tests 20 90 "$py" -m pytest -m gpu -q -p no:cacheprovider "${gpu_tests[@]}"
wants checkpoint && step checkpoint 60 200 "$py" scripts/gpu_bench.py checkpoint --cache "$cache"
wants encode && step profile-encode 60 200 "$py" -m builder.cli profile --spec chatglm2-6b \
    --cache-dir "$cache" --device cuda --quant fp16,int8,int4 --workloads encode:2048 \
    --out "$out/profile-encode"
wants bench && step bench 60 180 "$py" scripts/gpu_bench.py bench --checkpoint "$checkpoint" \
    --quant fp16,int8,int4 ${gpu:+--gpu "$gpu"} --out "$out/bench.json"
if wants serve; then
    [[ -n "$gpu" ]] || gpu="$("$py" scripts/gpu_bench.py detect 2>/dev/null || echo a100-80gb)"
    step build 20 60 "$py" -m builder.cli --quant int4 --gpu "$gpu" --out "$out/repo" --force
    if [[ " ${skipped[*]} " == *" build "* ]]; then
        skipped+=("serve")
    elif [[ " ${failed[*]} " == *" build "* ]]; then
        echo '{"ok": false, "error": "glm-build failed: see build.log"}' >"$out/serve.json"
    elif grep -qs KIND_GPU "$out"/repo/*/config.pbtxt; then
        step serve 40 150 "$py" scripts/gpu_bench.py serve --repo "$out/repo" --out "$out/serve.json"
    else
        failed+=("serve")
        echo '{"ok": false, "error": "the built repository has no KIND_GPU instance"}' >"$out/serve.json"
    fi
fi
if wants served; then
    [[ -n "$gpu" ]] || gpu="$("$py" scripts/gpu_bench.py detect 2>/dev/null || echo a100-80gb)"
    step served-build 30 120 "$py" -m builder.cli --model "$checkpoint" --quant fp16,int8,int4 \
        --gpu "$gpu" --quantize-at build --out "$out/served-repo" --force
    if [[ " ${skipped[*]} ${failed[*]} " == *" served-build "* ]]; then
        skipped+=("served-on" "served-off")
    else
        step served-on 90 200 "$py" scripts/gpu_served.py run --repo "$out/served-repo" \
            --graphs on --out "$out/served-on.json"
        step served-off 90 200 "$py" scripts/gpu_served.py run --repo "$out/served-repo" \
            --graphs off --out "$out/served-off.json"
    fi
fi
wants generate && step profile-generate 150 600 "$py" -m builder.cli profile --spec chatglm2-6b \
    --cache-dir "$cache" --device cuda --quant "$generate" --workloads generate:8192 \
    --out "$out/profile-generate"

"$py" scripts/gpu_bench.py table --profile "$out/profile-encode" "$out/profile-generate" \
    --bench "$out/bench.json" --tests "$out/tests.log" --serve "$out/serve.json" \
    | tee "$out/table.md"
"$py" scripts/gpu_served.py table "$out/served-on.json" "$out/served-off.json" | tee -a "$out/table.md"
echo "took ${SECONDS} s; logs in $out/" | tee -a "$out/table.md"
(( ${#skipped[@]} )) && echo "skipped (budget): ${skipped[*]}" | tee -a "$out/table.md"
if (( ${#failed[@]} )); then
    echo "failed: ${failed[*]}" | tee -a "$out/table.md"
    exit 1
fi
exit 0
