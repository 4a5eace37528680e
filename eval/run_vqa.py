"""Answer a LLaVA question file with a checkpoint, in batches; write a LLaVA answer file.

    python eval/run_vqa.py --model CKPT --question-file Q.jsonl --image-folder DIR --answers-file A.jsonl \
        [--batch-size 32] [--temperature 0] [--max-new-tokens 32] [--conv-mode M] [--num-chunks K --chunk-idx i]
    python eval/run_vqa.py merge --answers-files A.0.jsonl A.1.jsonl --question-file Q.jsonl --output A.jsonl

Questions: one JSON object a line (a JSON list is read too) with `question_id`, `text`, optional `image`
(relative to --image-folder, which it may not leave: no absolute paths, `../` or symlinks out, unless
--allow-images-outside-folder), `category`, `metadata`. Several questions may share an id if their texts
differ (LLaVA's MME file); the same id and text twice is an error, and questions without an image get a
warning. A text without `<image>` gets "<image>\\n" in front,
as LLaVA's model_vqa does. Answers: `question_id, prompt, text, answer_id, model_id, metadata`, where
metadata holds the question's `metadata` object and its `category`.

Runs resume: questions already in --answers-file (same id and prompt) are skipped, and answers are appended and flushed after each
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
from mm_moslora.errors import InputError, report_input_errors
from mm_moslora.data.images import load_image, resolve_image_path
from mm_moslora.infer import DECODE_MODES, InferenceEngine, PromptTooLongError, Request


class QuestionError(InputError):
    """A question that cannot be asked (missing image, bad record): the message names its id."""


def read_records(path: str | Path, what: str = "question") -> list[dict]:
    """JSONL (or a JSON list) -> list of objects; errors name the file and line (or list index)."""
    path = Path(path)
    if not path.is_file():
        raise QuestionError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuestionError(f"{path}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise QuestionError(f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
        places = [f"{path}: {what} {index}" for index in range(len(records))]
    else:
        records, places = [], []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if not records:
                    _refuse_single_object(path, text)
                raise QuestionError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            places.append(f"{path}:{line_no}")
    for place, record in zip(places, records):
        if not isinstance(record, dict):
            raise QuestionError(f"{place}: a {what} must be a JSON object, got {json.dumps(record)[:60]}")
    return records


def _refuse_single_object(path: Path, text: str) -> None:
    """A file that is one JSON object over several lines is not a question file: say so once, not per line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(value, dict):
        raise QuestionError(f"{path}: one JSON object ({len(value)} keys: {', '.join(list(map(str, value))[:4])}); "
                            f"expected one object per line (JSONL) or a JSON list of objects")


def check_questions(questions: list[dict], path: str | Path) -> list[str]:
    """Refuse records that cannot be answered; return warnings about those that are answered but look wrong.

    Keys: `question_id` (a string or an integer) and `text` (a string). Several questions may share an id when
    their texts differ (LLaVA's MME file uses the image path as the id of both of its questions): answers are
    matched by (id, prompt). The same id with the same text twice is refused: one answer would stand for both.
    """
    seen, ids, shared_ids, no_image = set(), set(), set(), []
    for index, question in enumerate(questions):
        qid = question.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise QuestionError(f"{path}: question {index}: 'question_id' must be a string or an integer, got "
                                f"{json.dumps(qid)[:60]}")
        if not isinstance(question.get("text"), str):
            raise QuestionError(f"{path}: question {qid}: 'text' must be a string, got "
                                f"{json.dumps(question.get('text'))[:60]}")
        if "image" in question and question["image"] is not None and not isinstance(question["image"], str):
            raise QuestionError(f"{path}: question {qid}: 'image' must be a path, got "
                                f"{json.dumps(question['image'])[:60]}")
        key = (qid, question["text"])
        if key in seen:
            raise QuestionError(f"{path}: question {qid} appears twice with the same text; question ids (with their "
                                f"text) must be unique, so that each answer names its question")
        if qid in ids:
            shared_ids.add(qid)
        seen.add(key)
        ids.add(qid)
        if not question.get("image"):
            no_image.append(qid)
    warnings = []
    if shared_ids:
        warnings.append(f"{path}: {len(shared_ids)} question ids are shared by questions with different texts "
                        f"(e.g. {sorted(map(str, shared_ids))[:3]}); their answers are told apart by the prompt")
    if no_image:
        warnings.append(f"{path}: {len(no_image)} of {len(questions)} questions have no image and are asked as text "
                        f"only (e.g. {list(map(str, no_image))[:3]})")
    return warnings


