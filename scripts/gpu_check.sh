#!/usr/bin/env bash
# GPU check: the engine tests on CUDA in float16 (and bfloat16), then the GPU benchmarks, in one command of at
# most about 9 minutes on one H100, ending in outputs/gpu/report.md and report.json.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --no-bf16        # skip the bfloat16 pass of tests/test_{editor,conformance}.py
#   P2P_TEST_DEVICE=cpu bash scripts/gpu_check.sh    # a CPU smoke run of the script itself (implies --quick)
#
# The lent GPU machine has no network, and its python3 has torch (never reinstalled here) but no diffusers.
# The device call must carry `.whl` (git-ignored; re-create it on a machine with PyPI with
# `bash scripts/gpu_wheels.sh`): when `import diffusers` fails, the wheels there whose package does not import
# are installed with pip --no-index into /tmp/p2p-site, which goes on PYTHONPATH after src/ (the project is
# run from src/, not installed). For example, with the device tool: carry [".whl"], command
# `bash scripts/gpu_check.sh`, timeout_s 560.
#
# Steps, in priority order, each under `timeout`, all inside a budget (P2P_GPU_BUDGET seconds, 500 by
# default; a step that would start with under 20 s left, 60 s for steps 9 to 11, 90 s for step 12, is skipped and
# reported so):
#   1. environment: card, driver, torch/CUDA/diffusers versions (fails at once without CUDA)
#   2. diffusers from .whl when missing
#   3. pytest on CUDA in float16: tests/test_{processor,editor,conformance,blend,inversion,cache,batch,device_guard}.py,
#      those that exist, without the Ray test and with the conformance suite's UNet families only (SD, SDXL,
#      v-prediction SD: -k "not local_ray and not (test_conformance and (sd3 or flux or chroma or pixart or
#      qwenimage or flux2 or zimage))"; P2P_GPU_PYTEST_K replaces the expression)
#   4. benchmarks/edit_vs_generate.py: SD 1.5 architecture, random weights, 512 px, 50 steps, fp16
#   5. benchmarks/inversion.py: null-text, negative-prompt and direct inversion, 512 px, 50 steps, fp16
#   6. benchmarks/edit_vs_generate.py --arch sdxl: 1024 px, P2P_GPU_SDXL_STEPS (20) steps, fp16; then
#      benchmarks/reedit.py: a re-edit on a cached source vs a fresh edit, 512 px, 50 steps, fp16
#   7. pytest tests/test_editor.py and test_conformance.py (UNet families) in bfloat16 (unless --no-bf16)
#   8. benchmarks/edit_vs_generate.py --arch sd3, flux, chroma and pixart: SD3-medium's (24 blocks), Flux.1-dev's
#      and Chroma1-HD's (19 + 38 blocks) and PixArt-Σ's (28 blocks; 20 steps) transformers, random weights, 1024 px, 28 steps, bf16, plain vs fused (2 rounds)
#   9. benchmarks/edit_vs_generate.py --arch qwenimage: Qwen-Image's transformer at full depth (60 blocks, 41 GB in
#      bf16, built on the GPU in bf16), random weights, 1024 px, 4 steps, guidance 4.0 (two passes a step), bf16,
#      plain vs fused (2 rounds); it starts only with 60 s of the budget left
#  10. benchmarks/edit_vs_generate.py --arch flux2-klein: FLUX.2 klein 4B's transformer at full depth (5 + 20 blocks,
#      3.9 B parameters, 8 GB in bf16, built on the GPU in bf16), random weights, 1024 px, 4 steps, text length 512,
#      guidance 4.0 (the base model: two passes a step), bf16, plain vs fused (2 rounds); it starts only with 60 s of
#      the budget left
#  11. benchmarks/edit_vs_generate.py --arch zimage: Z-Image's transformer at full depth (30 blocks and its 2 + 2
#      refiner blocks, about 6 B parameters, 12.3 GB in bf16, built on the GPU in bf16: it fits any lent card),
#      random weights, 1024 px, 4 steps, guidance 5.0 (CFG: conditional and unconditional rows in one batch),
#      text bound 512, bf16, plain vs fused (2 rounds); it starts only with 60 s of the budget left
#  12. benchmarks/edit_vs_generate.py --arch flux2-dev: FLUX.2 dev's transformer at full depth (8 + 48 blocks, about
#      32 B parameters, 64 GB (60 GiB) in bf16, built on the GPU in bf16), random weights, 1024 px, 4 steps, text
#      length 512, embedded guidance 4.0 (one pass a step), bf16, plain vs fused (2 rounds); the lowest priority: it
#      starts only with 90 s of the budget left, and is skipped, with the reason printed and reported, on a card of
#      under 72 GiB (env.json's gpu_memory_gib; an 80 GB H100 has 79)
#  13. scripts/gpu_report.py: report.md and report.json (rewritten after every step, so a killed run still
#      leaves one)
# Everything lands in outputs/gpu/ (log, junit-*.xml, bench-*.json, report.*); when $OUT is set, report.md,
# report.json, the junit files and the log are copied there too. One failed step does not stop the others;
# the exit code is 1 when any step failed (a test failed, a benchmark crashed or timed out), else 0.
# Missing a target (report's "Targets") does not change the exit code.
#
# --quick (forced by P2P_TEST_DEVICE=cpu): a handful of tests, tiny sizes, 1 step, float32, one thread: it checks
# the script, not the GPU. Env: PYTHON (python3), P2P_TEST_DEVICE (cuda), P2P_TEST_DTYPE (float16 on CUDA,
# float32 on CPU), P2P_GPU_BUDGET, P2P_GPU_SDXL_STEPS, P2P_GPU_PYTEST_K, OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PY=${PYTHON:-python3}
DEVICE=${P2P_TEST_DEVICE:-cuda}
QUICK=0
BF16=1
BUDGET=${P2P_GPU_BUDGET:-}
while (($#)); do
    case "$1" in
        --quick) QUICK=1 ;;
        --no-bf16) BF16=0 ;;
        --budget) BUDGET=$2; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$DEVICE" = cpu ] && QUICK=1
