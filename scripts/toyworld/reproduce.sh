#!/usr/bin/env bash
# Full toy-world reproduction: world -> base model -> judges -> adapters -> evaluation table.
#
#   bash scripts/toyworld/reproduce.sh                  # everything from scratch into runs/toyworld
#   bash scripts/toyworld/reproduce.sh --committed      # reuse data/models/toy-sd and data/toyworld/judges
#   bash scripts/toyworld/reproduce.sh --committed --eval-only   # re-evaluate the adapters in $OUT
#
# Stages (each timed into $OUT/timings.tsv):
#   world     render the shards of both domains (train identities, held-out identities); shards rendered
#             by the current world version with the same arguments are kept, unless --fresh-world
#   base-*    scripts/toyworld/train_base.py, nine legs (about 6 h) -> $OUT/base-legs/*, $OUT/toy-sd
#             (skipped with --committed): per-token text model, then a contextual one, the two transplant
#             legs, the CLIP-style subject encoder in two legs (1200 steps, then 2400 more), then the VAE
#             trained further with the UNet re-trained on its latents and the encoder re-aligned, then the
#             encoder on more renders per identity (16, then 32)
#   judges    scripts/toyworld/train_judges.py       -> $OUT/judges        (skipped with --committed)
#   base-words scripts/toyworld/check_base.py        -> $OUT/base-words.json (the base model told the
#             identity in words: the ceiling an adapter works under)
#   adapters  nested fit, faces and pets, injection nested and decoupled (two runs at a time)
#   eval      nested eval on HELD-OUT identities for each adapter, then the nested adapters again with
#             --token-weight (the subject token's attention times TOKEN_WEIGHT), then the two-subject prompts
#   results   scripts/toyworld/results.py -> $OUT/results.md, benchmarks/toyworld.md (with --publish),
#             $OUT/tradeoff.png
# Environment: OUT (default runs/toyworld), NESTED_BIN (default .venv/bin), STEPS (adapter steps, default
# from the configs), SUBJECTS (held-out subjects per domain, default 16, as published), TOKEN_WEIGHT (default 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${NESTED_BIN:-.venv/bin}
OUT=${OUT:-runs/toyworld}
SUBJECTS=${SUBJECTS:-16}
TOKEN_WEIGHT=${TOKEN_WEIGHT:-3}
export OMP_NUM_THREADS=1  # tiny models: one thread per process, two processes at a time on 2 cores
COMMITTED=0
FRESH_WORLD=0
EVAL_ONLY=0
PUBLISH=()
for arg in "$@"; do
    case $arg in
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --committed) COMMITTED=1 ;;
        --fresh-world) FRESH_WORLD=1 ;;
        --eval-only) EVAL_ONLY=1 ;;
        --publish) PUBLISH=(--publish) ;;
        *) echo "reproduce.sh: unknown argument $arg (use --committed, --fresh-world, --eval-only, --publish)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
TIMINGS="$OUT/timings.tsv"
if [ "$EVAL_ONLY" = 1 ]; then  # keep the other stages' timings, replace the evaluations'
    [ -f "$TIMINGS" ] && { grep -v '^eval-' "$TIMINGS" > "$TIMINGS.tmp" || true; mv "$TIMINGS.tmp" "$TIMINGS"; }
else
    : > "$TIMINGS"
fi
stage() {  # stage NAME COMMAND...: run, time, record
    local name=$1; shift
    local start; start=$(date +%s)
    echo "== $name: $*" >&2
    "$@"
    echo -e "$name\t$(( $(date +%s) - start ))" >> "$TIMINGS"
}
both() {  # run two commands in parallel; fail if either fails
    bash -c "$1" & local a=$!
    bash -c "$2" & local b=$!
    wait $a && wait $b
}

