#!/bin/bash
# Submit the M2-omni training pipeline as a chain of Slurm jobs:
#   PT-1 -> PT-2 -> step-balance calibration -> PT-3 -> IT-1 -> IT-2 -> IT-3 -> AT
# each job starting only when the previous one finished successfully (--dependency=afterok:<id>,
# --kill-on-invalid-dep=yes so a failed stage cancels the rest instead of leaving them pending).
# A stage that is preempted or hits its time limit requeues itself (slurm/train.sbatch) and keeps
# its job id, so the chain simply waits for it.
#
#   slurm/submit_chain.sh [options] [-- key.sub=value ...]
#
#   --size 9b|72b        recipes examples/stages/<size>/ (default 9b) and the default node count
#                        (9b: 8 nodes = 64 GPUs, 72b: 32 nodes = 256 GPUs)
#   --stages-dir DIR     any folder with pt1.yaml ... it3.yaml, at.yaml instead (e.g.
#                        examples/stages/tiny); at.yaml is needed only when AT is submitted
#   --nodes N            nodes of every job (per stage: NODES_PT1=... NODES_CALIBRATE=... env)
#   --time HH:MM:SS      time limit of every job (per stage: TIME_PT3=...); requeues continue
#   --from STAGE         first job to submit: pt1 pt2 calibrate pt3 it1 it2 it3 at (default pt1)
#   --to STAGE           last job to submit (default at: the alignment stage, DPO + LoRA)
#   --after JOBID        make the first submitted job wait for this one (afterok)
#   --balance-file PATH  step-balance weights written by the calibration and read by PT-3
#                        (default: stage.step_balance_file of pt3.yaml)
#   --no-calibrate       do not submit the calibration job (the weights file exists already)
#   --name PREFIX        job names PREFIX-pt1 ... (default m2omni-<size>)
#   --dry-run            print the sbatch commands instead of running them
#   -- ARGS              everything after -- goes to every stage (config overrides)
#
# Environment: ACCOUNT, PARTITION, QOS (added as sbatch flags), SBATCH_ARGS (more sbatch flags,
# e.g. "--reservation=big --mail-type=FAIL"), TRAIN_SBATCH (default slurm/train.sbatch), and
# anything train.sbatch reads (CONTAINER_IMAGE, CONTAINER_MOUNTS, PYTHON, SITE_ENV, ...): sbatch
# passes the submitting environment on to the jobs.
#
# Prints one line per job: "<stage> <job id> <config>". Run it from the repository root.

set -euo pipefail

die() { echo "submit_chain.sh: error: $*" >&2; exit 2; }

STAGES=(pt1 pt2 calibrate pt3 it1 it2 it3 at)
size=9b
stages_dir=
nodes=
time_limit=
from=pt1
to="at"
after=
balance_file=
calibrate=1
name=
dry_run=0
overrides=()

while [ $# -gt 0 ]; do
  case $1 in
    --size) size=${2:?--size needs 9b or 72b}; shift 2 ;;
    --stages-dir) stages_dir=${2:?}; shift 2 ;;
    --nodes) nodes=${2:?}; shift 2 ;;
    --time) time_limit=${2:?}; shift 2 ;;
    --from) from=${2:?}; shift 2 ;;
    --to) to=${2:?}; shift 2 ;;
    --after) after=${2:?}; shift 2 ;;
    --balance-file) balance_file=${2:?}; shift 2 ;;
    --no-calibrate) calibrate=0; shift ;;
    --name) name=${2:?}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [ -z "$stages_dir" ]; then
  case $size in
    9b|72b) stages_dir=examples/stages/$size ;;
    *) die "--size must be 9b or 72b (or give --stages-dir)" ;;
  esac
fi
if [ -z "$nodes" ]; then
  case $size in 9b) nodes=8 ;; 72b) nodes=32 ;; esac
fi
name=${name:-m2omni-$size}
train_sbatch=${TRAIN_SBATCH:-slurm/train.sbatch}
[ -f "$train_sbatch" ] || die "$train_sbatch not found: run from the repository root"

