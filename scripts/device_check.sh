#!/usr/bin/env bash
# The device check in one command (docs/gpu.md): on the GPU machine, install the carried wheels,
# then run benchmarks.device, which writes its report into OUTDIR.
#
#   bash scripts/device_check.sh "$OUT"                      # on the GPU machine (about 8 minutes)
#   bash scripts/device_check.sh /tmp/check --dry-run        # here: CPU, tiny data, the same code path
#
# Any further option goes to `python -m benchmarks.device` (--budget-s, --parts, --data-dir).
set -uo pipefail
OUT=${1:?usage: scripts/device_check.sh OUTDIR [--dry-run] [--budget-s SECONDS]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY=0
for arg in "$@"; do [[ $arg == --dry-run ]] && DRY=1; done
if [[ $DRY == 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
    # What the GPU image lacks (jsonargparse, datasets, mnist1d and their own needs): from the wheels
    # that scripts/prepare_wheels.sh downloaded here, no network.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PY" -m benchmarks.device --output "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
