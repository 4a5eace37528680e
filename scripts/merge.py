"""Export a training output: adapters merged into the LM, a stock PEFT adapter, or a transformers LLaVA.

    python scripts/merge.py --checkpoint outputs/finetune-tiny --output outputs/merged-tiny
    python scripts/merge.py --checkpoint CKPT --output OUT --export peft
    python scripts/merge.py --checkpoint CKPT --output OUT --export hf-llava --dtype bf16 --overwrite

Exit status: 0 done, 1 the checkpoint cannot be read or converted, 2 bad arguments (OUT exists without
--overwrite, OUT overlaps the checkpoint). Formats and their layouts: mm_moslora/export.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from mm_moslora.checkpoint import CheckpointError  # noqa: E402
from mm_moslora.export import EXPORT_FORMATS, ExportError, OutputPathError, export_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training output (or OUTPUT/checkpoints/step-K)")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--export", choices=EXPORT_FORMATS, default="merged", help="format (default: merged)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="dtype of the written weights (default: the base LM's stored dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output, args.export, args.dtype, args.overwrite)
    except OutputPathError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ExportError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote the {args.export} export of {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