index_of() {
  local i
  for i in "${!STAGES[@]}"; do
    if [ "${STAGES[$i]}" = "$1" ]; then echo "$i"; return 0; fi
  done
  die "unknown stage $1 (one of ${STAGES[*]})"
}
first=$(index_of "$from")
last=$(index_of "$to")
[ "$first" -le "$last" ] || die "--from $from comes after --to $to"

for s in pt1 pt2 pt3 it1 it2 it3; do
  [ -f "$stages_dir/$s.yaml" ] || die "$stages_dir/$s.yaml not found"
done
if [ "$last" -ge "$(index_of at)" ]; then
  [ -f "$stages_dir/at.yaml" ] || die "$stages_dir/at.yaml not found (or pass --to it3)"
fi
if [ -z "$balance_file" ]; then
  # stage.step_balance_file of pt3.yaml (block or flow style: `step_balance_file: PATH`)
  balance_file=$(sed -n 's/.*step_balance_file:[[:space:]]*\([^,}[:space:]]*\).*/\1/p' \
    "$stages_dir/pt3.yaml" | head -n 1)
fi
[ -n "$balance_file" ] || die "no stage.step_balance_file in $stages_dir/pt3.yaml: pass --balance-file"

common=()
[ -n "${ACCOUNT:-}" ] && common+=(--account="$ACCOUNT")
[ -n "${PARTITION:-}" ] && common+=(--partition="$PARTITION")
[ -n "${QOS:-}" ] && common+=(--qos="$QOS")
if [ -n "${SBATCH_ARGS:-}" ]; then
  read -r -a extra <<<"$SBATCH_ARGS"
  common+=("${extra[@]}")
fi

if [ "$dry_run" = 0 ]; then
  mkdir -p logs   # train.sbatch writes logs/%x-%j.out; Slurm does not create the folder
fi
prev=$after
for ((i = first; i <= last; i++)); do
  stage=${STAGES[$i]}
  if [ "$stage" = calibrate ] && [ "$calibrate" = 0 ]; then
    continue
  fi
  upper=$(echo "$stage" | tr '[:lower:]' '[:upper:]')
  nvar="NODES_$upper"
  tvar="TIME_$upper"
  args=(--parsable --job-name="$name-$stage" "${common[@]}")
  n=${!nvar:-$nodes}
  [ -n "$n" ] && args+=(--nodes="$n")
  t=${!tvar:-$time_limit}
  [ -n "$t" ] && args+=(--time="$t")
  if [ -n "$prev" ]; then
    args+=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
  fi
  if [ "$stage" = calibrate ]; then
    # PT-3's config from PT-2's weights, each modality alone until its loss plateaus; writes the
    # weights PT-3 reads (stage.balance=none: the weights file does not exist yet).
    config=$stages_dir/pt3.yaml
    cmd=("$train_sbatch" "$config" "${overrides[@]}" stage.balance=none
         "stage.step_balance_file=$balance_file" --calibrate-step-balance "$balance_file")
  elif [ "$stage" = pt3 ]; then
    config=$stages_dir/pt3.yaml
    cmd=("$train_sbatch" "$config" "${overrides[@]}" "stage.step_balance_file=$balance_file")
  else
    config=$stages_dir/$stage.yaml
    cmd=("$train_sbatch" "$config" "${overrides[@]}")
  fi
  if [ "$dry_run" = 1 ]; then
    printf 'sbatch'
    printf ' %q' "${args[@]}" "${cmd[@]}"
    printf '\n'
    id="<$stage>"
  else
    out=$(sbatch "${args[@]}" "${cmd[@]}") || die "sbatch failed for $stage"
    id=${out%%;*}   # --parsable prints "id" or "id;cluster"
    [ -n "$id" ] || die "sbatch printed no job id for $stage"
    echo "$stage $id $config"
  fi
  prev=$id
done
