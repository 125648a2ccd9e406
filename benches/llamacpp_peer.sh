#!/usr/bin/env bash
# Peer check on files llama.cpp itself wrote: SmolLM2-135M-Instruct requantized by llama.cpp's
# `llama-quantize` into each GGUF type we read, then greedy decoding of the same ChatML prompts (the same
# token ids) by llama.cpp's library and by `billion generate`, on the CPU. For every file and prompt it prints
# how many tokens agree and, where the two parted, both engines' top-2 margin (log-probability of the first
# choice minus the second's) at that step, and the preference of the exact model: the same file's weights
# dequantized and multiplied in f32 (`BILLION_CPU_EXACT_PREFILL=1`, teacher-forced over the common tokens),
# as log p(billion's pick) − log p(llama.cpp's pick). Both engines quantize activations to 8 bits inside
# their products, which moves this small model's logits by up to ~1 (measured), so partings come where the
# exact model is close to a tie; one where the exact model prefers llama.cpp's pick by more than 1 is our
# bug (exit 1).
#
#   benches/llamacpp_peer.sh BILLION SmolLM2-135M-Instruct.Q4_1.gguf [TYPE ...]
#
# BILLION: our release binary. llama.cpp comes from ../shared/anchors/llamacpp-cpu.sh (built once, cached),
# or from $LLAMACPP_DIR (a llama.cpp source tree with build/bin/llama-quantize and libllama). Files are
# written to $PEER_DIR (default: a temporary folder, removed at the end). Exits 1 if any parting is wide.
set -euo pipefail
BILLION=$(realpath "${1:?usage: $0 BILLION SMOLLM2.gguf [TYPE ...]}")
SOURCE=$(realpath "${2:?usage: $0 BILLION SMOLLM2.gguf [TYPE ...]}")
shift 2
TYPES=("$@")
[ ${#TYPES[@]} -gt 0 ] || TYPES=(Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q5_K Q6_K F16)
N=${PEER_TOKENS:-32}
THREADS=${PEER_THREADS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "${LLAMACPP_DIR:-}" ]; then
  BENCH=$("$HERE/../../shared/anchors/llamacpp-cpu.sh")
  LLAMACPP_DIR=$(cd "$(dirname "$BENCH")/../.." && pwd)
fi
LIB="$LLAMACPP_DIR/build/bin"
[ -x "$LIB/llama-quantize" ] || { echo "no llama-quantize in $LIB" >&2; exit 2; }
if [ -n "${PEER_DIR:-}" ]; then
  WORK=$PEER_DIR && mkdir -p "$WORK"
else
  WORK=$(mktemp -d) && trap 'rm -rf "$WORK"' EXIT
fi

cc -O2 "$HERE/peer/llamacpp_greedy.c" -I"$LLAMACPP_DIR/include" -I"$LLAMACPP_DIR/ggml/include" -L"$LIB" \
  -lllama -lggml -lggml-base -lm -Wl,-rpath,"$LIB" -o "$WORK/llamacpp_greedy"

SYSTEM='<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
PROMPTS=(
  "What is the capital of France? Answer in one word."
  "Write a Python function that returns the square of a number."
  "List three colors."
  "Explain in two sentences why the sky is blue."
)
: >"$WORK/runs.jsonl"
for type in "${TYPES[@]}"; do
  file="$WORK/smollm2-$type.gguf"
  if [ ! -f "$file" ]; then
    "$LIB/llama-quantize" --allow-requantize "$SOURCE" "$file.tmp" "$type" "$THREADS" >"$WORK/quantize-$type.log" 2>&1
    mv "$file.tmp" "$file"
  fi
  for i in "${!PROMPTS[@]}"; do
    printf -v prompt "${SYSTEM}<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n" "${PROMPTS[$i]}"
    "$WORK/llamacpp_greedy" "$file" "$prompt" "$N" "$THREADS" >"$WORK/llamacpp.json" 2>"$WORK/llamacpp.log"
    ids=$(python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["prompt_ids"])))' \
      "$WORK/llamacpp.json")
    "$BILLION" generate --model "$file" --prompt-ids "$ids" --max-tokens "$N" --device cpu --threads "$THREADS" \
      --json --top-logprobs 2 >"$WORK/billion.json" 2>"$WORK/billion.log"
    python3 - "$type" "$i" "$WORK/llamacpp.json" "$WORK/billion.json" "$BILLION" "$file" "$WORK" >>"$WORK/runs.jsonl" <<'PY'
