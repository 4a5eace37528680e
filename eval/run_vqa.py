"""Answer a LLaVA question file with a checkpoint, in batches; write a LLaVA answer file.

    python eval/run_vqa.py --model CKPT --question-file Q.jsonl --image-folder DIR --answers-file A.jsonl \
        [--batch-size 32] [--temperature 0] [--max-new-tokens 32] [--conv-mode M] [--num-chunks K --chunk-idx i]
    python eval/run_vqa.py merge --answers-files A.0.jsonl A.1.jsonl --question-file Q.jsonl --output A.jsonl

Questions: one JSON object a line (a JSON list is read too) with `question_id`, `text`, optional `image`
(relative to --image-folder), `category`, `metadata`. A text without `<image>` gets "<image>\\n" in front,
as LLaVA's model_vqa does. Answers: `question_id, prompt, text, answer_id, model_id, metadata`, where
metadata holds the question's `metadata` object and its `category`.

Runs resume: ids already in --answers-file are skipped, and answers are appended and flushed after each
batch. --num-chunks/--chunk-idx give each process one contiguous slice of the questions (one per GPU);
`merge` puts the slices back together in question-file order.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from mm_moslora.data.conversation import IMAGE_PLACEHOLDER
from mm_moslora.data.images import load_image, resolve_image_path
from mm_moslora.infer import DECODE_MODES, InferenceEngine, PromptTooLongError, Request


class QuestionError(ValueError):
    """A question that cannot be asked (missing image, bad record): the message names its id."""


def read_records(path: str | Path) -> list[dict]:
    """JSONL (or a JSON list) -> list of objects; errors name the file and line."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
    return records


def get_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """Contiguous slice `chunk_idx` of `num_chunks` near-equal slices (sizes differ by at most one)."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} must be in [0, --num-chunks {num_chunks})")
    return items[chunk_idx * len(items) // num_chunks:(chunk_idx + 1) * len(items) // num_chunks]


def answered_ids(answers_file: Path) -> set:
    """Question ids already in an answers file. A last line cut short by a crash is removed."""
    if not answers_file.exists():
        return set()
    data = answers_file.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with answers_file.open("r+b") as f:
            f.truncate(len(complete))
    return {json.loads(line)["question_id"] for line in complete.decode().splitlines() if line.strip()}


def image_path(question: dict, image_folder: str | None) -> Path | None:
    """The question's image file (checked to exist), or None for a text-only question."""
    qid = question.get("question_id")
    if qid is None or not isinstance(question.get("text"), str):
        raise QuestionError(f"question record {json.dumps(question)[:120]} lacks 'question_id' or 'text'")
    if not question.get("image"):
        return None
    try:
        path = resolve_image_path(question["image"], image_folder)
    except ValueError as err:
        raise QuestionError(f"question {qid}: {err}") from None
    if not path.is_file():
        raise QuestionError(f"question {qid}: image not found: {path}")
    return path


def to_request(question: dict, image_folder: str | None) -> Request:
    qid, text, images = question.get("question_id"), question.get("text"), []
    path = image_path(question, image_folder)
    if path is not None:
        try:
            images = [load_image(path)]
        except (OSError, ValueError) as err:
            raise QuestionError(f"question {qid}: cannot decode image {path}: {err}") from None
        if IMAGE_PLACEHOLDER not in text:
            text = IMAGE_PLACEHOLDER + "\n" + text
    if text.count(IMAGE_PLACEHOLDER) != len(images):
        raise QuestionError(f"question {qid}: the text has {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
                            f"placeholders but {len(images)} images")
    return Request([{"role": "user", "content": text}], images)


