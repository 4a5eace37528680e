"""Export a training output: adapters merged into the LM, a stock PEFT adapter, or a transformers LLaVA.

    python scripts/merge.py --checkpoint outputs/finetune-tiny --output outputs/merged-tiny
    python scripts/merge.py --checkpoint CKPT --output OUT --export peft
    python scripts/merge.py --checkpoint CKPT --output OUT --export hf-llava --dtype bf16 --overwrite

Exit status: 0 done, 2 bad input in one `error:` line (OUT exists without --overwrite, OUT is not an earlier
export, OUT overlaps the checkpoint, the checkpoint cannot be read or converted; docs/bad_input.md). Formats
and their layouts: mm_moslora/export.py; OUT's handling: mm_moslora/export_folder.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from mm_moslora.errors import report_input_errors  # noqa: E402
from mm_moslora.export import EXPORT_FORMATS, export_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training output (or OUTPUT/checkpoints/step-K)")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--export", choices=EXPORT_FORMATS, default="merged", help="format (default: merged)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="dtype of the written weights (default: the base LM's stored dtype)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output, if it is an earlier export (never another folder)")
    args = parser.parse_args(argv)

    def run() -> int:
        out = export_checkpoint(args.checkpoint, args.output, args.export, args.dtype, args.overwrite)
        print(f"wrote the {args.export} export of {args.checkpoint} to {out}")
        return 0
    return report_input_errors(run)


if __name__ == "__main__":
    sys.exit(main())
