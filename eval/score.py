"""Score LLaVA answer files exactly as each benchmark's official evaluation code does.

    python eval/score.py --benchmark vqav2 --answers-file answers/vqav2.jsonl \
        --annotation-file v2_mscoco_val2014_annotations.json
    python eval/score.py --benchmark pope --answers-file answers/pope.jsonl --annotation-file pope/coco/
    python eval/score.py --benchmark scienceqa --answers-file answers/sqa.jsonl \
        --annotation-file scienceqa/problems.json --split-file scienceqa/pid_splits.json

The CLI prints one JSON object on stdout and writes it to `<answers-stem>.scores.json` next to the
answers file (or to --output). `overall` is the headline number, `overall_metric` says what it is
(a percentage for every benchmark except MME, whose score is a sum over subtasks). Numbers are not
rounded; the official scripts print them rounded to two decimals (`round(overall, 2)`). For vqav2
and vizwiz it also writes the EvalAI submission file (`<answers-stem>.submission.json` or
--submission-file). Bad input (a missing, unreadable or malformed file, an answers file that does
not match the annotations) ends with exit status 2 and one line on stderr naming the file and the
reason; output files are written whole or not at all.

Answers files are LLaVA answer files: JSONL lines {"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}; question_id (a string or an integer) and text are read, plus prompt for
TextVQA and MME, round_id for MMBench and metadata for POPE and MME (see below). The
answers must cover the annotations exactly, as the official scripts need (they crash or count a
missing answer as wrong): ids missing from the answers, ids unknown to the annotations and repeated
ids raise `AnswersMismatchError`; `allow_partial=True` (--allow-partial) scores the answered subset
(not an official number) but still rejects unknown and repeated ids.

Which official code each score reproduces, and the quirks of that code kept on purpose
=====================================================================================
A score here equals the number the official pipeline behind LLaVA-1.5's published results reports
for the same answers; that pipeline's quirks are part of the number, so they are reproduced.

vqav2: LLaVA's scripts/convert_vqav2_for_submission.py (its `EvalAIAnswerProcessor`, from
  llava/eval/m4c_evaluator.py = MMF's copy of EvalAI's rules) writes the submitted answer, then the
  official VQA evaluation (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py, run by
  EvalAI) scores it against the annotation. Quirks:
  1. The answer is normalised twice: the converter lower-cases, deletes every "," and "?", turns
     "'s" into " 's", then applies vqaEval's rules (2-4); vqaEval applies rules 2-4 again. So
     "red,white" is submitted as "redwhite" (vqaEval alone would read "red white") and "man's" as
     "man 's", which never equals a human "man's".
  2. Punctuation (processPunctuation): each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted
     when the original text has it next to a space or holds a digit-comma-digit anywhere, else
     replaced by a space. Apostrophes and colons are kept.
  3. Periods: the pattern `(?!<=\\d)(\\.)(?!\\d)` (a mistyped lookbehind that matches nothing)
     deletes every period not followed by a digit ("2.5" keeps its period), but at most 32 of them:
     re.UNICODE (= 32) is passed as sub()'s count.
  4. processDigitArticle: lower-case, split on whitespace, number words "none", "zero".."ten" ->
     digits, drop "a", "an", "the", then expand contractions ("dont" -> "don't"); the table's keys
     with capitals ("Im", "Ive", "Id've") never match since the text is already lower-case.
  5. Human answers are normalised only when the ten disagree (`len(set(answers)) > 1`), and then
     only by processPunctuation (rules 2-3): never lower-cased, no number words, no articles. Ten
     agreeing answers are compared raw: ten "Yes" match no answer (answers are lower-cased).
  6. Leave-one-out: for each human answer record, the others are the records *unequal* to it (dict
     comparison; VQAv2's answer_id makes each record unique, so one is left out); accuracy =
     mean over records of min(1, matches among the others / 3): 1, 2, 3, >=4 matching humans
     score 0.3, 0.6, 0.9, 1.0. Per answer_type and question_type: means of the same numbers.
textvqa: LLaVA's llava/eval/eval_textvqa.py with m4c's `TextVQAAccuracyEvaluator`. Quirks:
  1. The prediction and every human answer go through `EvalAIAnswerProcessor` (vqav2 rule 1's
     converter), always: no agreement rule, so "man's" matches "man's" here.
  2. Exactly ten human answers per question (the evaluator asserts it); leave-one-out by position.
  3. LLaVA's question file puts the *image* id in question_id; eval_textvqa finds the annotation by
     (image id, question lower-cased), the question cut from the answer's prompt by its
     prompt_processor: a prompt starting "OCR tokens: " -> the text between "Question: " and
     " Short answer:"; a three-line prompt containing "Reference OCR token: " -> its first line
     (its second when it starts with that phrase); a two-line prompt -> its first line; any other
     prompt is an error. Such answer files are accepted, as are files whose question_id is the
     TextVQA question_id. Two annotations with the same image and question: the official dict keeps
     the last one and scores both answers against it; so does this scorer. (A leading "<image>\\n"
     in the prompt is ignored here; the official script would fail on it.)
vizwiz: LLaVA's scripts/convert_vizwiz_for_submission.py (`EvalAIAnswerProcessor`) writes the
  submitted answer; VizWiz's own evaluation (vqaEval.py of the VizWiz API by Qing Li, the code
  vizwiz.org publishes for its EvalAI challenge) scores it. The test split is scored only by EvalAI
  (upload the submission file); a local score needs the val annotations. Quirks:
  1. The submitted answer gets vqav2 rules 2-4, but with VizWiz's contraction table, whose
     replacements mostly use the typographic apostrophe: "dont" -> "don’t" (U+2019).
  2. Human answers are never normalised: compared raw, case included.
  3. Leave-one-out by position. Unanswerability AP/F1 and caption metrics are not computed.
gqa: LLaVA's scripts/convert_gqa_for_eval.py then GQA's official eval.py. Quirks:
  1. The prediction is text.rstrip(".").lower(): no whitespace strip (" left", "left. " are wrong).
  2. Exact string match with the question's "answer".
  3. Only questions with isBalanced true count (accuracy, binary/open, per structural and semantic
     type); every question still needs an answer (eval.py looks each one up).
     testdev_balanced_questions.json is balanced throughout; testdev_all_questions.json is not.
  4. binary = structural type other than "query", open = "query". Validity, plausibility,
     consistency, grounding and distribution need files LLaVA's evaluation does not use: not computed.
pope: LLaVA's llava/eval/eval_pope.py. Quirks:
  1. Parse: the text before the first "." (if any), commas removed, split on single spaces; "No",
     "no" or "not" among the words -> no, anything else -> yes ("NO", "None", "No\\nthere" are yes).
  2. Per split (label file coco_pope_<split>.json): yes = positive class; accuracy, precision,
     recall, F1, yes-ratio. LLaVA reports the mean F1 over the splits: `overall` (mean accuracy too).
  3. eval_pope pairs a split's answers with the label file by position (answers in file order);
     this scorer matches by question id, which is the same whenever the answers are in question
     order (LLaVA writes them so) and cannot be misaligned when they are not.
  4. LLaVA's llava_pope_test.jsonl numbers adversarial 1.., random 10000001.., popular 20000001..
     (10,000,000 x split + the label file's question_id); eval_pope finds the split through that
     question file. Answers numbered so are accepted as they are. Otherwise an id found in exactly
     one label file belongs to it, or the answer names its split in metadata.category.
  5. eval_pope crashes when a split has no yes answer (precision 0/0); here the metrics are then 0.
scienceqa: LLaVA's llava/eval/eval_science_qa.py. Quirks:
  1. The parse, first that applies: the text is exactly one of A-E (no whitespace: " B", "B\\n"
     fail); the text has >= 3 characters and starts with a letter A-E and ". "; the pattern
     `The answer is ([A-Z]).` occurs exactly once (findall) -> its letter; else FAILED. So "B.",
     "B) tiger", "The answer is B" at the very end (the pattern needs one more character), the
     phrase stated twice (even with the same letter) all fail, and "The answer is Bob" reads B (the
     "." matches any character but a newline). A letter beyond the problem's choices, any other
     capital letter, or FAILED scores wrong.
  2. A missing answer counts as wrong in the official script; here it is an error unless
     --allow-partial.
  3. accuracy over the split; LLaVA's IMG-accuracy counts the problems whose prompt holds
     "<image>", which its question file gives exactly the problems with an image: here the
     problems.json image field. Per subject, context (TXT = hint, IMG = image, NO = neither) and
     grade band follow ScienceQA's own evaluate_acc.py.
mme: LLaVA's scripts/convert_answer_to_mme.py + MME's eval_tool/calculation.py: answer "yes"/"no"
  (lower-cased), else "yes" then "no" searched in the first 4 characters ("not sure" -> no), else
  "other" (always wrong); per subtask acc, acc+ (an image counts when all its questions are right),
  score = (acc + acc+) x 100; perception/cognition = sums of the subtask scores.
mmbench: the MMBench authors' toolkit VLMEvalKit, exact-matching policy: `can_infer`
  (vlmeval/utils/matching_util.py) and mcq_circular_eval / mcq_vanilla_eval
  (vlmeval/dataset/utils/multiple_choice.py). The MMBench leaderboard server additionally asks
  ChatGPT to read answers the rules cannot: that needs the network and is not done, so with
  free-text answers a score here can be below the server's (equal when answers are option letters,
  as LLaVA's --single-pred-prompt asks). Quirks:
  1. A refusal phrase of VLMEvalKit's list -> "Z" (wrong). Else .()[],:;!*#{} become spaces and the
     text is split on whitespace: exactly one option letter among the words -> that option; no
     letter but a word "Z" -> "Z" (wrong); else the lower-cased text containing exactly one option's
     lower-cased text -> that option; else unread (wrong).
  2. Circular evaluation: TSV rows whose index % 1,000,000 is equal are one question, right only
     when every row is right, counted under the category of the row with index < 1,000,000.
     Without such rows: plain accuracy. LLaVA's --all-rounds answers (round_id r shows the row's
     options rotated left by r under letters A, B, ...) are the rotations of their row.

Ground-truth layouts (each benchmark's official release format)
===============================================================
- vqav2: `{"annotations": [{"question_id": int, "image_id", "question_type", "answer_type",
  "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"} x10]}]}`.
- textvqa: `{"data": [{"question_id": int, "image_id", "question", "answers": [str x10]}]}`.
- vizwiz: `[{"image": "VizWiz_val_00000000.jpg", "question", "answers": [{"answer",
  "answer_confidence"} x10], "answer_type", "answerable"}]`; answers-file question_id = image, or
  LLaVA's integer n for VizWiz_<split>_<n as 8 digits>.jpg (its VizWiz question files number them so).
- gqa: `{qid: {"imageId", "question", "answer", "fullAnswer", "isBalanced", "types":
  {"structural", "semantic", "detailed"}}}` (testdev_balanced_questions.json).
- pope: JSONL lines `{"question_id", "image", "text", "label": "yes"|"no"}`, one file per split
  (`coco_pope_<split>.json`); several files or a directory of them may be given.
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
import io
import json
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path, PurePosixPath

BENCHMARKS = ("vqav2", "textvqa", "vizwiz", "gqa", "pope", "scienceqa", "mme", "mmbench")


class ScoringInputError(ValueError):
    """An answers or annotation file that cannot be scored (missing, malformed, or not matching)."""


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
# VQA answer normalisation: the tables and rules of vqaEval.py (GT-Vision-Lab/VQA, run by EvalAI),
# shared by MMF's EvalAIAnswerProcessor (LLaVA's m4c_evaluator.py) and VizWiz's vqaEval.py.
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


def _typographic(text: str) -> str:
    return text.replace("'", "\u2019")


# VizWiz's vqaEval.py has the same table with the typographic apostrophe (’) in keys and values,
# except these values (and two keys) that kept the plain one.
_VIZWIZ_PLAIN_VALUES = frozenset({"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"})
_VIZWIZ_PLAIN_KEYS = frozenset({"couldn'tve", "hadn'tve"})
VIZWIZ_CONTRACTIONS = {(key if key in _VIZWIZ_PLAIN_KEYS else _typographic(key)):
                       (value if key in _VIZWIZ_PLAIN_VALUES else _typographic(value))
                       for key, value in CONTRACTIONS.items()}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


@functools.lru_cache(maxsize=1 << 18)  # human answers repeat a lot ("yes", "2", ...)
def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: delete or space out punctuation, then strip periods (rules 2-3).

    A mark next to a space ("a , b") or any mark in a text holding a digit-comma-digit ("1,000") is
    deleted; otherwise it becomes a space ("black-white" -> "black white"). Each mark is tested on
    the original text.
    """
    out = text
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for mark in PUNCTUATION:
        if has_number_comma or (mark + " " in text or " " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str, contractions: dict[str, str] = CONTRACTIONS) -> str:
    """vqaEval.processDigitArticle: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(contractions.get(word, word) for word in words if word not in ARTICLES)


@functools.lru_cache(maxsize=1 << 18)
def normalize_vqa_answer(answer: str, *, vizwiz: bool = False) -> str:
    """vqaEval's processing of a submitted answer: whitespace, punctuation, digits/articles/contractions.

    vizwiz=True uses VizWiz's contraction table (typographic apostrophes).
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text), VIZWIZ_CONTRACTIONS if vizwiz else CONTRACTIONS)