def get_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """Contiguous slice `chunk_idx` of `num_chunks` near-equal slices (sizes differ by at most one)."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} must be in [0, --num-chunks {num_chunks})")
    return items[chunk_idx * len(items) // num_chunks:(chunk_idx + 1) * len(items) // num_chunks]


def answered_ids(answers_file: Path) -> set:
    """(question_id, prompt) of the answers already in an answers file. A last line cut short by a crash is
    removed."""
    if not answers_file.exists():
        return set()
    data = answers_file.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with answers_file.open("r+b") as f:
            f.truncate(len(complete))
    try:
        return {(record["question_id"], record["prompt"]) for record in map(json.loads, complete.decode().splitlines())}
    except (ValueError, KeyError, TypeError):
        raise QuestionError(f"--answers-file {answers_file}: not an answers file written by run_vqa (move it away to "
                            f"start over)") from None


def image_path(question: dict, image_folder: str | None, allow_outside: bool = False) -> Path | None:
    """The question's image file (checked to exist, inside --image-folder unless allowed), or None for a
    text-only question."""
    qid = question.get("question_id")
    if qid is None or not isinstance(question.get("text"), str):
        raise QuestionError(f"question record {json.dumps(question)[:120]} lacks 'question_id' or 'text'")
    if not question.get("image"):
        return None
    try:
        path = resolve_image_path(question["image"], image_folder, allow_outside)
    except ValueError as err:
        raise QuestionError(f"question {qid}: {err}") from None
    if not path.is_file():
        raise QuestionError(f"question {qid}: image not found: {path}")
    return path


def to_request(question: dict, image_folder: str | None, allow_outside: bool = False) -> Request:
    qid, text, images = question.get("question_id"), question.get("text"), []
    path = image_path(question, image_folder, allow_outside)
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
    questions = read_records(args.question_file)
    for warning in check_questions(questions, args.question_file):
        print(f"warning: {warning}", file=sys.stderr)
    questions = get_chunk(questions, args.num_chunks, args.chunk_idx)
    answers_file = Path(args.answers_file)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(answers_file)
    todo = [q for q in questions if (q["question_id"], q["text"]) not in done]
    if not todo:
        print(f"{answers_file}: all {len(questions)} questions of this chunk are answered", file=sys.stderr)
        return 0
    for question in todo:  # find missing images before the model is loaded, not hours into the run
        image_path(question, args.image_folder, args.allow_images_outside_folder)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    engine = InferenceEngine.from_checkpoint(args.model, device=device, dtype=dtype, conv_mode=args.conv_mode,
                                             decode=args.decode)
    model_id = args.model_id or Path(args.model).resolve().name
    torch.manual_seed(args.seed)
    batches = [todo[start:start + args.batch_size] for start in range(0, len(todo), args.batch_size)]

    def load_batch(batch: list[dict]) -> list[Request]:
        return [to_request(q, args.image_folder, args.allow_images_outside_folder) for q in batch]
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
        for index, record in enumerate(read_records(path, what="answer")):
            if not {"question_id", "prompt"} <= record.keys():
                raise QuestionError(f"{path}: answer {index} lacks 'question_id' or 'prompt': not a run_vqa answer")
            key = (record["question_id"], record["prompt"])
            if not isinstance(key[0], (str, int)) or not isinstance(key[1], str):
                raise QuestionError(f"{path}: answer {index}: 'question_id' or 'prompt' has the wrong type")
            if key in answers:
                duplicates += 1
            else:
                answers[key] = record
    order = list(answers)
    if args.question_file:
        questions = read_records(args.question_file)
        check_questions(questions, args.question_file)
        order = [(q["question_id"], q["text"]) for q in questions]
        missing = [qid for qid, text in order if (qid, text) not in answers]
        unknown = answers.keys() - set(order)
        if unknown:
            raise QuestionError(f"{len(unknown)} answers are for questions not in {args.question_file}, "
                                f"e.g. {sorted(str(qid) for qid, _ in unknown)[:5]}")
        if missing and not args.allow_missing:
            raise QuestionError(f"{len(missing)} of {len(order)} questions have no answer, e.g. {missing[:5]} "
                                f"(finish those chunks, or pass --allow-missing)")
        order = [key for key in order if key in answers]
    tmp = Path(str(args.output) + ".tmp")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w") as out:
        out.writelines(json.dumps(answers[key]) + "\n" for key in order)
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
    parser.add_argument("--image-folder", default=None, help="images are read from here (default: the current "
                                                             "directory) and may not leave it")
    parser.add_argument("--allow-images-outside-folder", "--allow_images_outside_folder", action="store_true",
                        help="let image paths leave --image-folder (absolute paths, symlinks to elsewhere)")
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
    # ValueError too: the checkpoint loader's (a bad conv mode, another base LM) are reports, not bugs.
    return report_input_errors(lambda: args.command(args), extra=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
