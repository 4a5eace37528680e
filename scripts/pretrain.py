"""Stage 1, projector alignment (LLM and vision tower frozen).

    deepspeed scripts/pretrain.py --model_name_or_path lmsys/vicuna-7b-v1.5 \
        --vision_tower ViT-L-14-336:openai --mm_projector_type mlp2x_gelu \
        --data_path blip_laion_cc_sbu_558k.json --image_folder images --output_dir out/pretrain --bf16 True
    python scripts/pretrain.py            # tiny built-in model on the built-in demo data (CPU)

Flags: `python scripts/pretrain.py --help`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mm_moslora.train.args import parse_args  # noqa: E402  (light: --help and flag errors answer at once)

if __name__ == "__main__":
    parsed = parse_args("pretrain")
    from mm_moslora.train.recipe import run

    sys.exit(run(parsed))
