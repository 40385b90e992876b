#!/usr/bin/env bash
# The demo (the README's first command runs it after setup): a toy-world faces adapter, trained from the
# committed toy base model, generating HELD-OUT people it never saw in the prompt's scene and style.
#   1. render the world's faces shards unless current ones exist (deterministic, gitignored, about a minute);
#   2. nested fit --config configs/demo.yaml          -> runs/demo/adapters/last
#   3. nested eval with the committed judges on 6 held-out people x 24 contexts (8 scenes x 3 styles), base model vs
#      adapter at strength 1 -> runs/demo/eval/{grid.png,tradeoff.png,results.csv,summary.json};
#      accuracies printed, then each identity attribute's.
# Extra arguments go to `nested fit` (e.g. --trainer.max_steps=100). Re-running resumes the finished run in
# runs/demo (it stops at once) and evaluates again; delete runs/demo to train again.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/../.."
BIN=${NESTED_BIN:-.venv/bin}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: one thread per process is faster on 2 shared cores
SHARDS=data/toyworld/shards/faces
echo "== 1/3 world shards ($SHARDS)" >&2
"$BIN/python" scripts/toyworld/make_world.py --domains faces --train-identities 0 \
    --held-out-identities 0 --samples-per-identity 3 --skip-if-current
echo "== 2/3 nested fit --config configs/demo.yaml $*" >&2
"$BIN/nested" fit --config configs/demo.yaml "$@"
echo "== 3/3 nested eval --judges on held-out people" >&2
"$BIN/nested" eval --base data/models/toy-sd --adapter '<person>=runs/demo/adapters/last' \
    --subjects "$SHARDS/held_out/shards.json" --max-subjects 6 --reference-size 64 \
    --prompts data/prompts/toyworld-faces.txt --judges data/toyworld/judges --clip none \
    --strengths 1.0 --seeds 0 --steps 20 --batch-size 8 --overwrite --out runs/demo/eval
# Exact identity needs all five attributes; which ones the adapter carries is in the per-attribute means.
"$BIN/python" - <<'PY'
import json

points = json.load(open("runs/demo/eval/summary.json"))["points"]
columns = [key for key in points[0]["chance"] if key.startswith("identity_attr_")]
print("Per attribute, % right on held-out people (chance):")
for point in points:
    cells = [f"{c.removeprefix('identity_attr_')} {100 * point[c]:.0f} ({100 * point['chance'][c]:.0f})" for c in columns]
    print(f"  {point['label']:>6}: " + ", ".join(cells))
PY
echo "Grid of held-out references | base model | adapter: runs/demo/eval/grid.png"
