#!/usr/bin/env bash
# The GPU check in one command (issue 15): chat and classify exactness tests on CUDA, then
# the chat benchmark on llava-1.5-7b shapes (Llama width 4096, 32 layers, vocabulary 32064;
# random weights, fp16, about 14 GB) at 1, 8 and 32 clients, with and without an M2PT adapter
# (its KV prefix read in place, in half precision), printed as one table.
#
#   bench/gpu.sh                 # on a CUDA machine without network
#   bench/gpu.sh --wheels DIR    # fastapi/uvicorn/httpx wheels to install offline when missing
#   bench/gpu.sh --cpu-smoke     # the same steps on CPU with small shapes (a check of the script)
#
# Needs torch, transformers, pillow, pytest, safetensors, prometheus-client; output also in
# bench/gpu-out/ (test log, bench table and rows as JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
WHEELS=wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=bench/gpu-out
mkdir -p "$OUT"

missing=$(python - <<'PY'
import importlib.util
print(" ".join(m for m in ("fastapi", "uvicorn", "httpx", "pydantic_settings", "multipart")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing from $WHEELS: $missing"
  pip install -q --no-index --find-links "$WHEELS" fastapi uvicorn httpx pydantic-settings python-multipart
fi

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; DTYPE=float32
  BENCH=(--width 256 --layers 2 --vocab 4000 --clients 1,2 --prompts 100,300 --max-tokens 8
         --burst 2 --burst-prompt 300 --burst-stream-tokens 16 --m2pt 4)
else
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use --cpu-smoke'"
  DEVICE=cuda; DTYPE=float16
  BENCH=(--width 4096 --layers 32 --vocab 32064 --clients 1,8,32 --prompts 100,1000,2000 --max-tokens 64
         --burst 8 --burst-prompt 2000 --burst-stream-tokens 128 --m2pt 10)
fi

echo "== exactness tests on $DEVICE"
set +e
PROMPTSWAP_TEST_DEVICE=$DEVICE python -m pytest -q -p no:cacheprovider \
  tests/chat/test_chat_exact.py tests/chat/test_chat_engine.py tests/chat/test_shared_prefix.py \
  tests/classify/test_exact.py tests/backbones/test_device_pixels.py 2>&1 | tee "$OUT/tests.log"
TESTS=${PIPESTATUS[0]}
set -e

echo "== chat bench on $DEVICE ($DTYPE)"
python -m bench.chat --device "$DEVICE" --dtype "$DTYPE" "${BENCH[@]}" --json "$OUT/chat.json" 2>&1 \
  | grep -v -i warning | tee "$OUT/chat.md"

echo "== exactness tests: $([ "$TESTS" = 0 ] && echo passed || echo "FAILED (rc $TESTS, see $OUT/tests.log)")"
exit "$TESTS"
