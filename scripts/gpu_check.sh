#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (for a machine that has one and its own PyTorch):
# the GPU tests, the decode benchmark on the GPU (compiled steps replay CUDA graphs there), and a
# short pretraining run on the GPU. Logs go to $OUT (default ./gpu-check). Uses the python3 on PATH
# with nanoseek from this folder. About 8 minutes at most (each part has its own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NANOSEEK_CACHE=$(mktemp -d)
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py > "$OUT/tests.log" 2>&1
tail -n 40 "$OUT/tests.log"
# perf_hints: inductor's reasons for running a step without CUDA graphs, if it does
TORCH_LOGS=perf_hints timeout 220 python3 benchmarks/decode.py --device cuda --draft-tokens 1 2 --new-tokens 128 \
    --repeats 2 --bf16 > "$OUT/decode.log" 2>&1
grep -i "skipping cudagraphs" "$OUT/decode.log" | sort | uniq -c | head -n 5
grep -v "skipping cudagraphs" "$OUT/decode.log" | tail -n 25
# a fresh run folder each time: `nanoseek train --out` refuses a folder that already holds a run's checkpoints
RUN_DIR=$(mktemp -d)/run
timeout 90 python3 -m nanoseek.cli train --device cuda --corpus stdlib --tokenizer-max-bytes 3000000 --steps 200 \
    --batch-size 32 --seq-len 256 --eval-every 100 --log-every 50 --out "$RUN_DIR" --max-new-tokens 40 > "$OUT/train.log" 2>&1
tr '\r' '\n' < "$OUT/train.log" | grep -v "step/s\]\|s/step\]\|^$" | tail -n 20
