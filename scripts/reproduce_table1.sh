#!/usr/bin/env bash
# The paper's Table 1 on our data (issue 11): for each model, train (unless it is committed in
# pretrained/), calibrate its ELS schedule (unless committed), sample ELS from the evaluation seeds
# once, and evaluate network vs ELS vs IS under both protocols from the same ELS samples:
#   paper:  network 150 DDIM steps, machines one step per schedule entry (20)   -> evaluate-150
#   20/20:  network on the machines' 20-step grid                                -> evaluate-20
#   ablation: network 50 and 500 steps (ABLATION_STEPS; "none": skipped)        -> evaluate-50, evaluate-500
# then calibrate the other denoisers' locality knobs against the network (CALIBRATE_FAMILY: LS's k(sigma),
# data-locality's threshold(sigma); pspc's window too if listed)                -> calibrate-X-NAME/schedule.json
# and compare every denoiser with the network in the paper's protocol (COMPARE_DENOISERS; ELS reused from
# the same samples, LS/data-locality/pspc on their calibrated knobs)            -> compare-NAME/leaderboard.json
# and write runs/table1/table1.md (scripts/table1.py).
#
# Resumable: every stage is skipped when its output exists, training and ELS sampling continue
# from their checkpoints (--resume), so the script can be stopped and run again at any time.
#
#   bash scripts/reproduce_table1.sh                       # every model below
#   MODELS="mnist-resnet-zeros" bash scripts/reproduce_table1.sh
#   EVAL_SEEDS=1000-1009 OUT=runs/quick bash scripts/reproduce_table1.sh   # a quick look
#
# Calibration ablations (CAL_ABLATIONS, default none): each "TAG:FLAGS" entry (FLAGS without spaces,
# comma-free, e.g. --candidates=3-31, --metric=l2, --seeds=0-19, or --steps=40 / --steps=150 for a schedule
# calibrated on a finer grid or along the network's 150-step trajectory) calibrates the model again with FLAGS
# added, samples ELS from the evaluation seeds with that schedule on the MACHINE_STEPS (20) grid and evaluates
# it in the paper's protocol, all under OUT/ablation-TAG/, then renders OUT/ablation-TAG/table1.md:
#   CAL_ABLATIONS="cand31:--candidates=3-31 l2:--metric=l2" MODELS=fashion-unet-zeros-cond \
#     bash scripts/reproduce_table1.sh
#
# Training ablations (TRAIN_ABLATIONS, default none): each "TAG:FLAGS" entry trains the model again with FLAGS
# added to its recipe (e.g. --steps=8000, --width=64) under OUT/ablation-TAG/train-NAME, calibrates it as above
# (CAL_SEEDS, CANDIDATES), and evaluates it in the paper's protocol. ELS depends on the network only through its
# calibrated k(sigma) and its training set: when the variant's schedule and training set (dataset, n_train, image
# shape, conditioning, from config.json) equal the model's, the model's ELS samples are reused, otherwise ELS is
# sampled again under OUT/ablation-TAG/els-NAME. With the learning rate constant, a shorter run is the longer
# run's checkpoint at that step (a copy of that checkpoint, resumed with the shorter --steps, ends at once):
#   TRAIN_ABLATIONS="train8000:--steps=8000" CAL_SEEDS=0-4 MODELS=mnist-resnet-zeros bash scripts/reproduce_table1.sh
# ABLATION_SCHEDULE (default: calibrate each variant) gives the training ablations one k(sigma) instead, anything
# `--patch-sizes` takes (a schedule.json or a preset); "model" means the model's own calibrated schedule. For a
# variant too costly to calibrate here, e.g. all 10,000 bundled digits (ELS cost grows with n_train):
#   TRAIN_ABLATIONS="n10k:--n-train=10000" ABLATION_SCHEDULE=model EVAL_SEEDS=1000-1039 MODELS=mnist-resnet-zeros \
#     bash scripts/reproduce_table1.sh
#
# Machine-step ablations (MACHINE_ABLATIONS, default none): each entry N samples ELS with N DDIM steps, the model's
# own k(sigma) read at each step's sigma, under OUT/ablation-machineN/els-NAME, and evaluates it against the
# network in the paper's protocol (network 150 steps): how much of the gap is the machine's own 20-step solve.
#   MACHINE_ABLATIONS=150 MODELS=fashion-resnet-zeros-cond bash scripts/reproduce_table1.sh
#
# Costs on this 2-core CPU, one thread (measured 2026-11-30): ELS sampling at N = 1000 about
# 15 s per seed (MNIST, unconditional) and 5 s per seed (Fashion-MNIST, conditional); a
# 4,000-step ResNet training run about 40 min, a UNet's about 60 min (channels-last, both cores busy);
# calibration over 3..21 with 10 seeds 4-30 min (16 min for the MNIST UNet, 4 min for the Fashion UNet).
set -euo pipefail
cd "$(dirname "$0")/.."

