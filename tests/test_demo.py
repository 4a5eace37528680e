"""scripts/demo.py end to end on its --quick preset (a few samples and steps): data, both training stages through
the launcher, answers and scores of every benchmark, the chat reply, the results table and JSON; then a second run
that reuses everything. Accuracy is not tested here: the quick model is untrained (the full demo's numbers are
measured, see the README)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO_ROOT, subprocess_env

TIMEOUT = 600


def run_demo(out, data) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--quick", "--out", str(out), "--data", str(data)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"demo failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_quick_demo_runs_every_step_then_reuses_them(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    first = run_demo(out, data)

    for stage in ("pretrain", "finetune"):
        summary = json.loads((out / stage / "train_summary.json").read_text())
        assert summary["stage"] == stage and summary["steps"] > 0
    assert (out / "finetune" / "moslora_adapter.safetensors").is_file()

    results = json.loads((out / "demo_results.json").read_text())
    index = json.loads((data / "eval" / "index.json").read_text())
    assert set(results["benchmarks"]) == set(index["benchmarks"]) == {"vqav2", "pope", "scienceqa", "mme", "gqa"}
    question_types = set()
    for name, info in index["benchmarks"].items():
        questions = read_jsonl(data / info["question_file"])
        answers = read_jsonl(out / "eval" / name / "answers.jsonl")
        assert sorted(str(a["question_id"]) for a in answers) == sorted(str(q["question_id"]) for q in questions)
        assert all(isinstance(a["text"], str) for a in answers)
        scores = json.loads((out / "eval" / name / "answers.scores.json").read_text())
        assert scores["benchmark"] == name and scores["num_scored"] == scores["num_expected"] > 0
        row = results["benchmarks"][name]
        assert row["n"] == len(questions) and row["model"] == scores["overall"]
        assert 0.0 <= row["model_exact_match"] <= 100.0 and 0.0 <= row["baseline_exact_match"] <= 100.0
        question_types |= {q["metadata"]["question_type"] for q in questions}
    assert set(results["question_types"]) == question_types
    assert set(results["combinations"]) <= {"held_out", "seen"} and results["combinations"]

    chat = results["chat"]
    assert isinstance(chat["answer"], str) and chat["prompt"] and (data / "images").as_posix() in chat["image"]
    assert f"ASSISTANT: {chat['answer']}" in first.stdout
    for heading in ("benchmark", "question type", "held-out (unseen)", "time per step"):
        assert heading in first.stdout
    for step in ("data", "pretrain", "finetune", "chat", "total"):
        assert step in results["timings_s"]

    # A second run finds every output complete: no training, answering or chat command is started again.
    second = run_demo(out, data)
    for command in ("scripts/pretrain.py", "scripts/finetune.py", "eval/run_vqa.py", "mm_moslora.chat"):
        assert command not in second.stdout
    assert json.loads((out / "demo_results.json").read_text())["benchmarks"] == results["benchmarks"]
