"""Stage 2, visual instruction tuning: MoSLoRA (or LoRA) on the LLM plus the projector.

    deepspeed scripts/finetune.py --model_name_or_path lmsys/vicuna-7b-v1.5 --version v1 \
        --vision_tower ViT-L-14-336:openai --pretrain_mm_mlp_adapter out/pretrain \
        --data_path llava_v1_5_mix665k.json --image_folder data --output_dir out/finetune \
        --adapter moslora --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 --bf16 True \
        --deepspeed deepspeed_configs/zero3.json
    python scripts/finetune.py            # tiny built-in model on the built-in demo data (CPU)

Flags: `python scripts/finetune.py --help`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mm_moslora.train.args import parse_args  # noqa: E402  (light: --help and flag errors answer at once)

if __name__ == "__main__":
    parsed = parse_args("finetune")
    from mm_moslora.train.recipe import run

    sys.exit(run(parsed))
