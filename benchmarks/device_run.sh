#!/usr/bin/env bash
# One device call: decode benchmarks, then the kernel leaderboard (which tunes every
# kernel on this GPU), everything written under $OUT. Steps run in the order given so a
# call that runs out of time still returns the finished ones.
#   STEPS="bench:deepseek-r1-distill-qwen-1.5b:128 suite" bash benchmarks/device_run.sh
# bench:<model>:<prompt>[:paths]  `tileflow bench` (paths comma-separated, default all)
# jaxbench:<model>:<prompt>[:paths] `tileflow bench --framework jax` (paths comma-separated)
# multirow:<model>:<prompt>:<batch>[:<speculate>]  the patch path plus `--batch N` (generate on N
#                                  left-padded prompts per path, the step at 1-16 rows) and
#                                  `--speculate` (lookup:K or draft:K:MODEL)
# pytest:<test file>[:<-k expression>]  pytest on the GPU (e.g. the compiled jax_triton primitives)
# suite[:model]                    benchmarks/gpu_suite.py (tunes; autotune.json to $OUT)
# (env: REPEATS, BENCH_LIMIT seconds a bench, BREAKDOWN=1 per-kernel-class step profile,
#  SUITE_KERNELS="a b" to tune only those, SUITE_MAX candidates a kernel (default 24),
#  SUITE_LIMIT seconds a suite step, NEW new tokens a bench (default the bench's),
#  LAYERS=N only the first N decoder layers of a bench's model (DeepSeek-V3 on one card),
#  WEIGHTS=int4|fp8|fp8-checkpoint a bench's patch paths on quantized projections (`--weights`; its roofline
#  counts their bytes; fp8-checkpoint: FP8Linear built on the card, no bf16 model: the 70B on one card))
# ab:<model>:<prompt>:<file>[,<file>...] the patch path once per tuning file, each in a fresh
#                                  tuning cache ("-" = the shipped tables alone): an A/B in one call
# steptune[:model]                 `tileflow tune` (extra arguments in TUNE_ARGS, e.g. "--passes 3"):
#                                  the patched decode step tuned by whole-step timing;
#                                  the winners stay in this call's tuning cache for later steps and
#                                  are copied to $OUT/autotune-step.json
# rowsprobe[:<rows,...>]           benchmarks/rows_probe.py: each many-row form of the matvec family
#                                  per kernel (ROWS_CANDIDATES dot candidates sampled, default 4)
# tuned                            use $OUT/autotune.json (or TUNED=<file>) for later steps
# env:NAME=VALUE                   set an environment variable for later steps (an A/B in one call,
#                                  e.g. env:TILEFLOW_EARLY_INPUTS=0)
# Each bench writes under $OUT/<step number>-bench/, so two benches of one model do not collide.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
# pass TILEFLOW_COMMIT=<hash> from the calling machine: the device checkout's git metadata is stale
# pure-Python wheels the GPU image lacks (array_api_compat; jax-triton==0.3.1 and absl-py for the JAX
# paths' Triton kernels), carried in .whl/ (git-ignored: fill it with
# `pip download array-api-compat jax-triton==0.3.1 absl-py --no-deps -d .whl` and pass carry=[".whl"]): importable as zips.
# torchao for the bench's torchao_int8 / torchao_int4 paths (WEIGHTS=int4|fp8; 0.17.0 is built against torch 2.11,
# the image's; an abi3 wheel, 3.2 MB):
# `pip download torchao==0.17.0 --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl`
# A zip import loads none of its .so files (torchao then skips its C++ extension): the two paths need none
# (int8 weight-only is torch.mm under inductor, int4 tinygemm is aten._weight_int4pack_mm), so the zip is enough
WHEELS=$(ls .whl/*.whl 2>/dev/null | tr '\n' ':')
export PYTHONPATH=src:${WHEELS}${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TILEFLOW_COMMIT=${TILEFLOW_COMMIT:-unknown}
# a fresh tuning cache per call: the device keeps /tmp between calls on one host, and a tuning
# left there by an earlier call's `suite` step once leaked into a later call's baseline
export TILEFLOW_CACHE_DIR=${TILEFLOW_CACHE_DIR:-$(mktemp -d /tmp/tileflow-cache.XXXXXX)}
mkdir -p "$TILEFLOW_CACHE_DIR" "$OUT"
[ -n "${TUNED:-}" ] && cp "$TUNED" "$TILEFLOW_CACHE_DIR/autotune.json"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader || true
n=0
for step in ${STEPS:-bench:deepseek-r1-distill-qwen-1.5b:128 suite}; do
  n=$((n + 1))
  echo "=== $step ($(date +%T))"
  IFS=: read -r kind model prompt paths <<<"$step"
  case $kind in
    bench)
      args=(--model "$model" --prompt "$prompt" --out "$OUT/$n-bench")
      [ -n "${paths:-}" ] && args+=(--paths ${paths//,/ })
      [ -n "${REPEATS:-}" ] && args+=(--repeats "$REPEATS")
      [ -n "${NEW:-}" ] && args+=(--new "$NEW")
      [ -n "${BREAKDOWN:-}" ] && args+=(--breakdown)
      [ -n "${WEIGHTS:-}" ] && args+=(--weights "$WEIGHTS")
      [ -n "${LAYERS:-}" ] && args+=(--layers "$LAYERS")
      # with WEIGHTS the torchao comparison paths run too; without torchao they are recorded as not run
      if [ -n "${WEIGHTS:-}" ] && ! python3 -c "import torchao" >/dev/null 2>&1; then
        echo "!!! torchao is not importable: torchao_int8 / torchao_int4 will not run (.whl/ lacks its wheel?)"
      fi
      timeout "${BENCH_LIMIT:-900}" python3 benchmarks/run_cli_uninstalled.py bench "${args[@]}" 2>&1 \
        | grep --line-buffered -v -E "Warning|warn\(|^\s*$" ;;
    jaxbench)
      # without jax_triton the JAX paths run the Pallas kernels (optimize keeps XLA's code):
      # a different measurement, so say so loudly (carry .whl/ with jax_triton and absl-py)
      python3 -c "import jax_triton" 2>/dev/null \
        || echo "!!! jax_triton is not importable: JAX paths run through Pallas, not the Triton kernels (.whl/ lacks jax_triton / absl-py wheels?)"
      args=(--framework jax --model "$model" --prompt "$prompt" --out "$OUT/$n-jaxbench")
      [ -n "${paths:-}" ] && args+=(--paths ${paths//,/ })
      [ -n "${REPEATS:-}" ] && args+=(--repeats "$REPEATS")
      timeout "${BENCH_LIMIT:-900}" python3 benchmarks/run_cli_uninstalled.py bench "${args[@]}" 2>&1 \
        | grep --line-buffered -v -E "Warning|warn\(|^\s*$" ;;
    multirow)  # read gave the rest of the step, colons kept, to $paths: <batch>[:<speculate>]
      batch=${paths%%:*}
      args=(--model "$model" --prompt "$prompt" --out "$OUT/$n-multirow" --paths tileflow_patch --batch "$batch")
      [ "$paths" != "$batch" ] && args+=(--speculate "${paths#*:}")
      [ -n "${REPEATS:-}" ] && args+=(--repeats "$REPEATS")
      timeout "${BENCH_LIMIT:-900}" python3 benchmarks/run_cli_uninstalled.py bench "${args[@]}" 2>&1 \
        | grep --line-buffered -v -E "Warning|warn\(|^\s*$" ;;
    pytest)  # pytest:<file>[:<-k expression>]; the expression's spaces written as commas
      kexpr=${prompt:+-k "${prompt//,/ }"}
      timeout "${BENCH_LIMIT:-900}" bash -c "python3 benchmarks/pytest_uninstalled.py -q -p no:cacheprovider $model $kexpr" 2>&1 | tail -25 ;;
    suite)  # suite[:model]: another built-in config's shapes, Triton only (Pallas is shape-independent)
      sargs=(--out "$OUT")
      [ -n "${SUITE_KERNELS:-}" ] && sargs+=(--kernels $SUITE_KERNELS)
      [ -n "${SUITE_MAX:-}" ] && sargs+=(--max-candidates "$SUITE_MAX")
      if [ -n "${model:-}" ]; then sargs+=(--model "$model" --no-pallas); else sargs+=(--no-pallas-timing); fi
      # the leaderboard records each tuned kernel as it goes, so a step cut by its limit keeps those
      timeout "${SUITE_LIMIT:-900}" python3 benchmarks/gpu_suite.py "${sargs[@]}" 2>&1 | tail -40 ;;
    ab)
      for f in ${paths//,/ }; do
        cache=$(mktemp -d /tmp/tileflow-ab.XXXXXX)
        [ "$f" != "-" ] && cp "$f" "$cache/autotune.json"
        echo "--- arm: $f"
        args=(--model "$model" --prompt "$prompt" --out "$OUT/$n-ab-$(basename "$f" .json)" --paths tileflow_patch)
        [ -n "${REPEATS:-}" ] && args+=(--repeats "$REPEATS")
        [ -n "${BREAKDOWN:-}" ] && args+=(--breakdown)
        TILEFLOW_CACHE_DIR=$cache timeout "${BENCH_LIMIT:-900}" python3 benchmarks/run_cli_uninstalled.py bench "${args[@]}" 2>&1 \
          | grep --line-buffered -v -E "Warning|warn\(|^\s*$"
      done ;;
    steptune)
      targs=(--out "$OUT")
      [ -n "${model:-}" ] && targs+=(--model "$model")
      targs+=(${TUNE_ARGS:-})
      timeout "${BENCH_LIMIT:-900}" python3 benchmarks/run_cli_uninstalled.py tune "${targs[@]}" 2>&1 \
        | grep --line-buffered -v -E "Warning|warn\(|^\s*$"
      cp "$TILEFLOW_CACHE_DIR/autotune.json" "$OUT/autotune-step.json" 2>/dev/null || true ;;
    rowsprobe)
      timeout "${BENCH_LIMIT:-900}" python3 benchmarks/rows_probe.py --out "$OUT" \
        --candidates "${ROWS_CANDIDATES:-4}" ${model:+--rows ${model//,/ }} 2>&1 | grep -v -i warn | tail -40 ;;
    tuned)
      cp "${TUNED:-$OUT/autotune.json}" "$TILEFLOW_CACHE_DIR/autotune.json" ;;
    env)
      export "$model" ;;
  esac
done
echo "=== done ($(date +%T))"
