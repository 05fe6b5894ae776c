#!/usr/bin/env bash
# One prepared GPU check: CUDA correctness tests, the benchmark with the large config, a sample of the
# shape sweep, 50 training steps through the deepspeed launcher; one results file (results.md +
# results.json) in OUT_DIR.
#
#   bash scripts/gpu_check.sh OUT_DIR            # CUDA visible: the real check, within 9 minutes
#   bash scripts/gpu_check.sh OUT_DIR --dry-run  # tiny shapes on the CPU (also the default without CUDA)
#
# Every stage runs under `timeout` with its own budget, and a failed or hung stage does not stop the
# next: the results file records it. GPU_CHECK_STAGES=bench,train reruns only some stages (a second
# try on a lent machine). On the lent H200 (no network, no deepspeed/hydra/wandb, no .venv) the wheels
# in .whl/ (scripts/gpu_wheels.py) are installed into /tmp/site first, and our own package is
# imported from the repo root through PYTHONPATH.
set -u -o pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--dry-run]}
FORCE_DRY=${2:-}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
# Stage outputs: a second try on the same machine (GPU_CHECK_STAGES=...) reruns some stages and the
# results file still reports the others from the first try.
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
mkdir -p "$WORK"
STAGES=${GPU_CHECK_STAGES:-install,env,tests,bench,sweep,train}
if [ -x .venv/bin/python ]; then PY=${PY:-$REPO/.venv/bin/python}; else PY=${PY:-python3}; fi
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
started=$(date +%s)

# Runs one stage under its budget; its output goes to OUT/<name>.log, its outcome to WORK/stages.jsonl.
stage() {
    local name=$1 budget=$2
    shift 2
    case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
    local t0=$(date +%s)
    # Never past the whole check's deadline (the collection after the last stage needs a few seconds).
    local left=$((started + TOTAL_S - t0 - 20))
    [ $left -lt $budget ] && budget=$left
    if [ $budget -lt 5 ]; then
        echo "{\"stage\": \"$name\", \"rc\": 124, \"seconds\": 0, \"budget_s\": 0, \"timed_out\": true}" >>"$WORK/stages.jsonl"
        echo "no time left for $name" >"$OUT/$name.log"
        echo "   $name: skipped, no time left before the ${TOTAL_S}s deadline"
        return 0
    fi
    case $name in  # this stage's earlier outputs must not pass for this run's
        tests) rm -f "$WORK/tests.xml" ;;
        bench) rm -f "$WORK/bench.json" ;;
        sweep) rm -f "$WORK/sweep.json" ;;
        train) rm -rf "$WORK/train_run" ;;
        env) rm -f "$WORK/env.json" ;;
    esac
    echo "== $name (budget ${budget}s): $*"
    timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
    local rc=$? t1=$(date +%s)
    local timed_out=false
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then timed_out=true; fi
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((t1 - t0)), \"budget_s\": $budget, \"timed_out\": $timed_out}" >>"$WORK/stages.jsonl"
    echo "   $name: exit $rc after $((t1 - t0))s$([ $timed_out = true ] && echo ' (TIMED OUT)')"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

