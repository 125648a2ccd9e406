#!/usr/bin/env bash
# Data-parallel scaling: the same job on one GPU and on every GPU of this host (--devices all), back to back.
#
#   benches/data_parallel.sh BILLION TRAIN_STEP MODEL MMLU_DIR HUMANEVAL_FILE
#
# BILLION: the billion binary (built with --features cuda,nccl); TRAIN_STEP: the train_step bench binary;
# MODEL: a model folder (config.json + tokenizer.json) run with --random-weights, e.g. TinyLlama-1.1B's;
# MMLU_DIR: MMLU's dev/ and test/ CSVs; HUMANEVAL_FILE: HumanEval.jsonl(.gz).
# Prints wall times, throughput and the speedup of each job, and whether the merged records equal one GPU's.
set -euo pipefail
B=$1 T=$2 M=$3 MMLU=$4 HE=$5
out=$(mktemp -d)
run() { /usr/bin/time -f %e -o "$out/t" "$@" > "$out/o.json" 2> "$out/err" || { tail -5 "$out/err"; exit 1; }; cat "$out/t"; }
$B generate -m "$M" --random-weights --prompt-ids 1,2,3 --max-tokens 4 --device cuda > /dev/null 2>&1
for job in mmlu humaneval; do
  case $job in
    mmlu) args=(--mmlu --mmlu-dir "$MMLU") ;;
    humaneval) args=(--humaneval --humaneval-file "$HE" --samples 20 --temperature 0.8 --top-p 0.95) ;;
  esac
  one=$(run $B bench --models "$M" --random-weights "${args[@]}" --device cuda --json --results-dir "$out/r1"); cp "$out/o.json" "$out/one.json"
  all=$(run $B bench --models "$M" --random-weights "${args[@]}" --devices all --json --results-dir "$out/r2"); cp "$out/o.json" "$out/all.json"
  python3 - "$out/one.json" "$out/all.json" "$job" "$one" "$all" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))["models"][0]; b = json.load(open(sys.argv[2]))["models"][0]; job = sys.argv[3]
timing = {"mmlu": ["seconds", "questions_per_s", "tokens_run"],
          "humaneval": ["generation_seconds", "run_seconds", "generation_tok_s", "batch_rows"]}[job]
x = {k: v for k, v in a[job].items() if k not in timing}; y = {k: v for k, v in b[job].items() if k not in timing}
one, many = float(sys.argv[4]), float(sys.argv[5])
inner = "seconds" if job == "mmlu" else "generation_seconds"
print(f"{job}: one GPU {one:.1f} s wall ({a[job][inner]:.1f} s), {b['device']}: {many:.1f} s wall ({b[job][inner]:.1f} s); "
      f"speedup {one / many:.2f}x wall, {a[job][inner] / b[job][inner]:.2f}x {inner}; records {'identical' if x == y else 'differ'}")
PY
done
n=$(nvidia-smi --list-gpus | wc -l)
devices=$(seq -s, -f 'cuda:%g' 0 $((n - 1)))
cfg=$M/config.json
one=$($T --model "$cfg" --random-weights --device cuda --dtype bf16 --batch 4 --len 256 --steps 20 | tail -1)
# each rank prints its line; rank 0's holds the step time and the tokens/s of all ranks together
all=$($T --model "$cfg" --random-weights --devices "$devices" --dtype bf16 --batch 4 --len 256 --steps 20 | grep -m1 -E "rank 0 of|training tok/s" || true)
echo "train_step one GPU: $one"
echo "train_step $n GPUs: $all"
rm -rf "$out"