if ((QUICK)); then BUDGET=${BUDGET:-900}; else BUDGET=${BUDGET:-500}; fi
if [ "$DEVICE" = cpu ]; then DTYPE=${P2P_TEST_DTYPE:-float32}; BENCH_DTYPE=float32; else DTYPE=${P2P_TEST_DTYPE:-float16}; BENCH_DTYPE=float16; fi

RUN=$ROOT/outputs/gpu
SITE=/tmp/p2p-site
rm -rf "$RUN" "$SITE"
mkdir -p "$RUN"
[ -n "${OUT:-}" ] && mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + BUDGET - 10))  # the last seconds are the report's
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
if ((QUICK)); then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

record() {  # NAME STATUS SECONDS RC LIMIT NOTE
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RUN/steps.tsv"
}

publish() {  # the report from what is there so far, copied to $OUT (the log goes there through tee)
    "$PY" "$ROOT/scripts/gpu_report.py" "$RUN" >/dev/null 2>"$RUN/report.err" || cat "$RUN/report.err"
    if [ -n "${OUT:-}" ]; then
        cp -f "$RUN"/report.md "$RUN"/report.json "$RUN"/junit-*.xml "$OUT"/ 2>/dev/null
    fi
    return 0
}

step() {  # NAME LIMIT COMMAND...: run under `timeout`, clipped to the budget (a shell function runs as is)
    # STEP_MIN=SECONDS before the call: skip the step unless that much of the budget is left (default 20)
    local name=$1 limit=$2 left rc t0 seconds status note="" need=${STEP_MIN:-20}
    shift 2
    left=$((DEADLINE - $(date +%s)))
    if ((left < need)); then
        echo "=== $name: skipped, ${left} s of the ${BUDGET} s budget left (it starts with ${need} s or more)"
        record "$name" skipped 0 "" "$limit" "out of time budget (${left} s left, ${need} s needed)"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (at most ${limit} s): $*"
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then
        "$@"
    else
        timeout -s INT -k 15 "$limit" "$@"  # SIGINT: pytest still writes its summary and junit file
    fi
    rc=$?
    seconds=$(($(date +%s) - t0))
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; note="killed after ${limit} s" ;;
        *) status=failed; note="exit code $rc" ;;
    esac
    echo "=== $name: $status in ${seconds} s${note:+ ($note)}"
    record "$name" "$status" "$seconds" "$rc" "$limit" "$note"
    publish
    return 0
}