import array, json, os, struct, subprocess, sys
kind, prompt, peer, ours = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3])), json.load(open(sys.argv[4]))
billion, model, work = sys.argv[5:8]
theirs = [s["id"] for s in peer["steps"]]
mine = ours["tokens"]
agree = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), min(len(theirs), len(mine)))
row = {"type": kind, "prompt": prompt, "llamacpp_tokens": len(theirs), "billion_tokens": len(mine), "agree": agree}
if agree < min(len(theirs), len(mine)):
    def margin(top):
        return top[0][1] - top[1][1]
    row["llamacpp_margin"] = margin(peer["steps"][agree]["top"])
    row["billion_margin"] = margin([(t["id"], t["logprob"]) for t in ours["logprobs"][agree]["top"]])
    row["llamacpp_pick"], row["billion_pick"] = theirs[agree], mine[agree]
    # The exact model's logits after the common tokens (last row of --logits-out).
    out = os.path.join(work, "exact.safetensors")
    ids = ",".join(map(str, peer["prompt_ids"] + theirs[:agree]))
    subprocess.run([billion, "generate", "--model", model, "--prompt-ids", ids, "--max-tokens", "0", "--device", "cpu",
                    "--logits-out", out], check=True, capture_output=True,
                   env=dict(os.environ, BILLION_CPU_EXACT_PREFILL="1"))
    raw = open(out, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8:8 + n])["logits"]
    rows, vocab = meta["shape"]
    start = 8 + n + meta["data_offsets"][0] + (rows - 1) * vocab * 4
    last = array.array("f")
    last.frombytes(raw[start:start + vocab * 4])
    row["exact_preference"] = last[mine[agree]] - last[theirs[agree]]
elif len(theirs) != len(mine):
    row["note"] = "one stopped at end-of-turn first"
print(json.dumps(row))
PY
  done
done

python3 - "$WORK/runs.jsonl" "$N" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
wide = 0
print(f"| type | prompt | tokens equal (of {sys.argv[2]}, or until end of turn) | parting step | top-2 margin llama.cpp / billion | exact model: log p(billion's) − log p(llama.cpp's) |")
print("| --- | ---: | --- | ---: | --- | ---: |")
for r in rows:
    n = max(r["llamacpp_tokens"], r["billion_tokens"])
    if "llamacpp_margin" in r:
        m = (r["llamacpp_margin"], r["billion_margin"])
        e = r["exact_preference"]
        flag = " **ours wrong**" if e < -1.0 else ""
        wide += bool(flag)
        print(f"| {r['type']} | {r['prompt'] + 1} | {r['agree']} of {n} | {r['agree'] + 1} | {m[0]:.3f} / {m[1]:.3f} | {e:+.3f}{flag} |")
    else:
        print(f"| {r['type']} | {r['prompt'] + 1} | all {r['agree']}{' (' + r['note'] + ')' if 'note' in r else ''} | — | — | — |")
equal = sum("llamacpp_margin" not in r for r in rows)
parted = [r["exact_preference"] for r in rows if "exact_preference" in r]
ours = sum(p > 0 for p in parted)
print(f"\n{equal} of {len(rows)} runs equal to the last token; {len(parted)} parted: the exact model sides with billion at "
      f"{ours}, with llama.cpp at {len(parted) - ours}; {wide} where it prefers llama.cpp's pick by more than 1.")
sys.exit(1 if wide else 0)
PY
