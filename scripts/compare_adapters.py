"""Does MoSLoRA beat LoRA? K seeds x adapter variants through the real two-stage recipe, evaluation and scorers.

    python scripts/compare_adapters.py --variants lora moslora --seeds 0 1 --preset smoke --output_dir DIR
    python scripts/compare_adapters.py --variants lora moslora moslora:init=orthogonal moslora:init=identity \
        lora:params=moslora moslora:init=zero --seeds 0 1 2 3 4 --lr_sweep 5e-4 1e-3 2e-3 --jobs 12 \
        --output_dir outputs/adapter_study

Writes DIR/results.json, DIR/report.md and PNG plots; `--help` documents the variant syntax. The logic lives in
mm_moslora/study/ (docs/adapter_study.md has the study's results and exact commands).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from mm_moslora.study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
