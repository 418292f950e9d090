#!/usr/bin/env bash
# One call on the lent GPU machine: GPU tests, verify on GPU (one process; under torchrun and the
# distributed benchmark when there are 2 GPUs), and with BENCH_MOE=1 the MoE kernel benchmark
# (default configs only). Logs and JSON go to $OUT (or ./gpu_out).
#   bash benchmarks/gpu_session.sh                 # nvidia-h100-x2: tests, verify, torchrun, distributed
#   BENCH_MOE=1 bash benchmarks/gpu_session.sh     # one GPU: tests, verify, bench_moe --no-sweep
#   GPU_TESTS_K=small_shapes SKIP_20B=1 bash benchmarks/gpu_session.sh   # some GPU tests, then the verify runs
#   BENCH_MOE=1 BENCH_MOE_ARGS="--experts 128 --tokens 1 64" ...   # bench_moe at some points only
#   SKIP_GPU_TESTS=1 SKIP_VERIFY=1 SKIP_20B=1 BENCH_MOE=1 ...        # the benchmark alone
#   GPU_TESTS_FILES="tests/test_eager_plan.py tests/test_layer_on_gpu.py" ...   # some test files only
#   VERIFY_FORMATS=1 ...     # also verify a tiny checkpoint of each other format (mxfp4_moe.synthetic_formats)
#   PROBE_HOST_COST=1 ...    # also the eager layer's host cost (benchmarks/probes/probe_host_cost.py)
#   LAYER_AB="one_launch_router l2_prefetch" ...   # first, the layer with each switch off and on
#                            # (benchmarks/probes/probe_layer_ab.py; AB_POINTS="128:1,..." to choose points)
#   GPU_TESTS_K="not kernel_vs_float32 or gpt-oss-20b-E32-1-" ...   # every GPU test but most kernel x config
#                            # points (about 120 of the kernel file's 327)
# The device has no `gguf` package (VERIFY_FORMATS' GGUF step needs it): unzip its wheel (pure Python;
# `pip download gguf --no-deps`) into an ignored folder of the checkout, name that folder in the call's
# carry and add it to PYTHONPATH in the command.
# Set MXFP4_COMMIT=<hash of your checkout> in the command: the device's copy of .git can be stale
# (seen on 2026-11-28: it named the session's first commit), and the JSON records this value.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
# The package is not installed on the device machine: import it from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
commit="${MXFP4_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
export MXFP4_COMMIT="$commit"      # the benchmarks print it (the device's copy has no git metadata)
echo "commit $commit"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() { echo; echo "=== $1"; shift; "$@"; echo "=== rc=$?"; }

for switch in ${LAYER_AB:-}; do
  step "layer A/B: $switch" python3 -m benchmarks.probes.probe_layer_ab --switch "$switch" \
    --points "${AB_POINTS:-128:1,128:2,128:8,32:1,32:8}" --out "$OUT" 2>&1 | grep -v '^{"device' | cut -c1-330
done
if [ "${SKIP_GPU_TESTS:-0}" != 1 ]; then
  step "gpu tests ${GPU_TESTS_K:+(-k $GPU_TESTS_K)}" python3 -m pytest -q -m gpu ${GPU_TESTS_FILES:-tests/} ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
fi
# verify (with the whole-model check) at decode and at 64 tokens, on the built-in checkpoint and on a
# tiny transformers-loadable model (H = I = 64: one K step per program in every kernel)
if [ "${SKIP_VERIFY:-0}" != 1 ]; then
  TINY=/tmp/ckpt_tiny
  python3 -c "
from mxfp4_moe.synthetic import make_synthetic_checkpoint
make_synthetic_checkpoint('$TINY', num_layers=2, num_experts=4, hidden=64, intermediate=64, top_k=2, full_model=True)"
  for tokens in 1 64; do
    step "verify built-in, $tokens tokens" python3 -m mxfp4_moe.verify --model --tokens $tokens --json "$OUT/verify_builtin_t$tokens.json" > "$OUT/verify_builtin_t$tokens.txt" 2>&1; tail -3 "$OUT/verify_builtin_t$tokens.txt"
    step "verify tiny H = I = 64, $tokens tokens" python3 -m mxfp4_moe.verify $TINY --model --tokens $tokens --json "$OUT/verify_tiny_t$tokens.json" > "$OUT/verify_tiny_t$tokens.txt" 2>&1; tail -3 "$OUT/verify_tiny_t$tokens.txt"
  done
fi
if [ "${VERIFY_FORMATS:-0}" = 1 ]; then
  for fmt in compressed-tensors quark-qwen3 quark-gpt-oss gguf; do
    target=$(python3 -c "
from mxfp4_moe.synthetic_formats import make_format_checkpoint
print(make_format_checkpoint('/tmp/format_$fmt', '$fmt')[0])" 2>"$OUT/write_$fmt.err") || { echo "$fmt: not written: $(tail -1 "$OUT/write_$fmt.err")"; continue; }
    step "verify $fmt" python3 -m mxfp4_moe.verify "$target" --tokens 64 --json "$OUT/verify_$fmt.json" > "$OUT/verify_$fmt.txt" 2>&1; tail -3 "$OUT/verify_$fmt.txt"
  done
fi
if [ "${PROBE_HOST_COST:-0}" = 1 ]; then
  step "host cost of an eager layer call" python3 -m benchmarks.probes.probe_host_cost --json "$OUT/host_cost.json" 2>&1 | tail -6
fi
CK=/tmp/ckpt20b
if [ "${SKIP_20B:-0}" != 1 ]; then
  step "write gpt-oss-20b-like layer" python3 -c "
  from mxfp4_moe.synthetic import make_synthetic_checkpoint
  make_synthetic_checkpoint('$CK', num_layers=1, num_experts=32, hidden=2880, intermediate=2880, top_k=4, seed=0)"
  step "verify 20b-like tp4 triton-align" python3 -m mxfp4_moe.verify $CK --tp 4 --align triton --tokens 512 --bench-tokens 512 --json "$OUT/verify_20b_tp4.json" > "$OUT/verify_20b_tp4.txt" 2>&1; cat "$OUT/verify_20b_tp4.txt" | tail -14
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    step "torchrun verify tp2" torchrun --nproc-per-node 2 -m mxfp4_moe.verify $CK --tp 2 --align triton --tokens 256 --json "$OUT/torchrun_tp2.json" > "$OUT/torchrun_tp2.txt" 2>&1; tail -12 "$OUT/torchrun_tp2.txt"
    step "torchrun verify ep2" torchrun --nproc-per-node 2 -m mxfp4_moe.verify $CK --ep 2 --tokens 256 --json "$OUT/torchrun_ep2.json" > "$OUT/torchrun_ep2.txt" 2>&1; tail -6 "$OUT/torchrun_ep2.txt"
    step "bench distributed" python3 -m benchmarks.bench_distributed --checkpoint $CK --out "$OUT" 2>&1 | tee "$OUT/bench_distributed.log" | tail -20
  fi
fi
if [ "${BENCH_MOE:-0}" = 1 ]; then
  step "bench_moe (default configs)" env MXFP4_COMMIT="$commit" python3 -m benchmarks.bench_moe --no-sweep ${BENCH_MOE_ARGS:-} --out "$OUT/moe" 2>&1 | grep -v '^{' | tail -40
fi
# The device tool brings back at most 8 files: pack them into one.
(cd "$OUT" && tar czf /tmp/gpu_session.tar.gz . && rm -rf ./* && mv /tmp/gpu_session.tar.gz .)
