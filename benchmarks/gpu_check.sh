#!/usr/bin/env bash
# One prepared GPU check, for a CUDA machine with torch and Triton already installed and no
# network: runs the GPU parity tests, the test suite under CUDA, the side-by-side benchmark
# report (tf32 + exact fp32), the pipeline report (k-means, encode; its table is in
# gpu_check.log) and the scaling sweep, each phase under its own timeout, all in under 5 minutes.
#
# How to run: from the repository root, on a checkout of this repository,
#     bash benchmarks/gpu_check.sh                  (allow ~6 minutes)
# It installs the project itself (pip install -e . --no-deps, offline). It needs nothing outside
# the repository; what to bring along besides the tracked files:
#   .whl/     optional, not tracked: wheels of the peer vector-quantize-pytorch and its
#             dependencies (pip download vector-quantize-pytorch -d .whl on a networked machine);
#             installed offline with --no-index into /tmp/site. Without it, that peer is skipped.
# Environment variables it reads:
#   OUT            folder for the results (default: a new /tmp/gpu_check.XXXX); it receives
#                  gpu_check.log tests.log bench_tf32.json bench_tf32.md bench_ieee.json
#                  sweep.json scaling.png env.txt (8 files)
#   PYTHON         interpreter to use (default: python3)
#   GPU_CHECK_DRY  1 = dry run of the plumbing on a CPU machine (tiny shapes, no install)
set -uo pipefail

OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXX)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

phase() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
START=$(date +%s)

phase "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  git rev-parse --short HEAD 2>/dev/null; git status --porcelain --untracked-files=no 2>/dev/null | head -20
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$DRY" != "1" ]; then
  phase "install (no network)"
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  timeout 40 $PY -m pip install -q --no-deps --no-build-isolation -e . || echo "install FAILED"
  DEVICE=cuda; SHAPES=(--shapes small --shapes A --shapes B); QUICK=()
else
  DEVICE=cpu; SHAPES=(--shapes tiny); QUICK=(--quick)
fi

# Each phase has a hard cap (the report prints what it measured when stopped: SIGTERM, then KILL
# 10 s later); the caps add up to ~285 s.
phase "GPU parity tests: pytest tests -m gpu"
timeout -k 5 40 $PY -m pytest tests -m gpu -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15

phase "whole test suite under CUDA (not slow; capped at 30 s)"
timeout -k 5 30 $PY -m pytest tests -q -m "not slow" -p no:cacheprovider 2>&1 | tee -a "$OUT/tests.log" | tail -15

phase "report, tf32: all providers x modes x shapes (torch.compile peers: train on A only)"
timeout -k 10 100 $PY -m rqvae_fast.bench --device "$DEVICE" --precision tf32 "${SHAPES[@]}" "${QUICK[@]}" \
  --skip '*+compile:ema:*' --skip '*+compile:inference:*' --skip '*+compile:*:small' \
  --skip '*+compile:*:B' --skip '*+compile:*:tiny' \
  --json "$OUT/bench_tf32.json" --markdown "$OUT/bench_tf32.md"

phase "report, exact fp32 inference (target: >= 50% of the fp32 roofline)"
timeout -k 5 25 $PY -m rqvae_fast.bench --device "$DEVICE" --precision ieee --modes inference \
  --providers rqvae_fast,seed "${SHAPES[@]}" "${QUICK[@]}" --json "$OUT/bench_ieee.json"

phase "pipeline (issue 4): fused k-means 1M x 32 -> 256, 20 iterations (target < 1 s); encode 1M x 768"
if [ "$DRY" != "1" ]; then PIPE=(); else PIPE=(--quick); fi
timeout -k 5 40 $PY -m rqvae_fast.bench_pipeline --device "$DEVICE" "${PIPE[@]}"

phase "exact-at-speed (issue 10): precision exact vs ieee vs tf32 on shapes A and B, vs the paper model"
if [ "$DRY" != "1" ]; then
  timeout -k 5 30 $PY benchmarks/gpu_exact.py --shapes A B
else
  $PY benchmarks/gpu_exact.py --shapes A
fi

phase "scaling sweep: N 2^12..2^24, K 64..16384 (rqvae_fast, tf32)"
timeout -k 5 30 $PY -m rqvae_fast.bench --device "$DEVICE" --precision tf32 --no-matrix --sweep both \
  "${QUICK[@]}" --json "$OUT/sweep.json" --plot "$OUT/scaling.png"

phase "done in $(( $(date +%s) - START )) s; outputs in $OUT"
ls -la "$OUT"
