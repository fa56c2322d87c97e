#!/usr/bin/env bash
# One GPU check, for a machine with a CUDA GPU and no network: install the package from this working tree
# (no build isolation), run the GPU-marked tests, the training throughput, sampling, loss-stage, block-kernel
# and per-kernel (fused / reference / torch.compile) benchmarks and a short GPU training run, and write
# everything into OUT_DIR. Meant to finish in about 8 minutes on an H200 (reduced iteration counts).
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Time budget: GPU_CHECK_BUDGET_S (default 480 s) from the start. Each step's timeout is its own limit or what
# is left of the budget, whichever is smaller, and a step with < 20 s left is skipped (said in its output), so
# a run under an outer time limit still reaches the summary with everything measured so far. Steps run in
# order of importance: tests, training throughput, sampling, then the per-stage benchmarks and training.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)   # absolute: some steps run from /tmp (to import the installed package)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
status=0
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), $(( $(date +%s) - START )) s in)"; }
# limit WANT: the step's timeout in seconds (WANT capped by the budget left); 0 = skip the step
limit() { local left=$(( BUDGET - ($(date +%s) - START) )); (( left < $1 )) && set -- "$left"; (( $1 < 20 )) && set -- 0; echo "$1"; }
skipped() { echo "skipped: time budget (GPU_CHECK_BUDGET_S=$BUDGET) spent" | tee "$1"; }
# bench WANT OUT_FILE CMD...: run a benchmark under the budget, output to the terminal (minus warnings) and OUT_FILE
bench() {
  local T; T=$(limit "$1"); local file=$2; shift 2
  if (( T > 0 )); then
    timeout "$T" "$@" 2>&1 | tee "$file" | grep -v Warning
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  else skipped "$file"; fi
}

step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  python -c "import triton; print('triton', triton.__version__)" 2>&1
  git rev-parse --short HEAD 2>/dev/null; } | tee "$OUT/environment.txt"

step "install (pip install --no-build-isolation --no-deps .)"
MAX_JOBS=${MAX_JOBS:-16} pip install --no-build-isolation --no-deps . > "$OUT/install.log" 2>&1 \
  || { tail -30 "$OUT/install.log"; echo "install failed"; exit 1; }
# run from outside the tree so the installed package (with its compiled extension) is imported
(cd /tmp && python -c "import json, mdlm_kernels as m; print(json.dumps(m.available(), indent=1))") | tee "$OUT/available.json"

step "GPU-marked tests"
T=$(limit 200)
if (( T > 0 )); then
  timeout "$T" pytest -q -m cuda tests -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else skipped "$OUT/pytest_cuda.txt"; fi

step "training throughput: fused / reference / masked (DiT small, B=64, L=1024, bf16: the targets' shape)"
bench 200 "$OUT/throughput.txt" python bench/throughput.py --providers fused,reference,masked --batch 64 --no-sampling --out "$OUT"

step "sampling: step arithmetic (B=16, L=1024, half masked) and generation (100 ddpm_cache steps; first hitting eager and CUDA graph)"
bench 240 "$OUT/bench_sampling.txt" python bench/bench_sampling.py --steps 100 --iters 10 --out "$OUT"

step "loss stage: reference / masked / masked_compiled / fused (B=64, L=1024, d=768, V=50258, bf16)"
bench 200 "$OUT/bench_linear_ce.txt" python bench/bench_linear_ce.py --out "$OUT"

step "block kernels vs copy bandwidth; DiT small fwd+bwd: kernels / reference / torch.compile (B=64, L=1024, bf16)"
bench 200 "$OUT/bench_blocks.txt" python bench/bench_blocks.py --iters 10 --out "$OUT"

step "optimizer step alone: published clip + AdamW foreach/fused + EMA loop vs the trainer's device step (DiT small, 169.6M fp32 parameters)"
bench 90 "$OUT/bench_optimizer.txt" python bench/bench_optimizer.py --iters 20 --out "$OUT"

step "kernels: fused / reference / torch.compile of the spec, fwd and fwd+bwd, vs copy and matmul ceilings (B=8, L=1024, bf16)"
bench 200 "$OUT/kernels.txt" python bench/kernels.py --out "$OUT"

step "trainer smoke run without shipped data: synthetic corpus, tiny preset, 60 steps with a stop + resume"
T=$(limit 150)
if (( T > 0 )); then
  (cd /tmp && timeout "$T" python "$ROOT/bench/train_smoke.py" --steps 60 --out "$OUT") 2>&1 \
    | tee "$OUT/train_smoke.txt" | grep -v Warning | tail -3
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else skipped "$OUT/train_smoke.txt"; fi

step "training run on the GPU: mdlm train, tiny preset on Tiny Shakespeare, fused kernels, 40 steps + resume to 60"
DATA_DIR=${MDLM_DATA_DIR:-$(cd .. && pwd)/shared/data}
T=$(limit 200)
if [ ! -d "$DATA_DIR" ]; then
  echo "shipped data not found (set MDLM_DATA_DIR): training run skipped" | tee "$OUT/train_tiny.txt"
elif (( T > 0 )); then
  ARGS="trainer.save_every=20 trainer.val_every=20 trainer.val_blocks=64 loader.global_batch_size=16 trainer.log_every=10
        lr_scheduler.warmup_steps=10 optim.lr=1e-3 trainer.num_samples=2 trainer.sample_steps=32
        trainer.out_dir=$OUT/train_tiny data.cache_dir=$OUT/train_tiny/cache"
  # shellcheck disable=SC2086  # ARGS is a list of key=value words without spaces
  (cd /tmp && export MDLM_DATA_DIR="$DATA_DIR" \
   && timeout "$(( T / 2 ))" python -m mdlm train --preset tiny --data tinyshakespeare trainer.max_steps=40 $ARGS \
   && timeout "$(( T / 2 ))" python -m mdlm train --preset tiny --data tinyshakespeare trainer.max_steps=60 $ARGS) \
    2>&1 | tee "$OUT/train_tiny.txt" | tail -6
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  rm -rf "$OUT/train_tiny/cache" "$OUT/train_tiny/checkpoints"
else skipped "$OUT/train_tiny.txt"; fi

step "summary"
tail -1 "$OUT/pytest_cuda.txt"
grep -A8 "^provider" "$OUT/throughput.txt"
grep -A3 "^# step arithmetic" "$OUT/bench_sampling.txt"
grep -A4 "^# generation" "$OUT/bench_sampling.txt"
grep -A8 "^provider" "$OUT/bench_linear_ce.txt"
grep -A6 "^kernel (forward)" "$OUT/bench_blocks.txt"
grep -A4 "^DiT fwd+bwd" "$OUT/bench_blocks.txt"
sed -n '/^kernel  *pass  *provider/,/^# /p' "$OUT/kernels.txt" | grep -v "^# wrote"
tail -1 "$OUT/train_smoke.txt"
grep "val NELBO" "$OUT/train_tiny.txt"
echo "gpu_check: $(( $(date +%s) - START )) s, status $status"
exit $status
