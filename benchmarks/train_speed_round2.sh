#!/usr/bin/env bash
# Issue 17 in one device call on one GPU: the best peer (HF LLaVA + PEFT LoRA + Liger) and our fast paths, one after
# another on the same GPU, so ratios are taken within the call. Results: docs/benchmarks.md ("round 2").
#   bash benchmarks/train_speed_round2.sh PEER_SCRIPT OUT_DIR [BATCH] [PART]
# PART: a (peer, MoSLoRA kernels on/off, LoRA, no adapters), b (no Liger, batch-16 budget rows), c (where the
# adapters' time goes: benchmarks/adapter_overhead.py, a profiled step, --torch_compile, LoRA) or all (a and b);
# each part fits one 10-minute device call, and the peer's row only in part a: compare b's rows with a's on one card.
# BATCH (default 8) is the batch of the no-checkpointing rows (16 needs more than 80 GB without checkpointing);
# the memory-regime rows run batch 16 under --activation_memory_budget_gib auto (the card's memory, then 40 GiB).
set -u
usage="usage: bash benchmarks/train_speed_round2.sh PEER_SCRIPT OUT_DIR [BATCH] [a|b|c|all]"
[ $# -ge 2 ] && [ $# -le 4 ] || { echo "$usage" >&2; exit 2; }
peer="$1"; out="$2"; b="${3:-8}"; part="${4:-all}"
case "$part" in a|b|c|all) ;; *) echo "train_speed_round2.sh: PART $part: choose a, b, c or all" >&2; exit 2;; esac
[[ "$b" =~ ^[1-9][0-9]*$ ]] || { echo "train_speed_round2.sh: BATCH $b: not a positive integer" >&2; exit 2; }
[ "$part" = b ] || [ -f "$peer" ] || { echo "train_speed_round2.sh: PEER_SCRIPT $peer: no such file" >&2; exit 2; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench() {  # name, timeout, flags...
  local name="$1" limit="$2"; shift 2
  timeout "$limit" python scripts/benchmark_train.py --text-tokens 448 --steps 6 --warmup 3 "$@" > "$out/$name.log" 2>&1
  echo "== $name (rc $?): $*"; grep -E "^BENCH|Error|out of memory" "$out/$name.log" | cut -c1-600 | tail -3
}
if [ "$part" = a ] || [ "$part" = all ]; then
timeout 150 python "$peer" --liger --batch "$b" --steps 6 > "$out/peer.log" 2>&1
echo "== peer --liger --batch $b (rc $?)"; grep -E "floor|peft|N_llm|Error|out of memory" "$out/peer.log"
bench moslora_liger 110 --adapter moslora --batch "$b" --use_liger_kernel true --dropout_kernel both
# The rows below run torch's dropout (--dropout_kernel off, the default: the kernels lost on an H100, 2026-12-08).
bench lora_liger 80 --adapter lora --batch "$b" --use_liger_kernel true
bench none_liger 80 --adapter none --batch "$b" --use_liger_kernel true
fi
if [ "$part" = b ] || [ "$part" = all ]; then
bench moslora_plain 80 --adapter moslora --batch "$b" --use_liger_kernel false
bench moslora_b16_auto 100 --adapter moslora --batch 16 --use_liger_kernel true --activation_memory_budget_gib auto
bench moslora_b16_40g 100 --adapter moslora --batch 16 --use_liger_kernel true --activation_memory_budget_gib auto \
  --memory_limit_gib 40
fi
if [ "$part" = c ]; then
timeout 150 python benchmarks/adapter_overhead.py --out "$out/overhead.json" > "$out/overhead.log" 2>&1
echo "== adapter_overhead (rc $?)"; grep -E "^LAYER|^OPT|Error" "$out/overhead.log"
bench moslora_profiled 80 --adapter moslora --batch "$b" --use_liger_kernel true --profile "$out/prof"
bench moslora_compile 150 --adapter moslora --batch "$b" --use_liger_kernel true --torch_compile
bench lora_torch_dropout 80 --adapter lora --batch "$b" --use_liger_kernel true
fi
