#!/usr/bin/env bash
# The codec experiments behind recipes/codec/RESULTS.md (issue #14), stage by stage.
#
#   scripts/codec_experiments.sh dense TARGET OUT_DIR [extra overrides...]   # trainer=codec_cpu at TARGET bit/s
#   scripts/codec_experiments.sh prune DENSE_PT OUT_DIR                      # csp, gmp, magnitude x 0.5/0.7/0.9 x seeds
#
# prune: every run starts from the same DENSE_PT (init_from) and fine-tunes the same FT_EPOCHS epochs (default 2)
# with the rate controller still on; gmp ramps over the first epoch with a mask update every 8 steps; csp and
# magnitude prune one-shot. Two jobs run at once with one thread each (hydra/launcher=local_parallel). SEEDS
# (default "0,1") and SPARSITIES (default "0.5,0.7,0.9") select the grid.
set -euo pipefail
stage=$1 arg=$2 out=$3
shift 3
PY=${PY:-.venv/bin/python}
case "$stage" in
dense)
  "$PY" recipes/codec/run.py trainer=codec_cpu "loss.target_bitrate=$arg" "output_dir=$out" "$@"
  ;;
prune)
  common=(recipes/codec/run.py -m hydra/launcher=local_parallel trainer.threads=1 "init_from=$arg"
          "prune.finetune_epochs=choice(${FT_EPOCHS:-2})" "prune.sparsity=choice(${SPARSITIES:-0.5,0.7,0.9})"
          "seed=${SEEDS:-0,1}")
  "$PY" "${common[@]}" +prune=csp,magnitude "hydra.sweep.dir=$out/oneshot" "$@"
  "$PY" "${common[@]}" +prune=gmp "prune.ramp_epochs=choice(1)" "prune.frequency=choice(8)" "hydra.sweep.dir=$out/gmp" "$@"
  ;;
*)
  echo "unknown stage $stage (dense | prune)" >&2
  exit 2
  ;;
esac
