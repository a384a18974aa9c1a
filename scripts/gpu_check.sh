#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (for a machine that has one and its own PyTorch):
# the GPU tests, a short pretraining run on the GPU, and the decode benchmark on the GPU.
# Logs go to $OUT (default ./gpu-check). Uses the python3 on PATH with nanoseek from this folder.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NANOSEEK_CACHE=$(mktemp -d)
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs -x tests/test_cuda.py > "$OUT/tests.log" 2>&1
tail -n 40 "$OUT/tests.log"
timeout 120 python3 -m nanoseek.cli train --device cuda --corpus stdlib --tokenizer-max-bytes 3000000 --steps 200 \
    --batch-size 32 --seq-len 256 --eval-every 100 --log-every 50 --out /tmp/gpu-run --max-new-tokens 40 > "$OUT/train.log" 2>&1
tr '\r' '\n' < "$OUT/train.log" | grep -v "step/s\]\|s/step\]\|^$" | tail -n 30
cp /tmp/gpu-run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
timeout 170 python3 benchmarks/decode.py --device cuda --draft-tokens --new-tokens 64 --repeats 2 > "$OUT/decode.log" 2>&1
tail -n 25 "$OUT/decode.log"
