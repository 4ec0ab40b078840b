#!/usr/bin/env bash
# One local_only run per PEFT method on the synthetic default with MiniLM; prints a table of
# trainable parameters per user, mean / 10th-percentile per-user accuracy and wall time.
# Usage: bash sims/peft_methods.sh [OUT] [KEY=VALUE ...]
set -euo pipefail
OUT=${1:-runs/methods}; shift || true
METHODS=${METHODS:-lora dora ia3 prompt_tuning prefix_tuning p_tuning loha lokr vera bottleneck}
for m in $METHODS; do
  python -m fedpeft.sim --strategy local_only --peft "$m" --out "$OUT" --name "$m" output.progress=false "$@" > "$OUT-$m.log" 2>&1 || echo "$m failed: see $OUT-$m.log"
done
python - "$OUT" $METHODS <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| method | trainable params / user | accuracy mean | accuracy p10 | wall time (s) |")
print("|---|---|---|---|---|")
for m in sys.argv[2:]:
    f = out / m / "results.json"
    if not f.is_file():
        print(f"| {m} | failed | | | |"); continue
    r = json.loads(f.read_text()); s = r["summary"]
    print(f"| {m} | {r['parameters']['trainable_params_per_user']:,} | {s['accuracy_mean']:.4f} | {s['accuracy_p10']:.4f} | {r['wall_seconds']:.1f} |")
PY
