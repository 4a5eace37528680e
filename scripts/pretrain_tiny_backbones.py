"""Pretrain the tiny LM and vision tower that the demo starts from (their weights are committed).

    python scripts/pretrain_tiny_backbones.py --device cuda --workers 12   # about 5 minutes on one H200
    python scripts/pretrain_tiny_backbones.py --lm-steps 20 --vision-steps 20 --out /tmp/x   # smoke run
    python scripts/pretrain_tiny_backbones.py --only lm --lm-size 8x512 --lm-steps 4000 --bf16 --device cuda \
        --workers 8 --out outputs/backbones-8x512      # the adapter study's larger LM (docs/adapter_study.md)

Writes OUT/lm (Hugging Face LLaMA folder, text-only pretraining) and OUT/vision (open_clip folder,
per-patch colour/shape labels), plus OUT/pretraining.json with the settings and final accuracies.
What each one learns and why the demo needs it: mm_moslora/model/tiny_pretrain.py.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from mm_moslora.model.tiny_pretrain import (LM_SIZES, PRETRAINED_DIR, pretrain_tiny_lm,  # noqa: E402
                                            pretrain_tiny_vision)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=PRETRAINED_DIR)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="processes drawing training batches")
    ap.add_argument("--lm-steps", type=int, default=11000)
    ap.add_argument("--vision-steps", type=int, default=3000)
    ap.add_argument("--only", choices=["lm", "vision"], default=None)
    ap.add_argument("--lm-size", choices=sorted(LM_SIZES), default="tiny", help="LM shape (model/tiny_pretrain.py)")
    ap.add_argument("--lm-lr", type=float, default=1e-3)
    ap.add_argument("--bf16", action="store_true", help="LM forward in bf16 autocast (GPU)")
    args = ap.parse_args()
    report_file = args.out / "pretraining.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    if args.only != "vision":
        report["lm"] = pretrain_tiny_lm(args.out / "lm", args.lm_steps, lr=args.lm_lr, device=args.device,
                                        workers=args.workers, size=args.lm_size, bf16=args.bf16)
    if args.only != "lm":
        report["vision"] = pretrain_tiny_vision(args.out / "vision", args.vision_steps, device=args.device,
                                                workers=args.workers)
    report_file.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
