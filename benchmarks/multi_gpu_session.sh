#!/usr/bin/env bash
# One call on a lent multi-GPU machine (nvidia-h100-x2, -x4 or -x8): issue 31's runs, as many
# ranks as the host has GPUs (2, 4, 8). Logs and JSON go to $OUT (or ./gpu_out), packed in one tar.
#   STEPS=tests bash benchmarks/multi_gpu_session.sh      # token dispatch + NCCL tests (pytest -m gpu)
#   STEPS=model bash benchmarks/multi_gpu_session.sh      # item 1: the whole 20b-shaped model, every layout
#   STEPS=dispatch bash benchmarks/multi_gpu_session.sh   # items 2-3: both EP schemes, 2/4/8 ranks, T 1..8192
# Default STEPS="tests model dispatch" (more than one 10-minute call holds: split them on the device).
# Set MXFP4_COMMIT=<hash of your checkout> in the command: the device's copy of .git can be stale.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
# The package is not installed on the device machine: make kernels/ importable as mxfp4_moe.kernels.
ln -sfn ../kernels mxfp4_moe/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MXFP4_COMMIT="${MXFP4_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
gpus=$(nvidia-smi -L | wc -l)
echo "commit $MXFP4_COMMIT, $gpus GPUs"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() { echo; echo "=== $1"; shift; "$@"; echo "=== rc=$?"; }
WORK=/tmp/multi_gpu_session; mkdir -p "$WORK"

for s in ${STEPS:-tests model dispatch}; do
  case "$s" in
  tests)
    step "gpu tests: token dispatch over NCCL" python3 -m pytest -q -m gpu tests/test_expert_dispatch.py 2>&1 | tee "$OUT/gpu_tests_dispatch.log" | tail -5
    ;;
  model)
    # float32 first (judged against the single GPU), then bf16 with decode timings per layout.
    layouts=("--tp 2" "--ep 2")
    [ "$gpus" -ge 4 ] && layouts+=("--tp 2 --ep 2" "--tp 4" "--ep 4")
    [ "$gpus" -ge 8 ] && layouts+=("--tp 2 --ep 4" "--ep 8")
    step "model float32, TP 2" torchrun --nproc-per-node 2 -m benchmarks.bench_model_torchrun --tp 2 --dtype float32 --batches "" --workdir "$WORK" --out "$OUT/model_fp32" 2>&1 | tee "$OUT/model_fp32_tp2.log" | tail -12
    for layout in "${layouts[@]}"; do
      read -r -a flags <<< "$layout"
      n=1; for ((i = 1; i < ${#flags[@]}; i += 2)); do n=$((n * flags[i])); done
      tag=$(echo "$layout" | tr -d ' -')
      step "model bf16, $layout" torchrun --nproc-per-node "$n" -m benchmarks.bench_model_torchrun $layout --workdir "$WORK" --out "$OUT" 2>&1 | tee "$OUT/model_$tag.log" | tail -14
    done
    ;;
  dispatch)
    CK="$WORK/layer120b"
    [ -f "$CK/config.json" ] || step "write a gpt-oss-120b-like layer" python3 -c "
from mxfp4_moe.synthetic import make_synthetic_checkpoint
make_synthetic_checkpoint('$CK', num_layers=1, num_experts=128, hidden=2880, intermediate=2880, top_k=4, seed=0)"
    for n in 2 4 8; do
      [ "$gpus" -ge "$n" ] || continue
      step "EP schemes, $n ranks" torchrun --nproc-per-node "$n" -m benchmarks.bench_expert_dispatch --checkpoint "$CK" --out "$OUT" 2>&1 | tee "$OUT/dispatch_n$n.log" | tail -22
    done
    ;;
  *) echo "unknown step $s (tests, model, dispatch)"; exit 2 ;;
  esac
done
rm -f mxfp4_moe/kernels
# The device tool brings back at most 8 files: pack them into one.
(cd "$OUT" && tar czf /tmp/multi_gpu_session.tar.gz . && rm -rf ./* && mv /tmp/multi_gpu_session.tar.gz .)
