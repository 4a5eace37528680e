"""eval/run_vqa.py: LLaVA answer files, resuming, chunks + merge, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eval import run_vqa
from mm_moslora.infer import InferenceEngine
from tests.helpers import REPO_ROOT, make_eval_set, single_thread, subprocess_env

N_QUESTIONS = 8
ARGS = ["--batch-size", "3", "--max-new-tokens", "4", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_eval_set(tmp_path_factory.mktemp("vqa"), n_questions=N_QUESTIONS)


@pytest.fixture(scope="module")
def full_run(data):
    """One complete run through the command line, as a user would start it."""
    answers = data["questions"].parent / "full.jsonl"
    result = subprocess.run([sys.executable, "eval/run_vqa.py", "--model", str(data["checkpoint"]),
                             "--question-file", str(data["questions"]), "--image-folder", str(data["images"]),
                             "--answers-file", str(answers), *ARGS],
                            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "question/s" in result.stderr  # tqdm progress with the rate
    return read(answers)


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def run_main(data, answers, *extra) -> int:
    with single_thread():
        return run_vqa.main(["--model", str(data["checkpoint"]), "--question-file", str(data["questions"]),
                             "--image-folder", str(data["images"]), "--answers-file", str(answers), *ARGS, *extra])


def test_answer_file_format(data, full_run):
    questions = read(data["questions"])
    assert [a["question_id"] for a in full_run] == [q["question_id"] for q in questions]
    assert len({a["answer_id"] for a in full_run}) == N_QUESTIONS
    for question, answer in zip(questions, full_run):
        assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert answer["prompt"] == question["text"] and answer["model_id"] == "ckpt"
        assert isinstance(answer["text"], str) and answer["text"]
        assert answer["metadata"] == {**question["metadata"], "category": question["category"]}
    # The image is placed before texts that lack it, so both styles of question file give the same answer:
    # q0 and q6 ask the same question about the same image, one with "<image>\n" written and one without.
    q0, q6 = questions[0], questions[6]
    assert q0["image"] == q6["image"] and q0["text"] == "<image>\n" + q6["text"]
    assert full_run[0]["text"] == full_run[6]["text"]


def test_resume_skips_answered_questions(data, full_run, tmp_path, monkeypatch):
    answers = tmp_path / "resumed.jsonl"
    cut_line = json.dumps(full_run[3])[:25]  # the run crashed while writing answer 4
    answers.write_text("".join(json.dumps(a) + "\n" for a in full_run[:3]) + cut_line)
    asked = []
    generate = InferenceEngine.generate
    monkeypatch.setattr(InferenceEngine, "generate",
                        lambda self, requests, **kw: asked.extend(requests) or generate(self, requests, **kw))
    assert run_main(data, answers) == 0
    resumed = read(answers)
    assert len(asked) == N_QUESTIONS - 3
    assert resumed[:3] == full_run[:3]  # kept as written (same answer ids)
    assert [(a["question_id"], a["text"]) for a in resumed] == [(a["question_id"], a["text"]) for a in full_run]
    asked.clear()
    assert run_main(data, answers) == 0 and not asked and len(read(answers)) == N_QUESTIONS


def test_chunks_then_merge_equal_one_run(data, full_run, tmp_path):
    parts = [tmp_path / f"chunk{i}.jsonl" for i in range(3)]
    for i, part in reversed(list(enumerate(parts))):
        assert run_main(data, part, "--num-chunks", "3", "--chunk-idx", str(i)) == 0
    sizes = [len(read(p)) for p in parts]
    assert sum(sizes) == N_QUESTIONS and max(sizes) - min(sizes) <= 1
    merged = tmp_path / "merged.jsonl"
    assert run_vqa.main(["merge", "--answers-files", *map(str, reversed(parts)), "--output", str(merged),
                         "--question-file", str(data["questions"])]) == 0

    def strip_ids(records):
        return [{k: v for k, v in r.items() if k != "answer_id"} for r in records]
    assert strip_ids(read(merged)) == strip_ids(full_run)
    # A missing chunk is an error, unless asked for.
    assert run_vqa.main(["merge", "--answers-files", str(parts[0]), "--output", str(merged),
                         "--question-file", str(data["questions"])]) == 2
    assert run_vqa.main(["merge", "--answers-files", str(parts[0]), "--output", str(merged),
                         "--question-file", str(data["questions"]), "--allow-missing"]) == 0
    assert len(read(merged)) == sizes[0]


def test_missing_image_names_question_and_path(data, tmp_path, capsys):
    questions = read(data["questions"])
    questions[5]["image"] = "nowhere.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(q) + "\n" for q in questions))
    code = run_vqa.main(["--model", str(data["checkpoint"]), "--question-file", str(bad), "--image-folder",
                         str(data["images"]), "--answers-file", str(tmp_path / "a.jsonl"), *ARGS])
    err = capsys.readouterr().err
    assert code == 2
    assert "question q5: image not found:" in err and str(data["images"] / "nowhere.png") in err
    assert not (tmp_path / "a.jsonl").exists() or not read(tmp_path / "a.jsonl")


def test_undecodable_image_names_question(data, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    questions = read(data["questions"])[:4]
    questions[3]["image"] = str(tmp_path / "broken.png")  # absolute: used as it is, with the opt-out flag
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "a.jsonl"
    assert run_main({**data, "questions": bad}, answers, "--allow-images-outside-folder") == 2
    assert f"question q3: cannot decode image {tmp_path / 'broken.png'}" in capsys.readouterr().err
    assert [a["question_id"] for a in read(answers)] == ["q0", "q1", "q2"]  # the batches before it are kept