def answer_record(question: dict, answer: str, model_id: str) -> dict:
    metadata = dict(question.get("metadata") or {})
    if "category" in question:
        metadata.setdefault("category", question["category"])
    return {"question_id": question["question_id"], "prompt": question["text"], "text": answer,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": metadata}


def run(args: argparse.Namespace) -> int:
    questions = get_chunk(read_records(args.question_file), args.num_chunks, args.chunk_idx)
    answers_file = Path(args.answers_file)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(answers_file)
    todo = [q for q in questions if q.get("question_id") not in done]
    if not todo:
        print(f"{answers_file}: all {len(questions)} questions of this chunk are answered", file=sys.stderr)
        return 0
    for question in todo:  # find missing images before the model is loaded, not hours into the run
        image_path(question, args.image_folder)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    engine = InferenceEngine.from_checkpoint(args.model, device=device, dtype=dtype, conv_mode=args.conv_mode,
                                             decode=args.decode)
    model_id = args.model_id or Path(args.model).resolve().name
    torch.manual_seed(args.seed)
    batches = [todo[start:start + args.batch_size] for start in range(0, len(todo), args.batch_size)]

    def load_batch(batch: list[dict]) -> list[Request]:
        return [to_request(q, args.image_folder) for q in batch]
    # Images of the next batch are decoded in a thread while the current batch generates.
    with answers_file.open("a") as out, ThreadPoolExecutor(max_workers=1) as loader, \
            tqdm(total=len(questions), initial=len(questions) - len(todo), unit="question",
                 desc=answers_file.name) as progress:
        upcoming = loader.submit(load_batch, batches[0])
        for index, batch in enumerate(batches):
            requests = upcoming.result()
            if index + 1 < len(batches):
                upcoming = loader.submit(load_batch, batches[index + 1])
            try:
                answers = engine.generate(requests, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_p=args.top_p, batch_size=args.batch_size, truncate=args.truncate)
            except PromptTooLongError as err:
                raise QuestionError(f"question {batch[err.index]['question_id']}: {err} (--truncate cuts it)") from None
            for question, answer in zip(batch, answers):
                out.write(json.dumps(answer_record(question, answer, model_id)) + "\n")
            out.flush()
            progress.update(len(batch))
    return 0


def merge(args: argparse.Namespace) -> int:
    """Concatenate chunk answer files, in question-file order when --question-file is given."""
    answers, duplicates = {}, 0
    for path in args.answers_files:
        for record in read_records(path):
            if record["question_id"] in answers:
                duplicates += 1
            else:
                answers[record["question_id"]] = record
    order = list(answers)
    if args.question_file:
        order = [q["question_id"] for q in read_records(args.question_file)]
        missing = [qid for qid in order if qid not in answers]
        unknown = answers.keys() - set(order)
        if unknown:
            raise QuestionError(f"{len(unknown)} answers are for questions not in {args.question_file}, "
                                f"e.g. {sorted(map(str, unknown))[:5]}")
        if missing and not args.allow_missing:
            raise QuestionError(f"{len(missing)} of {len(order)} questions have no answer, e.g. {missing[:5]} "
                                f"(finish those chunks, or pass --allow-missing)")
        order = [qid for qid in order if qid in answers]
    tmp = Path(str(args.output) + ".tmp")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w") as out:
        out.writelines(json.dumps(answers[qid]) + "\n" for qid in order)
    os.replace(tmp, args.output)
    note = f" ({duplicates} duplicate answers ignored)" if duplicates else ""
    print(f"wrote {len(order)} answers to {args.output}{note}", file=sys.stderr)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["merge"]:
        parser = argparse.ArgumentParser(prog="run_vqa.py merge", description=merge.__doc__)
        parser.add_argument("--answers-files", nargs="+", required=True)
        parser.add_argument("--output", required=True)
        parser.add_argument("--question-file", help="order the answers like this file and check none is missing")
        parser.add_argument("--allow-missing", action="store_true")
        return parser.parse_args(argv[1:], namespace=argparse.Namespace(command=merge))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model-path", required=True, help="checkpoint folder (mm_config.json)")
    parser.add_argument("--model-id", help="model_id written in the answers (default: the checkpoint folder name)")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", "--top_p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=32)
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--truncate", action="store_true", help="cut over-long prompts instead of stopping")
    parser.add_argument("--seed", type=int, default=0, help="for sampling (temperature > 0)")
    parser.add_argument("--decode", choices=DECODE_MODES, default="auto",
                        help="auto: static KV cache + CUDA graphs on CUDA, Hugging Face generate on CPU; "
                             "hf forces generate (e.g. if CUDA graph capture fails), static the static decoder")
    return parser.parse_args(argv, namespace=argparse.Namespace(command=run))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.command(args)
    except (QuestionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
