#!/usr/bin/env bash
# A small-scale version of the paper's NLP comparison on one GPU: pretrain ALBERT, WideNet E=4/8/16
# (and BERT) on one corpus with one tokenizer, token budget and optimizer, side by side on the same GPU;
# fine-tune GLUE tasks when GLUE data is given; write the reports, the LayerNorm divergence and the GLUE
# table. Only metrics, figures and JSON go to --out; checkpoints and exports stay in --scratch.
#
#   experiments/paper_study.sh --corpus '/data/gutenberg/*.txt' --out runs/paper_study [--glue_dir glue_data]
#   experiments/paper_study.sh --smoke --corpus tests_corpus.txt --out /tmp/study   # tiny, on CPU
#
# See experiments/README.md for the recipe and why it was chosen.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'HELP'

options:
  --corpus GLOB       text files to pretrain on (repeatable; quote globs)            [required]
  --out DIR           metrics, figures, reports, tables                              [runs/paper_study]
  --scratch DIR       tokenizer, checkpoints, exports (not part of the results)      [<out>.scratch]
  --glue_dir DIR      GLUE data in the download layout; absent: no fine-tuning
  --models "SPEC..."  LABEL=PRESET[,FIELD=VALUE...] each                             [the five base presets]
  --steps N           pretraining optimizer steps                                    [1500]
  --seq N             tokens per sequence                                            [128]
  --vocab N           SentencePiece pieces                                           [16000]
  --eval_every N      pretraining steps between evaluations                          [250]
  --tasks "T..."      GLUE tasks                                                     [sst2 mrpc stsb rte cola]
  --seeds "S..."      fine-tuning seeds                                              [1 2 3]
  --ft_steps N        fine-tuning optimizer steps per task                           [300]
  --parallel N        pretraining / fine-tuning jobs at once on the GPU              [all]
  --pretrain_config J DeepSpeed JSON of the pretraining runs       [ds_configs/study_pretrain_1gpu.json]
  --finetune_config J DeepSpeed JSON of the fine-tuning runs       [ds_configs/study_finetune_1gpu.json]
  --tar FILE          also pack --out into one .tar.gz (for a transfer that counts files)
  --smoke             CPU-sized: the debug preset as ALBERT and WideNet, a few steps
HELP
}

CORPUS=() OUT="runs/paper_study" SCRATCH="" GLUE_DIR="" MODELS="" STEPS=1500 SEQ=128 VOCAB=16000 EVAL_EVERY=250
TASKS="sst2 mrpc stsb rte cola" SEEDS="1 2 3" FT_STEPS=300 PARALLEL=0 TAR="" SMOKE=0 CUSTOM_PRETRAIN=0 CUSTOM_FINETUNE=0
PRETRAIN_JSON="$REPO/ds_configs/study_pretrain_1gpu.json" FINETUNE_JSON="$REPO/ds_configs/study_finetune_1gpu.json"
EVAL_BATCHES=20 LOG_EVERY=10 FT_EVAL_EVERY=100

