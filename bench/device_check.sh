#!/usr/bin/env bash
# Issue 9's GPU checks in one device call, on a bare GPU host (the device tool's image):
#
#   make device-bundle                             # here, once: writes .whl/
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
#
# Installs the carried wheels, runs the CUDA tests, then bench/engine_scale.py at full size
# with the training profile. Logs go to $OUT (the device tool brings them back) and stdout.
# BENCH_ARGS adds arguments to the bench (e.g. "--only training search" for a rerun).
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 SONGS_GLOB="$PWD/.whl/songs/*/*.m4a"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /dev/shm || true  # the music decode processes' shared memory
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# Not the venv's pytest-django: the engine's tests import no Django.
timeout 180 "$PYTHON" -m pytest tests/engine -m gpu -q -p no:cacheprovider -p no:django \
    -W "ignore::pytest.PytestConfigWarning" 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout 330 "$PYTHON" bench/engine_scale.py --profile ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "device_check: tests rc=$tests, bench rc=$bench"
exit $((tests || bench))