environment() {
    MODE=$([ "$QUICK" = 1 ] && echo quick || echo full) COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
    "$PY" - "$RUN/env.json" "$DEVICE" <<'PYTHON'
import json, os, platform, subprocess, sys
path, device = sys.argv[1], sys.argv[2]
env = {"python": platform.python_version(), "executable": sys.executable, "test_device": device,
       "mode": os.environ["MODE"], "commit": os.environ["COMMIT"]}
try:
    import torch
except Exception as error:
    env["torch"] = f"import failed: {error}"
    json.dump(env, open(path, "w"), indent=2)
    sys.exit(f"torch does not import: {error}")
env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
           cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(gpu_name=props.name, gpu_memory_gib=props.total_memory / 2**30, gpu_count=torch.cuda.device_count(),
               capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        pass
for name in ("transformers", "huggingface_hub", "safetensors", "accelerate", "numpy", "PIL"):
    try:
        env[name] = __import__(name).__version__
    except Exception as error:
        env[name] = f"missing ({type(error).__name__})"
json.dump(env, open(path, "w"), indent=2)
print(json.dumps(env, indent=2))
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("CUDA is not available to this python: no GPU check (P2P_TEST_DEVICE=cpu runs the CPU smoke run)")
PYTHON
}

diffusers_version() {  # records where diffusers comes from in env.json
    "$PY" - "$RUN/env.json" "$1" <<'PYTHON'
import json, sys
path, origin = sys.argv[1], sys.argv[2]
env = json.load(open(path))
try:
    import diffusers
    env.update(diffusers=diffusers.__version__, diffusers_from=origin, diffusers_path=diffusers.__file__)
    print(f"diffusers {diffusers.__version__} from {diffusers.__file__}")
    status = 0
except Exception as error:
    env.update(diffusers=f"import failed: {error}", diffusers_from=origin)
    print(f"diffusers does not import: {error}")
    status = 1
json.dump(env, open(path, "w"), indent=2)
sys.exit(status)
PYTHON
}

install_wheels() {  # diffusers and its missing requirements from .whl/, never torch
    if "$PY" -c "import diffusers" 2>/dev/null; then
        diffusers_version "already installed"
        return
    fi
    shopt -s nullglob
    local wheels=("$ROOT"/.whl/*.whl) missing=() wheel module
    shopt -u nullglob
    if ((${#wheels[@]} == 0)); then
        echo "diffusers is missing and there is no .whl/ folder: run scripts/gpu_wheels.sh where PyPI is reachable," \
             "and carry .whl in the device call"
        diffusers_version "missing, no .whl/"
        return 1
    fi
    for wheel in "${wheels[@]}"; do
        module=$(basename "$wheel")
        module=${module%%-*}
        module=${module,,}
        case "$module" in
            torch|torchvision|torchaudio|triton|nvidia_*) echo "not installing $(basename "$wheel"): never torch here"; continue ;;
        esac
        if "$PY" -c "import $module" 2>/dev/null; then
            echo "$module: already importable, its wheel is left out"
        else
            missing+=("$wheel")
        fi
    done
    echo "installing into $SITE: ${missing[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${missing[@]}" || return 1
    export PYTHONPATH=$ROOT/src:$SITE${PYTHONPATH#"$ROOT/src"}
    diffusers_version "installed from .whl/ into $SITE"
}

gpu_memory_gib() {  # the card's memory in whole GiB, from env.json; empty when unknown (no GPU)
    "$PY" -c 'import json, sys; m = json.load(open(sys.argv[1])).get("gpu_memory_gib"); print(int(m) if m else "")' \
        "$RUN/env.json" 2>/dev/null
}

pytest_files() {  # the engine test files that exist
    local f
    for f in processor editor conformance blend inversion cache batch device_guard; do
        [ -f "tests/test_$f.py" ] && printf 'tests/test_%s.py ' "$f"
    done
}

main() {
    echo "GPU check: $(date -u +%FT%TZ), python ${PY}, device ${DEVICE}, tests in ${DTYPE}, benchmarks in ${BENCH_DTYPE}," \
         "$([ "$QUICK" = 1 ] && echo "quick mode" || echo "full mode"), budget ${BUDGET} s"
    if ! command -v "$PY" >/dev/null; then
        echo "no python: $PY"
        record environment failed 0 127 0 "no python at $PY"
        publish
        return
    fi
    step environment 90 environment
    if [ "$(tail -n1 "$RUN/steps.tsv" | cut -f2)" != ok ]; then
        echo "environment failed: nothing else runs"
        return
    fi
    step diffusers 120 install_wheels
    if [ "$(tail -n1 "$RUN/steps.tsv" | cut -f2)" != ok ]; then
        echo "diffusers does not import: nothing else runs"
        return
    fi

    local files k quick_k
    files=$(pytest_files)
    quick_k="test_blend_mask_is_the_union or test_self_attention_untouched or test_edit_changes_the_output"
    quick_k+=" or (test_shapes_and_contents and direct) or test_job_ids_are_stable"
    # the conformance suite's UNet families, as tests/test_editor.py had them before the suite took them over
    local unet_only="not (test_conformance and (sd3 or flux or chroma or pixart or qwenimage or flux2 or zimage))"
    if ((QUICK)); then k=${P2P_GPU_PYTEST_K:-$quick_k}; else k=${P2P_GPU_PYTEST_K:-not local_ray and $unet_only}; fi
    # shellcheck disable=SC2086
    step "tests-$DTYPE" "$( ((QUICK)) && echo 240 || echo 110)" env P2P_TEST_DEVICE="$DEVICE" P2P_TEST_DTYPE="$DTYPE" \
        "$PY" -m pytest $files -k "$k" -p no:cacheprovider -q -rfE --durations=8 --junitxml="$RUN/junit-$DTYPE.xml"

    local bench=("$PY" benchmarks/edit_vs_generate.py --device "$DEVICE" --dtype "$BENCH_DTYPE")
    local inversion=("$PY" benchmarks/inversion.py --device "$DEVICE" --dtype "$BENCH_DTYPE"
                     --methods null-text negative-prompt direct)
    if ((QUICK)); then
        step bench-sd15 180 "${bench[@]}" --arch sd15 --size 64 --steps 1 --rounds 2 --threads 1 --json "$RUN/bench-sd15.json"
        step bench-inversion 180 "${inversion[@]}" --size 64 --steps 1 --inner-steps 2 --threads 1 --json "$RUN/bench-inversion.json"
        step bench-sdxl 120 "${bench[@]}" --arch sdxl --tiny --size 64 --steps 1 --rounds 2 --threads 1 --json "$RUN/bench-sdxl.json"
        step bench-reedit 120 "$PY" benchmarks/reedit.py --device "$DEVICE" --dtype "$BENCH_DTYPE" --tiny --size 32 --steps 2 \
            --rounds 2 --threads 1 --json "$RUN/bench-reedit.json"
    else
        step bench-sd15 80 "${bench[@]}" --arch sd15 --size 512 --steps 50 --rounds 3 --json "$RUN/bench-sd15.json"
        step bench-inversion 140 "${inversion[@]}" --size 512 --steps 50 --json "$RUN/bench-inversion.json"
        step bench-sdxl 100 "${bench[@]}" --arch sdxl --size 1024 --steps "${P2P_GPU_SDXL_STEPS:-20}" --rounds 3 \
            --json "$RUN/bench-sdxl.json"
        step bench-reedit 50 "$PY" benchmarks/reedit.py --device "$DEVICE" --dtype "$BENCH_DTYPE" --size 512 --steps 50 \
            --rounds 3 --json "$RUN/bench-reedit.json"
    fi

    if ((BF16)) && [ -f tests/test_editor.py ]; then
        if ((QUICK)); then k=${P2P_GPU_PYTEST_K:-test_edit_changes_the_output}; else k=${P2P_GPU_PYTEST_K:-not local_ray and $unet_only}; fi
        step tests-bfloat16 "$( ((QUICK)) && echo 120 || echo 45)" env P2P_TEST_DEVICE="$DEVICE" P2P_TEST_DTYPE=bfloat16 \
            "$PY" -m pytest tests/test_editor.py tests/test_conformance.py -k "$k" -p no:cacheprovider -q -rfE --junitxml="$RUN/junit-bfloat16.xml"
    fi

    local mmdit=("$PY" benchmarks/edit_vs_generate.py --device "$DEVICE" --skip-explicit --rounds 2)
    if ((QUICK)); then
        step bench-sd3 120 "${mmdit[@]}" --arch sd3 --tiny --steps 2 --threads 1 --dtype "$BENCH_DTYPE" \
            --max-sequence-length 16 --json "$RUN/bench-sd3.json"
        step bench-flux 120 "${mmdit[@]}" --arch flux --tiny --steps 2 --threads 1 --dtype "$BENCH_DTYPE" \
            --max-sequence-length 16 --json "$RUN/bench-flux.json"
        step bench-chroma 120 "${mmdit[@]}" --arch chroma --tiny --steps 2 --threads 1 --dtype "$BENCH_DTYPE" \
            --max-sequence-length 16 --json "$RUN/bench-chroma.json"
        step bench-pixart 120 "${mmdit[@]}" --arch pixart --tiny --steps 2 --threads 1 --dtype "$BENCH_DTYPE" \
            --max-sequence-length 16 --json "$RUN/bench-pixart.json"
        STEP_MIN=60 step bench-qwenimage 120 "${mmdit[@]}" --arch qwenimage --tiny --steps 2 --threads 1 \
            --dtype "$BENCH_DTYPE" --json "$RUN/bench-qwenimage.json"
        STEP_MIN=60 step bench-flux2-klein 120 "${mmdit[@]}" --arch flux2-klein --tiny --steps 2 --threads 1 \
            --dtype "$BENCH_DTYPE" --json "$RUN/bench-flux2-klein.json"
        STEP_MIN=60 step bench-zimage 120 "${mmdit[@]}" --arch zimage --tiny --steps 2 --threads 1 \
            --dtype "$BENCH_DTYPE" --json "$RUN/bench-zimage.json"
        STEP_MIN=60 step bench-flux2-dev 120 "${mmdit[@]}" --arch flux2-dev --tiny --steps 2 --threads 1 \
            --dtype "$BENCH_DTYPE" --json "$RUN/bench-flux2-dev.json"
    else
        step bench-sd3 70 "${mmdit[@]}" --arch sd3 --depth 24 --size 1024 --steps 28 --max-sequence-length 256 \
            --dtype bfloat16 --json "$RUN/bench-sd3.json"
        step bench-flux 110 "${mmdit[@]}" --arch flux --depth 19 --single-depth 38 --size 1024 --steps 28 \
            --max-sequence-length 512 --dtype bfloat16 --json "$RUN/bench-flux.json"
        step bench-chroma 110 "${mmdit[@]}" --arch chroma --depth 19 --single-depth 38 --size 1024 --steps 28 \
            --max-sequence-length 512 --dtype bfloat16 --json "$RUN/bench-chroma.json"
        step bench-pixart 60 "${mmdit[@]}" --arch pixart --depth 28 --size 1024 --steps 20 \
            --max-sequence-length 300 --dtype bfloat16 --json "$RUN/bench-pixart.json"
        # 60 blocks of 340M parameters: 41 GB in bf16 (82 GB in fp32: built in bf16 on the GPU). Never 1 step: Qwen-
        # Image's scheduler stretches its sigmas to a terminal value, and a single sigma makes that 0 / 0 (NaN).
        STEP_MIN=60 step bench-qwenimage 120 "${mmdit[@]}" --arch qwenimage --depth 60 --size 1024 --steps 4 \
            --max-sequence-length 512 --dtype bfloat16 --json "$RUN/bench-qwenimage.json"
        # FLUX.2 klein 4B's 5 double- and 20 single-stream blocks, built as the base model: guidance 4.0 runs a second
        # pass on the empty prompt every step (the distilled model's 4 steps, at the base model's cost)
        STEP_MIN=60 step bench-flux2-klein 120 "${mmdit[@]}" --arch flux2-klein --depth 5 --single-depth 20 --size 1024 \
            --steps 4 --max-sequence-length 512 --dtype bfloat16 --json "$RUN/bench-flux2-klein.json"
        # Z-Image's 30 blocks and 2 + 2 refiner blocks: about 6 B parameters, 12.3 GB in bf16; guidance 5.0 runs the
        # conditional and unconditional rows in one batch every step (Turbo's own setting, guidance 0, would not)
        STEP_MIN=60 step bench-zimage 120 "${mmdit[@]}" --arch zimage --depth 30 --size 1024 --steps 4 \
            --max-sequence-length 512 --dtype bfloat16 --json "$RUN/bench-zimage.json"
        # FLUX.2 dev's 8 double- and 48 single-stream blocks: about 32 B parameters, 60 GiB in bf16 before any
        # activation, so a card of under 72 GiB skips it; embedded guidance 4.0, one pass a step
        local gib need_gib=72
        gib=$(gpu_memory_gib)
        if [ -z "$gib" ] || ((gib < need_gib)); then
            echo "=== bench-flux2-dev: skipped, the GPU has ${gib:-unknown} GiB; FLUX.2 dev's 8 + 48 blocks take" \
                 "60 GiB in bf16 (${need_gib} GiB needed)"
            record bench-flux2-dev skipped 0 "" 150 \
                "GPU memory: ${gib:-unknown} GiB, ${need_gib} GiB needed (60 GiB of weights)"
            publish
        else
            STEP_MIN=90 step bench-flux2-dev 150 "${mmdit[@]}" --arch flux2-dev --depth 8 --single-depth 48 \
                --size 1024 --steps 4 --max-sequence-length 512 --dtype bfloat16 --json "$RUN/bench-flux2-dev.json"
        fi
    fi
}

main 2>&1 | tee "$RUN/gpu_check.log" ${OUT:+"$OUT/gpu_check.log"}
# main ran in a subshell of the pipeline: the outcome is read back from the steps it recorded
"$PY" "$ROOT/scripts/gpu_report.py" "$RUN" 2>&1 | tee -a "$RUN/gpu_check.log" ${OUT:+"$OUT/gpu_check.log"}
publish >/dev/null
if [ ! -f "$RUN/steps.tsv" ] || cut -f2 "$RUN/steps.tsv" | grep -qvE '^(ok|skipped)$'; then
    echo "GPU check: FAILED (outputs/gpu/report.md)"
    exit 1
fi
echo "GPU check: all steps passed (outputs/gpu/report.md)"
