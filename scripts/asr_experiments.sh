#!/usr/bin/env bash
# The AN4 pruning experiments behind recipes/asr/RESULTS.md, stage by stage (issue #12).
#
#   scripts/asr_experiments.sh STAGE DENSE_PT OUT_DIR
#
# STAGE: tune, tune2 — fine-tuning LR / warm-up / ℓ1 sweep at 0.7, seed 0, for every method
#        main  — every method at 0.5 (seed 0) and 0.7 / 0.9 (seeds 0, 1, 2) with the tuned settings
#                (METHODS="magnitude gmp csp csp_cubic" runs a subset, as for the LSTM RNN-T)
# Every run starts from the same DENSE_PT (init_from) and fine-tunes the same number of steps
# (prune.finetune_epochs) with AdamW and the same warm-up + cosine schedule; two jobs run at once with
# one thread each (hydra/launcher=local_parallel). Settings for `main` are read from the environment
# (defaults: the values the tune stage chose, see RESULTS.md).
set -euo pipefail
stage=$1 dense=$2 out=$3
PY=${PY:-.venv/bin/python}
# Fine-tuning budget: FT_EPOCHS epochs (120 steps at the default 2) for every method; gradual schedules ramp
# over the first RAMP epochs of it.
common=(recipes/asr/run.py -m hydra/launcher=local_parallel trainer.threads=1 "init_from=$dense"
        "prune.finetune_epochs=choice(${FT_EPOCHS:-2})")
one() { echo "choice($1)"; }
want() { [[ " ${METHODS:-magnitude wanda gmp csp csp_cubic} " == *" $1 "* ]]; }  # METHODS: the main stage's subset

case "$stage" in
tune)
  # LR with the warm-up every method gets; plus CSP with the old protocol (5e-4, no warm-up) for defect 6.
  "$PY" "${common[@]}" +prune=magnitude,csp "prune.sparsity=$(one 0.7)" "prune.finetune_lr=choice(2.5e-4,5e-4,1e-3)" \
    "prune.finetune_warmup_steps=$(one 30)" "hydra.sweep.dir=$out/tune_oneshot"
  "$PY" "${common[@]}" +prune=csp "prune.sparsity=$(one 0.7)" "prune.finetune_lr=$(one 5e-4)" \
    "prune.finetune_warmup_steps=$(one 0)" "hydra.sweep.dir=$out/tune_csp_nowarmup"
  "$PY" "${common[@]}" +prune=gmp "prune.sparsity=$(one 0.7)" "prune.finetune_lr=choice(2.5e-4,5e-4,1e-3)" \
    "prune.ramp_epochs=$(one "${GMP_RAMP:-1}")" "prune.frequency=$(one 10)" "prune.finetune_warmup_steps=$(one 30)" "hydra.sweep.dir=$out/tune_gmp"
  # Gradual CSP, and the sparsity-inducing term in training (λ_train·Σ|W|, annealed to 0 over the ramp).
  "$PY" "${common[@]}" +prune=csp "prune.schedule=$(one cubic)" "prune.sparsity=$(one 0.7)" "prune.ramp_epochs=$(one "${CSP_RAMP:-1}")" \
    "prune.frequency=$(one 15)" "prune.stats_steps=$(one 4)" "prune.train_l1=choice(0,1e-5)" \
    "prune.finetune_lr=$(one "5e-4")" "prune.finetune_warmup_steps=$(one 30)" "hydra.sweep.dir=$out/tune_csp_cubic"
  ;;
tune2)
  # The LR grid's edge: every method at 2e-3 (the dense peak), gradual CSP at 1e-3.
  "$PY" "${common[@]}" +prune=magnitude,csp "prune.sparsity=$(one 0.7)" "prune.finetune_lr=$(one 2e-3)" \
    "prune.finetune_warmup_steps=$(one 30)" "hydra.sweep.dir=$out/tune2_oneshot"
  "$PY" "${common[@]}" +prune=gmp "prune.sparsity=$(one 0.7)" "prune.finetune_lr=$(one 2e-3)" \
    "prune.ramp_epochs=$(one 1)" "prune.frequency=$(one 10)" "prune.finetune_warmup_steps=$(one 30)" "hydra.sweep.dir=$out/tune2_gmp"
  "$PY" "${common[@]}" +prune=csp "prune.schedule=$(one cubic)" "prune.sparsity=$(one 0.7)" "prune.ramp_epochs=$(one 1)" \
    "prune.frequency=$(one 15)" "prune.stats_steps=$(one 4)" "prune.train_l1=choice(0,1e-5)" \
    "prune.finetune_lr=$(one 1e-3)" "prune.finetune_warmup_steps=$(one 30)" "hydra.sweep.dir=$out/tune2_csp_cubic"
  ;;
main)
  for spec in ${MAIN_BLOCKS:-"0.5:0" "0.7,0.9:0,1,2"}; do
    sp=${spec%%:*} seeds=${spec##*:} tag=${spec%%:*}; tag=${tag//,/_}  # a comma in a path would read as a Hydra sweep
    want magnitude && "$PY" "${common[@]}" +prune=magnitude "prune.sparsity=choice($sp)" "seed=$seeds" \
      "prune.finetune_lr=$(one "${MAG_LR:-1e-3}")" "prune.finetune_warmup_steps=$(one "${WARMUP:-30}")" \
      "hydra.sweep.dir=$out/main_magnitude_$tag"
    want wanda && "$PY" "${common[@]}" +prune=wanda "prune.sparsity=choice($sp)" "seed=$seeds" "prune.refit=choice(false,true)" \
      "prune.finetune_lr=$(one "${MAG_LR:-1e-3}")" "prune.finetune_warmup_steps=$(one "${WARMUP:-30}")" \
      "hydra.sweep.dir=$out/main_wanda_$tag"
    want gmp && "$PY" "${common[@]}" +prune=gmp "prune.sparsity=choice($sp)" "seed=$seeds" "prune.ramp_epochs=$(one "${GMP_RAMP:-1}")" \
      "prune.frequency=$(one 10)" "prune.finetune_lr=$(one "${GMP_LR:-1e-3}")" "prune.finetune_warmup_steps=$(one "${WARMUP:-30}")" \
      "hydra.sweep.dir=$out/main_gmp_$tag"
    want csp && "$PY" "${common[@]}" +prune=csp "prune.sparsity=choice($sp)" "seed=$seeds" \
      "prune.finetune_lr=$(one "${CSP_LR:-1e-3}")" "prune.finetune_warmup_steps=$(one "${WARMUP:-30}")" \
      "hydra.sweep.dir=$out/main_csp_$tag"
    want csp_cubic && "$PY" "${common[@]}" +prune=csp "prune.schedule=$(one cubic)" "prune.sparsity=choice($sp)" "seed=$seeds" \
      "prune.ramp_epochs=$(one "${CSP_RAMP:-1}")" "prune.frequency=$(one 15)" "prune.stats_steps=$(one 4)" \
      "prune.train_l1=$(one "${CSP_L1:-0}")" "prune.finetune_lr=$(one "${CSP_CUBIC_LR:-1e-3}")" \
      "prune.finetune_warmup_steps=$(one "${WARMUP:-30}")" "hydra.sweep.dir=$out/main_csp_cubic_$tag"
  done
  ;;
*) echo "unknown stage $stage (tune | main)" >&2; exit 2 ;;
esac
