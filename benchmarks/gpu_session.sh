#!/usr/bin/env bash
# One GPU session on the H200 (see README "On a CUDA machine"). Stages, in the order given:
#   env        versions, the GPU, compute-sanitizer
#   tests      the gpu tests (pytest -m gpu), log to $OUT/tests.log
#   sanitize   compute-sanitizer memcheck + racecheck over benchmarks/sanitize_*.py
#   bench      every benchmarks/*.py other than sanitize_*, log to $OUT/bench.log
#   refresh    re-execute every chapter in place (stored outputs from this GPU)
#   suite      python3 dev.py gpu (pytest + strict nbval with GPU cells), log to $OUT/suite.log
#   pack       tar the chapters into $OUT/notebooks.tar
# Usage: bash benchmarks/gpu_session.sh env tests sanitize ...
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DSA_CACHE_DIR=/tmp/dsa_kernels
status=0
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
      python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__, torch.cuda.get_device_name())"
      which compute-sanitizer || true ;;
    tests)
      python3 -m pytest -q -m gpu tests -p no:cacheprovider -ra 2>&1 | tee "$OUT/tests.log" | tail -40 || status=1 ;;
    sanitize)
      for f in benchmarks/sanitize_*.py; do
        for tool in memcheck racecheck; do
          echo "--- $tool $f"
          timeout 240 compute-sanitizer --tool $tool --error-exitcode 99 python3 "$f" > "$OUT/san.tmp" 2>&1
          rc=$?
          tail -6 "$OUT/san.tmp" | tee -a "$OUT/sanitize.log"
          echo "rc=$rc" | tee -a "$OUT/sanitize.log"
          [ $rc -eq 0 ] || status=1
        done
      done
      rm -f "$OUT/san.tmp" ;;
    bench)
      for f in benchmarks/*.py; do
        case $f in */sanitize_*) continue ;; esac
        echo "--- $f" | tee -a "$OUT/bench.log"
        timeout 300 python3 "$f" 2>&1 | tee -a "$OUT/bench.log" || status=1
      done ;;
    refresh)
      python3 dev.py refresh 2>&1 | grep -v "without encryption" || status=1 ;;
    suite)
      python3 dev.py gpu -q 2>&1 | tee "$OUT/suite.log" | tail -25 || status=1 ;;
    pack)
      tar cf "$OUT/notebooks.tar" book/*.ipynb ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
