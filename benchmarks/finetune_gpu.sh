#!/usr/bin/env bash
# scripts/finetune.py at LLaVA-1.5-7B's shape (random LLaMA-2-7B-shaped LM, open_clip ViT-L-14-336, mlp2x_gelu)
# on 2 GPUs with DeepSpeed, bf16, SDPA, on generated demo data (576 image tokens + the demo's short text).
#   bash benchmarks/finetune_gpu.sh OUT_DIR ZERO_CONFIG ADAPTER [STEPS]
set -eu
out="$1"; zero="$2"; adapter="$3"; steps="${4:-30}"
export PYTHONUNBUFFERED=1
data=/tmp/mm_demo_gpu; model=/tmp/llama2-7b-shape
[ -f "$data/manifest.json" ] || python scripts/make_demo_data.py --out "$data" --n-train 2000 --n-pretrain 16 --n-eval 16 --workers 8 > /dev/null
[ -f "$model/config.json" ] || python - "$model" <<'PY'
import shutil, sys
sys.path.insert(0, "scripts")
from benchmark_train import config_only_model_dir
shutil.copytree(config_only_model_dir("llama2-7b"), sys.argv[1])
PY
deepspeed --num_gpus 2 scripts/finetune.py --model_name_or_path "$model" --random_init_llm True \
  --vision_tower ViT-L-14-336 --mm_projector_type mlp2x_gelu --data_path "$data/finetune.json" \
  --image_folder "$data/images" --output_dir "$out" --deepspeed "$zero" --bf16 True --adapter "$adapter" \
  --lora_r 128 --lora_alpha 256 --lora_dropout 0.05 --mm_projector_lr 2e-5 --learning_rate 2e-4 \
  --per_device_train_batch_size 16 --max_steps "$steps" --save_steps 0 --report_to none \
  --group_by_modality_length True --dataloader_num_workers 4 2>&1 | grep -E "\[mm_moslora\]|Error|error|Traceback" | tail -5
cat "$out/train_summary.json"
