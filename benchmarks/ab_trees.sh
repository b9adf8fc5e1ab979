#!/usr/bin/env bash
# An A/B of two commits in one device call: each arm is a source tree exported with
#   git archive <commit> src integrations patterns tests benchmarks/run_cli_uninstalled.py \
#     benchmarks/pytest_uninstalled.py benchmarks/tuned | tar -x -C .ab/<arm>
# (.ab/ git-ignored through .git/info/exclude, passed in the call's carry with .whl/).
#   ARMS="head:model:prompt:path,path base:model:prompt:path" bash benchmarks/ab_trees.sh
#   arm "pytest" entries: "head:pytest:<test file>[:-k expression, spaces as commas]"
# Each bench writes under $OUT/<n>-<arm>/; the fresh tuning cache per arm keeps them apart.
set -uo pipefail
OUT=${OUT:-/tmp/ab-out}
W=$(ls "$PWD"/.whl/*.whl 2>/dev/null | tr '\n' ':')
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
n=0
for item in $ARMS; do
  n=$((n + 1))
  IFS=: read -r arm model prompt paths <<<"$item"
  echo "=== $n $item ($(date +%T))"
  if [ "$model" = pytest ]; then
    kexpr=${paths:+-k "${paths//,/ }"}
    (cd ".ab/$arm" && PYTHONPATH=src:$W timeout "${LIMIT:-300}" bash -c "python3 benchmarks/pytest_uninstalled.py -q -p no:cacheprovider -p no:warnings $prompt $kexpr" 2>&1 | tail -8)
    continue
  fi
  (cd ".ab/$arm" && TILEFLOW_CACHE_DIR=$(mktemp -d) TILEFLOW_COMMIT=$arm PYTHONPATH=src:$W \
    timeout "${LIMIT:-300}" python3 benchmarks/run_cli_uninstalled.py bench --model "$model" --prompt "$prompt" \
    --repeats "${REPEATS:-3}" --paths ${paths//,/ } --out "$OUT/$n-$arm" 2>&1 \
    | grep --line-buffered -v -E "Warning|warn\(|^\s*$" | tail -16)
done
