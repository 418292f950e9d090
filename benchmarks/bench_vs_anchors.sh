#!/usr/bin/env bash
# One device call for the comparison of benchmarks/RESULTS.md 3.1: our bench_moe.py (default
# configs, E = 128 and 32), then the anchors' bench_tk.py (OpenAI triton_kernels, E = 128 and 32)
# and read_bw.py (the HBM read rate, beside our own measurement of it), then our table rebuilt
# from the saved JSONs with triton_kernels' times beside ours, on one roofline.
#
# The anchors (../shared/anchors) do not travel to the device: copy them into the checkout,
# ignored by git, and name the copy in `carry`. Once, here:
#   cp -r ../shared/anchors .anchors && echo /.anchors/ >> .git/info/exclude
# then on the device, with carry [".anchors"]:
#   MXFP4_COMMIT=<hash of the checkout> bash benchmarks/bench_vs_anchors.sh
# Env: ANCHORS (the anchors folder, default .anchors), OUT (default ./gpu_out), BENCH_MOE_ARGS
# (more bench_moe options), SKIP_MOE=1 or SKIP_TK=1 to split the work over two calls on one warm
# machine: give both the same OUT outside the call's own $OUT (it starts empty), e.g. /tmp/bva, and
# copy it to $OUT at the end of the second (each call renders what OUT holds so far).
# Back in $OUT: results_moe.md (the table) and everything, logs included, in bench_vs_anchors.tar.gz
# (the device tool returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1
ANCHORS=$(cd "${ANCHORS:-.anchors}" 2>/dev/null && pwd) || { echo "no anchors folder ${ANCHORS:-.anchors}" >&2; exit 2; }
OUT="${OUT:-$ROOT/gpu_out}"; mkdir -p "$OUT/moe" "$OUT/tk128" "$OUT/tk32"
# An earlier call's results (a split run), to render beside this call's.
[ -f "$OUT/bench_vs_anchors.tar.gz" ] && tar xzf "$OUT/bench_vs_anchors.tar.gz" -C "$OUT"
# The package is not installed on the device machine: import it from the checkout.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MXFP4_COMMIT="${MXFP4_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
echo "commit $MXFP4_COMMIT"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# step NAME LOG COMMAND...: run COMMAND with its output in LOG, then show the log's end.
step() {
  local name=$1 log=$2; shift 2
  echo; echo "=== $name ($(date +%T))"; "$@" > "$log" 2>&1; local rc=$?
  tail -n 4 "$log"; echo "=== rc=$rc"
}
in_dir() { (cd "$1" && shift && "$@"); }

if [ "${SKIP_MOE:-0}" != 1 ]; then
  step "bench_moe --no-sweep" "$OUT/moe/bench_moe.log" \
    python3 -m benchmarks.bench_moe --no-sweep ${BENCH_MOE_ARGS:-} --out "$OUT/moe"
fi
if [ "${SKIP_TK:-0}" != 1 ]; then
  # bench_tk imports triton_kernels alone (not our package) and writes $OUT/tk_results.json.
  for e in 128 32; do
    step "bench_tk --E $e" "$OUT/tk$e/bench_tk.log" in_dir "$ANCHORS" env OUT="$OUT/tk$e" \
      PYTHONPATH=triton_kernels_v3.6.0 python3 bench_tk.py --E $e --jobs 4 --no-ref --budget 200
  done
  step "read_bw" "$OUT/read_bw.log" in_dir "$ANCHORS" python3 read_bw.py
fi
# The table from the saved JSONs, run inside $OUT so that it names the files as the tarball does.
tk_specs=()
for e in 128 32; do
  [ -f "$OUT/tk$e/tk_results.json" ] && tk_specs+=("$e=tk$e/tk_results.json")
done
step "render with triton_kernels (${tk_specs[*]:-none})" "$OUT/render.log" in_dir "$OUT" \
  python3 -m benchmarks.bench_moe --render-only moe/out_moe.json ${tk_specs[@]:+--tk-json "${tk_specs[@]}"} \
  --out moe
sed -n '/^## Against/,/^## All/p' "$OUT/render.log"
(cd "$OUT" && cp moe/results_moe.md . 2>/dev/null; tar czf /tmp/bench_vs_anchors.tar.gz --exclude=./results_moe.md \
  --exclude=./bench_vs_anchors.tar.gz . && rm -rf moe tk128 tk32 ./*.log && mv /tmp/bench_vs_anchors.tar.gz .)
