#!/usr/bin/env bash
# The prepared device check (issue 10), for a CUDA machine lent through the device tool. Run it there from the
# repository root in one call, after scripts/prepare_device_check.sh here:
#
#   run(command="bash bench/device_check.sh", carry=[".whl", ".devcarry"], timeout_s=540)
#
# It installs the few packages that machine lacks (wheels carried in .whl), runs the CUDA tests (they skip on a
# machine without CUDA), then bench/gpu_check.py within a time budget (BUDGET seconds, default 330). Everything it
# prints also goes to $OUT (the device tool brings $OUT back).
set -uo pipefail
OUT="${OUT:-/tmp/device-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PY:-python3}"
if ! "$PY" -c "import blake3, platformdirs, jsonschema" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || { echo "installing the carried wheels failed"; exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi -L; nproc; free -g; df -h /dev/shm; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/machine.txt"
"$PY" -m pytest tests/test_device_pipeline.py tests/test_device_path.py tests/test_engine.py tests/test_device_streaming.py \
    tests/test_methods.py -q -p no:cacheprovider -k "cuda or pipeline or device" 2>&1 | tee "$OUT/pytest.txt"
layouts=.devcarry/layouts
[ -d "$layouts" ] || layouts=../shared/layouts
"$PY" bench/gpu_check.py --data-dir /dev/shm/mm-gpu --layouts "$layouts" --budget "${BUDGET:-330}" 2>&1 | tee "$OUT/gpu_check.txt"
rm -rf /dev/shm/mm-gpu
