#!/usr/bin/env bash
# Benchmark runs on the real PEFT-U tasks in ../shared/data/peft-u (tweeteval, studemo):
# prepare with PEFT-U's split protocol, then the strategies side by side with the MiniLM backbone;
# each comparison has its own `majority` row (each user's majority label, over its own users).
# Usage: bash sims/peftu_benchmarks.sh [OUT] [KEY=VALUE ...]
set -euo pipefail
OUT=${1:-runs/peftu}; shift || true
RAW=${FEDPEFT_PEFTU_RAW:-../shared/data/peft-u}
STRATEGIES=${STRATEGIES:-local_only,fedavg,fedavg_ft,fedper,fedrep,fedsa}
STUDEMO_STRATEGIES=${STUDEMO_STRATEGIES:-local_only,fedavg,fedper}  # studemo has 30x more examples per user
for task in tweeteval studemo; do
  strategies=$STRATEGIES
  [ "$task" = studemo ] && strategies=$STUDEMO_STRATEGIES
  python -m fedpeft.data prepare peft-u --task "$task" --raw "$RAW/$task" --out "$OUT/data/$task"
  python sims/compare.py --strategies "$strategies" --benchmark "peft-u/$task" "data.path=$OUT/data/$task" \
    --compare-out "$OUT/$task" output.progress=false "$@"
done
