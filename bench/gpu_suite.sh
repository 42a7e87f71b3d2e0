#!/usr/bin/env bash
# On the lent GPU machine, from the repository root: install the carried wheels (.whl/, made here with
# ../shared/tools/gpu-wheels), then run bench/gpu_suite.py with the set-up time counted in its budget.
# Usage: bash bench/gpu_suite.sh OUT [gpu_suite.py options...]   (writes OUT/gpu_suite.{json,md,log}, gpu_tests.xml)
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT [gpu_suite.py options]}
shift
start=$(date +%s.%N)
ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no .whl/*.whl here: make them with ../shared/tools/gpu-wheels and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "error: installing .whl/ failed" >&2; exit 2; }
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
setup=$(python3 -c "import time; print(round(time.time() - $start, 1))")
echo "set-up (wheels): $setup s"
mkdir -p "$out"
python3 bench/gpu_suite.py --out "$out" --setup-seconds "$setup" "$@" 2>&1 | tee "$out/gpu_suite.log"