# Budgets in seconds. On the GPU they add up to 505 s and the whole check stops at TOTAL_S = 520 s
# (under 9 minutes, a hung stage's 10 s kill grace included); in a dry run they only catch hangs
# (a shared 2-core CI machine can be many times slower than its idle speed).
if [ "$FORCE_DRY" != "--dry-run" ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    MODE=cuda
    TOTAL_S=520 B_INSTALL=45 B_ENV=25 B_TESTS=75 B_BENCH=130 B_SWEEP=110 B_TRAIN=120
    echo "CUDA visible: the real GPU check (results in $OUT)"
else
    MODE=dry-run
    TOTAL_S=2400 B_INSTALL=200 B_ENV=120 B_TESTS=400 B_BENCH=400 B_SWEEP=400 B_TRAIN=500
    echo "DRY RUN: no CUDA device (or --dry-run): the same stages at tiny shapes on the CPU; no GPU numbers (results in $OUT)"
fi
TOTAL_S=${GPU_CHECK_TOTAL_S:-$TOTAL_S}

# The lent machine lacks deepspeed, hydra, omegaconf and wandb: install the carried wheels (no network).
install_wheels() {
    if "$PY" -c "import deepspeed, hydra, omegaconf, wandb" 2>/dev/null; then
        echo "deepspeed, hydra, omegaconf and wandb import already: nothing to install"
        return 0
    fi
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: build them here with scripts/gpu_wheels.py and carry .whl"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        touch /tmp/site/.gpu_check_wheels &&
        PYTHONPATH=/tmp/site "$PY" -c "import deepspeed, hydra, omegaconf, wandb; print('installed from .whl:', deepspeed.__version__)"
}
use_site() {  # the wheels installed by this or an earlier try on the same machine
    if [ -f /tmp/site/.gpu_check_wheels ] && [[ ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]]; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
}
use_site
export -f install_wheels
export PY
stage install $B_INSTALL bash -c install_wheels
use_site
# Our package from the repo root (the lent machine has no .venv with it installed).
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

stage env $B_ENV "$PY" scripts/gpu_check.py env "$WORK/env.json"

# 1. CUDA correctness (on the CPU in a dry run, so that the tests themselves are exercised).
TEST_DEVICE=cuda
[ $MODE = dry-run ] && TEST_DEVICE=cpu
stage tests $B_TESTS env MOE_GPU_TESTS_DEVICE=$TEST_DEVICE "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider \
    tests/test_gpu.py --junitxml "$WORK/tests.xml"

# 2. The benchmark: standard configs plus the large one (ep2 needs two GPUs and is skipped on one).
if [ $MODE = cuda ]; then
    stage bench $B_BENCH "$PY" benchmarks/bench_moe.py --device cuda --dtype bfloat16 --configs c1,c2,c3,ep2,large \
        --no-write --json "$WORK/bench.json"
else
    # fp32: bf16 GEMMs crawl on CPUs, and tests/test_benchmark.py covers the bf16 plumbing.
    stage bench $B_BENCH "$PY" benchmarks/bench_moe.py --quick --configs large --reps 1 --dtype float32 --no-memory \
        --peak-tflops 790 --json "$WORK/bench.json"
fi

# 2b. The shape sweep in bf16: 8 of its sampled points, sized for the GPU, EP=2 points
# skipped on one GPU; no fresh memory processes (the budget). A dry run: the --quick machinery.
if [ $MODE = cuda ]; then
    stage sweep $B_SWEEP "$PY" benchmarks/bench_moe.py --sweep --device cuda --dtype bfloat16 --sweep-points 8 \
        --sweep-target-s 0.02 --reps 3 --warmup 1 --no-memory --no-write --json "$WORK/sweep.json"
else
    stage sweep $B_SWEEP "$PY" benchmarks/bench_moe.py --sweep --quick --sweep-only q2 --reps 1 --warmup 0 \
        --no-memory --no-write --json "$WORK/sweep.json"
fi

# 3. Training through the deepspeed launcher, world size 1 (NCCL and bf16 on a GPU; gloo and fp32 on the CPU).
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
TRAIN_ARGS=(+experiment=gpu_check "train.run_dir=$WORK/train_run" "data.cache_dir=$WORK/data_cache")
if [ $MODE = dry-run ]; then
    TRAIN_ARGS+=(model=tiny deepspeed.precision=fp32 train.steps=4 train.log_every=2 train.eval_every=4
        train.ckpt_every=4 train.micro_batch_size=2 data.seq_len=64 data.max_corpus_bytes=150000 data.vocab_size=512)
fi
stage train $B_TRAIN "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$PORT" launch/train.py "${TRAIN_ARGS[@]}"

# 4. One results file, whatever failed above.
"$PY" scripts/gpu_check.py collect "$OUT" "$WORK" "$MODE" >"$WORK/collect.log" 2>&1 || cat "$WORK/collect.log"
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
echo "gpu check ($MODE) took $(($(date +%s) - started))s; results: $OUT/results.md, $OUT/results.json"
[ -f "$OUT/results.json" ]