@functools.lru_cache(maxsize=1 << 18)
def evalai_answer(answer: str) -> str:
    """LLaVA's `EvalAIAnswerProcessor`: the answer LLaVA submits for VQAv2/VizWiz, and TextVQA's rule.

    Lower-case, delete every comma and question mark, split "'s" off ("man's" -> "man 's"), strip,
    then vqaEval's rules (so "Two." becomes "2"). Its digit-comma-digit test uses another pattern
    than vqaEval's, which cannot matter: no comma is left to test.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(text)


def _leave_one_out(matches: Sequence[bool], left_out: Sequence[int]) -> float:
    """Mean over the human answers of min(1, matches among the others / 3).

    matches[i]: human answer i equals the prediction; left_out[i]: how many matching answers leaving
    answer i out removes (1 when it matches and records are told apart by position).
    """
    n_match = sum(matches)
    return sum(min(1.0, (n_match - (k if hit else 0)) / 3) for hit, k in zip(matches, left_out)) / len(matches)


def vqav2_accuracy(submitted: str, human_answers: Sequence[dict]) -> float:
    """vqaEval.py's accuracy in [0, 1] of a submitted answer against one question's answer records.

    submitted: the answer as uploaded to EvalAI (for a model's text: `evalai_answer(text)`).
    human_answers: the annotation's `answers` records ({"answer", "answer_confidence", "answer_id"}).
    """
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    result = normalize_vqa_answer(submitted)
    texts = [record["answer"] for record in human_answers]
    if len(set(texts)) > 1:  # the official rule: only disagreeing answers are processed, punctuation only
        texts = [process_punctuation(text) for text in texts]
    matches = [text == result for text in texts]
    answer_ids = [record.get("answer_id") for record in human_answers]
    if all(isinstance(i, (int, str)) for i in answer_ids) and len(set(answer_ids)) == len(answer_ids):
        left_out = [1] * len(texts)  # every record differs from the others: one is left out
    else:  # vqaEval leaves out every record equal (`!=` on dicts, answer processed) to the one left out
        records = [{**record, "answer": text} for record, text in zip(human_answers, texts)]
        left_out = [sum(other == record for other in records) for record in records]
    return _leave_one_out(matches, left_out)


def textvqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """m4c's TextVQAAccuracyEvaluator: both sides through `evalai_answer`, exactly 10 human answers."""
    if len(human_answers) != 10:
        raise ValueError(f"TextVQA's evaluator needs exactly 10 human answers, got {len(human_answers)}")
    pred = evalai_answer(prediction)
    matches = [evalai_answer(answer) == pred for answer in human_answers]
    return _leave_one_out(matches, [1] * 10)


def vizwiz_accuracy(submitted: str, human_answers: Sequence[dict]) -> float:
    """VizWiz's vqaEval.py: the submitted answer normalised (VizWiz tables), human answers raw."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    result = normalize_vqa_answer(submitted, vizwiz=True)
    matches = [record["answer"] == result for record in human_answers]
    return _leave_one_out(matches, [1] * len(matches))


# ----------------------------------------------------------------------------------------------
# Prediction parsers of the other benchmarks
# ----------------------------------------------------------------------------------------------
def llava_gqa_answer(text: str) -> str:
    """LLaVA's convert_gqa_for_eval.py: trailing periods dropped, lower-cased; no whitespace strip."""
    return text.rstrip(".").lower()


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
_SCIENCEQA_STATED = re.compile(r"The answer is ([A-Z]).")


def scienceqa_option_letter(text: str) -> str:
    """The letter LLaVA's eval_science_qa reads from a prediction (any capital), else "FAILED".

    Exactly "A".."E"; or >= 3 characters starting with a letter A-E and ". "; or the pattern
    `The answer is ([A-Z]).` found exactly once. The letter scores only when it names one of the
    problem's choices (`scienceqa_choice_index`).
    """
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    stated = _SCIENCEQA_STATED.findall(text)
    return stated[0] if len(stated) == 1 else FAILED


def scienceqa_choice_index(letter: str, num_choices: int) -> int:
    """eval_science_qa.get_pred_idx: the choice index of a parsed letter, -1 (wrong) when out of range."""
    options = SCIENCEQA_OPTIONS[:num_choices]
    return options.index(letter) if letter in options else -1


_MMBENCH_SEPARATORS = ".()[],:;!*#{}"
# VLMEvalKit's can_infer_option: answers holding one of these are read as the rejection option Z.
MMBENCH_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                    "I'm sorry, but without the image provided", "Cannot determine the answer")
MMBENCH_REJECTED = "Z"