PM=${PM:-.venv/bin/patchmosaic}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/table1}
THREADS=${THREADS:-1}
EVAL_SEEDS=${EVAL_SEEDS:-1000-1099}   # seeds no calibration or earlier evaluation used
CAL_SEEDS=${CAL_SEEDS:-0-9}
CANDIDATES=${CANDIDATES:-3-21}
TRAIN_STEPS=${TRAIN_STEPS:-4000}
ABLATION_STEPS=${ABLATION_STEPS:-"50 500"}   # the network's own DDIM steps, beside 150 and 20 (same ELS samples)
[[ $ABLATION_STEPS == none ]] && ABLATION_STEPS=""   # "none": 150 and 20 only (empty means the default)
CAL_ABLATIONS=${CAL_ABLATIONS:-}   # "TAG:FLAGS ...": calibration variants (see above)
TRAIN_ABLATIONS=${TRAIN_ABLATIONS:-}   # "TAG:FLAGS ...": training variants (see above)
MACHINE_ABLATIONS=${MACHINE_ABLATIONS:-}   # "N ...": ELS sampled with N steps on the model's k(sigma) (see above)
ABLATION_SCHEDULE=${ABLATION_SCHEDULE:-}   # the training variants' k(sigma) instead of calibrating them ("model": the model's)
MACHINE_STEPS=${MACHINE_STEPS:-20}   # the ablations' ELS sampling steps, whatever their schedule's length
COMPARE_DENOISERS=${COMPARE_DENOISERS:-els,ls,ideal,wiener,data-locality,pspc,nearest}  # "none": no compare stage
CALIBRATE_FAMILY=${CALIBRATE_FAMILY:-"ls data-locality"}   # knobs calibrated before compare ("none": published defaults)
PSPC_CANDIDATES=${PSPC_CANDIDATES:-3-31}   # PSPC windows tried when CALIBRATE_FAMILY lists pspc
MODELS=${MODELS:-"mnist-resnet-zeros fashion-resnet-zeros-cond mnist-resnet-circular mnist-unet-zeros fashion-unet-zeros-cond mnist-unet-attention"}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$OUT"

# The training recipe of each model (the committed ResNets' own, see their config.json).
train_flags() {
  local common="--n-train 1000 --batch-size 64 --lr 5e-4 --ema 0.999 --seed 0 --checkpoint-every 250"
  case $1 in
    mnist-resnet-zeros)        echo "--dataset mnist --arch resnet --padding zeros --width 32 --depth 4 --norm-groups 0 $common" ;;
    fashion-resnet-zeros-cond) echo "--dataset fashion-mnist --conditional --arch resnet --padding zeros --width 32 --depth 4 --norm-groups 0 $common" ;;
    mnist-resnet-circular)     echo "--dataset mnist --arch resnet --padding circular --width 32 --depth 4 --norm-groups 0 $common" ;;
    mnist-unet-zeros)          echo "--dataset mnist --arch unet --padding zeros --width 32 $common" ;;
    fashion-unet-zeros-cond)   echo "--dataset fashion-mnist --conditional --arch unet --padding zeros --width 32 $common" ;;
    mnist-unet-attention)      echo "--dataset mnist --arch unet --attention --padding zeros --width 32 $common" ;;
    *) echo "reproduce_table1.sh: unknown model $1" >&2; return 1 ;;
  esac
}

