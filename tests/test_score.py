"""eval/score.py against the official evaluation rules.

Four kinds of check:
- the cases issue 14 found (each failed on the scorer before this version, see the git log);
- randomised answers scored by eval/score.py and by tests/score_reference.py, an independent
  re-implementation of the official code (vqaEval.py, m4c's evaluator, VizWiz's vqaEval.py,
  LLaVA's parsers, VLMEvalKit's can_infer), which must agree exactly;
- hand-computed cases per benchmark;
- the CLI on bad files: one line naming the file and the reason, exit status 2, nothing written.

The module is imported as `score` (attributes looked up in each test) so that a test can run, and
fail on its own, against an older eval/score.py.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` run without `python -m` does not put the repo root on sys.path
    sys.path.insert(0, str(REPO))

from eval import score  # noqa: E402
from tests import score_reference as ref  # noqa: E402

SCRIPT = REPO / "eval" / "score.py"
SUFFIX = "\nAnswer the question using a single word or phrase."


def answer(question_id, text, **extra):
    return {"question_id": question_id, "prompt": "", "text": text, "answer_id": "x", "model_id": "m",
            "metadata": {}, **extra}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def vqav2_annotation(qid, gts, atype="other", qtype="what"):
    return {"question_id": qid, "image_id": 1, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": gts[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(gts)]}


def score_one_vqav2(tmp_path, prediction, gts):
    path = write_json(tmp_path / "vqav2.json", {"annotations": [vqav2_annotation(1, gts)]})
    return score.score_vqav2([answer(1, prediction)], path)["overall"]


def score_one_textvqa(tmp_path, prediction, gts):
    path = write_json(tmp_path / "textvqa.json", {"data": [
        {"question_id": 5, "image_id": "abc", "question": "What is it?", "answers": gts}]})
    return score.score_textvqa([answer(5, prediction)], path)["overall"]


def scienceqa_problems(tmp_path, answer_index=1, n_choices=3):
    problems = {"1": {"question": "?", "choices": [f"c{i}" for i in range(n_choices)], "answer": answer_index,
                      "hint": "", "image": None, "split": "test", "subject": "natural science", "grade": "grade3"}}
    return write_json(tmp_path / "problems.json", problems)


# ---------------------------------------------------------------------------------------------
# The cases of issue 14: each scored differently from the official code before
# ---------------------------------------------------------------------------------------------
def test_issue14_vqav2_comma_without_space_follows_llava_converter(tmp_path):
    # LLaVA's converter deletes the comma ("redwhite"); vqaEval alone would read "red white"
    assert score_one_vqav2(tmp_path, "red,white", ["red white"] * 4 + ["red"] * 6) == 0.0
    assert score_one_vqav2(tmp_path, "red, white", ["red white"] * 4 + ["red"] * 6) == 100.0


def test_issue14_vqav2_possessive_is_split_by_llava_converter(tmp_path):
    # "man's" is submitted as "man 's", which never equals the human "man's"
    assert score_one_vqav2(tmp_path, "man's", ["man's"] * 10) == 0.0
    assert score_one_vqav2(tmp_path, "man's", ["man's"] * 5 + ["men"] * 5) == 0.0


def test_issue14_vqav2_agreeing_ground_truth_is_not_normalised(tmp_path):
    assert score_one_vqav2(tmp_path, "yes", ["Yes"] * 10) == 0.0          # ten agree: compared raw
    assert score_one_vqav2(tmp_path, "2", ["two"] * 10) == 0.0
    assert score_one_vqav2(tmp_path, "yes", ["Yes"] * 9 + ["yes"]) == pytest.approx(30.0)  # disagree: punctuation
    assert score_one_vqav2(tmp_path, "dog", ["dog."] * 9 + ["cat"]) == 100.0       # only: "dog." -> "dog"
    assert score_one_vqav2(tmp_path, "dog", ["A dog"] * 9 + ["cat"]) == 0.0        # articles stay


def test_issue14_textvqa_follows_m4c_evaluator(tmp_path):
    assert score_one_textvqa(tmp_path, "red,white", ["red white"] * 10) == 0.0   # "redwhite" on this side only
    assert score_one_textvqa(tmp_path, "red,white", ["red,white"] * 10) == 100.0
    assert score_one_textvqa(tmp_path, "man's", ["man's"] * 10) == 100.0  # both sides split it


@pytest.mark.parametrize("text", ["B.", "B) tiger", "It is a tiger. The answer is B",
                                  "The answer is B. The answer is B.", "The answer is A. No wait, The answer is B.",
                                  " B", "B\n", "B.\nBecause tigers have stripes."])
def test_issue14_scienceqa_answers_the_official_parser_fails(tmp_path, text):
    result = score.score_scienceqa([answer("1", text)], scienceqa_problems(tmp_path), split="test")
    assert result["overall"] == 0.0 and result["num_failed_to_parse"] == 1


@pytest.mark.parametrize("text", ["B", "B. tiger", "The answer is B.", "Because of the stripes. The answer is B!",
                                  "The answer is Bob"])
def test_scienceqa_answers_the_official_parser_reads(tmp_path, text):
    assert score.score_scienceqa([answer("1", text)], scienceqa_problems(tmp_path))["overall"] == 100.0


def test_issue14_gqa_scores_balanced_questions_only(tmp_path):
    def question(answer_, balanced):
        return {"imageId": "n1", "question": "?", "answer": answer_, "fullAnswer": "", "isBalanced": balanced,
                "types": {"structural": "query", "semantic": "attr", "detailed": "x"}}
    path = write_json(tmp_path / "testdev_all_questions.json",
                      {"1": question("red", True), "2": question("blue", False), "3": question("left", True)})
    result = score.score_gqa([answer("1", "red"), answer("2", "green"), answer("3", "left")], path)
    assert result["overall"] == 100.0  # question 2 (unbalanced, wrong) does not count
    assert result["num_balanced"] == 2 and result["num_scored"] == 3


def llava_pope_files(tmp_path, labels_by_split):
    for split, labels in labels_by_split.items():
        write_jsonl(tmp_path / f"coco_pope_{split}.json",
                    [{"question_id": i + 1, "image": f"{i}.jpg", "text": "Is there a dog in the image?",
                      "label": label} for i, label in enumerate(labels)])
    return tmp_path


def test_issue14_pope_accepts_llava_answer_files(tmp_path):
    labels = {"adversarial": ["yes", "no"], "random": ["yes", "no"], "popular": ["no", "yes"]}
    folder = llava_pope_files(tmp_path, labels)
    # LLaVA's llava_pope_test.jsonl: adversarial 1.., random 10000001.., popular 20000001.., no category
    ids = [1, 2, 10_000_001, 10_000_002, 20_000_001, 20_000_002]
    texts = ["Yes", "No", "Yes", "Yes", "No", "Yes"]
    result = score.score_pope([answer(i, t) for i, t in zip(ids, texts)], folder)
    assert result["per_split"]["adversarial"]["accuracy"] == 100.0
    assert result["per_split"]["random"]["accuracy"] == 50.0
    assert result["per_split"]["popular"]["accuracy"] == 100.0
    # run_vqa copies LLaVA's category into metadata.category: accepted too
    tagged = [answer(i, t, metadata={"category": s}) for (i, t), s in
              zip(zip(ids, texts), ["adversarial"] * 2 + ["random"] * 2 + ["popular"] * 2)]
    assert score.score_pope(tagged, folder)["per_split"] == result["per_split"]


def test_issue14_textvqa_accepts_llava_answer_files(tmp_path):
    # LLaVA's TextVQA question file: question_id = image id, the question on the prompt's first line
    path = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "What is the brand of this camera?",
         "answers": ["dakota"] * 10},
        {"question_id": 34603, "image_id": "003a8ae2ef43b901", "question": "What does the small white text spell?",
         "answers": ["copenhagen"] * 4 + ["rupalcon"] * 6},
    ]})
    answers = [
        {"question_id": "003a8ae2ef43b901", "text": "Dakota",
         "prompt": "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL\n"
                   "Answer the question using a single word or phrase."},
        {"question_id": "003a8ae2ef43b901", "text": "copenhagen",
         "prompt": "What does the small white text spell?\nReference OCR token: D, RUPALCON" + SUFFIX},
    ]
    result = score.score_textvqa(answers, path)
    assert result["overall"] == pytest.approx((100 + 100) / 2)
    assert result["answer_keys"].startswith("image id")


# ---------------------------------------------------------------------------------------------
# Randomised answers: eval/score.py == the reference re-implementation of the official code
# ---------------------------------------------------------------------------------------------
WORDS = sorted({*ref.CONTRACTIONS, *ref.CONTRACTIONS.values(), *ref.VIZWIZ_CONTRACTIONS,
                *ref.VIZWIZ_CONTRACTIONS.values(), *ref.MANUAL_MAP, "a", "an", "the", "The", "A", "red", "white",
                "black-and-white", "red,white", "man's", "it's", "Yes", "yes", "no", "NO", "Two", "1,000", "2.5", "3.",
                "10", "e.g.", "u.s.a.", "(left)", "wow!", "what?", "a/b", "x_y", "@home", "`tick`", '"quoted"', "[x]",
                "{y}", "a=b", "c+d", "back\\slash", "<tag>", "dog", "Dog.", "cat", "1,2", "4,5,6", "x;y", "...",
                "well -done", "5 ,6", "don’t", "unanswerable", "Unanswerable"})
SEPARATORS = [" ", " ", " ", ",", ", ", "-", "  ", "\t", "\n", "/", " - ", ";", "?", "'s "]
ENDINGS = ["", "", "", ".", "?", "!", " ", "..", "'s", ".\n", ","]


def random_text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    text = words[0]
    for word in words[1:]:
        text += rng.choice(SEPARATORS) + word
    text = rng.choice([str, str, str.upper, str.capitalize, str.lower])(text) + rng.choice(ENDINGS)
    return rng.choice(["", "", " ", "\n"]) + text


def random_human_answers(rng: random.Random, prediction: str) -> list[str]:
    """Ten answers: often some written like the prediction (raw, normalised, cased), sometimes all equal."""
    pool = [prediction, ref.evalai_processor(prediction), ref.process_punctuation_ref(prediction),
            prediction.lower(), prediction.strip(), random_text(rng), random_text(rng)]
    if rng.random() < 0.25:
        return [rng.choice(pool)] * 10
    return [rng.choice(pool) for _ in range(10)]


def test_normalisation_equals_reference_on_random_answers():
    rng = random.Random(1)
    for _ in range(3000):
        text = random_text(rng)
        assert score.evalai_answer(text) == ref.evalai_processor(text), repr(text)
        assert score.process_punctuation(text) == ref.process_punctuation_ref(text), repr(text)
        official = ref.process_digit_article_ref(ref.process_punctuation_ref(text.replace("\n", " ")
                                                                             .replace("\t", " ").strip()))
        assert score.normalize_vqa_answer(text) == official, repr(text)


def test_vqav2_equals_vqaeval_on_random_answers(tmp_path):
    rng = random.Random(2)
    annotations, answers = [], []
    for qid in range(2000):
        prediction = random_text(rng)
        annotations.append(vqav2_annotation(qid, random_human_answers(rng, prediction), atype=rng.choice("xyz")))
        answers.append(answer(qid, prediction))
    path = write_json(tmp_path / "vqav2.json", {"annotations": annotations})
    submitted = {a["question_id"]: ref.evalai_processor(a["text"]) for a in answers}  # LLaVA's converter
    official = ref.VQAEvalRef({ann["question_id"]: ann for ann in annotations}, submitted).evaluate()
    result = score.score_vqav2(answers, path)
    assert result["overall"] == official["overall"]
    assert {k: v["accuracy"] for k, v in result["per_answer_type"].items()} == official["per_answer_type"]
    assert 5 < official["overall"] < 95  # the random cases exercise both hits and misses
    # EvalAI scoring a submission directly (no LLaVA converter), record by record
    for ann in annotations[:500]:
        raw = {ann["question_id"]: random_text(rng)}
        expected = ref.VQAEvalRef({ann["question_id"]: ann}, raw).evaluate()["per_question"][0]
        assert score.vqav2_accuracy(raw[ann["question_id"]], ann["answers"]) == expected


def test_vqav2_leave_one_out_compares_whole_records_like_vqaeval():
    # without answer_id, equal records are all left out together (vqaEval's `item != gtAnsDatum`)
    rng = random.Random(3)
    for _ in range(500):
        prediction = random_text(rng)
        records = [{"answer": a, "answer_confidence": rng.choice(["yes", "maybe"])}
                   for a in random_human_answers(rng, prediction)]
        ann = {"question_id": 1, "answers": records}
        expected = ref.VQAEvalRef({1: ann}, {1: prediction}).evaluate()["per_question"][0]
        assert score.vqav2_accuracy(prediction, records) == expected
    same = [{"answer": "yes", "answer_confidence": "yes"}] * 10
    assert score.vqav2_accuracy("yes", same) == 0.0  # nothing is left to match


def test_textvqa_equals_m4c_evaluator_on_random_answers(tmp_path):
    rng = random.Random(4)
    data, answers, expected = [], [], []
    for qid in range(2000):
        prediction = random_text(rng)
        gts = random_human_answers(rng, prediction)
        data.append({"question_id": qid, "image_id": f"img{qid}", "question": "?", "answers": gts})
        answers.append(answer(qid, prediction))
        expected.append(ref.textvqa_accuracy_ref(prediction, gts))
        assert score.textvqa_accuracy(prediction, gts) == expected[-1], (prediction, gts)
    result = score.score_textvqa(answers, write_json(tmp_path / "textvqa.json", {"data": data}))
    assert result["overall"] == pytest.approx(100.0 * sum(expected) / len(expected), abs=1e-12)


def test_vizwiz_equals_vizwiz_vqaeval_on_random_answers(tmp_path):
    rng = random.Random(5)
    items, answers = [], []
    for k in range(2000):
        prediction = random_text(rng)
        records = [{"answer": a, "answer_confidence": "yes"} for a in random_human_answers(rng, prediction)]
        items.append({"image": f"VizWiz_val_{k:08d}.jpg", "question": "?", "answer_type": "other", "answerable": 1,
                      "answers": records})
        answers.append(answer(items[-1]["image"], prediction))
    submitted = {a["question_id"]: ref.evalai_processor(a["text"]) for a in answers}
    official = ref.VizWizEvalRef({item["image"]: item for item in items}, submitted).evaluate()
    result = score.score_vizwiz(answers, write_json(tmp_path / "vizwiz.json", items))
    assert result["overall"] == official["overall"]
    assert 5 < official["overall"] < 95


SCIENCEQA_PIECES = ["A", "B", "C", "D", "E", "F", "b", " B", "B.", "B. ", "B) ", "B.\n", "(B)", "The answer is ",
                    "The answer is B", "The answer is B.", "The answer is C.", "The answer is Bob", "the answer is A.",
                    "tiger", " ", "\n", ". ", "Because stripes", "Answer: A"]


def test_scienceqa_parse_equals_llava_on_random_answers():
    rng = random.Random(6)
    for _ in range(3000):
        text = "".join(rng.choice(SCIENCEQA_PIECES) for _ in range(rng.randint(1, 4)))
        n_choices = rng.randint(2, 5)
        letter = score.scienceqa_option_letter(text)
        assert letter == ref.scienceqa_parse_ref(text), repr(text)
        assert score.scienceqa_choice_index(letter, n_choices) == \
            ref.scienceqa_pred_idx_ref(ref.scienceqa_parse_ref(text), [None] * n_choices)


def test_pope_and_gqa_parses_equal_llava_on_random_answers():
    rng = random.Random(7)
    pieces = ["Yes", "No", "no", "not", "NO", "None", "there", "is", "a", "dog", ",", ".", " ", "\n", "No,", "yes."]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, 5)))
        assert score.pope_yes_no(text) == ref.pope_parse_ref(text), repr(text)
        assert score.llava_gqa_answer(text) == ref.gqa_prediction_ref(text), repr(text)


def test_mmbench_parse_equals_vlmevalkit_on_random_answers():
    rng = random.Random(8)
    pieces = ["A", "B", "C", "Z", "(B)", "B.", "cat", "dog", "Cat", "the", "I think", "answer:", "*", "A cat",
              "Cannot determine the answer", "Failed to obtain answer via API", "dog.", "#C", "{A}", " "]
    options = {"A": "cat", "B": "dog", "C": "the dog"}
    for _ in range(3000):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
        shown = dict(list(options.items())[:rng.randint(2, 3)])
        expected = ref.can_infer_ref(text, dict(shown))
        assert score.mmbench_option_letter(text, shown) == (expected or None), repr(text)


# ---------------------------------------------------------------------------------------------
# Normalisation and per-question rules, hand-computed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("", ""),
    ("Yes.", "yes"),
    ("two", "2"),
    ("Two dogs", "2 dogs"),
    ("none", "0"),
    ("1,000", "1000"),
    ("1,000 people, maybe!", "1000 people maybe"),   # a digit-comma-digit deletes every mark
    ("red, white", "red white"),                    # mark next to a space: deleted
    ("red,white", "red white"),                     # otherwise: becomes a space
    ("black-and-white", "black and white"),
    ("what?", "what"),
    ("the cat in a hat", "cat in hat"),
    ("dont", "don't"),
    ("Im", "im"),                                   # capitalised keys never match the lower-cased text
    ("2.5", "2.5"),                                 # a period before a digit stays
    ("e.g", "eg"),
    ("man's", "man's"),                             # apostrophes are not punctuation
    ("  multi\tline\nanswer ", "multi line answer"),
])
def test_normalize_vqa_answer(raw, expected):
    assert score.normalize_vqa_answer(raw) == expected


def test_period_strip_keeps_official_count_quirk():
    # vqaEval.py passes re.UNICODE (32) as the count of periods removed
    assert score.normalize_vqa_answer("x" + "." * 40) == "x" + "." * 8


def test_vizwiz_uses_its_own_contraction_table():
    assert score.normalize_vqa_answer("dont", vizwiz=True) == "don\u2019t"
    assert score.normalize_vqa_answer("cant", vizwiz=True) == "can't"
    records = [{"answer": "Soup"}] * 10
    assert score.vizwiz_accuracy(score.evalai_answer("Soup"), records) == 0.0  # human answers stay raw


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"), ("The answer is Two.", "answer is 2"), ("1,000.", "1000"), ("It's red", "it 's red"),
    ("What?", "what"), ("red,white", "redwhite"), ("man's", "man 's"),
])
def test_evalai_submission_answer(raw, expected):
    assert score.evalai_answer(raw) == expected


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(k, expected):
    gts = ["cat"] * k + ["dog"] * (10 - k)
    records = [{"answer": a, "answer_id": i} for i, a in enumerate(gts)]
    assert score.vqav2_accuracy("cat", records) == pytest.approx(expected)
    assert score.textvqa_accuracy("cat", gts) == pytest.approx(expected)
    assert score.vizwiz_accuracy("cat", records) == pytest.approx(expected)


def test_accuracy_rejects_unscorable_ground_truth():
    with pytest.raises(ValueError):
        score.vqav2_accuracy("yes", [])
    with pytest.raises(ValueError, match="exactly 10"):
        score.textvqa_accuracy("yes", ["yes"] * 9)


@pytest.mark.parametrize("prompt, question", [
    ("What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.", "what is it?"),
    ("Reference OCR token: A, B\nWhat is it?\nAnswer briefly.", "what is it?"),
    ("What is it?\nAnswer the question using a single word or phrase.", "what is it?"),
    ("OCR tokens: A B Question: What is it? Short answer:", "what is it?"),
    ("<image>\nWhat is it?" + SUFFIX, "what is it?"),
    ("What is it?", None), ("a\nb\nc\nd", None), ("OCR tokens: no question here", None),
])
def test_textvqa_question_from_prompt(prompt, question):
    assert score.textvqa_question_from_prompt(prompt) == question


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("No, there is none.", "no"), ("There is not a dog", "no"),
    ("Yes. No other dogs.", "yes"), ("NO", "yes"), ("None", "yes"), ("yes, no", "no"), ("No\nthere", "yes"),
])
def test_pope_yes_no(text, expected):
    assert score.pope_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("NO.", "no"), ("not sure", "no"),
    ("Maybe", "other"), ("", "other"), ("The answer is yes", "other"),
])
def test_mme_yes_no(text, expected):
    assert score.mme_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("B. tiger", "B"), ("B.", score.FAILED), ("B) tiger", score.FAILED), ("The answer is C.", "C"),
    ("Hmm. The answer is D", score.FAILED), ("The answer is Dx", "D"), ("The answer is F.", "F"),
    ("I think it's B", score.FAILED), ("b", score.FAILED), ("", score.FAILED), ("Answer: A", score.FAILED),
    ("The answer is A. The answer is A.", score.FAILED), ("The answer is A\n", score.FAILED),
])
def test_scienceqa_option_letter(text, expected):
    assert score.scienceqa_option_letter(text) == expected


def test_scienceqa_letter_beyond_choices_is_wrong():
    assert score.scienceqa_choice_index("C", 2) == -1 and score.scienceqa_choice_index("F", 5) == -1
    assert score.scienceqa_choice_index("B", 2) == 1 and score.scienceqa_choice_index(score.FAILED, 5) == -1


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("(B) dog", "B"), ("The answer is B.", "B"), ("A cat", "A"), ("dog", "B"),
    ("I pick the dog", "B"), ("A or B", None), ("a bird", None), ("Z", "Z"), ("Z dog", "Z"),
    ("Cannot determine the answer: B", "Z"), ("Failed to obtain answer via API; dog", "B"),
])
def test_mmbench_option_letter(text, expected):
    assert score.mmbench_option_letter(text, {"A": "cat", "B": "dog"}) == expected


def test_llava_gqa_answer():
    assert score.llava_gqa_answer("Left.") == "left"
    assert score.llava_gqa_answer("Yes..") == "yes"
    assert score.llava_gqa_answer(" Left. ") == " left. "  # no whitespace strip in LLaVA's converter


# ---------------------------------------------------------------------------------------------
# Per-benchmark fixtures: (annotation paths, matching answers, extra kwargs)
# ---------------------------------------------------------------------------------------------
def vqav2_case(tmp):
    path = write_json(tmp / "vqav2.json", {"annotations": [
        vqav2_annotation(1, ["yes"] * 10, "yes/no", "is the"),
        vqav2_annotation(2, ["2"] * 2 + ["3"] * 8, "number", "how many"),
        vqav2_annotation(3, ["red"] + ["blue"] * 9, "other", "what color"),
    ]})
    return [path], [answer(1, "Yes."), answer(2, "two"), answer(3, "green")], {}


def textvqa_case(tmp):
    path = write_json(tmp / "textvqa.json", {"data": [
        {"question_id": 7, "image_id": "abc", "question": "what brand?", "answers": ["coca cola"] * 3 + ["pepsi"] * 7},
        {"question_id": 8, "image_id": "abd", "question": "what number?", "answers": ["12"] * 10},
    ]})
    return [path], [answer(7, "Coca-Cola"), answer(8, "twelve")], {}


def vizwiz_case(tmp):
    def item(image, atype, gts):
        return {"image": image, "question": "what is this?", "answer_type": atype,
                "answerable": int(atype != "unanswerable"),
                "answers": [{"answer": a, "answer_confidence": "yes"} for a in gts]}
    path = write_json(tmp / "vizwiz.json", [
        item("VizWiz_val_00000000.jpg", "other", ["soup"] * 10),
        item("VizWiz_val_00000001.jpg", "unanswerable", ["unanswerable"] * 9 + ["blurry"]),
    ])
    return [path], [answer("VizWiz_val_00000000.jpg", "Soup."), answer("VizWiz_val_00000001.jpg", "blurry")], {}


def gqa_case(tmp):
    def q(answer_, structural, semantic):
        return {"imageId": "n1", "question": "?", "answer": answer_, "fullAnswer": "", "isBalanced": True,
                "types": {"structural": structural, "semantic": semantic, "detailed": "x"}}
    path = write_json(tmp / "testdev_balanced_questions.json", {
        "201": q("yes", "verify", "attr"), "202": q("left", "query", "rel"), "203": q("no", "verify", "rel")})
    return [path], [answer("201", "Yes."), answer("202", "The left"), answer("203", "no")], {}


def pope_case(tmp):
    labels = {"adversarial": ["yes", "yes", "yes", "no", "no"], "random": ["yes", "no"]}
    for split, split_labels in labels.items():
        write_jsonl(tmp / f"coco_pope_{split}.json",
                    [{"question_id": (100 if split == "random" else 0) + i, "image": f"{i}.jpg",
                      "text": "Is there a dog in the image?", "label": label} for i, label in enumerate(split_labels)])
    preds = ["Yes", "No", "Yes, there is.", "yes", "There is not."] + ["Yes", "No"]
    ids = [0, 1, 2, 3, 4, 100, 101]
    return [tmp], [answer(i, text) for i, text in zip(ids, preds)], {}


def scienceqa_case(tmp):
    def problem(answer_, n_choices, hint, image, subject, grade, split="test"):
        return {"question": "?", "choices": [f"c{i}" for i in range(n_choices)], "answer": answer_, "hint": hint,
                "image": image, "split": split, "subject": subject, "grade": grade}
    problems = write_json(tmp / "problems.json", {
        "1": problem(0, 2, "", "image.png", "natural science", "grade3"),
        "2": problem(2, 3, "a hint", None, "social science", "grade8"),
        "3": problem(1, 4, "", None, "natural science", "grade12"),
        "4": problem(1, 2, "a hint", "image.png", "language science", "grade2"),
        "9": problem(0, 2, "", None, "natural science", "grade2", split="val"),
    })
    splits = write_json(tmp / "pid_splits.json", {"test": ["1", "2", "3", "4"], "val": ["9"]})
    answers = [answer("1", "A"), answer("2", "The answer is C."), answer("3", "C. c2"), answer("4", "it is B")]
    return [problems], answers, {"split_file": splits}


def mme_case(tmp):
    # existence: images/ + questions_answers_YN/ layout; code_reasoning: images and .txt side by side
    qa = tmp / "MME" / "existence" / "questions_answers_YN"
    qa.mkdir(parents=True)
    (tmp / "MME" / "existence" / "images").mkdir()
    (qa / "000001.txt").write_text("Is there a cat? Please answer yes or no.\tYes\n"
                                   "Is there a dog? Please answer yes or no.\tNo\n", encoding="utf-8")
    (qa / "000002.txt").write_text("Is there a car? Please answer yes or no.\tYes\n"
                                   "Is there a bus? Please answer yes or no.\tNo\n", encoding="utf-8")
    code = tmp / "MME" / "code_reasoning"
    code.mkdir()
    (code / "0001.png").write_bytes(b"")
    (code / "0001.txt").write_text("Is the output 3? Please answer yes or no.\tYes\n"
                                   "Is the output 4? Please answer yes or no.\tNo\n", encoding="utf-8")

    def mme_answer(task, image, question, text):
        return answer(f"{task}/{image}", text, metadata={"category": task, "image": image, "question": question})
    answers = [
        mme_answer("existence", "images/000001.jpg", "Is there a cat? Please answer yes or no.", "Yes"),
        mme_answer("existence", "images/000001.jpg", "Is there a dog? Please answer yes or no.", "No"),
        mme_answer("existence", "images/000002.jpg", "Is there a car? Please answer yes or no.", "Yes, there is"),
        mme_answer("existence", "images/000002.jpg", "Is there a bus? Please answer yes or no.", "Yes"),
        mme_answer("code_reasoning", "0001.png", "Is the output 3? Please answer yes or no.", "yes"),
        mme_answer("code_reasoning", "0001.png", "Is the output 4? Please answer yes or no.", "no"),
    ]
    return [tmp / "MME"], answers, {}


def write_mmbench(path: Path, rows, extra_columns=()):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image",
              *extra_columns]
    big_image = "iVBORw0KGgo" * 20_000  # > csv's default 128 KiB field limit
    lines = ["\t".join(header)]
    for row in rows:
        cells = {"hint": "nan", "C": "", "D": "", "image": big_image, **row}
        lines.append("\t".join(str(cells.get(col, "")) for col in header))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def mmbench_case(tmp):
    path = write_mmbench(tmp / "mmbench_dev.tsv", [
        {"index": 0, "question": "Which animal?", "A": "cat", "B": "dog", "answer": "A",
         "category": "animals", "l2-category": "perception"},
        {"index": 1_000_000, "question": "Which animal?", "A": "dog", "B": "cat", "answer": "B",
         "category": "animals", "l2-category": "perception"},
        {"index": 1, "question": "Which colour?", "A": "red", "B": "blue", "C": "green", "answer": "C",
         "category": "colours", "l2-category": "perception"},
        {"index": 1_000_001, "question": "Which colour?", "A": "blue", "B": "green", "C": "red", "answer": "B",
         "category": "colours", "l2-category": "perception"},
    ])
    answers = [answer(0, "A", round_id=0), answer(1_000_000, "B", round_id=0),
               answer(1, "C", round_id=0), answer(1_000_001, "A", round_id=0)]
    return [path], answers, {}


CASES = {"vqav2": (vqav2_case, "score_vqav2"), "textvqa": (textvqa_case, "score_textvqa"),
         "vizwiz": (vizwiz_case, "score_vizwiz"), "gqa": (gqa_case, "score_gqa"), "pope": (pope_case, "score_pope"),
         "scienceqa": (scienceqa_case, "score_scienceqa"), "mme": (mme_case, "score_mme"),
         "mmbench": (mmbench_case, "score_mmbench")}


def run_case(name, tmp, **kwargs):
    """Build the hand case of `name` in tmp and score its own answers."""
    paths, answers, extra = CASES[name][0](tmp)
    return score_case(name, paths, answers, extra, **kwargs)


def score_case(name, paths, answers, extra, **kwargs):
    annotation = paths if name == "pope" else paths[0]
    return getattr(score, CASES[name][1])(answers, annotation, **extra, **kwargs)


# ---------------------------------------------------------------------------------------------
# Scores on the hand cases
# ---------------------------------------------------------------------------------------------
def test_score_vqav2(tmp_path):
    result = run_case("vqav2", tmp_path)
    assert result["overall"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
    assert result["per_answer_type"]["yes/no"] == {"accuracy": pytest.approx(100.0), "count": 1}
    assert result["per_answer_type"]["number"]["accuracy"] == pytest.approx(60.0)
    assert result["per_question_type"]["what color"]["accuracy"] == 0.0
    assert (result["num_scored"], result["num_expected"], result["partial"]) == (3, 3, False)


def test_score_textvqa(tmp_path):
    assert run_case("textvqa", tmp_path)["overall"] == pytest.approx(100 * (0.9 + 0.0) / 2)  # "twelve" is not mapped


def test_score_textvqa_llava_format_repeated_question_uses_last_annotation(tmp_path):
    # the official {(image, question): annotation} dict keeps the last of two equal keys
    path = write_json(tmp_path / "textvqa.json", {"data": [
        {"question_id": 1, "image_id": "img", "question": "What is it?", "answers": ["cat"] * 10},
        {"question_id": 2, "image_id": "img", "question": "what is it?", "answers": ["dog"] * 10},
    ]})
    prompt = "What is it?" + SUFFIX
    both = [{"question_id": "img", "text": "dog", "prompt": prompt}, {"question_id": "img", "text": "dog",
                                                                       "prompt": prompt}]
    assert score.score_textvqa(both, path)["overall"] == 100.0
    with pytest.raises(score.AnswersMismatchError):  # a third answer has no annotation left
        score.score_textvqa(both * 2, path)
    with pytest.raises(score.ScoringInputError, match="cannot read the question"):
        score.score_textvqa([{"question_id": "img", "text": "dog", "prompt": "a\nb\nc\nd"}], path)


def test_score_vizwiz(tmp_path):
    result = run_case("vizwiz", tmp_path)
    assert result["overall"] == pytest.approx(100 * (1.0 + 0.3) / 2)
    assert result["per_answer_type"]["unanswerable"]["accuracy"] == pytest.approx(30.0)


def test_score_vizwiz_llava_numbered_answers_and_submission(tmp_path, capsys):
    # LLaVA's VizWiz question file: question_id n for the image VizWiz_<split>_<n, 8 digits>.jpg
    paths, answers, _ = vizwiz_case(tmp_path)
    numbered = [dict(a, question_id=int(a["question_id"][11:19])) for a in answers]
    assert score.score_vizwiz(numbered, paths[0])["overall"] == score.score_vizwiz(answers, paths[0])["overall"]
    answers_file = write_jsonl(tmp_path / "llava_vizwiz.jsonl", numbered)
    assert score.main(["--benchmark", "vizwiz", "--answers-file", str(answers_file),
                       "--annotation-file", str(paths[0])]) == 0
    submission = json.loads((tmp_path / "llava_vizwiz.submission.json").read_text())
    assert submission == [{"image": "VizWiz_val_00000000.jpg", "answer": "soup"},
                          {"image": "VizWiz_val_00000001.jpg", "answer": "blurry"}]


def test_score_gqa(tmp_path):
    result = run_case("gqa", tmp_path)
    assert result["overall"] == pytest.approx(200 / 3)
    assert result["per_structural_type"]["verify"]["accuracy"] == pytest.approx(100.0)
    assert result["per_semantic_type"]["rel"] == {"accuracy": pytest.approx(50.0), "count": 2}
    assert result["per_answer_kind"] == {"binary": {"accuracy": 100.0, "count": 2},
                                         "open": {"accuracy": 0.0, "count": 1}}


def test_score_pope(tmp_path):
    result = run_case("pope", tmp_path)
    adv = result["per_split"]["adversarial"]  # preds y n y y n vs labels y y y n n: TP 2, FN 1, FP 1, TN 1
    assert (adv["tp"], adv["fn"], adv["fp"], adv["tn"]) == (2, 1, 1, 1)
    assert adv["accuracy"] == pytest.approx(60.0)
    assert adv["precision"] == pytest.approx(200 / 3) and adv["recall"] == pytest.approx(200 / 3)
    assert adv["f1"] == pytest.approx(200 / 3)
    assert adv["yes_ratio"] == pytest.approx(60.0)
    assert result["per_split"]["random"]["f1"] == pytest.approx(100.0)
    assert result["overall"] == pytest.approx((200 / 3 + 100) / 2)
    assert "F1" in result["overall_metric"]


def test_score_pope_files_and_split_disambiguation(tmp_path):
    for split in ("adversarial", "popular"):
        write_jsonl(tmp_path / f"coco_pope_{split}.json",
                    [{"question_id": 1, "image": "1.jpg", "text": "?", "label": "yes" if split == "popular" else "no"}])
    files = [tmp_path / "coco_pope_adversarial.json", tmp_path / "coco_pope_popular.json"]
    with pytest.raises(score.ScoringInputError, match="metadata.category"):
        score.score_pope([answer(1, "no"), answer(1, "yes")], files)
    tagged = [answer(1, "no", metadata={"category": "adversarial"}), answer(1, "yes", metadata={"category": "popular"})]
    result = score.score_pope(tagged, files)
    assert result["per_split"]["adversarial"]["accuracy"] == 100.0 and result["per_split"]["popular"]["f1"] == 100.0
    one = score.score_pope([answer(1, "no")], files[0])  # a single file
    assert list(one["per_split"]) == ["adversarial"]


def test_score_scienceqa(tmp_path):
    result = run_case("scienceqa", tmp_path)
    # pid 1 right (IMG), 2 right (TXT), 3 wrong (NO: C is index 2, answer 1), 4 FAILED (TXT + IMG)
    assert result["overall"] == pytest.approx(50.0)
    assert result["img_accuracy"] == pytest.approx(50.0)
    assert result["per_context"]["NO"] == {"accuracy": 0.0, "count": 1}
    assert result["per_context"]["TXT"]["accuracy"] == pytest.approx(50.0)
    assert result["per_subject"]["natural science"]["accuracy"] == pytest.approx(50.0)
    assert result["per_grade"]["G1-6"]["count"] == 2 and result["per_grade"]["G7-12"]["count"] == 2
    assert result["num_failed_to_parse"] == 1


def test_score_scienceqa_split_from_problem_field(tmp_path):
    paths, answers, _ = scienceqa_case(tmp_path)
    assert score.score_scienceqa([answer("9", "A")], paths[0], split="val")["overall"] == 100.0
    assert score.score_scienceqa(answers, paths[0])["num_expected"] == 4  # default "test" from the split field


def test_score_mme(tmp_path):
    result = run_case("mme", tmp_path)
    existence = result["per_subtask"]["existence"]  # image 1: both right; image 2: one right
    assert existence["acc"] == pytest.approx(75.0) and existence["acc_plus"] == pytest.approx(50.0)
    assert existence["score"] == pytest.approx(125.0)
    assert result["per_subtask"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert (result["perception"], result["cognition"], result["overall"]) == (pytest.approx(125.0), 200.0, 125.0)
    assert "not a percentage" in result["overall_metric"]
    assert "count" in result["missing_subtasks"] and "existence" not in result["missing_subtasks"]


def test_score_mme_key_falls_back_to_llava_prompt(tmp_path):
    paths, answers, _ = mme_case(tmp_path)
    bare = []
    for a in answers:  # LLaVA's answer files: no metadata, question_id "<subtask>/<image>"
        question = a["metadata"]["question"]
        if "cat" in question:  # LLaVA's convert script appends the yes/no request when missing
            question = question.replace(" Please answer yes or no.", "")
        bare.append({**a, "prompt": question + SUFFIX, "metadata": {}})
    assert score.score_mme(bare, paths[0])["overall"] == pytest.approx(125.0)


def test_score_mmbench_circular(tmp_path):
    result = run_case("mmbench", tmp_path)
    assert result["circular"] is True
    assert result["overall"] == pytest.approx(50.0)  # colours: one rotation wrong
    assert result["vanilla_accuracy"] == pytest.approx(100.0)
    assert result["per_category"] == {"animals": {"accuracy": 100.0, "count": 1},
                                      "colours": {"accuracy": 0.0, "count": 1}}
    assert result["num_questions"] == 2


def test_score_mmbench_llava_all_rounds(tmp_path):
    path = write_mmbench(tmp_path / "mmbench.tsv", [
        {"index": 5, "question": "?", "A": "cat", "B": "dog", "C": "cow", "answer": "A", "category": "c",
         "l2-category": "l"}])
    # round r shows the options rotated left by r: r1 = dog, cow, cat (answer C), r2 = cow, cat, dog (answer B)
    rounds = [answer(5, "A", round_id=0), answer(5, "C", round_id=1), answer(5, "cat", round_id=2)]
    assert score.score_mmbench(rounds, path)["overall"] == 100.0
    wrong = rounds[:2] + [answer(5, "A", round_id=2)]
    result = score.score_mmbench(wrong, path)
    assert result["overall"] == 0.0 and result["vanilla_accuracy"] == 100.0
    with pytest.raises(score.AnswersMismatchError, match="5/2"):
        score.score_mmbench(rounds[:2], path)


def test_score_mmbench_plain_and_split_column(tmp_path):
    path = write_mmbench(tmp_path / "mmbench.tsv", [
        {"index": 1, "question": "?", "A": "x", "B": "y", "answer": "B", "category": "c", "l2-category": "l",
         "split": "dev"},
        {"index": 2, "question": "?", "A": "x", "B": "y", "answer": "A", "category": "c", "l2-category": "l",
         "split": "other"},
    ], extra_columns=("split",))
    result = score.score_mmbench([answer(1, "B")], path, split="dev")
    assert result["circular"] is False and result["overall"] == 100.0


# ---------------------------------------------------------------------------------------------
# Every scorer rejects answers that do not match the annotations
# ---------------------------------------------------------------------------------------------
def unknown_answer(name, answers):
    a = dict(answers[0], question_id=987654321 if isinstance(answers[0]["question_id"], int) else "987654321")
    if name == "mme":
        a["metadata"] = dict(a["metadata"], question="Is 987654321 shown? Please answer yes or no.")
    return a


@pytest.mark.parametrize("name", sorted(CASES))
def test_scorers_reject_mismatched_answers(name, tmp_path):
    paths, answers, extra = CASES[name][0](tmp_path)
    with pytest.raises(score.AnswersMismatchError) as missing:
        score_case(name, paths, answers[1:], extra)
    assert missing.value.missing and not missing.value.unknown and "--allow-partial" in str(missing.value)
    with pytest.raises(score.AnswersMismatchError) as unknown:
        score_case(name, paths, answers + [unknown_answer(name, answers)], extra)
    assert unknown.value.unknown and "987654321" in str(unknown.value)
    with pytest.raises(score.AnswersMismatchError) as duplicated:
        score_case(name, paths, answers + [answers[0]], extra)
    assert duplicated.value.duplicated
    assert isinstance(duplicated.value, ValueError)


@pytest.mark.parametrize("name", sorted(CASES))
def test_allow_partial_scores_subset_but_rejects_unknown(name, tmp_path):
    paths, answers, extra = CASES[name][0](tmp_path)
    result = score_case(name, paths, answers[1:], extra, allow_partial=True)
    assert result["partial"] is True and result["num_scored"] < result["num_expected"]
    with pytest.raises(score.AnswersMismatchError):
        score_case(name, paths, answers[1:] + [unknown_answer(name, answers)], extra, allow_partial=True)


def test_load_answers_rejects_malformed_lines(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "yes"}\nnot json\n', encoding="utf-8")
    with pytest.raises(score.ScoringInputError, match="bad.jsonl:2"):
        score.load_answers(tmp_path / "bad.jsonl")
    (tmp_path / "notext.jsonl").write_text('{"question_id": 1}\n', encoding="utf-8")
    with pytest.raises(score.ScoringInputError, match="text"):
        score.load_answers(tmp_path / "notext.jsonl")


def test_load_answers_keeps_lines_with_unicode_line_separators(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"question_id": 1, "text": "a\u2028b\x85c"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert [a["text"] for a in score.load_answers(path)] == ["a\u2028b\x85c"]


# ---------------------------------------------------------------------------------------------
# CLI as a user runs it
# ---------------------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_cli_vqav2_writes_scores_and_submission(tmp_path):
    paths, answers, _ = vqav2_case(tmp_path)
    answers_file = write_jsonl(tmp_path / "preds.jsonl", answers)
    proc = run_cli("--benchmark", "vqav2", "--answers-file", answers_file, "--annotation-file", paths[0])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["overall"] == pytest.approx(160 / 3)
    assert json.loads((tmp_path / "preds.scores.json").read_text()) == result
    submission = json.loads((tmp_path / "preds.submission.json").read_text())
    assert submission == [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"},
                          {"question_id": 3, "answer": "green"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl", "preds.scores.json",
                                                          "preds.submission.json", "vqav2.json"]


def test_cli_pope_directory_and_output_flag(tmp_path):
    paths, answers, _ = pope_case(tmp_path)
    answers_file = write_jsonl(tmp_path / "pope.jsonl", answers)
    out = tmp_path / "out" / "pope_scores.json"
    out.parent.mkdir()
    proc = run_cli("--benchmark", "pope", "--answers-file", answers_file, "--annotation-file", paths[0],
                   "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["overall"] == pytest.approx((200 / 3 + 100) / 2)
    assert out.exists() and not (tmp_path / "pope.scores.json").exists()


def test_cli_exits_2_on_mismatch_with_one_line(tmp_path):
    paths, answers, extra = scienceqa_case(tmp_path)
    answers_file = write_jsonl(tmp_path / "sqa.jsonl", answers[1:] + [answer("555", "A")])
    args = ["--benchmark", "scienceqa", "--answers-file", answers_file, "--annotation-file", paths[0],
            "--split-file", extra["split_file"]]
    proc = run_cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "555" in lines[0] and "missing" in lines[0]
    assert run_cli(*args, "--allow-partial").returncode == 2  # the unknown id is still an error
    write_jsonl(answers_file, answers[1:])
    partial = run_cli(*args, "--allow-partial")
    assert partial.returncode == 0, partial.stderr
    assert json.loads(partial.stdout)["partial"] is True


def test_cli_rejects_flags_of_other_benchmarks(tmp_path):
    paths, answers, _ = gqa_case(tmp_path)
    answers_file = write_jsonl(tmp_path / "gqa.jsonl", answers)
    proc = run_cli("--benchmark", "gqa", "--answers-file", answers_file, "--annotation-file", paths[0],
                   "--split-file", paths[0])
    assert proc.returncode == 2 and "--split-file" in proc.stderr


def test_cli_bad_annotation_file_in_a_real_process(tmp_path):
    answers_file = write_jsonl(tmp_path / "a.jsonl", [answer(1, "yes")])
    (tmp_path / "ann.json").write_bytes(b"\xff\xfe\x00garbage")
    proc = run_cli("--benchmark", "vqav2", "--answers-file", answers_file, "--annotation-file", tmp_path / "ann.json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "ann.json" in proc.stderr and "UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr


# Bad files, each given to the CLI (in-process: fast): (benchmark, what, a function that breaks the
# case in `tmp` and returns the CLI's arguments, the file the message must name, words of the reason)
def _args(name, tmp, answers_file=None, annotation=None, split_file=None, build=True):
    """CLI arguments for the hand case of `name` in tmp (build=False: reuse the files already there)."""
    paths, answers, extra = CASES[name][0](tmp) if build else _case_paths(name, tmp)
    if answers_file is None:
        answers_file = write_jsonl(tmp / "answers.jsonl", answers)
    argv = ["--benchmark", name, "--answers-file", str(answers_file)]
    for path in ([annotation] if annotation else paths):
        argv += ["--annotation-file", str(path)]
    if "split_file" in extra:
        argv += ["--split-file", str(split_file or extra["split_file"])]
    return argv


def _case_paths(name, tmp):
    """The annotation paths and extras of an already built case, without rewriting its files."""
    scratch = tmp / "_scratch"
    scratch.mkdir(exist_ok=True)
    paths, answers, extra = CASES[name][0](scratch)
    swap = {str(scratch / p.relative_to(scratch)): tmp / p.relative_to(scratch) for p in paths}
    extra = {k: tmp / Path(v).relative_to(scratch) for k, v in extra.items()}
    return [swap[str(p)] for p in paths], answers, extra


def _bad_answers(content):
    def make(name, tmp):
        path = tmp / "answers.jsonl"
        argv = _args(name, tmp, answers_file=path)
        if content is not None:
            path.write_bytes(content)
        return argv, "answers.jsonl"
    return make


def _bad_annotation(file_name, content):
    def make(name, tmp):
        argv = _args(name, tmp)  # the good case, then one file broken
        path = tmp / file_name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
        if name != "pope":
            argv = _args(name, tmp, answers_file=Path(argv[argv.index("--answers-file") + 1]), annotation=path,
                         build=False)
        return argv, file_name
    return make


BAD_FILES = [
    *[(name, what, _bad_answers(content), reason) for name in ("vqav2", "gqa", "mmbench") for what, content, reason in [
        ("answers file missing", None, "no such file"),
        ("answers not JSON", b"{oops\n", "not a JSON line"),
        ("answers not UTF-8", b"\xff\xfe\x80\n", "not UTF-8"),
        ("answers empty", b"\n\n", "no answers"),
        ("answer is a list", b"[1, 2]\n", "question_id"),
        ("answer id is a list", b'{"question_id": [1], "text": "a"}\n', "question_id"),
        ("answer text is a number", b'{"question_id": 1, "text": 3}\n', "text"),
        ("metadata not an object", b'{"question_id": 1, "text": "a", "metadata": [1]}\n', "metadata"),
    ]],
    ("vqav2", "annotation missing", _bad_annotation("gone.json", None), "no such file"),
    ("vqav2", "annotation not JSON", _bad_annotation("vqav2.json", "{"), "not valid JSON"),
    ("vqav2", "annotation is a list", _bad_annotation("vqav2.json", []), "expected an object"),
    ("vqav2", "annotations not a list", _bad_annotation("vqav2.json", {"annotations": 3}), "expected a list"),
    ("vqav2", "answers not a list", _bad_annotation("vqav2.json", {"annotations": [
        {"question_id": 1, "answer_type": "x", "question_type": "y", "answers": "yes"}]}), "expected a list"),
    ("vqav2", "human answer not a string", _bad_annotation("vqav2.json", {"annotations": [
        {"question_id": 1, "answer_type": "x", "question_type": "y", "answers": [{"answer": 1}]}]}), "string"),
    ("vqav2", "question id repeats", _bad_annotation("vqav2.json", {"annotations": [
        vqav2_annotation(1, ["a"] * 10), vqav2_annotation(1, ["b"] * 10)]}), "repeats"),
    ("textvqa", "not 10 answers", _bad_annotation("textvqa.json", {"data": [
        {"question_id": 7, "image_id": "a", "question": "?", "answers": ["x"] * 9}]}), "exactly 10"),
    ("textvqa", "no data key", _bad_annotation("textvqa.json", {"items": []}), "missing field"),
    ("vizwiz", "not a list", _bad_annotation("vizwiz.json", {"image": "x"}), "expected a list"),
    ("gqa", "questions a list", _bad_annotation("testdev_balanced_questions.json", []), "JSON object"),
    ("gqa", "no isBalanced", _bad_annotation("testdev_balanced_questions.json", {
        "201": {"answer": "yes", "types": {"structural": "verify", "semantic": "attr"}}}), "isBalanced"),
    ("gqa", "types not an object", _bad_annotation("testdev_balanced_questions.json", {
        "201": {"answer": "yes", "isBalanced": True, "types": "verify"}}), "expected an object"),
    ("pope", "label file not JSONL", _bad_annotation("coco_pope_random.json", "{[\n"), "not a JSON line"),
    ("pope", "label not yes/no", _bad_annotation("coco_pope_random.json",
                                                 '{"question_id": 100, "label": "maybe"}\n'), "label"),
    ("pope", "label file not UTF-8", _bad_annotation("coco_pope_random.json", b"\xff\n"), "not UTF-8"),
    ("scienceqa", "problems a list", _bad_annotation("problems.json", []), "JSON object"),
    ("scienceqa", "answer out of range", _bad_annotation("problems.json", {
        pid: {"choices": ["a"], "answer": 3 if pid == "1" else 0, "subject": "s", "grade": "grade1", "split": "test"}
        for pid in "1234"}), "'answer' must index"),
    ("mme", "annotation not a folder", _bad_annotation("mme.txt", "x"), "release directory"),
    ("mmbench", "TSV lacks columns", _bad_annotation("mmbench_dev.tsv", "index\tquestion\n1\tq\n"), "lacks column"),
    ("mmbench", "TSV not UTF-8", _bad_annotation("mmbench_dev.tsv", b"index\t\xff\n"), "not UTF-8"),
]


@pytest.mark.parametrize("name, what, make, reason", BAD_FILES, ids=[f"{b[0]}-{b[1]}" for b in BAD_FILES])
def test_cli_bad_file_ends_in_one_line_naming_it(name, what, make, reason, tmp_path, capsys):
    argv, file_name = make(name, tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert score.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert file_name in err and reason in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_cli_bad_split_file_and_unwritable_output(tmp_path, capsys):
    argv = _args("scienceqa", tmp_path)
    write_json(tmp_path / "pid_splits.json", {"val": []})
    assert score.main(argv) == 2
    assert "pid_splits.json" in capsys.readouterr().err
    argv = _args("gqa", tmp_path) + ["--output", str(tmp_path / "no" / "dir" / "s.json")]
    assert score.main(argv) == 2
    err = capsys.readouterr().err
    assert "s.json" in err and "cannot write" in err
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_cli_refuses_to_overwrite_an_input(tmp_path, capsys):
    argv = _args("gqa", tmp_path)
    answers_file = Path(argv[argv.index("--answers-file") + 1])
    before = answers_file.read_text()
    assert score.main(argv + ["--output", str(answers_file)]) == 2
    assert "overwrite an input" in capsys.readouterr().err
    assert answers_file.read_text() == before


def test_cli_refuses_scores_over_the_submission_file(tmp_path, capsys):
    argv = _args("vqav2", tmp_path)
    same = str(tmp_path / "same.json")
    assert score.main(argv + ["--output", same, "--submission-file", same]) == 2
    assert "overwrite an input" in capsys.readouterr().err