def mmbench_option_letter(text: str, options: dict[str, str]) -> str | None:
    """Option letter of an MMBench prediction by VLMEvalKit's `can_infer` (exact matching, no GPT).

    options: {letter: option text} as shown to the model. Returns the letter, "Z" (a refusal or a
    bare "Z": always wrong) or None (unread: wrong). See the module docstring, mmbench rule 1.
    """
    if "Failed to obtain answer via API" not in text:
        if any(refusal in text for refusal in MMBENCH_REFUSALS):
            return MMBENCH_REJECTED
        spaced = text
        for mark in _MMBENCH_SEPARATORS:
            spaced = spaced.replace(mark, " ")
        words = set(spaced.split())
        letters = [letter for letter in options if letter in words]
        if len(letters) == 1:
            return letters[0]
        if not letters and MMBENCH_REJECTED in words:
            return MMBENCH_REJECTED
    lowered = text.lower()
    by_text = [letter for letter, option in options.items() if str(option).lower() in lowered]
    return by_text[0] if len(by_text) == 1 else None


# ----------------------------------------------------------------------------------------------
# Reading inputs (every failure becomes one ScoringInputError naming the file) and matching
# ----------------------------------------------------------------------------------------------
def _os_reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScoringInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ScoringInputError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as e:
        raise ScoringInputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ScoringInputError(f"{path}: cannot read ({_os_reason(e)})") from None


