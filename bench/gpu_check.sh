#!/usr/bin/env bash
# One GPU check, for a machine with a CUDA GPU and no network: install the package from this working tree
# (no build isolation), run the GPU-marked tests, the loss-stage, block-kernel, per-kernel (fused / reference /
# torch.compile), sampling and training throughput benchmarks, and write everything into OUT_DIR. Meant to
# finish in about 8 minutes on an H200 (the benchmarks run with reduced iteration counts).
#
#   bash bench/gpu_check.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)   # absolute: some steps run from /tmp (to import the installed package)
cd "$(dirname "$0")/.."
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

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
pytest -q -m cuda tests -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "loss stage: reference / masked / masked_compiled / fused (B=64, L=1024, d=768, V=50258, bf16)"
timeout 300 python bench/bench_linear_ce.py --out "$OUT" 2>&1 | tee "$OUT/bench_linear_ce.txt" | grep -v Warning
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "block kernels vs copy bandwidth; DiT small fwd+bwd: kernels / reference / torch.compile (B=64, L=1024, bf16)"
timeout 300 python bench/bench_blocks.py --iters 10 --out "$OUT" 2>&1 | tee "$OUT/bench_blocks.txt" | grep -v Warning
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "kernels: fused / reference / torch.compile of the spec, fwd and fwd+bwd, vs copy and matmul ceilings (B=8, L=1024, bf16)"
timeout 240 python bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.txt" | grep -v Warning
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "sampling: step arithmetic (B=16, L=1024, half masked) and generation (100 ddpm_cache steps; first hitting eager and CUDA graph)"
timeout 300 python bench/bench_sampling.py --steps 100 --iters 10 --out "$OUT" 2>&1 | tee "$OUT/bench_sampling.txt" | grep -v Warning
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "training throughput: fused / reference / masked (DiT small, B=16, L=1024, bf16)"
timeout 300 python bench/throughput.py --providers fused,reference,masked --no-sampling --out "$OUT" 2>&1 \
  | tee "$OUT/throughput.txt" | grep -v Warning
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "training run on the GPU: mdlm train, tiny preset on Tiny Shakespeare, fused kernels, 60 steps + resume"
DATA_DIR=${MDLM_DATA_DIR:-$(cd .. && pwd)/shared/data}
if [ -d "$DATA_DIR" ]; then
  (cd /tmp && export MDLM_DATA_DIR="$DATA_DIR" && timeout 120 python -m mdlm train --preset tiny --data tinyshakespeare trainer.max_steps=40 \
     trainer.save_every=20 trainer.val_every=20 trainer.val_blocks=64 loader.global_batch_size=16 trainer.log_every=10 \
     lr_scheduler.warmup_steps=10 optim.lr=1e-3 trainer.num_samples=2 trainer.sample_steps=32 \
     trainer.out_dir="$OUT/train_tiny" data.cache_dir="$OUT/train_tiny/cache" \
   && timeout 120 python -m mdlm train --preset tiny --data tinyshakespeare trainer.max_steps=60 \
     trainer.save_every=20 trainer.val_every=20 trainer.val_blocks=64 loader.global_batch_size=16 trainer.log_every=10 \
     lr_scheduler.warmup_steps=10 optim.lr=1e-3 trainer.num_samples=2 trainer.sample_steps=32 \
     trainer.out_dir="$OUT/train_tiny" data.cache_dir="$OUT/train_tiny/cache") 2>&1 | tee "$OUT/train_tiny.txt" | tail -6
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  rm -rf "$OUT/train_tiny/cache" "$OUT/train_tiny/checkpoints"
else
  echo "shipped data not found (set MDLM_DATA_DIR): training run skipped" | tee "$OUT/train_tiny.txt"
fi

step "trainer smoke run without shipped data: synthetic corpus, tiny preset, 60 steps with a stop + resume"
(cd /tmp && timeout 150 python "$OLDPWD/bench/train_smoke.py" --steps 60 --out "$OUT") 2>&1 \
  | tee "$OUT/train_smoke.txt" | grep -v Warning | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "summary"
tail -1 "$OUT/pytest_cuda.txt"
grep -A8 "^provider" "$OUT/bench_linear_ce.txt"
grep -A6 "^kernel (forward)" "$OUT/bench_blocks.txt"
grep -A4 "^DiT fwd+bwd" "$OUT/bench_blocks.txt"
sed -n '/^kernel  *pass  *provider/,/^# /p' "$OUT/kernels.txt" | grep -v "^# wrote"
grep -A3 "^# step arithmetic" "$OUT/bench_sampling.txt"
grep -A4 "^# generation" "$OUT/bench_sampling.txt"
grep -A8 "^provider" "$OUT/throughput.txt"
grep "val NELBO" "$OUT/train_tiny.txt"
tail -1 "$OUT/train_smoke.txt"
exit $status
