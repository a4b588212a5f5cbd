#!/usr/bin/env bash
# Everything GPU-related in one run, for a lent CUDA machine: the `gpu` tests, then the encoder
# benchmark (ours vs transformers, fp16 batch 256 for small/base/large, plus bf16/int8/int4 on small),
# then the indexing benchmark with the encoder on the GPU (needs faiss-cpu importable: carry a wheel).
# Results go to $OUT (default ./results). Needs torch with CUDA and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q -m gpu tests 2>&1 | tail -5 | tee "$OUT/gpu-tests.txt"
python benchmarks/encoder.py --device cuda --presets small base large --batch 256 --precisions fp16 \
    --warmup 3 --repeats 10 2>&1 | grep -v Warning | tee "$OUT/encoder-cuda-fp16.txt"
python benchmarks/encoder.py --device cuda --presets small --batch 256 --precisions bf16 int8 int4 \
    --warmup 3 --repeats 10 2>&1 | grep -v Warning | tee "$OUT/encoder-cuda-small.txt"
if python -c "import faiss, sqlalchemy, alembic" 2>/dev/null; then
    python benchmarks/index.py --device cuda --precision fp16 --batch 128 --workers 15 --sizes 256 768 \
        2>&1 | grep -v Warning | tee "$OUT/index-cuda.txt"
else
    echo "faiss/sqlalchemy/alembic not importable: indexing benchmark skipped" | tee "$OUT/index-cuda.txt"
fi
