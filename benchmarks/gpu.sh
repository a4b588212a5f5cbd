#!/usr/bin/env bash
# Everything GPU-related in one run, for a lent CUDA machine (an H200 for the README's figures):
#   1. the `gpu`-marked tests (encoder parity on CUDA, int8/int4 kernels, nvjpeg vs PIL, GPU search);
#   2. the encoder: ours (eager and compiled) vs transformers' Dinov2Model (sdpa), fp16 batch 256,
#      small/base/large, then bf16/int8/int4 on small;
#   3. indexing 12 MP JPEGs: reading and hashing alone; the GPU lane stage by stage; PIL workers,
#      nvjpeg, both; end to end (needs faiss/sqlalchemy/alembic);
#   4. search and dedup at 1M x 384 through torch on the GPU (and faiss where it has a GPU build);
#   5. only when named (`autotune`): ViT-B and ViT-L with inductor's GEMM autotuning, a trial for the
#      1.3x target that the default compile misses there (compiling takes minutes instead of seconds).
#
#     OUT=results bash benchmarks/gpu.sh            # steps 1-4
#     OUT=results bash benchmarks/gpu.sh tests search  # some steps: tests encoder index search autotune
#
# Each step has its own time limit, so one that hangs or fails costs only itself; every line goes to
# $OUT/gpu.log and each step's output to $OUT/<step>.txt; the exit status is 1 if any step failed
# (2 where torch sees no GPU). Needs torch with CUDA and transformers.
# dinoseek need not be installed: the repository folders are made importable as `dinoseek.*`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
STEPS=${*:-tests encoder index search}
if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "benchmarks/gpu.sh: needs python3 with a CUDA build of torch and a visible GPU" >&2
    exit 2
fi
mkdir -p "$OUT"
scratch=$(mktemp -d)  # the import namespace and the compile caches; removed at exit
trap 'rm -rf "$scratch"' EXIT
namespace=$scratch/namespace
mkdir -p "$namespace/dinoseek"
for package in model indexer retrieval migrations; do ln -s "$PWD/$package" "$namespace/dinoseek/$package"; done
export PYTHONPATH="$namespace:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DINOSEEK_PROGRESS=0

log() { echo "$*" | tee -a "$OUT/gpu.log"; }

# step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt and the log.
failed=0
step() {
    local name=$1 limit=$2 started=$SECONDS status
    shift 2
    log "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" >>"$OUT/gpu.log"
    status=${PIPESTATUS[0]}
    log "== $name: exit $status after $((SECONDS - started)) s"
    [[ $status == 0 ]] || failed=$((failed + 1))
}

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

log "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
log "# $(nproc) cores; $(python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"

if wanted tests; then
    # xdist (where installed) builds the CPU references of the test files side by side
    parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
    step gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider $parallel $(grep -l "mark.gpu" tests/test_*.py)
fi
if wanted encoder; then
    export TORCHINDUCTOR_CACHE_DIR=$scratch/inductor-encoder  # a cold cache: "compile s" is a first compile
    step encoder-fp16 150 python3 benchmarks/encoder.py --device cuda --presets small base large --batch 256 \
        --precisions fp16 --warmup 2 --repeats 7
    step encoder-small 90 python3 benchmarks/encoder.py --device cuda --presets small --batch 256 \
        --precisions bf16 int8 int4 --warmup 2 --repeats 7
fi
if wanted index; then
    step read 60 python3 benchmarks/read.py --files 64 --threads 1 4 16
    step index 180 python3 benchmarks/index.py --device cuda --precision fp16 --batch 128 --workers 14 \
        --sizes 512 2048 --gpu-batch 32
fi
if wanted autotune; then
    export TORCHINDUCTOR_CACHE_DIR=$scratch/inductor-autotune
    step encoder-autotune 300 env TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 python3 benchmarks/encoder.py --device cuda \
        --presets base large --batch 256 --precisions fp16 --warmup 2 --repeats 7
fi
if wanted search; then
    step search 120 python3 benchmarks/gpu_search.py --n 1000000
fi
log "# done after $SECONDS s; $failed step(s) failed"
exit $((failed > 0))