SHARDS=data/toyworld/shards
world() {  # shards rendered by this world version with these arguments are kept (world.json says so)
    local keep=(--skip-if-current)
    [ "$FRESH_WORLD" = 1 ] && keep=(--overwrite)
    "$BIN/python" scripts/toyworld/make_world.py --out $SHARDS --domains faces --train-identities 0 \
        --held-out-identities 0 --samples-per-identity 3 "${keep[@]}"
    "$BIN/python" scripts/toyworld/make_world.py --out $SHARDS --domains pets --train-identities 0 \
        --held-out-identities 0 --samples-per-identity 8 "${keep[@]}"
}
[ "$EVAL_ONLY" = 1 ] || stage world world

if [ "$COMMITTED" = 1 ] || [ "$EVAL_ONLY" = 1 ]; then
    BASE=data/models/toy-sd
    JUDGES=data/toyworld/judges
else
    BASE=$OUT/toy-sd
    JUDGES=$OUT/judges
    # The committed base model's recipe (its training.json records each leg; its first four, made with an earlier
    # text tower, are one per-token leg here), every leg warm-started from the one before.
    LEGS=$OUT/base-legs
    mkdir -p "$LEGS"
    train_base() { "$BIN/python" scripts/toyworld/train_base.py --overwrite "$@"; }
    warm_start() {  # warm_start LEG ARGS...: train_base on LEG's UNet, VAE and text model
        local leg=$1; shift
        train_base --unet "$leg/unet" --vae "$leg/vae" --text-encoder "$leg/text_encoder" "$@"
    }
    CONTEXTUAL=(--text-layers 2 --describe-before --threads 2)
    stage base-per-token train_base --out "$LEGS/1-per-token" --threads 2
    stage base-contextual warm_start "$LEGS/1-per-token" --out "$LEGS/2-contextual" \
        --image-encoder "$LEGS/1-per-token/image_encoder" --unet-steps 3000 "${CONTEXTUAL[@]}"
    stage base-transplant warm_start "$LEGS/2-contextual" --out "$LEGS/3-transplant" \
        --image-encoder "$LEGS/1-per-token/image_encoder" --unet-steps 2500 --transplant 0.5 "${CONTEXTUAL[@]}"
    stage base-value-transplant warm_start "$LEGS/3-transplant" --out "$LEGS/4-value-transplant" \
        --image-encoder "$LEGS/1-per-token/image_encoder" --unet-steps 1500 --transplant 0.2 \
        --value-transplant 0.5 "${CONTEXTUAL[@]}"
    ENCODER=(--unet-steps 0 --encoder-text --encoder-lr 5e-4 --encoder-batch 128)
    stage base-encoder warm_start "$LEGS/4-value-transplant" --out "$LEGS/5-encoder" \
        --encoder-start "$LEGS/1-per-token/image_encoder" --encoder-steps 1200 "${ENCODER[@]}" "${CONTEXTUAL[@]}"
    stage base-encoder-longer warm_start "$LEGS/5-encoder" --out "$LEGS/6-encoder-longer" \
        --encoder-start "$LEGS/5-encoder/image_encoder" --encoder-steps 2400 "${ENCODER[@]}" "${CONTEXTUAL[@]}"
    LAST=$LEGS/6-encoder-longer
    stage base-vae train_base --out "$LEGS/7-vae" --vae-start "$LAST/vae" --vae-steps 6000 --unet "$LAST/unet" \
        --unet-steps 2500 --text-encoder "$LAST/text_encoder" --transplant 0.2 --value-transplant 0.5 \
        --encoder-start "$LAST/image_encoder" --encoder-steps 600 --encoder-text --encoder-lr 5e-4 \
        --encoder-batch 128 "${CONTEXTUAL[@]}"
    # The encoder on more renders per identity: 16, then 32 (the UNet, VAE and text model stay 7-vae's).
    stage base-encoder-views warm_start "$LEGS/7-vae" --out "$LEGS/8-encoder-views" \
        --encoder-start "$LEGS/7-vae/image_encoder" --encoder-views 16 --encoder-steps 1500 "${ENCODER[@]}" \
        "${CONTEXTUAL[@]}"
    stage base-encoder-more-views warm_start "$LEGS/8-encoder-views" --out "$BASE" \
        --encoder-start "$LEGS/8-encoder-views/image_encoder" --encoder-views 32 --encoder-steps 1500 \
        "${ENCODER[@]}" --sheet "$OUT/base-sheet.png" "${CONTEXTUAL[@]}"
    stage judges "$BIN/python" scripts/toyworld/train_judges.py --out "$JUDGES" --threads 2
