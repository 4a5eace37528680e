#!/usr/bin/env bash
# Training-speed comparison on a host with 2 GPUs (results in docs/benchmarks.md): the peer (HF LLaVA + PEFT
# LoRA, shared/bench/peer_llava_peft.py) runs on GPU 0 while our variants run one after another on GPU 1, so
# both sides are measured in the same call.
#   bash benchmarks/train_speed.sh PEER_SCRIPT OUT_DIR [VARIANT ...]
# A VARIANT is a quoted list of benchmark_train.py flags; default: MoSLoRA, LoRA and no adapter, without checkpointing.
# PEER_ARGS (env) goes to the peer script (default: --batch 16).
set -u
peer="$1"; out="$2"; shift 2
[ $# -gt 0 ] || set -- "--adapter moslora" "--adapter lora" "--adapter none"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
CUDA_VISIBLE_DEVICES=0 python "$peer" ${PEER_ARGS:---batch 16} > "$out/peer.log" 2>&1 &
peer_pid=$!
for variant in "$@"; do
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=1 python scripts/benchmark_train.py --batch 16 --text-tokens 448 $variant 2>&1 \
    | grep -E "BENCH|Error|error|out of memory" | tail -3
done > "$out/ours.log"
wait $peer_pid
cat "$out/ours.log"; grep -E "floor|peft|N_llm|Error|error" "$out/peer.log"
