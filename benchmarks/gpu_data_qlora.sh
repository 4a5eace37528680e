#!/usr/bin/env bash
# One device call: packing (issue 16) and QLoRA + tower adapters vs PEFT QLoRA (issue 18), LLaVA-1.5-7B shape.
# Run from the repo root on the GPU machine with .whl/ (deepspeed, open_clip, bitsandbytes, liger-kernel) and
# .bench_peer/peer_llava_peft.py (a copy of shared/bench/peer_llava_peft.py) carried; logs go to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; timeout "$limit" "$@" 2>&1 | grep -E "BENCH|PEER|tok|Error|error" | tee "$OUT/$name.log"; }
run packing 140 python scripts/benchmark_train.py --lengths mix665k --packing both --batch 16 --rows 8 \
  --max_length 2048 --gradient_checkpointing --warmup 1 --steps 4
run qlora 120 python scripts/benchmark_train.py --bits 4 --vision_adapter moslora --gradient_checkpointing \
  --batch 16,4 --steps 4 --warmup 1 --learning_rate 2e-4
run peer_qlora_liger 85 python .bench_peer/peer_llava_peft.py --bits 4 --liger --batch 16 --steps 4
run bf16_tower 65 python scripts/benchmark_train.py --vision_adapter moslora --gradient_checkpointing --batch 16 \
  --steps 4 --warmup 1 --learning_rate 2e-4
