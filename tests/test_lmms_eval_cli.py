"""lmms-eval as users run it: the `lmms_eval` command (through eval/run_lmms_eval.py) on the committed offline task
eval/lmms_tasks/pope_local answers every question as eval/run_vqa.py does and scores as eval/score.py does; a
run that fails while lmms-eval exits 0 is caught by the wrapper.

This needs lmms-eval installed with its own dependencies (the `eval` extra, which scripts/setup_env.sh installs).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from eval import run_lmms_eval, run_vqa
from eval.score import score_pope
from tests.helpers import REPO_ROOT, subprocess_env

TASK_DIR = REPO_ROOT / "eval" / "lmms_tasks"
PARQUET = TASK_DIR / "pope_local" / "pope_local.parquet"
FORMAT_LINE = "\nAnswer the question using a single word or phrase."  # the task's post_prompt


def lmms_eval(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval/run_lmms_eval.py", *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def llava_files(tmp_path_factory) -> dict[str, Path]:
    """The task's Parquet rows as LLaVA files: images, a question file and a POPE label file (one split)."""
    root = tmp_path_factory.mktemp("pope_local")
    (root / "images").mkdir()
    questions, labels = [], []
    for row in datasets.Dataset.from_parquet(str(PARQUET)):
        name = f"{row['question_id']}.png"
        row["image"].save(root / "images" / name)
        questions.append({"question_id": row["question_id"], "image": name, "text": row["question"] + FORMAT_LINE,
                          "category": "local"})
        labels.append({"question_id": row["question_id"], "image": name, "text": row["question"],
                       "label": row["answer"]})
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "coco_pope_local.json").write_text("".join(json.dumps(label) + "\n" for label in labels))
    return {"root": root, "images": root / "images", "questions": root / "questions.jsonl",
            "labels": root / "coco_pope_local.json"}


def test_the_local_task_equals_run_vqa_and_score(tiny_checkpoint_files, llava_files, tmp_path):
    checkpoint = tiny_checkpoint_files[0]
    result = lmms_eval(["--model", "mm_moslora", "--model_args", f"pretrained={checkpoint},device=cpu,batch_size=16",
                        "--tasks", "pope_local", "--include_path", str(TASK_DIR), "--output_path", str(tmp_path),
                        "--log_samples"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (samples_file,) = tmp_path.rglob("*_samples_pope_local.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    (results_file,) = tmp_path.rglob("*_results.json")
    metrics = json.loads(results_file.read_text())["results"]["pope_local"]

    answers_file = llava_files["root"] / "answers.jsonl"
    assert run_vqa.main(["--model", str(checkpoint), "--question-file", str(llava_files["questions"]),
                         "--image-folder", str(llava_files["images"]), "--answers-file", str(answers_file),
                         "--max-new-tokens", "16", "--batch-size", "16", "--device", "cpu", "--dtype", "fp32"]) == 0
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    ours = {a["question_id"]: a["text"] for a in answers}
    theirs = {s["pope_accuracy"]["question_id"]: s["filtered_resps"] for s in samples}
    theirs = {qid: reply[0] if isinstance(reply, list) else reply for qid, reply in theirs.items()}
    assert len(theirs) == len(ours) == 100 and theirs == ours

    scored = score_pope(answers, llava_files["labels"])["per_split"]["local"]
    assert metrics["pope_accuracy,none"] * 100 == pytest.approx(scored["accuracy"])
    assert metrics["pope_f1_score,none"] * 100 == pytest.approx(scored["f1"])
    assert metrics["pope_yes_ratio,none"] * 100 == pytest.approx(scored["yes_ratio"])


def test_a_failed_run_is_a_failure(tmp_path):
    """lmms-eval logs the model's error and exits 0; the wrapper exits 1 and says so."""
    result = lmms_eval(["--model", "mm_moslora", "--model_args", "pretrained=/nonexistent/ckpt,device=cpu",
                        "--tasks", "pope_local", "--include_path", str(TASK_DIR), "--output_path", str(tmp_path)])
    log = result.stdout + result.stderr
    assert "/nonexistent/ckpt: not an mm_moslora checkpoint" in log  # lmms-eval's own log of the error
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (f"error: lmms-eval exited 0 but wrote no results under "
                                                       f"{tmp_path}: the run failed (see its log above)")


def test_check_names_missing_tasks(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "x_results.json").write_text(json.dumps({"results": {"pope_local": {}}}))
    assert run_lmms_eval.check(0, tmp_path, ["pope_local"], 0) == (0, None)
    status, reason = run_lmms_eval.check(0, tmp_path, ["pope_local", "mme"], 0)
    assert status == 1 and "no results for ['mme']" in reason
    assert run_lmms_eval.check(0, tmp_path, ["pope_local"], started=4e9)[0] == 1  # only files of this run count
    assert run_lmms_eval.check(3, tmp_path, ["pope_local"], 0) == (3, "lmms-eval exited with status 3")
    assert run_lmms_eval.option(["--tasks=a,b", "--x", "1"], "--tasks") == "a,b"
    assert run_lmms_eval.main(["--model", "mm_moslora"]) == 2
