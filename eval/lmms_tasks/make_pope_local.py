"""Write the offline lmms-eval task's data: a POPE-style Parquet file with the images embedded.

    python eval/lmms_tasks/make_pope_local.py [--n 100] [--output eval/lmms_tasks/pope_local/pope_local.parquet]
    python eval/lmms_tasks/make_pope_local.py --question-file Q.jsonl --image-folder DIR --output my.parquet

By default the questions are the first N of the built-in demo's POPE-style set (seeded: the same file every
time). With --question-file, any LLaVA POPE question file (its records' `metadata.answer` or a `label` holds
yes/no) is converted, so one's own images can be evaluated offline the same way. Columns: question_id,
question (without LLaVA's answer-format line: the task's post_prompt adds it), answer, category, image.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import datasets
from PIL import Image

FORMAT_LINE = "\nAnswer the question using a single word or phrase."
HERE = Path(__file__).resolve().parent


def records_from(question_file: Path, image_folder: Path, n: int | None) -> list[dict]:
    rows = []
    for line_no, line in enumerate(question_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        answer = record.get("label") or record.get("metadata", {}).get("answer")
        if answer not in ("yes", "no"):
            raise ValueError(f"{question_file}:{line_no}: no yes/no answer (label or metadata.answer)")
        with Image.open(image_folder / record["image"]) as image:
            rows.append({"question_id": str(record["question_id"]), "question": record["text"].removesuffix(FORMAT_LINE),
                         "answer": answer, "category": record.get("category", ""), "image": image.convert("RGB")})
        if n is not None and len(rows) == n:
            break
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="questions to keep (all with --question-file if not given)")
    parser.add_argument("--question-file", type=Path, help="a LLaVA POPE question file (default: the demo's)")
    parser.add_argument("--image-folder", type=Path, help="folder of the question file's images")
    parser.add_argument("--output", type=Path, default=HERE / "pope_local" / "pope_local.parquet")
    args = parser.parse_args(argv)
    if args.question_file is not None:
        rows = records_from(args.question_file, args.image_folder or args.question_file.parent, args.n)
    else:
        from mm_moslora.demo_data import generate

        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp, seed=0, n_train=0, n_pretrain=0, n_eval=args.n, progress=False)
            index = json.loads((Path(tmp) / "eval" / "index.json").read_text())
            rows = records_from(Path(tmp) / index["benchmarks"]["pope"]["question_file"],
                                Path(tmp) / index["image_folder"], args.n)
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "category": datasets.Value("string"),
                                  "image": datasets.Image()})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(args.output)
    print(f"wrote {len(rows)} questions to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