while [[ $# -gt 0 ]]; do
  case "$1" in
    --corpus) CORPUS+=("$2"); shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --scratch) SCRATCH="$2"; shift 2 ;;
    --glue_dir) GLUE_DIR="$2"; shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --seq) SEQ="$2"; shift 2 ;;
    --vocab) VOCAB="$2"; shift 2 ;;
    --eval_every) EVAL_EVERY="$2"; shift 2 ;;
    --tasks) TASKS="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --ft_steps) FT_STEPS="$2"; shift 2 ;;
    --parallel) PARALLEL="$2"; shift 2 ;;
    --tar) TAR="$2"; shift 2 ;;
    --pretrain_config) PRETRAIN_JSON="$(realpath "$2")"; CUSTOM_PRETRAIN=1; shift 2 ;;
    --finetune_config) FINETUNE_JSON="$(realpath "$2")"; CUSTOM_FINETUNE=1; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ ${#CORPUS[@]} -eq 0 ]]; then
  echo "error: --corpus is required: the text files to pretrain on, e.g. --corpus '/data/gutenberg/*.txt'" >&2
  exit 2
fi
if [[ $SMOKE -eq 1 ]]; then
  # ALBERT's structure (one shared LayerNorm pair, dense FFN, post-LN) and WideNet's on the debug preset
  MODELS="${MODELS:-albert=debug,share_layer_norm=true,num_experts=1,top_k=1,pre_layer_norm=false widenet-e4=debug}"
  STEPS=4 SEQ=64 VOCAB=300 EVAL_EVERY=2 EVAL_BATCHES=2 LOG_EVERY=1 FT_STEPS=4 FT_EVAL_EVERY=2
  SEEDS="${SEEDS%% *}"
  [[ $CUSTOM_PRETRAIN -eq 1 ]] || PRETRAIN_JSON="$REPO/ds_configs/pretrain_cpu_smoke.json"
  [[ $CUSTOM_FINETUNE -eq 1 ]] || FINETUNE_JSON="$REPO/ds_configs/finetune_cpu_smoke.json"
fi
MODELS="${MODELS:-albert-base=albert-base widenet-base-e4=widenet-base-e4 widenet-base-e8=widenet-base-e8 widenet-base-e16=widenet-base-e16 bert-base=bert-base}"
SCRATCH="${SCRATCH:-$OUT.scratch}"
mkdir -p "$OUT/logs" "$SCRATCH"
OUT="$(cd "$OUT" && pwd)" SCRATCH="$(cd "$SCRATCH" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
START=$(date +%s)
say() { echo "[paper_study $(date -u +%H:%M:%S)] $*"; }

# Run "$@" for each line of stdin-free job list in the background, at most $PARALLEL at once.
run_limited() {  # name log command...
  local name="$1" log="$2"; shift 2
  if [[ $PARALLEL -gt 0 ]]; then
    while [[ $(jobs -rp | wc -l) -ge $PARALLEL ]]; do wait -n || true; done
  fi
  ( "$@" >"$log" 2>&1 && echo ok >"$log.status" || echo "failed ($?)" >"$log.status" ) &
  say "started $name (log: $log)"
}

# --- tokenizer, once for every model ----------------------------------------------------------------
TOKENIZER="$SCRATCH/tokenizer"
if [[ ! -f "$TOKENIZER/tokenizer_config.json" ]]; then
  say "training a $VOCAB-piece SentencePiece tokenizer on ${CORPUS[*]}"
  "$PYTHON" - "$TOKENIZER" "$VOCAB" "${CORPUS[@]}" <<'PY'
import sys

from widenet_ds.data.tokenizer import train_tokenizer
from widenet_ds.jobs.cli import main

main(lambda: train_tokenizer(sys.argv[3:], sys.argv[1], int(sys.argv[2])))
PY
fi

# --- pretraining, every model at once on the GPU ----------------------------------------------------
LABELS=()
for spec in $MODELS; do
  label="${spec%%=*}" rest="${spec#*=}"
  preset="${rest%%,*}" overrides=()
  if [[ "$rest" == *,* ]]; then
    IFS=',' read -r -a fields <<<"${rest#*,}"
    for field in "${fields[@]}"; do overrides+=(--override "$field"); done
  fi
  LABELS+=("$label")
  run_limited "pretraining $label" "$OUT/logs/pretrain_$label.log" \
    "$PYTHON" "$REPO/launch/pretrain.py" --preset "$preset" "${overrides[@]}" --train_files "${CORPUS[@]}" \
      --tokenizer "$TOKENIZER" --max_seq_length "$SEQ" --deepspeed_config "$PRETRAIN_JSON" \
      --max_steps "$STEPS" --eval_every "$EVAL_EVERY" --eval_batches "$EVAL_BATCHES" --log_every "$LOG_EVERY" \
      --save_every "$STEPS" --keep_last 1 --seed 42 --output_dir "$SCRATCH/pretrain/$label" --overwrite_output_dir
done
wait
PRETRAINED=() FAILED=()
for label in "${LABELS[@]}"; do
  status="$(cat "$OUT/logs/pretrain_$label.log.status" 2>/dev/null || echo 'no status')"
  if [[ "$status" == ok && -f "$SCRATCH/pretrain/$label/final/config.json" ]]; then
    PRETRAINED+=("$label")
  else
    FAILED+=("pretraining $label: $status")
    say "pretraining $label $status; the end of its log:"; tail -n 15 "$OUT/logs/pretrain_$label.log" || true
  fi
done
PRETRAIN_END=$(date +%s)
say "pretraining done in $((PRETRAIN_END - START)) s: ${PRETRAINED[*]:-none}"

# --- GLUE fine-tuning, when there is data -----------------------------------------------------------
FINETUNED=0
if [[ -z "$GLUE_DIR" ]]; then
  say "GLUE: no --glue_dir given: fine-tuning skipped (pretraining results only)"
elif [[ ! -d "$GLUE_DIR" ]]; then
  say "GLUE: $GLUE_DIR is not a folder: fine-tuning skipped (pretraining results only)"
elif [[ ${#PRETRAINED[@]} -gt 0 ]]; then
  for label in "${PRETRAINED[@]}"; do
    # shellcheck disable=SC2086  # tasks and seeds are word lists
    run_limited "fine-tuning $label" "$OUT/logs/glue_$label.log" \
      "$PYTHON" "$REPO/launch/glue_table.py" run --models "$label=$SCRATCH/pretrain/$label/final" \
        --tasks $TASKS --seeds $SEEDS --output_dir "$SCRATCH/glue" --data_dir "$GLUE_DIR" \
        --deepspeed_config "$FINETUNE_JSON" --max_steps "$FT_STEPS" --eval_every "$FT_EVAL_EVERY" \
        --max_seq_length "$SEQ" --overwrite_output_dir
  done
  wait
  for label in "${PRETRAINED[@]}"; do
    status="$(cat "$OUT/logs/glue_$label.log.status" 2>/dev/null || echo 'no status')"
    [[ "$status" == ok ]] || { FAILED+=("fine-tuning $label: $status"); tail -n 15 "$OUT/logs/glue_$label.log" || true; }
  done
  # shellcheck disable=SC2086
  if "$PYTHON" "$REPO/launch/glue_table.py" collect "$SCRATCH/glue" --tasks $TASKS >"$OUT/logs/glue_table.log" \
      2>&1; then
    grep '^|' "$OUT/logs/glue_table.log" >"$OUT/glue_table.md"  # the table without library notices
    FINETUNED=1
    say "GLUE table:"; cat "$OUT/glue_table.md"
  else
    FAILED+=("GLUE table: see $OUT/logs/glue_table.log")
  fi
fi
FINETUNE_END=$(date +%s)

# --- reports, LayerNorm divergence, records ---------------------------------------------------------
RUN_DIRS=() EXPORTS=()
for label in "${LABELS[@]}"; do
  [[ -f "$SCRATCH/pretrain/$label/metrics.jsonl" ]] && RUN_DIRS+=("$SCRATCH/pretrain/$label")
  [[ -f "$SCRATCH/pretrain/$label/final/config.json" ]] && EXPORTS+=("$SCRATCH/pretrain/$label/final")
done
if [[ ${#RUN_DIRS[@]} -gt 0 ]]; then
  LN_ARGS=()
  [[ ${#EXPORTS[@]} -gt 0 ]] && LN_ARGS=(--ln "${EXPORTS[@]}")
  "$PYTHON" "$REPO/launch/report.py" "${RUN_DIRS[@]}" --out "$OUT/pretraining" "${LN_ARGS[@]}" \
    --title "Pretraining: ${LABELS[*]}" || FAILED+=("pretraining report")
fi
if [[ $FINETUNED -eq 1 ]]; then
  for task in $TASKS; do  # one report per task: every model and seed side by side
    mapfile -t FT_DIRS < <(find "$SCRATCH/glue" -path "*/$task/seed*/metrics.jsonl" -printf '%h\n' | sort)
    [[ ${#FT_DIRS[@]} -gt 0 ]] || continue
    "$PYTHON" "$REPO/launch/report.py" "${FT_DIRS[@]}" --out "$OUT/finetuning/$task" --no_ln \
      --title "GLUE fine-tuning: $task" || FAILED+=("fine-tuning report $task")
  done
fi
# the records of every run (no weights): metrics, configs, results
for dir in "$SCRATCH/pretrain"/* "$SCRATCH/glue"/*/*/*; do
  [[ -f "$dir/metrics.jsonl" ]] || continue
  dest="$OUT/records/${dir#"$SCRATCH"/}"
  mkdir -p "$dest"
  for file in metrics.jsonl run.json model_config.json ds_config.json eval_results.json; do
    [[ -f "$dir/$file" ]] && cp "$dir/$file" "$dest/"
  done
done
END=$(date +%s)
"$PYTHON" - "$OUT/study.json" <<PY
import json, platform, subprocess, sys
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip() or "none"
except OSError:
    gpu = "none"
import torch
study = {"models": "$MODELS".split(), "pretrained": "${PRETRAINED[*]:-}".split(), "corpus": "${CORPUS[*]}".split(),
         "steps": $STEPS, "seq": $SEQ, "vocab": $VOCAB, "pretrain_config": "$PRETRAIN_JSON",
         "finetune_config": "$FINETUNE_JSON", "glue_dir": "$GLUE_DIR" or None, "tasks": "$TASKS".split(),
         "seeds": "$SEEDS".split(), "ft_steps": $FT_STEPS, "smoke": bool($SMOKE), "gpu": gpu,
         "torch": torch.__version__, "host": platform.node(),
         "seconds": {"pretraining": $PRETRAIN_END - $START, "fine_tuning": $FINETUNE_END - $PRETRAIN_END,
                     "total": $END - $START},
         "failed": [line for line in """$(printf '%s\n' "${FAILED[@]:-}")""".splitlines() if line]}
json.dump(study, open(sys.argv[1], "w"), indent=2)
PY
if [[ -n "$TAR" ]]; then
  tar czf "$TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")"
  say "packed $OUT into $TAR ($(du -h "$TAR" | cut -f1))"
fi
say "done in $((END - START)) s: results in $OUT (pretraining/report.md, study.json, records/)"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  say "FAILED: ${FAILED[*]}"
  exit 1
fi
