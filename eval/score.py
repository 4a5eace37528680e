"""Official-style scoring of LLaVA answer files on VQA benchmarks.

    python eval/score.py --benchmark vqav2 --answers-file answers/vqav2.jsonl \
        --annotation-file v2_mscoco_val2014_annotations.json
    python eval/score.py --benchmark pope --answers-file answers/pope.jsonl --annotation-file pope/coco/
    python eval/score.py --benchmark scienceqa --answers-file answers/sqa.jsonl \
        --annotation-file scienceqa/problems.json --split-file scienceqa/pid_splits.json

The CLI prints one JSON object on stdout and writes it to `<answers-stem>.scores.json` next to the
answers file (or to --output). `overall` is the headline number, `overall_metric` says what it is
(a percentage for every benchmark except MME, whose score is a sum over subtasks). For vqav2 and
vizwiz it also writes the EvalAI submission file (`<answers-stem>.submission.json` or
--submission-file). Input errors (a malformed file, an answers file that does not match the
annotations) end with exit status 2 and one line on stderr.

Answers files are LLaVA answer files: JSONL lines {"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}; only question_id and text are read (plus round_id for MMBench and metadata
for POPE and MME, see below). The answers must cover the annotations exactly: ids missing from the
answers, ids unknown to the annotations and repeated ids raise `AnswersMismatchError`;
`allow_partial=True` (--allow-partial) scores the answered subset but still rejects unknown and
repeated ids.

Ground-truth layouts (each benchmark's official release format):
- vqav2: `{"annotations": [{"question_id": int, "image_id", "question_type", "answer_type",
  "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"} x10]}]}`.
- textvqa: `{"data": [{"question_id": int, "image_id", "question", "answers": [str x10]}]}`.
- vizwiz: `[{"image": "VizWiz_val_00000000.jpg", "question", "answers": [{"answer",
  "answer_confidence"} x10], "answer_type", "answerable"}]`; answers-file question_id = image.
- gqa: `{qid: {"imageId", "question", "answer", "fullAnswer", "types": {"structural", "semantic",
  "detailed"}}}` (testdev_balanced_questions.json).
- pope: JSONL lines `{"question_id", "image", "text", "label": "yes"|"no"}`, one file per split
  (`coco_pope_<split>.json`); several files or a directory of them may be given. When the same
  question_id occurs in several splits, each answer must name its split in `metadata.category`
  (the `category` of LLaVA's POPE question file).
- scienceqa: `problems.json` `{pid: {"question", "choices", "answer": int, "hint", "image",
  "split", "subject", "grade"}}` + optional `pid_splits.json` `{split: [pid, ...]}`.
- mme: the MME release folder: one folder per subtask holding either `images/` +
  `questions_answers_YN/` or images and .txt files side by side; each .txt holds lines
  `question<TAB>Yes|No` for the image with the same stem. The eval runner must write
  `metadata: {"category": subtask, "image": "<relative image path>", "question": "<question as in
  the .txt>"}` into each answer; without it the key falls back to LLaVA's convention
  (question_id = "<subtask>/.../<image>", question = prompt without LLaVA's short-answer suffix).
- mmbench: the MMBench TSV (index, question, hint, A, B, C, D[, E...], answer, category,
  l2-category, image as base64, optional split); answers-file question_id = index, optional round_id.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path, PurePosixPath

BENCHMARKS = ("vqav2", "textvqa", "vizwiz", "gqa", "pope", "scienceqa", "mme", "mmbench")


class ScoringInputError(ValueError):
    """An answers or annotation file that cannot be scored (malformed, or not matching)."""


class AnswersMismatchError(ScoringInputError):
    """The answers file's question ids do not match the annotations.

    Attributes `missing`, `unknown` and `duplicated` hold the offending keys.
    """

    def __init__(self, benchmark: str, missing: list, unknown: list, duplicated: list, allow_partial: bool):
        self.missing, self.unknown, self.duplicated = missing, unknown, duplicated
        parts = []
        for what, keys in (("missing from the answers", missing), ("unknown to the annotations", unknown),
                           ("answered more than once", duplicated)):
            if keys:
                shown = ", ".join(_format_key(k) for k in keys[:5])
                parts.append(f"{len(keys)} id(s) {what} (e.g. {shown})")
        hint = "" if allow_partial or not missing else "; pass --allow-partial to score the answered subset"
        super().__init__(f"answers file does not match the {benchmark} annotations: {'; '.join(parts)}{hint}")


# ----------------------------------------------------------------------------------------------
# VQA answer normalisation: the rules of the official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py,
# used by EvalAI for VQAv2, VizWiz and TextVQA), reproduced quirks included.
# ----------------------------------------------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
# The official pattern: "(?!<=\d)" is a (mistyped) lookahead that never fires, so in effect a period
# is removed unless a digit follows it ("2.5" keeps its period, "yes." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: drop or space out punctuation, strip periods not before a digit.

    A mark next to a space ("a , b") or any mark in a text holding a digit-comma-digit ("1,000") is
    deleted; otherwise it becomes a space ("black-white" -> "black white").
    """
    out = text
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for mark in PUNCTUATION:
        if has_number_comma or (mark + " " in text or " " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


@functools.lru_cache(maxsize=1 << 18)  # ground-truth answers repeat a lot ("yes", "2", ...)
def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation: whitespace, punctuation, then digits/articles/contractions."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def evalai_answer(answer: str) -> str:
    """LLaVA's `EvalAIAnswerProcessor` (from MMF), used to write VQAv2/VizWiz submission files.

    It lower-cases, deletes every comma and question mark, splits "'s" off, then applies the
    official normalisation (so a trailing period goes and "two" becomes "2").
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(text)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Official VQA accuracy in [0, 1] of one prediction against the human answers (usually 10).

    Prediction and every human answer are normalised; then for each leave-one-out subset of the
    human answers, min(1, #matches in the subset / 3), averaged over the subsets. An answer given by
    1, 2, 3, >=4 of 10 humans scores 0.3, 0.6, 0.9, 1.0.
    """
    if not gt_answers:
        raise ValueError("a question needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(gt) == pred for gt in gt_answers]
    n_match = sum(hits)
    return sum(min(1.0, (n_match - hit) / 3) for hit in hits) / len(hits)


# ----------------------------------------------------------------------------------------------
# Prediction parsers of the other benchmarks
# ----------------------------------------------------------------------------------------------
def llava_short_answer(text: str) -> str:
    """LLaVA's GQA answer processing: strip, drop trailing periods, lower-case."""
    return text.strip().rstrip(".").lower()


def pope_yes_no(text: str) -> str:
    """LLaVA's eval_pope rule: first sentence, commas removed; 'No'/'no'/'not' as a word -> no, else yes."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def mme_yes_no(text: str) -> str:
    """The MME eval tool's parse: lower-cased 'yes'/'no', else 'yes' then 'no' searched in the first
    4 characters ("not sure" -> no, as in the official tool), else 'other' (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"


def scienceqa_option_letter(text: str, num_choices: int) -> str:
    """Option letter of a ScienceQA prediction as LLaVA's eval_science_qa reads it, else "FAILED".

    Accepted: a bare letter ("B"), a letter opening the answer ("B. tiger", "B) tiger"), or
    "The answer is B" anywhere. A letter beyond the problem's choices is FAILED (scored wrong).
    """
    flat = text.replace("\n", ". ")
    letter = FAILED
    if flat.strip() in SCIENCEQA_OPTIONS:
        letter = flat.strip()
    elif opening := re.match(r"([A-E])[.)](?:\s|$)", text.strip()):
        letter = opening.group(1)
    elif stated := re.search(r"The answer is ([A-E])", flat):
        letter = stated.group(1)
    return letter if letter in SCIENCEQA_OPTIONS[:num_choices] else FAILED


_MMBENCH_SEPARATORS = ".()[],:;!*#{}"


def mmbench_option_letter(text: str, options: dict[str, str]) -> str | None:
    """Option letter of an MMBench prediction (MMBench's `can_infer`, without the GPT fallback).

    options: {letter: option text} as shown to the model. The letter is the only option letter
    appearing as a word once brackets and punctuation are spaced out ("(B)", "B.", "B: dog");
    failing that, the only option whose text occurs in the answer; else None (scored wrong).
    """
    spaced = text
    for mark in _MMBENCH_SEPARATORS:
        spaced = spaced.replace(mark, " ")
    words = set(spaced.split())
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    lowered = text.lower()
    by_text = [letter for letter, option in options.items() if option.lower() in lowered]
    return by_text[0] if len(by_text) == 1 else None


# ----------------------------------------------------------------------------------------------
# Reading inputs and matching answers to annotations
# ----------------------------------------------------------------------------------------------
def load_answers(path: str | Path) -> list[dict]:
    """Read a LLaVA answers JSONL file; every record needs `question_id` and a string `text`."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoringInputError(f"{path}:{line_no}: not a JSON line ({e.msg})") from None
            if not isinstance(record, dict) or "question_id" not in record or not isinstance(record.get("text"), str):
                raise ScoringInputError(f"{path}:{line_no}: an answer needs 'question_id' and a string 'text'")
            records.append(record)
    return records


def _read_json(path: str | Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ScoringInputError(f"{path}: not valid JSON ({e})") from None


def _require(record, keys: Iterable[str], where: str) -> None:
    if not isinstance(record, dict):
        raise ScoringInputError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise ScoringInputError(f"{where}: missing field(s) {', '.join(missing)}")


def _format_key(key) -> str:
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


def match_answers(answers: Sequence[dict], expected: Iterable[Hashable], key_of: Callable[[dict], Hashable],
                  *, benchmark: str, allow_partial: bool = False) -> dict:
    """Map each expected key to its answer record, or raise `AnswersMismatchError`.

    key_of(answer) gives the annotation key an answer claims. Unknown and repeated keys are always
    errors; keys without an answer are errors unless allow_partial (then they are left out).
    """
    expected_keys = list(expected)
    expected_set = set(expected_keys)
    matched, unknown, duplicated = {}, [], []
    for answer in answers:
        key = key_of(answer)
        if key not in expected_set:
            unknown.append(key)
        elif key in matched:
            duplicated.append(key)
        else:
            matched[key] = answer
    missing = [key for key in expected_keys if key not in matched]
    if unknown or duplicated or (missing and not allow_partial):
        raise AnswersMismatchError(benchmark, [] if allow_partial else missing, unknown, duplicated, allow_partial)
    if not matched:
        raise ScoringInputError(f"no answers to score for {benchmark}")
    return {key: matched[key] for key in expected_keys if key in matched}  # annotation order


def _qid(answer: dict) -> str:
    """Question ids compare as strings: annotation ids may be ints (VQAv2) or strings (GQA, TSV)."""
    return str(answer["question_id"])


# ----------------------------------------------------------------------------------------------
# Aggregation helpers
# ----------------------------------------------------------------------------------------------
def _percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def _breakdown(pairs: Iterable[tuple[str, float]]) -> dict[str, dict]:
    """[(group, score in [0,1])] -> {group: {"accuracy": percent, "count": n}}, groups sorted."""
    groups = defaultdict(list)
    for group, value in pairs:
        groups[str(group)].append(value)
    return {group: {"accuracy": _percent(values), "count": len(values)} for group, values in sorted(groups.items())}


def _summary(benchmark: str, overall: float, metric: str, scored: int, expected: int) -> dict:
    return {"benchmark": benchmark, "overall": overall, "overall_metric": metric,
            "num_scored": scored, "num_expected": expected, "partial": scored < expected}


VQA_METRIC = "VQA accuracy (%): official normalisation, leave-one-out over the human answers"


# ----------------------------------------------------------------------------------------------
# Scorers: score_<benchmark>(answers, annotation_path, ...) -> dict
# ----------------------------------------------------------------------------------------------
def score_vqav2(answers: Sequence[dict], annotation_path: str | Path, *, allow_partial: bool = False) -> dict:
    """VQAv2 accuracy with per answer_type and per question_type breakdowns.

    Unlike vqaEval.py, which skips normalising the human answers when all 10 agree, every answer is
    normalised; the released annotations are already normalised, so the scores agree.
    """
    data = _read_json(annotation_path)
    _require(data, ["annotations"], str(annotation_path))
    annotations = {}
    for i, ann in enumerate(data["annotations"]):
        _require(ann, ["question_id", "answer_type", "question_type", "answers"], f"{annotation_path}: annotation {i}")
        annotations[str(ann["question_id"])] = ann
    matched = match_answers(answers, annotations, _qid, benchmark="vqav2", allow_partial=allow_partial)
    scores = {key: vqa_accuracy(answer["text"], [a["answer"] for a in annotations[key]["answers"]])
              for key, answer in matched.items()}
    result = _summary("vqav2", _percent(list(scores.values())), VQA_METRIC, len(scores), len(annotations))
    result["per_answer_type"] = _breakdown((annotations[k]["answer_type"], s) for k, s in scores.items())
    result["per_question_type"] = _breakdown((annotations[k]["question_type"], s) for k, s in scores.items())
    return result


def score_textvqa(answers: Sequence[dict], annotation_path: str | Path, *, allow_partial: bool = False) -> dict:
    """TextVQA accuracy (the VQA accuracy over the 10 answers of each question)."""
    data = _read_json(annotation_path)
    _require(data, ["data"], str(annotation_path))
    annotations = {}
    for i, item in enumerate(data["data"]):
        _require(item, ["question_id", "answers"], f"{annotation_path}: data[{i}]")
        annotations[str(item["question_id"])] = item
    matched = match_answers(answers, annotations, _qid, benchmark="textvqa", allow_partial=allow_partial)
    scores = [vqa_accuracy(answer["text"], annotations[key]["answers"]) for key, answer in matched.items()]
    return _summary("textvqa", _percent(scores), VQA_METRIC, len(scores), len(annotations))


def score_vizwiz(answers: Sequence[dict], annotation_path: str | Path, *, allow_partial: bool = False) -> dict:
    """VizWiz-VQA accuracy (question_id = image file name) with a per answer_type breakdown."""
    data = _read_json(annotation_path)
    if not isinstance(data, list):
        raise ScoringInputError(f"{annotation_path}: VizWiz annotations must be a JSON list")
    annotations = {}
    for i, item in enumerate(data):
        _require(item, ["image", "answers", "answer_type"], f"{annotation_path}: item {i}")
        annotations[str(item["image"])] = item
    matched = match_answers(answers, annotations, _qid, benchmark="vizwiz", allow_partial=allow_partial)
    scores = {key: vqa_accuracy(answer["text"], [a["answer"] for a in annotations[key]["answers"]])
              for key, answer in matched.items()}
    result = _summary("vizwiz", _percent(list(scores.values())), VQA_METRIC, len(scores), len(annotations))
    result["per_answer_type"] = _breakdown((annotations[k]["answer_type"], s) for k, s in scores.items())
    return result


def score_gqa(answers: Sequence[dict], annotation_path: str | Path, *, allow_partial: bool = False) -> dict:
    """GQA exact-match accuracy after LLaVA's answer processing, per structural and semantic type."""
    questions = _read_json(annotation_path)
    if not isinstance(questions, dict):
        raise ScoringInputError(f"{annotation_path}: GQA questions must be a JSON object {{qid: question}}")
    for qid, question in questions.items():
        _require(question, ["answer", "types"], f"{annotation_path}: question {qid}")
    matched = match_answers(answers, questions, _qid, benchmark="gqa", allow_partial=allow_partial)
    scores = {key: float(llava_short_answer(answer["text"]) == questions[key]["answer"])
              for key, answer in matched.items()}
    result = _summary("gqa", _percent(list(scores.values())), "exact-match accuracy (%)", len(scores), len(questions))
    result["per_structural_type"] = _breakdown((questions[k]["types"].get("structural"), s) for k, s in scores.items())
    result["per_semantic_type"] = _breakdown((questions[k]["types"].get("semantic"), s) for k, s in scores.items())
    return result


def _pope_files(paths: str | Path | Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(split, file) for POPE label files given as files and/or directories of coco_pope_<split>.json."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("coco_pope_*.json"))
            if not found:
                raise ScoringInputError(f"{path}: no coco_pope_<split>.json files in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ScoringInputError(f"{path}: no such POPE annotation file or directory")
    # coco_pope_adversarial.json -> "adversarial"; any other file name -> its stem
    splits = [(file.stem.removeprefix("coco_pope_"), file) for file in files]
    names = [split for split, _ in splits]
    if len(set(names)) != len(names):
        raise ScoringInputError(f"POPE split names repeat across the annotation files: {names}")
    return splits


def _binary_metrics(pairs: Sequence[tuple[str, str]]) -> dict:
    """[(pred, label)] with yes = positive -> percentages as in LLaVA's eval_pope (0 where undefined)."""
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l == "yes" for p, l in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100.0 * (tp + tn) / len(pairs), "precision": 100.0 * precision, "recall": 100.0 * recall,
            "f1": 100.0 * f1, "yes_ratio": 100.0 * (tp + fp) / len(pairs),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "count": len(pairs)}


def score_pope(answers: Sequence[dict], annotation_path: str | Path | Sequence[str | Path], *,
               allow_partial: bool = False) -> dict:
    """POPE accuracy/precision/recall/F1/yes-ratio per split; overall = mean F1 over the splits."""
    labels, splits_of_id = {}, defaultdict(list)
    for split, file in _pope_files(annotation_path):
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ScoringInputError(f"{file}:{line_no}: not a JSON line ({e.msg})") from None
                _require(item, ["question_id", "label"], f"{file}:{line_no}")
                if item["label"] not in ("yes", "no"):
                    raise ScoringInputError(f"{file}:{line_no}: label must be 'yes' or 'no', got {item['label']!r}")
                qid = str(item["question_id"])
                if (split, qid) in labels:
                    raise ScoringInputError(f"{file}:{line_no}: question_id {qid} repeats within split {split}")
                labels[(split, qid)] = item["label"]
                splits_of_id[qid].append(split)

    def key_of(answer: dict) -> tuple[str, str]:
        qid = _qid(answer)
        candidates = splits_of_id.get(qid, [])
        if len(candidates) <= 1:
            return (candidates[0] if candidates else "?", qid)
        split = (answer.get("metadata") or {}).get("category") or answer.get("category")
        if split not in candidates:
            raise ScoringInputError(f"question_id {qid} occurs in POPE splits {candidates}: the answer must name "
                                    f"its split in metadata.category (got {split!r})")
        return (split, qid)

    matched = match_answers(answers, labels, key_of, benchmark="pope", allow_partial=allow_partial)
    by_split = defaultdict(list)
    for (split, qid), answer in matched.items():
        by_split[split].append((pope_yes_no(answer["text"]), labels[(split, qid)]))
    per_split = {split: _binary_metrics(pairs) for split, pairs in sorted(by_split.items())}
    mean_f1 = sum(m["f1"] for m in per_split.values()) / len(per_split)
    result = _summary("pope", mean_f1, "F1 (%) averaged over the POPE splits (yes = positive class)",
                      len(matched), len(labels))
    result["mean_accuracy"] = sum(m["accuracy"] for m in per_split.values()) / len(per_split)
    result["per_split"] = per_split
    return result


def _scienceqa_grade_band(grade: str) -> str:
    digits = re.sub(r"\D", "", str(grade))
    return "G1-6" if digits and int(digits) <= 6 else "G7-12"


def score_scienceqa(answers: Sequence[dict], annotation_path: str | Path, *, split_file: str | Path | None = None,
                    split: str = "test", allow_partial: bool = False) -> dict:
    """ScienceQA accuracy overall, per subject, per context (TXT/IMG/NO) and per grade band.

    The problems scored are `split_file[split]` or, without a split file, those whose "split" field
    equals `split`. Contexts follow the official ScienceQA evaluation: TXT = has a hint, IMG = has an
    image, NO = neither. `img_accuracy` is the IMG subset (LLaVA's "SQA-IMG").
    """
    problems = _read_json(annotation_path)
    if not isinstance(problems, dict):
        raise ScoringInputError(f"{annotation_path}: problems.json must be a JSON object {{pid: problem}}")
    if split_file is not None:
        splits = _read_json(split_file)
        if not isinstance(splits, dict) or split not in splits:
            raise ScoringInputError(f"{split_file}: no split {split!r}")
        pids = [str(pid) for pid in splits[split]]
        unknown = [pid for pid in pids if pid not in problems]
        if unknown:
            raise ScoringInputError(f"{split_file}: split {split!r} lists pids absent from problems.json "
                                    f"(e.g. {', '.join(unknown[:5])})")
    else:
        pids = [pid for pid, problem in problems.items() if isinstance(problem, dict) and problem.get("split") == split]
    if not pids:
        raise ScoringInputError(f"{annotation_path}: no problems in split {split!r}")
    for pid in pids:
        _require(problems[pid], ["choices", "answer", "subject", "grade"], f"{annotation_path}: problem {pid}")

    matched = match_answers(answers, pids, _qid, benchmark="scienceqa", allow_partial=allow_partial)
    correct, letters = {}, {}
    for pid, answer in matched.items():
        problem = problems[pid]
        letters[pid] = scienceqa_option_letter(answer["text"], len(problem["choices"]))
        correct[pid] = float(letters[pid] != FAILED and SCIENCEQA_OPTIONS.index(letters[pid]) == problem["answer"])

    contexts = []  # a problem with a hint and an image counts in TXT and in IMG
    for pid, value in correct.items():
        has_text, has_image = bool(problems[pid].get("hint")), bool(problems[pid].get("image"))
        if has_text:
            contexts.append(("TXT", value))
        if has_image:
            contexts.append(("IMG", value))
        if not has_text and not has_image:
            contexts.append(("NO", value))
    result = _summary("scienceqa", _percent(list(correct.values())), "accuracy (%)", len(correct), len(pids))
    result["split"] = split
    result["per_context"] = _breakdown(contexts)
    result["img_accuracy"] = result["per_context"].get("IMG", {}).get("accuracy")
    result["per_subject"] = _breakdown((problems[pid]["subject"], v) for pid, v in correct.items())
    result["per_grade"] = _breakdown((_scienceqa_grade_band(problems[pid]["grade"]), v) for pid, v in correct.items())
    result["num_failed_to_parse"] = sum(letter == FAILED for letter in letters.values())
    return result


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
LLAVA_SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
MME_YES_NO_SUFFIX = " Please answer yes or no."


def load_mme_ground_truth(root: str | Path) -> dict[tuple[str, str, str], str]:
    """{(subtask, image stem, question): "yes"|"no"} from an MME release folder."""
    root = Path(root)
    if not root.is_dir():
        raise ScoringInputError(f"{root}: the MME annotation must be the release directory")
    truth = {}
    for subtask_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        qa_dir = subtask_dir / "questions_answers_YN"
        if not qa_dir.is_dir():
            qa_dir = subtask_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for line_no, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
                    raise ScoringInputError(f"{txt}:{line_no}: expected 'question<TAB>Yes|No'")
                key = (subtask_dir.name, txt.stem, fields[0])
                if key in truth:
                    raise ScoringInputError(f"{txt}:{line_no}: question repeated for this image")
                truth[key] = fields[1].strip().lower()
    if not truth:
        raise ScoringInputError(f"{root}: no MME subtask folders with question .txt files")
    return truth


def _mme_key(answer: dict, truth: dict) -> tuple[str, str, str]:
    """(subtask, image stem, question) of an answer: from metadata, else LLaVA's conventions."""
    meta = answer.get("metadata") or {}
    qid = _qid(answer)
    subtask = meta.get("category") or qid.split("/")[0]
    stem = PurePosixPath(str(meta.get("image") or qid)).stem
    if meta.get("question"):
        return (subtask, stem, meta["question"])
    question = str(answer.get("prompt", ""))
    question = question.removeprefix("<image>").replace(LLAVA_SHORT_ANSWER_SUFFIX, "").strip()
    # LLaVA's convert_answer_to_mme.py: the .txt question may carry the yes/no request (with one or
    # two spaces) when the prompt does not.
    candidates = [question, question + MME_YES_NO_SUFFIX, question + " " + MME_YES_NO_SUFFIX]
    for candidate in candidates:
        if (subtask, stem, candidate) in truth:
            return (subtask, stem, candidate)
    return (subtask, stem, question)


def score_mme(answers: Sequence[dict], annotation_path: str | Path, *, allow_partial: bool = False) -> dict:
    """MME scores: per subtask acc, acc+ (an image counts when all its questions are right) and
    score = (acc + acc+) x 100; perception/cognition totals sum the subtask scores.

    overall = the perception total, an MME score (max 200 per subtask, 2000 with all 10 perception
    subtasks), not a percentage.
    """
    truth = load_mme_ground_truth(annotation_path)
    matched = match_answers(answers, truth, lambda answer: _mme_key(answer, truth), benchmark="mme",
                            allow_partial=allow_partial)
    per_question, per_image = defaultdict(list), defaultdict(list)
    others = defaultdict(int)
    for (subtask, stem, question), answer in matched.items():
        pred = mme_yes_no(answer["text"])
        right = pred == truth[(subtask, stem, question)]
        per_question[subtask].append(right)
        per_image[(subtask, stem)].append(right)
        others[subtask] += pred == "other"
    per_subtask = {}
    for subtask, rights in sorted(per_question.items()):
        images = [all(v) for (task, _), v in per_image.items() if task == subtask]
        acc, acc_plus = sum(rights) / len(rights), sum(images) / len(images)
        per_subtask[subtask] = {"acc": 100.0 * acc, "acc_plus": 100.0 * acc_plus, "score": 100.0 * (acc + acc_plus),
                                "num_questions": len(rights), "num_images": len(images),
                                "num_other_answers": others[subtask]}
    perception = sum(per_subtask[t]["score"] for t in MME_PERCEPTION if t in per_subtask)
    cognition = sum(per_subtask[t]["score"] for t in MME_COGNITION if t in per_subtask)
    present = {subtask for subtask, _, _ in truth}
    result = _summary("mme", perception, "MME perception score: sum over perception subtasks of (acc + acc+) x 100 "
                      "(max 200 each, 2000 in total); not a percentage", len(matched), len(truth))
    result.update({"perception": perception, "cognition": cognition, "per_subtask": per_subtask,
                   "missing_subtasks": [t for t in MME_PERCEPTION + MME_COGNITION if t not in present],
                   "unofficial_subtasks": sorted(present - set(MME_PERCEPTION + MME_COGNITION))})
    return result


def _raise_csv_field_limit() -> None:
    """MMBench's base64 image cells exceed csv's 128 KiB default field limit."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32-bit on some platforms
            limit //= 2


def _is_none(value: str | None) -> bool:
    """LLaVA's is_none for TSV cells: empty, 'nan' or 'none' (pandas writes NaN as empty or 'nan')."""
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


MMBENCH_ROTATION_STRIDE = 1_000_000


def _round_id(answer: dict) -> int:
    """LLaVA's MMBench answers carry round_id (0 when not run with --all-rounds)."""
    round_id = answer.get("round_id") or 0
    if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
        raise ScoringInputError(f"question_id {answer['question_id']}: round_id must be a non-negative integer, "
                                f"got {round_id!r}")
    return round_id


def load_mmbench(path: str | Path, split: str | None = None) -> dict[str, dict]:
    """{index: {"options": {letter: text}, "answer", "category", "l2_category"}} from an MMBench TSV."""
    _raise_csv_field_limit()
    rows = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        missing = [col for col in ("index", "question", "answer", "A", "B") if col not in header]
        if missing:
            raise ScoringInputError(f"{path}: MMBench TSV lacks column(s) {', '.join(missing)}")
        option_columns = [col for col in header if len(col) == 1 and col.isupper()]
        for row_no, row in enumerate(reader, 2):
            if split is not None and "split" in header and row.get("split") != split:
                continue
            index = row["index"].strip()
            if not index.isdigit():
                raise ScoringInputError(f"{path}:{row_no}: index must be a non-negative integer, got {index!r}")
            options = {col: row[col] for col in option_columns if not _is_none(row.get(col))}
            answer = (row["answer"] or "").strip()
            if answer not in options:
                raise ScoringInputError(f"{path}:{row_no}: answer {answer!r} is not one of the options "
                                        f"{sorted(options)} (a test split without answers cannot be scored)")
            if index in rows:
                raise ScoringInputError(f"{path}:{row_no}: index {index} repeats")
            rows[index] = {"options": options, "answer": answer, "category": row.get("category") or "",
                           "l2_category": row.get("l2-category") or row.get("l2_category") or ""}
    if not rows:
        raise ScoringInputError(f"{path}: no MMBench rows" + (f" in split {split!r}" if split else ""))
    return rows


def score_mmbench(answers: Sequence[dict], annotation_path: str | Path, *, split: str | None = None,
                  allow_partial: bool = False) -> dict:
    """MMBench accuracy per category and l2-category, circular when rotations are present.

    Rotations are TSV rows whose index % 1,000,000 is equal, and/or LLaVA's `--all-rounds` answers:
    round r of a row shows its options rotated left by r (LLaVA's model_vqa_mmbench), so one row
    of n options expects rounds 0..n-1 as soon as any answer carries round_id > 0. A question counts
    right only if every rotation is right. Without rotations this is plain (vanilla) accuracy.
    """
    rows = load_mmbench(annotation_path, split)
    all_rounds = any(_round_id(answer) > 0 for answer in answers)
    expected = [(index, r) for index, row in rows.items()
                for r in range(len(row["options"]) if all_rounds else 1)]

    def key_of(answer: dict) -> tuple[str, int]:
        return (_qid(answer), _round_id(answer))

    matched = match_answers(answers, expected, key_of, benchmark="mmbench", allow_partial=allow_partial)
    right = {}
    for (index, r), answer in matched.items():
        row = rows[index]
        letters = list(row["options"])
        texts = [row["options"][letter] for letter in letters]
        shown = dict(zip(letters, texts[r:] + texts[:r]))
        target = letters[(letters.index(row["answer"]) - r) % len(letters)]
        right[(index, r)] = mmbench_option_letter(answer["text"], shown) == target

    groups = defaultdict(list)
    for (index, r), value in right.items():
        groups[int(index) % MMBENCH_ROTATION_STRIDE].append((int(index), value))
    circular = all_rounds or any(len(members) > 1 for members in groups.values())
    per_question, categories = {}, {}
    for group, members in groups.items():
        per_question[group] = float(all(value for _, value in members))
        categories[group] = rows[str(min(index for index, _ in members))]
    vanilla = [float(v) for (index, r), v in right.items() if r == 0 and int(index) < MMBENCH_ROTATION_STRIDE]
    metric = "circular accuracy (%): right only if every rotation is right" if circular else "accuracy (%)"
    result = _summary("mmbench", _percent(list(per_question.values())), metric, len(matched), len(expected))
    result.update({"circular": circular, "num_questions": len(per_question),
                   "vanilla_accuracy": _percent(vanilla) if vanilla else None,
                   "per_category": _breakdown((categories[g]["category"], v) for g, v in per_question.items()),
                   "per_l2_category": _breakdown((categories[g]["l2_category"], v) for g, v in per_question.items())})
    return result


# ----------------------------------------------------------------------------------------------
# EvalAI submission files
# ----------------------------------------------------------------------------------------------
def vqav2_submission(answers: Sequence[dict]) -> list[dict]:
    """EvalAI VQAv2 results: [{"question_id", "answer"}] with LLaVA's EvalAI answer processing."""
    return [{"question_id": answer["question_id"], "answer": evalai_answer(answer["text"])} for answer in answers]


def vizwiz_submission(answers: Sequence[dict]) -> list[dict]:
    """EvalAI VizWiz results: [{"image", "answer"}] with LLaVA's EvalAI answer processing."""
    return [{"image": answer["question_id"], "answer": evalai_answer(answer["text"])} for answer in answers]


SUBMISSIONS = {"vqav2": vqav2_submission, "vizwiz": vizwiz_submission}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def score_benchmark(benchmark: str, answers: Sequence[dict], annotation_paths: Sequence[str | Path], *,
                    split_file: str | Path | None = None, split: str | None = None,
                    allow_partial: bool = False) -> dict:
    """Dispatch to score_<benchmark>; only POPE takes several annotation paths."""
    if benchmark not in BENCHMARKS:
        raise ScoringInputError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    if benchmark == "pope":
        return score_pope(answers, annotation_paths, allow_partial=allow_partial)
    if len(annotation_paths) != 1:
        raise ScoringInputError(f"{benchmark} takes exactly one --annotation-file")
    path = annotation_paths[0]
    if benchmark == "scienceqa":
        return score_scienceqa(answers, path, split_file=split_file, split=split or "test", allow_partial=allow_partial)
    if benchmark == "mmbench":
        return score_mmbench(answers, path, split=split, allow_partial=allow_partial)
    scorer = {"vqav2": score_vqav2, "textvqa": score_textvqa, "vizwiz": score_vizwiz, "gqa": score_gqa,
              "mme": score_mme}[benchmark]
    return scorer(answers, path, allow_partial=allow_partial)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score a LLaVA answers file on a VQA benchmark.")
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    parser.add_argument("--answers-file", required=True, type=Path, help="LLaVA answers JSONL")
    parser.add_argument("--annotation-file", required=True, action="append", type=Path,
                        help="ground truth in the benchmark's official format (repeatable for pope)")
    parser.add_argument("--split-file", type=Path, help="scienceqa: pid_splits.json")
    parser.add_argument("--split", help="scienceqa: split to score (default test); mmbench: value of the split column")
    parser.add_argument("--output", type=Path, help="scores JSON (default: <answers-stem>.scores.json)")
    parser.add_argument("--submission-file", type=Path,
                        help="vqav2/vizwiz: EvalAI submission JSON (default: <answers-stem>.submission.json)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="score the answered subset instead of rejecting missing answers")
    args = parser.parse_args(argv)
    if args.split_file is not None and args.benchmark != "scienceqa":
        parser.error("--split-file is only for scienceqa")
    if args.split is not None and args.benchmark not in ("scienceqa", "mmbench"):
        parser.error("--split is only for scienceqa and mmbench")
    if args.submission_file is not None and args.benchmark not in SUBMISSIONS:
        parser.error(f"--submission-file is only for {', '.join(SUBMISSIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    answers_path: Path = args.answers_file
    try:
        answers = load_answers(answers_path)
        result = score_benchmark(args.benchmark, answers, args.annotation_file, split_file=args.split_file,
                                 split=args.split, allow_partial=args.allow_partial)
    except (ScoringInputError, OSError) as e:
        print(f"error: {e}".replace("\n", "\\n"), file=sys.stderr)
        return 2
    result["answers_file"] = str(answers_path)
    if args.benchmark in SUBMISSIONS:
        submission_path = args.submission_file or answers_path.with_name(answers_path.stem + ".submission.json")
        submission_path.write_text(json.dumps(SUBMISSIONS[args.benchmark](answers)), encoding="utf-8")
        result["submission_file"] = str(submission_path)
    output_path = args.output or answers_path.with_name(answers_path.stem + ".scores.json")
    text = json.dumps(result, indent=2, ensure_ascii=False)
    output_path.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
