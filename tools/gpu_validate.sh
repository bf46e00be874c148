#!/usr/bin/env bash
# Validate the course on one GPU: every solutions notebook under nbval in the gpu profile, with wall time, peak
# memory (kernel and GPU) and pass / fail per notebook in benchmarks/results/gpu_validate.json.
#
#     bash tools/gpu_validate.sh             # on the GPU machine (installs .whl/ from tools/gpu_wheels.sh first)
#     bash tools/gpu_validate.sh --dry-run   # anywhere: gpu shapes, smoke amounts of work, on CUDA or the CPU
#     bash tools/gpu_validate.sh 06 07       # some notebooks only (number prefixes), merged into the results file
set -euo pipefail
cd "$(dirname "$0")/.."
args=(--profile gpu)
out=benchmarks/results/gpu_validate.json
if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    # the dry run's time limit is benchmarks/notebooks.py's DRY_RUN_TIMEOUT, the one tests/test_gpu_profile.py uses
    args+=(--dry-run)
    out=benchmarks/results/notebooks_gpu_dry_run.json
else
    args+=(--timeout 600)  # seconds per notebook in the gpu profile
fi
if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
fi
python3 -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available() and torch.cuda.get_device_name())"
[[ $# -gt 0 ]] && args+=(--notebooks "$@")
# results go to $OUT too when the device tool runs this (what is written under $OUT comes back)
python3 benchmarks/notebooks.py "${args[@]}" --out "$out" && status=0 || status=$?
[[ -n "${OUT:-}" ]] && cp "$out" "$OUT/" || true
exit $status
