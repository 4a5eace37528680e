"""Scoring rules of eval/score.py pinned with hand-computed cases, and the CLI run as a subprocess."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` run without `python -m` does not put the repo root on sys.path
    sys.path.insert(0, str(REPO))

from eval.score import (  # noqa: E402
    FAILED, AnswersMismatchError, ScoringInputError, evalai_answer, llava_short_answer, load_answers,
    mme_yes_no, mmbench_option_letter, normalize_vqa_answer, pope_yes_no, score_gqa, score_mmbench,
    score_mme, score_pope, score_scienceqa, score_textvqa, score_vizwiz, score_vqav2,
    scienceqa_option_letter, vqa_accuracy,
)

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


# ---------------------------------------------------------------------------------------------
# VQA normalisation and accuracy
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("", ""),
    ("Yes.", "yes"),
    ("yes", "yes"),
    ("two", "2"),
    ("Two dogs", "2 dogs"),
    ("none", "0"),
    ("1,000", "1000"),
    ("1,000 people, maybe!", "1000 people maybe"),   # a digit-comma-digit deletes every mark
    ("red, white", "red white"),                    # mark next to a space: deleted
    ("red,white", "red white"),                     # otherwise: becomes a space
    ("black-and-white", "black and white"),
    ("well - done", "well done"),
    ("what?", "what"),
    ("A dog", "dog"),
    ("the cat in a hat", "cat in hat"),
    ("an", ""),
    ("dont", "don't"),
    ("Dont know", "don't know"),
    ("2.5", "2.5"),                                 # a period before a digit stays
    ("3.", "3"),
    ("e.g", "eg"),
    ("  multi\tline\nanswer ", "multi line answer"),
])
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_period_strip_keeps_official_count_quirk():
    # vqaEval.py passes re.UNICODE (32) as the count of periods removed
    assert normalize_vqa_answer("x" + "." * 40) == "x" + "." * 8


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(k, expected):
    gts = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction_and_ground_truth():
    assert vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("Yes.", ["yes"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("don't", ["dont"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("1000", ["1,000"] * 2 + ["1000"] * 2 + ["many"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"), ("The answer is Two.", "answer is 2"), ("1,000.", "1000"), ("It's red", "it 's red"),
    ("What?", "what"),
])
def test_evalai_submission_answer(raw, expected):
    assert evalai_answer(raw) == expected


# ---------------------------------------------------------------------------------------------
# Prediction parsers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("No, there is none.", "no"), ("There is not a dog", "no"),
    ("Yes. No other dogs.", "yes"), ("NO", "yes"), ("None", "yes"), ("yes, no", "no"),
])
def test_pope_yes_no(text, expected):
    assert pope_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("NO.", "no"), ("not sure", "no"),
    ("Maybe", "other"), ("", "other"), ("The answer is yes", "other"),
])
def test_mme_yes_no(text, expected):
    assert mme_yes_no(text) == expected


@pytest.mark.parametrize("text, n, expected", [
    ("A", 3, "A"), ("C", 2, FAILED), ("B. tiger", 3, "B"), ("B) tiger", 3, "B"), ("B.", 3, "B"),
    ("A.\nBecause it floats.", 2, "A"), ("The answer is C.", 4, "C"), ("Hmm. The answer is D", 4, "D"),
    ("The answer is E", 4, FAILED), ("I think it's B", 4, FAILED), ("b", 4, FAILED), ("", 4, FAILED),
    ("Answer: A", 4, FAILED), ("AB", 4, FAILED),
])
def test_scienceqa_option_letter(text, n, expected):
    assert scienceqa_option_letter(text, n) == expected


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("(B) dog", "B"), ("The answer is B.", "B"), ("A cat", "A"), ("dog", "B"),
    ("I pick the dog", "B"), ("A or B", None), ("a bird", None),
])
def test_mmbench_option_letter(text, expected):
    assert mmbench_option_letter(text, {"A": "cat", "B": "dog"}) == expected


def test_llava_short_answer():
    assert llava_short_answer(" Left. ") == "left"
    assert llava_short_answer("Yes..") == "yes"


# ---------------------------------------------------------------------------------------------
# Per-benchmark fixtures: (annotation paths, matching answers, extra kwargs)
# ---------------------------------------------------------------------------------------------
def vqav2_case(tmp):
    def ann(qid, atype, qtype, gts):
        return {"question_id": qid, "image_id": 1, "question_type": qtype, "answer_type": atype,
                "multiple_choice_answer": gts[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(gts)]}
    path = write_json(tmp / "vqav2.json", {"annotations": [
        ann(1, "yes/no", "is the", ["yes"] * 10),
        ann(2, "number", "how many", ["2"] * 2 + ["3"] * 8),
        ann(3, "other", "what color", ["red"] + ["blue"] * 9),
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
                "answerable": int(atype != "unanswerable"), "answers": [{"answer": a, "answer_confidence": "yes"} for a in gts]}
    path = write_json(tmp / "vizwiz.json", [
        item("VizWiz_val_00000000.jpg", "other", ["soup"] * 10),
        item("VizWiz_val_00000001.jpg", "unanswerable", ["unanswerable"] * 9 + ["blurry"]),
    ])
    return [path], [answer("VizWiz_val_00000000.jpg", "Soup."), answer("VizWiz_val_00000001.jpg", "blurry")], {}


def gqa_case(tmp):
    def q(answer_, structural, semantic):
        return {"imageId": "n1", "question": "?", "answer": answer_, "fullAnswer": "",
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


CASES = {"vqav2": (vqav2_case, score_vqav2), "textvqa": (textvqa_case, score_textvqa),
         "vizwiz": (vizwiz_case, score_vizwiz), "gqa": (gqa_case, score_gqa), "pope": (pope_case, score_pope),
         "scienceqa": (scienceqa_case, score_scienceqa), "mme": (mme_case, score_mme),
         "mmbench": (mmbench_case, score_mmbench)}


def run_case(name, tmp, **kwargs):
    """Build the hand case of `name` in tmp and score its own answers."""
    paths, answers, extra = CASES[name][0](tmp)
    return score_case(name, paths, answers, extra, **kwargs)


def score_case(name, paths, answers, extra, **kwargs):
    annotation = paths if name == "pope" else paths[0]
    return CASES[name][1](answers, annotation, **extra, **kwargs)


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


def test_score_vizwiz(tmp_path):
    result = run_case("vizwiz", tmp_path)
    assert result["overall"] == pytest.approx(100 * (1.0 + 0.3) / 2)
    assert result["per_answer_type"]["unanswerable"]["accuracy"] == pytest.approx(30.0)


def test_score_gqa(tmp_path):
    result = run_case("gqa", tmp_path)
    assert result["overall"] == pytest.approx(200 / 3)
    assert result["per_structural_type"]["verify"]["accuracy"] == pytest.approx(100.0)
    assert result["per_semantic_type"]["rel"] == {"accuracy": pytest.approx(50.0), "count": 2}


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
    with pytest.raises(ScoringInputError, match="metadata.category"):
        score_pope([answer(1, "no"), answer(1, "yes")], files)
    tagged = [answer(1, "no", metadata={"category": "adversarial"}), answer(1, "yes", metadata={"category": "popular"})]
    result = score_pope(tagged, files)
    assert result["per_split"]["adversarial"]["accuracy"] == 100.0 and result["per_split"]["popular"]["f1"] == 100.0
    one = score_pope([answer(1, "no")], files[0])  # a single file
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
    assert score_scienceqa([answer("9", "A")], paths[0], split="val")["overall"] == 100.0
    assert score_scienceqa(answers, paths[0])["num_expected"] == 4  # default "test" from the split field


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
    assert score_mme(bare, paths[0])["overall"] == pytest.approx(125.0)


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
    assert score_mmbench(rounds, path)["overall"] == 100.0
    wrong = rounds[:2] + [answer(5, "A", round_id=2)]
    result = score_mmbench(wrong, path)
    assert result["overall"] == 0.0 and result["vanilla_accuracy"] == 100.0
    with pytest.raises(AnswersMismatchError, match="5/2"):
        score_mmbench(rounds[:2], path)


def test_score_mmbench_plain_and_split_column(tmp_path):
    path = write_mmbench(tmp_path / "mmbench.tsv", [
        {"index": 1, "question": "?", "A": "x", "B": "y", "answer": "B", "category": "c", "l2-category": "l",
         "split": "dev"},
        {"index": 2, "question": "?", "A": "x", "B": "y", "answer": "A", "category": "c", "l2-category": "l",
         "split": "other"},
    ], extra_columns=("split",))
    result = score_mmbench([answer(1, "B")], path, split="dev")
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
    with pytest.raises(AnswersMismatchError) as missing:
        score_case(name, paths, answers[1:], extra)
    assert missing.value.missing and not missing.value.unknown and "--allow-partial" in str(missing.value)
    with pytest.raises(AnswersMismatchError) as unknown:
        score_case(name, paths, answers + [unknown_answer(name, answers)], extra)
    assert unknown.value.unknown and "987654321" in str(unknown.value)
    with pytest.raises(AnswersMismatchError) as duplicated:
        score_case(name, paths, answers + [answers[0]], extra)
    assert duplicated.value.duplicated
    assert isinstance(duplicated.value, ValueError)


@pytest.mark.parametrize("name", sorted(CASES))
def test_allow_partial_scores_subset_but_rejects_unknown(name, tmp_path):
    paths, answers, extra = CASES[name][0](tmp_path)
    result = score_case(name, paths, answers[1:], extra, allow_partial=True)
    assert result["partial"] is True and result["num_scored"] < result["num_expected"]
    with pytest.raises(AnswersMismatchError):
        score_case(name, paths, answers[1:] + [unknown_answer(name, answers)], extra, allow_partial=True)


def test_load_answers_rejects_malformed_lines(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "yes"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ScoringInputError, match="bad.jsonl:2"):
        load_answers(tmp_path / "bad.jsonl")
    (tmp_path / "notext.jsonl").write_text('{"question_id": 1}\n', encoding="utf-8")
    with pytest.raises(ScoringInputError, match="text"):
        load_answers(tmp_path / "notext.jsonl")


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
