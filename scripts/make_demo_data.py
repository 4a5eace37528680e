"""Generate the built-in procedural visual-QA demo data (images, LLaVA JSON, evaluation sets).

    python scripts/make_demo_data.py --out outputs/demo_data --seed 0 \
        --n-train 4000 --n-pretrain 4000 --n-eval 300 --image-size 64 --workers 2

Writes DIR/images/{train,eval}/, DIR/pretrain.json, DIR/finetune.json, DIR/eval/<bench>/ and
DIR/eval/index.json, then DIR/manifest.json last. Pass DIR/images as --image-folder. Re-running with
the same arguments returns at once ("already generated"); other arguments need --overwrite.
See mm_moslora/demo_data/ for the content.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from mm_moslora.demo_data import DemoDataExistsError, generate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=4000, help="finetune samples")
    parser.add_argument("--n-pretrain", type=int, default=4000, help="caption samples")
    parser.add_argument("--n-eval", type=int, default=300, help="questions per benchmark")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing images")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace data generated with other arguments")
    args = parser.parse_args(argv)
    try:
        manifest = generate(args.out, seed=args.seed, n_train=args.n_train,
                            n_pretrain=args.n_pretrain, n_eval=args.n_eval,
                            image_size=args.image_size, workers=args.workers,
                            overwrite=args.overwrite)
    except (DemoDataExistsError, ValueError) as err:
        parser.error(str(err))
    out = Path(args.out)
    if manifest["status"] == "already generated":
        print(f"already generated: {out / 'manifest.json'}")
        return 0
    print(json.dumps(manifest["counts"], indent=2))
    print(f"done: {out}  (image folder: {out / manifest['image_folder']}, "
          f"eval index: {out / manifest['files']['eval_index']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
