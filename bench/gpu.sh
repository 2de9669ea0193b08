#!/usr/bin/env bash
# The GPU session script (device tool / any CUDA machine with torch + triton): install quantbench without deps,
# run the kernel tests compiled on the GPU, then the speed cases; logs and tables to ${OUT:-reports/gpu}.
# Peer kernels that are not in the image (gemlite) travel as wheels in .whl/ (device tool: carry .whl).
# Usage: [T_TESTS=s T_GEMM=s T_LAYER=s T_CALIB=s] bash bench/gpu.sh [tests|gemm|layer|calib|all] [pytest -k expr]
set -uo pipefail
OUT=${OUT:-reports/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
what=${1:-all}; sel=${2:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  timeout "${T_TESTS:-600}" python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -m "not slow" --tb=short ${sel:+-k "$sel"} 2>&1 | tee "$OUT/tests.log" | grep -E "^(FAILED|ERROR|E  )|passed|failed" | tail -30 || rc=1
fi
if [[ $what == gemm || $what == all ]]; then
  timeout "${T_GEMM:-600}" python3 -m pytest -q -p no:cacheprovider bench/test_kernel_speed.py --speed --model tiny-llama ${sel:+-k "$sel"} 2>&1 | tee "$OUT/gemm.log" | grep -E "^(FAILED|ERROR|E  )|passed|failed" | tail -8 || rc=1
fi
if [[ $what == layer || $what == all ]]; then
  timeout "${T_LAYER:-600}" python3 -m pytest -q -p no:cacheprovider bench/test_layer_speed.py --speed --model tiny-llama ${sel:+-k "$sel"} 2>&1 | tee "$OUT/layer.log" | grep -E "^(FAILED|ERROR|E  )|passed|failed" | tail -8 || rc=1
fi
if [[ $what == calib || $what == all ]]; then
  timeout "${T_CALIB:-600}" python3 -m pytest -q -p no:cacheprovider bench/test_calibration_scale.py --speed --model tiny-llama ${sel:+-k "$sel"} 2>&1 | tee "$OUT/calib.log" | grep -E "^(FAILED|ERROR|E  )|passed|failed" | tail -8 || rc=1
fi
cp reports/kernels-*.md reports/layer-*.md reports/calibration-scale-*.md "$OUT/" 2>/dev/null
for f in "$OUT"/layer-*.md "$OUT"/kernels-*.md "$OUT"/calibration-scale-*.md; do [[ -f $f ]] && grep -E "^\|" "$f" | cut -c1-150; done
exit $rc