def _read_json(path: str | Path):
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ScoringInputError(f"{path}: not valid JSON ({e})") from None


def _read_jsonl(path: str | Path) -> Iterable[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSONL file."""
    # split on "\n" only: JSON strings may hold U+2028 or U+0085, which str.splitlines() breaks on
    for line_no, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            raise ScoringInputError(f"{path}:{line_no}: not a JSON line ({e.msg})") from None


def _is_id(value) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def load_answers(path: str | Path) -> list[dict]:
    """Read a LLaVA answers JSONL file; every record needs a string/int `question_id` and a string `text`."""
    records = []
    for line_no, record in _read_jsonl(path):
        if not isinstance(record, dict) or not _is_id(record.get("question_id")) \
                or not isinstance(record.get("text"), str):
            raise ScoringInputError(f"{path}:{line_no}: an answer needs a string or integer 'question_id' "
                                    f"and a string 'text'")
        if "prompt" in record and not isinstance(record["prompt"], str):
            raise ScoringInputError(f"{path}:{line_no}: 'prompt' must be a string")
        if record.get("metadata") is not None and not isinstance(record["metadata"], dict):
            raise ScoringInputError(f"{path}:{line_no}: 'metadata' must be an object")
        records.append(record)
    if not records:
        raise ScoringInputError(f"{path}: no answers in this file")
    return records


def _require(record, keys: Iterable[str], where: str) -> None:
    if not isinstance(record, dict):
        raise ScoringInputError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise ScoringInputError(f"{where}: missing field(s) {', '.join(missing)}")


def _require_list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ScoringInputError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _require_answer_records(value, where: str) -> list[dict]:
    """A list of {"answer": str, ...} human answer records."""
    for i, record in enumerate(_require_list(value, where)):
        _require(record, ["answer"], f"{where}[{i}]")
        if not isinstance(record["answer"], str):
            raise ScoringInputError(f"{where}[{i}]: 'answer' must be a string")
    if not value:
        raise ScoringInputError(f"{where}: no human answers")
    return value


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


def _as_number(qid: str) -> int | None:
    return int(qid) if qid.isascii() and qid.isdigit() else None


# ----------------------------------------------------------------------------------------------
# Aggregation helpers
# ----------------------------------------------------------------------------------------------
def _percent(values: Sequence[float]) -> float:
    return 100 * float(sum(values)) / len(values)  # vqaEval's expression (same rounding)


def _breakdown(pairs: Iterable[tuple[str, float]]) -> dict[str, dict]:
    """[(group, score in [0,1])] -> {group: {"accuracy": percent, "count": n}}, groups sorted."""
    groups = defaultdict(list)
    for group, value in pairs:
        groups[str(group)].append(value)
    return {group: {"accuracy": _percent(values), "count": len(values)} for group, values in sorted(groups.items())}


def _summary(benchmark: str, overall: float, metric: str, scored: int, expected: int) -> dict:
    return {"benchmark": benchmark, "overall": overall, "overall_metric": metric,
            "num_scored": scored, "num_expected": expected, "partial": scored < expected}


# ----------------------------------------------------------------------------------------------
# Scorers: score_<benchmark>(answers, annotation_path, ...) -> dict
# ----------------------------------------------------------------------------------------------
def _by_question_id(items: Iterable, path, where: str, keys: Sequence[str], id_field: str = "question_id") -> dict:
    annotations = {}
    for i, item in enumerate(items):
        _require(item, keys, f"{path}: {where}[{i}]")
        key = item[id_field]
        if not _is_id(key):
            raise ScoringInputError(f"{path}: {where}[{i}]: '{id_field}' must be a string or an integer")
        if str(key) in annotations:
            raise ScoringInputError(f"{path}: {where}[{i}]: {id_field} {key} repeats")
        annotations[str(key)] = item
    if not annotations:
        raise ScoringInputError(f"{path}: no {where}")
    return annotations


def score_vqav2(answers: Sequence[dict], annotation_path: str | Path, *, allow_partial: bool = False) -> dict:
    """VQAv2 accuracy as EvalAI reports it for LLaVA's submission, per answer_type and question_type."""
    data = _read_json(annotation_path)
    _require(data, ["annotations"], str(annotation_path))
    annotations = _by_question_id(_require_list(data["annotations"], f"{annotation_path}: annotations"),
                                  annotation_path, "annotations", ["question_id", "answer_type", "question_type",
                                                                   "answers"])
    for key, ann in annotations.items():
        _require_answer_records(ann["answers"], f"{annotation_path}: question {key}: answers")
    matched = match_answers(answers, annotations, _qid, benchmark="vqav2", allow_partial=allow_partial)
    scores = {key: vqav2_accuracy(evalai_answer(answer["text"]), annotations[key]["answers"])
              for key, answer in matched.items()}
    metric = "VQA accuracy (%): LLaVA's EvalAI submission scored by vqaEval.py"
    result = _summary("vqav2", _percent(list(scores.values())), metric, len(scores), len(annotations))
    result["per_answer_type"] = _breakdown((annotations[k]["answer_type"], s) for k, s in scores.items())
    result["per_question_type"] = _breakdown((annotations[k]["question_type"], s) for k, s in scores.items())
    return result


def textvqa_question_from_prompt(prompt: str) -> str | None:
    """The question eval_textvqa's prompt_processor cuts from an answer's prompt, lower-cased; None
    where the official script fails (textvqa rule 3)."""
    prompt = prompt.removeprefix("<image>\n")
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        found = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if found is None:
            return None
        question = found.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        return None
    return question.lower()


def _textvqa_llava_keys(items: dict[str, dict], path) -> tuple[list, Callable, dict]:
    """Expected keys, key_of and {key: annotation} for LLaVA's answers (question_id = image id).

    A key is (image id, question lower-cased, k): the k-th annotation or answer with that image and
    question. Every such key scores against the *last* annotation of its (image, question), as the
    official dict does.
    """
    last, expected, seen = {}, [], Counter()
    for item in items.values():
        _require(item, ["image_id", "question"], f"{path}: question {item['question_id']}")
        image_question = (str(item["image_id"]), str(item["question"]).lower())
        last[image_question] = item
        expected.append((*image_question, seen[image_question]))
        seen[image_question] += 1
    counts = Counter()

    def key_of(answer: dict) -> tuple:
        question = textvqa_question_from_prompt(str(answer.get("prompt", "")))
        if question is None:
            raise ScoringInputError(f"question_id {answer['question_id']}: cannot read the question from the "
                                    f"prompt {str(answer.get('prompt', ''))[:60]!r} (LLaVA's TextVQA format: "
                                    f"question, then 'Reference OCR token: ...', then the answer request)")
        image_question = (_qid(answer), question)
        key = (*image_question, counts[image_question])
        counts[image_question] += 1
        return key

    return expected, key_of, {key: last[key[:2]] for key in expected}


def score_textvqa(answers: Sequence[dict], annotation_path: str | Path, *, allow_partial: bool = False) -> dict:
    """TextVQA accuracy as LLaVA's eval_textvqa.py (m4c's evaluator) reports it.

    Answers keyed by TextVQA question_id, or LLaVA's (question_id = image id + question from the
    prompt) when an answer's id is no question id but an image id.
    """
    data = _read_json(annotation_path)
    _require(data, ["data"], str(annotation_path))
    items = _by_question_id(_require_list(data["data"], f"{annotation_path}: data"), annotation_path, "data",
                            ["question_id", "answers"])
    for key, item in items.items():
        gts = _require_list(item["answers"], f"{annotation_path}: question {key}: answers")
        if len(gts) != 10 or not all(isinstance(a, str) for a in gts):
            raise ScoringInputError(f"{annotation_path}: question {key}: TextVQA needs exactly 10 string answers "
                                    f"(the official evaluator asserts it), got {len(gts)}")
    image_ids = {str(item.get("image_id")) for item in items.values()}
    llava_format = any(_qid(a) not in items and _qid(a) in image_ids for a in answers)
    if llava_format:
        expected, key_of, annotation_of = _textvqa_llava_keys(items, annotation_path)
    else:
        expected, key_of, annotation_of = list(items), _qid, items
    matched = match_answers(answers, expected, key_of, benchmark="textvqa", allow_partial=allow_partial)
    scores = [textvqa_accuracy(answer["text"], annotation_of[key]["answers"]) for key, answer in matched.items()]
    metric = "VQA accuracy (%): m4c's TextVQA evaluator (EvalAI answer processing on both sides)"
    result = _summary("textvqa", _percent(scores), metric, len(scores), len(expected))
    result["answer_keys"] = "image id + question (LLaVA's format)" if llava_format else "question_id"
    return result


def _load_vizwiz(annotation_path) -> dict[str, dict]:
    data = _read_json(annotation_path)
    items = _by_question_id(_require_list(data, str(annotation_path)), annotation_path, "items",
                            ["image", "answers", "answer_type"], id_field="image")
    for key, item in items.items():
        _require_answer_records(item["answers"], f"{annotation_path}: image {key}: answers")
    return items


_VIZWIZ_IMAGE_NUMBER = re.compile(r"VizWiz_[A-Za-z]+_(\d+)\.\w+")


def _vizwiz_key_of(images: Iterable[str]) -> Callable[[dict], str]:
    """The image an answer is about: its question_id, or LLaVA's number n for VizWiz_<split>_<n>.jpg."""
    by_number = {}
    for image in images:
        if found := _VIZWIZ_IMAGE_NUMBER.fullmatch(image):
            by_number[int(found.group(1))] = image

    def key_of(answer: dict) -> str:
        qid = _qid(answer)
        number = _as_number(qid)
        return by_number.get(number, qid) if number is not None else qid

    return key_of


def score_vizwiz(answers: Sequence[dict], annotation_path: str | Path, *, allow_partial: bool = False) -> dict:
    """VizWiz-VQA accuracy of LLaVA's submission as VizWiz's vqaEval.py reports it, per answer_type.

    An answer's question_id is the image file name, or LLaVA's question_id n (its VizWiz question
    file numbers VizWiz_<split>_<n, 8 digits>.jpg so).
    """
    items = _load_vizwiz(annotation_path)
    matched = match_answers(answers, items, _vizwiz_key_of(items), benchmark="vizwiz", allow_partial=allow_partial)
    scores = {key: vizwiz_accuracy(evalai_answer(answer["text"]), items[key]["answers"])
              for key, answer in matched.items()}
    metric = "VQA accuracy (%): LLaVA's submission scored by VizWiz's vqaEval.py (human answers raw)"
    result = _summary("vizwiz", _percent(list(scores.values())), metric, len(scores), len(items))
    result["per_answer_type"] = _breakdown((items[k]["answer_type"], s) for k, s in scores.items())
    return result


def score_gqa(answers: Sequence[dict], annotation_path: str | Path, *, allow_partial: bool = False) -> dict:
    """GQA accuracy as GQA's eval.py reports it for LLaVA's predictions: balanced questions only."""
    questions = _read_json(annotation_path)
    if not isinstance(questions, dict) or not questions:
        raise ScoringInputError(f"{annotation_path}: GQA questions must be a JSON object {{qid: question}}")
    for qid, question in questions.items():
        where = f"{annotation_path}: question {qid}"
        _require(question, ["answer", "types", "isBalanced"], where)
        _require(question["types"], ["structural", "semantic"], f"{where}: types")
        if not isinstance(question["answer"], str):
            raise ScoringInputError(f"{where}: 'answer' must be a string")
    matched = match_answers(answers, questions, _qid, benchmark="gqa", allow_partial=allow_partial)
    scores = {key: float(llava_gqa_answer(answer["text"]) == questions[key]["answer"])
              for key, answer in matched.items() if questions[key]["isBalanced"]}
    if not scores:
        raise ScoringInputError(f"{annotation_path}: no balanced question among those answered "
                                f"(GQA's eval.py scores isBalanced questions only)")
    types = {key: questions[key]["types"] for key in scores}
    result = _summary("gqa", _percent(list(scores.values())), "exact-match accuracy (%) over balanced questions",
                      len(matched), len(questions))
    result["num_balanced"] = len(scores)
    result["per_answer_kind"] = _breakdown(("open" if types[k]["structural"] == "query" else "binary", s)
                                           for k, s in scores.items())
    result["per_structural_type"] = _breakdown((types[k]["structural"], s) for k, s in scores.items())
    result["per_semantic_type"] = _breakdown((types[k]["semantic"], s) for k, s in scores.items())
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


# LLaVA's llava_pope_test.jsonl: question_id = 10,000,000 x split number + the label file's question_id.
LLAVA_POPE_ID_STRIDE = 10_000_000
LLAVA_POPE_SPLITS = ("adversarial", "random", "popular")


def _load_pope_labels(annotation_path) -> dict[tuple[str, str], str]:
    labels = {}
    for split, file in _pope_files(annotation_path):
        for line_no, item in _read_jsonl(file):
            _require(item, ["question_id", "label"], f"{file}:{line_no}")
            if not _is_id(item["question_id"]):
                raise ScoringInputError(f"{file}:{line_no}: question_id must be a string or an integer")
            if item["label"] not in ("yes", "no"):
                raise ScoringInputError(f"{file}:{line_no}: label must be 'yes' or 'no', got {item['label']!r}")
            key = (split, str(item["question_id"]))
            if key in labels:
                raise ScoringInputError(f"{file}:{line_no}: question_id {key[1]} repeats within split {split}")
            labels[key] = item["label"]
        if not any(split == s for s, _ in labels):
            raise ScoringInputError(f"{file}: no POPE questions in this file")
    return labels


def _pope_key_of(answers: Sequence[dict], labels: dict) -> Callable[[dict], tuple[str, str]]:
    """(split, label-file question_id) an answer claims (pope rule 4)."""
    splits_of_id = defaultdict(list)
    for split, qid in labels:
        splits_of_id[qid].append(split)
    numbers = [_as_number(_qid(answer)) for answer in answers]
    llava_numbering = any(n is not None and n >= LLAVA_POPE_ID_STRIDE for n in numbers)

    def llava_key(qid: str) -> tuple[str, str] | None:
        number = _as_number(qid)
        if number is None or number // LLAVA_POPE_ID_STRIDE >= len(LLAVA_POPE_SPLITS):
            return None
        key = (LLAVA_POPE_SPLITS[number // LLAVA_POPE_ID_STRIDE], str(number % LLAVA_POPE_ID_STRIDE))
        return key if key in labels else None

    def key_of(answer: dict) -> tuple[str, str]:
        qid = _qid(answer)
        named = (answer.get("metadata") or {}).get("category") or answer.get("category")
        if named is not None and not isinstance(named, str):
            raise ScoringInputError(f"question_id {qid}: the split in metadata.category must be a string, "
                                    f"got {named!r}")
        if named is not None:
            llava = llava_key(qid)
            return llava if (named, qid) not in labels and llava is not None and llava[0] == named else (named, qid)
        candidates = splits_of_id.get(qid, [])
        if len(candidates) == 1:
            return (candidates[0], qid)
        if llava_numbering and (llava := llava_key(qid)) is not None:
            return llava
        if candidates:
            raise ScoringInputError(f"question_id {qid} occurs in POPE splits {candidates}: the answer must name "
                                    f"its split in metadata.category, or use LLaVA's numbering (split x "
                                    f"{LLAVA_POPE_ID_STRIDE:,} + id)")
        return ("?", qid)

    return key_of


def score_pope(answers: Sequence[dict], annotation_path: str | Path | Sequence[str | Path], *,
               allow_partial: bool = False) -> dict:
    """POPE accuracy/precision/recall/F1/yes-ratio per split as eval_pope.py; overall = mean F1."""
    labels = _load_pope_labels(annotation_path)
    matched = match_answers(answers, labels, _pope_key_of(answers, labels), benchmark="pope",
                            allow_partial=allow_partial)
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


def _scienceqa_pids(problems: dict, annotation_path, split_file, split: str) -> list[str]:
    if split_file is not None:
        splits = _read_json(split_file)
        if not isinstance(splits, dict) or split not in splits:
            raise ScoringInputError(f"{split_file}: no split {split!r}")
        pids = [str(pid) for pid in _require_list(splits[split], f"{split_file}: split {split!r}")]
        unknown = [pid for pid in pids if pid not in problems]
        if unknown:
            raise ScoringInputError(f"{split_file}: split {split!r} lists pids absent from problems.json "
                                    f"(e.g. {', '.join(unknown[:5])})")
    else:
        pids = [pid for pid, problem in problems.items() if isinstance(problem, dict) and problem.get("split") == split]
    if not pids:
        raise ScoringInputError(f"{annotation_path}: no problems in split {split!r}")
    for pid in pids:
        where = f"{annotation_path}: problem {pid}"
        _require(problems[pid], ["choices", "answer", "subject", "grade"], where)
        choices, answer = problems[pid]["choices"], problems[pid]["answer"]
        if not isinstance(choices, list) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ScoringInputError(f"{where}: 'answer' must index the 'choices' list")
    return pids


def score_scienceqa(answers: Sequence[dict], annotation_path: str | Path, *, split_file: str | Path | None = None,
                    split: str = "test", allow_partial: bool = False) -> dict:
    """ScienceQA accuracy as LLaVA's eval_science_qa.py, IMG accuracy, and ScienceQA's breakdowns.

    The problems scored are `split_file[split]` or, without a split file, those whose "split" field
    equals `split`.
    """
    problems = _read_json(annotation_path)
    if not isinstance(problems, dict):
        raise ScoringInputError(f"{annotation_path}: problems.json must be a JSON object {{pid: problem}}")
    pids = _scienceqa_pids(problems, annotation_path, split_file, split)
    matched = match_answers(answers, pids, _qid, benchmark="scienceqa", allow_partial=allow_partial)
    correct, letters = {}, {}
    for pid, answer in matched.items():
        problem = problems[pid]
        letters[pid] = scienceqa_option_letter(answer["text"])
        correct[pid] = float(scienceqa_choice_index(letters[pid], len(problem["choices"])) == problem["answer"])

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
            for line_no, line in enumerate(_read_text(txt).split("\n"), 1):
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
    subtask = str(meta.get("category") or qid.split("/")[0])
    stem = PurePosixPath(str(meta.get("image") or qid)).stem
    if meta.get("question"):
        return (subtask, stem, str(meta["question"]))
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
    try:
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t")
        header = reader.fieldnames or []
        missing = [col for col in ("index", "question", "answer", "A", "B") if col not in header]
        if missing:
            raise ScoringInputError(f"{path}: MMBench TSV lacks column(s) {', '.join(missing)}")
        option_columns = [col for col in header if len(col) == 1 and col.isupper()]
        for row_no, row in enumerate(reader, 2):
            if split is not None and "split" in header and row.get("split") != split:
                continue
            index = (row["index"] or "").strip()
            if not (index.isascii() and index.isdigit()):
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
    except csv.Error as e:
        raise ScoringInputError(f"{path}: not a readable TSV ({e})") from None
    if not rows:
        raise ScoringInputError(f"{path}: no MMBench rows" + (f" in split {split!r}" if split else ""))
    return rows


def score_mmbench(answers: Sequence[dict], annotation_path: str | Path, *, split: str | None = None,
                  allow_partial: bool = False) -> dict:
    """MMBench accuracy (VLMEvalKit, exact matching) per category and l2-category, circular when
    rotations are present.

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
    right, unread = {}, 0
    for (index, r), answer in matched.items():
        row = rows[index]
        letters = list(row["options"])
        texts = [row["options"][letter] for letter in letters]
        shown = dict(zip(letters, texts[r:] + texts[:r]))
        target = letters[(letters.index(row["answer"]) - r) % len(letters)]
        letter = mmbench_option_letter(answer["text"], shown)
        unread += letter is None
        right[(index, r)] = letter == target

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
    result.update({"circular": circular, "num_questions": len(per_question), "num_unread_answers": unread,
                   "vanilla_accuracy": _percent(vanilla) if vanilla else None,
                   "per_category": _breakdown((categories[g]["category"], v) for g, v in per_question.items()),
                   "per_l2_category": _breakdown((categories[g]["l2_category"], v) for g, v in per_question.items())})
    return result


# ----------------------------------------------------------------------------------------------
# EvalAI submission files
# ----------------------------------------------------------------------------------------------
def vqav2_submission(answers: Sequence[dict], annotation_paths: Sequence[str | Path] = ()) -> list[dict]:
    """EvalAI VQAv2 results: [{"question_id", "answer"}] with LLaVA's EvalAI answer processing."""
    return [{"question_id": answer["question_id"], "answer": evalai_answer(answer["text"])} for answer in answers]


def vizwiz_submission(answers: Sequence[dict], annotation_paths: Sequence[str | Path] = ()) -> list[dict]:
    """EvalAI VizWiz results: [{"image", "answer"}] with LLaVA's EvalAI answer processing.

    The image is the answer's question_id, or (given the annotations) the image LLaVA's number names.
    """
    key_of = _vizwiz_key_of(_load_vizwiz(annotation_paths[0])) if annotation_paths else _qid
    return [{"image": key_of(answer), "answer": evalai_answer(answer["text"])} for answer in answers]


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


def _write_whole(path: Path, text: str, inputs: Sequence[Path]) -> None:
    """Write through a temporary file and a rename, so a file is complete or absent; never over an input."""
    if any(path.resolve() == Path(p).resolve() for p in inputs):
        raise ScoringInputError(f"{path}: refusing to overwrite an input (or the submission) with this output")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ScoringInputError(f"{path}: cannot write ({_os_reason(e)})") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    answers_path: Path = args.answers_file
    inputs = [answers_path, *args.annotation_file, *([args.split_file] if args.split_file else [])]
    try:
        answers = load_answers(answers_path)
        result = score_benchmark(args.benchmark, answers, args.annotation_file, split_file=args.split_file,
                                 split=args.split, allow_partial=args.allow_partial)
        result["answers_file"] = str(answers_path)
        if args.benchmark in SUBMISSIONS:
            submission_path = args.submission_file or answers_path.with_name(answers_path.stem + ".submission.json")
            _write_whole(submission_path, json.dumps(SUBMISSIONS[args.benchmark](answers, args.annotation_file)), inputs)
            result["submission_file"] = str(submission_path)
        output_path = args.output or answers_path.with_name(answers_path.stem + ".scores.json")
        text = json.dumps(result, indent=2, ensure_ascii=False)
        _write_whole(output_path, text + "\n", [*inputs, *([submission_path] if args.benchmark in SUBMISSIONS else [])])
    except ScoringInputError as e:
        print(f"error: {e}".replace("\n", "\\n"), file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an annotation folder that cannot be listed
        print(f"error: {e.filename or 'input'}: cannot read ({_os_reason(e)})", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