fi

[ "$EVAL_ONLY" = 1 ] || stage base-words "$BIN/python" scripts/toyworld/check_base.py --base "$BASE" \
    --judges "$JUDGES" --out "$OUT/base-words.json"

fit() {  # fit DOMAIN INJECTION
    local extra=()
    [ "$2" = decoupled ] && extra+=(--model.injection=decoupled)
    [ -n "${STEPS:-}" ] && extra+=("--trainer.max_steps=$STEPS" "--data.epoch_samples=$(( STEPS * 16 ))")
    "$BIN/nested" fit --config "configs/toyworld/$1.yaml" --model.base_model="$BASE" \
        --model.encoder.backbone="$BASE/image_encoder" --trainer.default_root_dir="$OUT/$1-$2" \
        "${extra[@]}" > "$OUT/fit-$1-$2.log" 2>&1
}
export -f fit
export BIN BASE OUT STEPS
if [ "$EVAL_ONLY" = 0 ]; then
    stage adapters-nested both "fit faces nested" "fit pets nested"
    stage adapters-decoupled both "fit faces decoupled" "fit pets decoupled"
fi

evaluate() {  # evaluate DOMAIN INJECTION [TOKEN_WEIGHT]: held-out identities, every context, a strength sweep
    local token; [ "$1" = faces ] && token='<person>' || token='<pet>'
    local name="$1-$2" extra=(--strengths 0.5,1.0,1.5)
    [ -n "${3:-}" ] && { name="$name-tw$3"; extra=(--strengths 1.0,1.5 --token-weight "$token=$3"); }
    "$BIN/nested" eval --base "$BASE" --adapter "$token=$OUT/$1-$2/adapters/last" \
        --subjects "$SHARDS/$1/held_out/shards.json" --max-subjects "$SUBJECTS" --reference-size 64 \
        --prompts "data/prompts/toyworld-$1.txt" --judges "$JUDGES" --clip none \
        "${extra[@]}" --seeds 0 --steps 20 --batch-size 16 --no-images --overwrite \
        --no-progress --out "$OUT/eval-$name" > "$OUT/eval-$name.log" 2>&1
}
evaluate_pair() {  # evaluate_pair INJECTION: a held-out person and a held-out pet in one prompt
    "$BIN/nested" eval --base "$BASE" --pair '<person>,<pet>' \
        --adapter "<person>=$OUT/faces-$1/adapters/last" --adapter "<pet>=$OUT/pets-$1/adapters/last" \
        --subjects "<person>=$SHARDS/faces/held_out/shards.json" \
        --subjects "<pet>=$SHARDS/pets/held_out/shards.json" --max-subjects "$SUBJECTS" --reference-size 64 \
        --prompts data/prompts/toyworld-pairs.txt --judges "$JUDGES" --clip none \
        --strengths 0.5,1.0 --seeds 0 --steps 20 --batch-size 16 --no-images --overwrite \
        --no-progress --out "$OUT/eval-pairs-$1" > "$OUT/eval-pairs-$1.log" 2>&1
}
export -f evaluate evaluate_pair
export SHARDS JUDGES SUBJECTS
stage eval-faces both "evaluate faces nested" "evaluate faces decoupled"
stage eval-pets both "evaluate pets nested" "evaluate pets decoupled"
stage eval-token-weight both "evaluate faces nested $TOKEN_WEIGHT" "evaluate pets nested $TOKEN_WEIGHT"
stage eval-pairs both "evaluate_pair nested" "evaluate_pair decoupled"

"$BIN/python" scripts/toyworld/results.py --runs "$OUT" --judges "$JUDGES" --base "$BASE" "${PUBLISH[@]}"