stage() { echo "== $(date +%T) $*"; }
# calibrate_els MODEL OUT [FLAGS...]: ELS's k(sigma) against MODEL (CANDIDATES, CAL_SEEDS), FLAGS last
calibrate_els() {
  "$PM" calibrate --model "$1" --machine els --candidates "$CANDIDATES" --seeds "$CAL_SEEDS" \
    --threads "$THREADS" --out "$2" --overwrite "${@:3}"
}
# ablation_evaluate NETWORK ELS SCHEDULE: an ablation's ELS samples (in ELS, sampled there on the MACHINE_STEPS grid
# with SCHEDULE unless ELS holds them) against NETWORK in the paper's protocol
ablation_evaluate() {
  local sched=$3 resume=()
  if [[ ! -f $2/samples.npz ]]; then
    stage "$name: ELS samples, ablation $tag"
    [[ -f $2/config.json ]] && resume=(--resume)
    "$PM" sample --machine els --like "$1" --patch-sizes "$sched" --steps "$MACHINE_STEPS" --seeds "$EVAL_SEEDS" \
      --threads "$THREADS" --out "$2" "${resume[@]}"
  fi
  if [[ ! -f $abl/evaluate-150-$name/metrics.json ]]; then
    stage "$name: evaluate, ablation $tag, network 150 steps"
    "$PM" evaluate --model "$1" --machine els --patch-sizes "$sched" --steps "$MACHINE_STEPS" --seeds "$EVAL_SEEDS" \
      --network-steps 150 --reuse "$2" --threads "$THREADS" --out "$abl/evaluate-150-$name" --overwrite
  fi
}
# a schedule.json's patch sizes as one string (JSON of any layout; no python needed)
patch_sizes_of() { tr -d ' \n\t' < "$1" | grep -o '"patch_sizes":\[[0-9,]*\]'; }
# a network's training set (the ELS machine's data) as one string, from its config.json (MODEL: a directory or
# pretrained:NAME)
training_set_of() {
  local dir=${1/#pretrained:/pretrained/}
  tr -d ' \n\t' < "$dir/config.json" | grep -oE '"(dataset_name|n_images|image_shape|conditional)":("[^"]*"|[0-9]+|\[[0-9,]*\]|true|false)' |
    sort | tr '\n' ' '
}

for name in $MODELS; do
  flags=$(train_flags "$name")
  if [[ -f pretrained/$name/model.pt ]]; then
    model=pretrained:$name
  else
    model=$OUT/train-$name
    if [[ ! -f $model/summary.json ]]; then
      stage "$name: train ($TRAIN_STEPS steps)"
      # shellcheck disable=SC2086
      resume=()
      [[ -f $model/model.pt ]] && resume=(--resume)
      "$PM" train $flags --steps "$TRAIN_STEPS" --threads "$THREADS" --out "$model" "${resume[@]}"
    fi
  fi
  if [[ -f pretrained/$name/schedule.json ]]; then
    schedule=pretrained/$name/schedule.json
  else
    schedule=$OUT/calibrate-$name/schedule.json
    if [[ ! -f $schedule ]]; then
      stage "$name: calibrate (seeds $CAL_SEEDS, candidates $CANDIDATES)"
      calibrate_els "$model" "$OUT/calibrate-$name"
    fi
  fi
  els=$OUT/els-$name
  if [[ ! -f $els/samples.npz ]]; then
    stage "$name: ELS samples (seeds $EVAL_SEEDS)"
    resume=()
    [[ -f $els/config.json ]] && resume=(--resume)
    "$PM" sample --machine els --like "$model" --patch-sizes "$schedule" --seeds "$EVAL_SEEDS" \
      --threads "$THREADS" --out "$els" "${resume[@]}"
  fi
  for steps in 150 20 $ABLATION_STEPS; do
    ev=$OUT/evaluate-$steps-$name
    if [[ ! -f $ev/metrics.json ]]; then
      stage "$name: evaluate, network $steps steps"
      "$PM" evaluate --model "$model" --machine els --patch-sizes "$schedule" --seeds "$EVAL_SEEDS" \
        --network-steps "$steps" --reuse "$els" --threads "$THREADS" --out "$ev" --overwrite
    fi
  done
  cmp=$OUT/compare-$name
  if [[ $COMPARE_DENOISERS != none && ! -f $cmp/leaderboard.json ]]; then
    knobs=()
    for den in $CALIBRATE_FAMILY; do
      [[ $den == none || ,$COMPARE_DENOISERS, != *,$den,* ]] && continue
      cal=$OUT/calibrate-$den-$name
      if [[ ! -f $cal/schedule.json ]]; then
        case $den in
          ls) cands=(--candidates "$CANDIDATES") ;;
          pspc) cands=(--candidates "$PSPC_CANDIDATES") ;;
          *) cands=() ;;   # data-locality, smoothed: calibrate's default values
        esac
        stage "$name: calibrate $den (seeds $CAL_SEEDS)"
        "$PM" calibrate --model "$model" --denoiser "$den" "${cands[@]}" --seeds "$CAL_SEEDS" --threads "$THREADS" \
          --out "$cal" --overwrite
      fi
      case $den in
        ls) knobs+=(--ls-patch-sizes "$cal/schedule.json") ;;
        pspc) knobs+=(--pspc-patch-sizes "$cal/schedule.json") ;;
        data-locality) knobs+=(--threshold "$cal/schedule.json") ;;
        smoothed) knobs+=(--std "$cal/schedule.json") ;;
      esac
    done
    stage "$name: compare $COMPARE_DENOISERS, network 150 steps"
    "$PM" compare --model "$model" --denoisers "$COMPARE_DENOISERS" --patch-sizes "$schedule" "${knobs[@]}" \
      --seeds "$EVAL_SEEDS" --network-steps 150 --reuse "$els" --threads "$THREADS" --out "$cmp" --overwrite
  fi
  for entry in $CAL_ABLATIONS; do
    tag=${entry%%:*} extra=${entry#*:}
    abl=$OUT/ablation-$tag
    if [[ ! -f $abl/calibrate-$name/schedule.json ]]; then
      stage "$name: calibrate, ablation $tag ($extra)"
      # shellcheck disable=SC2086
      calibrate_els "$model" "$abl/calibrate-$name" $extra
    fi
    ablation_evaluate "$model" "$abl/els-$name" "$abl/calibrate-$name/schedule.json"
  done
  for entry in $TRAIN_ABLATIONS; do
    tag=${entry%%:*} extra=${entry#*:}
    abl=$OUT/ablation-$tag
    variant=$abl/train-$name
    if [[ ! -f $variant/summary.json ]]; then
      stage "$name: train, ablation $tag ($extra)"
      resume=()
      [[ -f $variant/model.pt ]] && resume=(--resume)
      # shellcheck disable=SC2086
      "$PM" train $flags --steps "$TRAIN_STEPS" --threads "$THREADS" --out "$variant" "${resume[@]}" $extra
    fi
    case $ABLATION_SCHEDULE in
      "") vschedule=$abl/calibrate-$name/schedule.json ;;
      model) vschedule=$schedule ;;
      *) vschedule=$ABLATION_SCHEDULE ;;
    esac
    if [[ -z $ABLATION_SCHEDULE && ! -f $vschedule ]]; then
      stage "$name: calibrate, ablation $tag (seeds $CAL_SEEDS, candidates $CANDIDATES)"
      calibrate_els "$variant" "$abl/calibrate-$name"
    fi
    vels=$abl/els-$name
    vsizes= sizes=$(patch_sizes_of "$schedule" || true)
    [[ -f $vschedule ]] && vsizes=$(patch_sizes_of "$vschedule" || true)
    vdata=$(training_set_of "$variant" || true) data=$(training_set_of "$model" || true)
    if [[ -n $vsizes && $vsizes == "$sizes" && -n $vdata && $vdata == "$data" && ! -d $vels ]]; then
      vels=$els   # the same k(sigma) and training set: the same ELS samples
    fi
    ablation_evaluate "$variant" "$vels" "$vschedule"
  done
  for n in $MACHINE_ABLATIONS; do
    tag=machine$n abl=$OUT/ablation-machine$n
    MACHINE_STEPS=$n ablation_evaluate "$model" "$abl/els-$name" "$schedule"
  done
done
stage "table"
"$PY" scripts/table1.py "$OUT" --out "$OUT/table1.md"
cat "$OUT/table1.md"
for entry in $CAL_ABLATIONS $TRAIN_ABLATIONS; do
  abl=$OUT/ablation-${entry%%:*}
  # the ablation's own schedules: no committed ones (--pretrained points at the ablation folder)
  "$PY" scripts/table1.py "$abl" --pretrained "$abl" --out "$abl/table1.md"
  cat "$abl/table1.md"
done
for n in $MACHINE_ABLATIONS; do
  abl=$OUT/ablation-machine$n   # the models' own schedules
  "$PY" scripts/table1.py "$abl" --out "$abl/table1.md"
  cat "$abl/table1.md"
done
