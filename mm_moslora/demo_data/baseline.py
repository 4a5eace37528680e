"""The per-question-type majority-answer baseline: what a model that ignores the image would score.

Kept beside the generator because it relies on the generator's templates (``question_type_of``) to group
training turns and evaluation questions by kind; the demo scores it beside the trained model.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from .prompts import question_type_of

def normalize_answer(answer: str) -> str:
    """Lower case, trimmed, without a trailing period: the exact-match form used here."""
    return answer.strip().lower().rstrip(".").strip()


def _load_records(obj: str | os.PathLike | list[dict]) -> list[dict]:
    if not isinstance(obj, (str, os.PathLike)):
        return list(obj)
    text = Path(obj).read_text()
    return json.loads(text) if text.lstrip().startswith("[") else \
        [json.loads(line) for line in text.splitlines() if line.strip()]


def majority_baseline(finetune_json: str | os.PathLike | list[dict],
                      question_file_records: str | os.PathLike | list[dict],
                      answers: dict | None = None) -> dict[str, dict]:
    """Per-question-type majority-answer baseline.

    For each question kind (``question_type_of`` on the prompts of both sides), the most common
    training answer of that kind is predicted for every evaluation question of the kind and scored
    by exact match (``normalize_answer``).

    Args:
        finetune_json: path of ``finetune.json`` or its loaded list.
        question_file_records: a question file (JSONL path) or its records.
        answers: ``{question_id: answer}``; default: each record's ``metadata["answer"]``.

    Returns:
        ``{qtype: {"majority_answer", "n_train", "n_eval", "correct", "accuracy"}}`` plus
        ``"overall": {"n_eval", "correct", "accuracy"}``.
    """
    by_type: dict[str, Counter] = defaultdict(Counter)
    for sample in _load_records(finetune_json):
        conv = sample["conversations"]
        for human, gpt in zip(conv[0::2], conv[1::2]):
            by_type[question_type_of(human["value"])][normalize_answer(gpt["value"])] += 1
    result: dict[str, dict] = {}
    for rec in _load_records(question_file_records):
        qtype = question_type_of(rec["text"])
        truth = answers[rec["question_id"]] if answers is not None else rec["metadata"]["answer"]
        counter = by_type.get(qtype, Counter())
        guess = counter.most_common(1)[0][0] if counter else None
        entry = result.setdefault(qtype, {"majority_answer": guess, "n_train": sum(counter.values()),
                                          "n_eval": 0, "correct": 0})
        entry["n_eval"] += 1
        entry["correct"] += int(guess is not None and guess == normalize_answer(str(truth)))
    for entry in result.values():
        entry["accuracy"] = entry["correct"] / entry["n_eval"]
    n = sum(e["n_eval"] for e in result.values())
    correct = sum(e["correct"] for e in result.values())
    result["overall"] = {"n_eval": n, "correct": correct, "accuracy": correct / n if n else 0.0}
    return result
