"""The steps of a whole run as the commands a user runs, each in its own subprocess: train a stage with
scripts/pretrain.py or scripts/finetune.py (through the `deepspeed` launcher or plain python), answer every
evaluation set with eval/run_vqa.py, score the answers with eval/score.py, and summarise per benchmark,
question type and held-out colour-shape combination.

Used by scripts/demo.py (one run) and mm_moslora.study (many seeds x adapter variants). Imports no torch:
the orchestrating process stays light, the subprocesses do the work. Needs a checkout (scripts/ and eval/).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from .demo_data import generate, majority_baseline, normalize_answer

REPO_ROOT = Path(__file__).resolve().parents[1]
# The tiny backbones the demo starts from: pretrained on their own data and tasks (text for the LM, patch labels
# for the tower), as a real run starts from Vicuna and CLIP; made by scripts/pretrain_tiny_backbones.py (see
# mm_moslora/model/tiny_pretrain.py, whose PRETRAINED_DIR this is; not imported: that module needs torch).
# Passed by path like any Hugging Face / open_clip checkpoint.
PRETRAINED_DIR = REPO_ROOT / "mm_moslora" / "model" / "tiny" / "pretrained"
BACKBONES = {"model_name_or_path": str(PRETRAINED_DIR / "lm"), "vision_tower": str(PRETRAINED_DIR / "vision"),
             "mm_vision_select_layer": -1}

# Data and training settings. "full" is the demo (sized for a 2-core CPU within 10 minutes, see the README);
# "quick" only checks that the pipeline runs end to end (tests).
PRESETS: dict[str, dict] = {
    "full": {
        "data": {"seed": 0, "n_train": 4000, "n_pretrain": 4000, "n_eval": 300, "image_size": 64},
        "pretrain": {"max_steps": 300, "per_device_train_batch_size": 32, "learning_rate": 3e-3},
        "finetune": {"max_steps": 400, "per_device_train_batch_size": 32, "learning_rate": 1e-3,
                     "mm_projector_lr": 3e-3, "lora_r": 64, "lora_alpha": 128, "lora_dropout": 0.0},
        "eval_batch_size": 64,
    },
    "quick": {
        "data": {"seed": 0, "n_train": 48, "n_pretrain": 24, "n_eval": 8, "image_size": 64},
        "pretrain": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 2e-3},
        "finetune": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                     "mm_projector_lr": 3e-3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "eval_batch_size": 16,
    },
}
COMMON_TRAIN_FLAGS = {"save_steps": 0, "warmup_ratio": 0.03, "lr_scheduler_type": "cosine", "report_to": "none",
                      "seed": 42, **BACKBONES}
MAX_NEW_TOKENS = 8  # answers are a word, a number, a letter or "<colour> <shape>"
STAGE_RECORD_FILE = "demo_stage.json"  # what a stage ran with: flags and backbone weights; other ones are not reused

Echo = Callable[[str], None]


class PipelineError(RuntimeError):
    """A step failed; the message says which command and where its output is."""


# ---------------------------------------------------------------- running commands
def subprocess_env(threads: int) -> dict:
    """The environment of every step: the checkout importable, `threads` torch threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run(cmd: list[str], env: dict, what: str, capture: bool = False, log: Path | None = None,
        echo: Echo = print) -> subprocess.CompletedProcess:
    """Run `cmd` in the repository root, its output going to the terminal, to `log` (appended) or captured."""
    echo("$ " + " ".join(_quote(c) for c in cmd))
    handle = log.open("a") if log is not None and not capture else None
    try:
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, text=True,
                                stdout=subprocess.PIPE if capture else handle,
                                stderr=subprocess.PIPE if capture else (subprocess.STDOUT if handle else None))
    finally:
        if handle:
            handle.close()
    if result.returncode != 0:
        detail = f"\n{result.stderr.strip()}" if capture and result.stderr else ""
        if log is not None and not capture:
            detail = failure_detail(log)
        raise PipelineError(f"{what} failed (exit status {result.returncode}): {' '.join(cmd)}{detail}")
    return result


def failure_detail(log: Path) -> str:
    """What a failed command said: its one `error:` line when it has one (the bad-input contract of every command,
    docs/bad_input.md), else the end of its log."""
    lines = log.read_text(errors="replace").splitlines()
    errors = [piece for line in lines for piece in line.split("\r") if piece.startswith("error:")]  # after a bar
    if errors:
        return f" {errors[-1][len('error:'):].strip()} (log: {log})"
    return "\n" + "\n".join(lines[-15:]) + f"\n(log: {log})"


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in " \n?") else arg


def free_port() -> int:
    """A free TCP port for the launcher's rendezvous, so that several runs (or a test) can go side by side."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def deepspeed_launcher() -> str | None:
    """The `deepspeed` launcher next to this interpreter (the venv's), else on PATH, else None."""
    local = Path(sys.executable).with_name("deepspeed")
    return str(local) if local.is_file() else shutil.which("deepspeed")


# ---------------------------------------------------------------- data and training
def prepare_data(data_dir: Path, settings: dict, fresh: bool, progress: bool | None = None) -> str:
    """Generate the demo data unless a complete run with the same settings is there. Returns the status."""
    from .demo_data import read_manifest

    if fresh and read_manifest(data_dir) is not None:
        (data_dir / "manifest.json").unlink()  # the generator then clears and rewrites only its own files
    manifest = generate(data_dir, workers=min(2, os.cpu_count() or 1), overwrite=fresh,
                        progress=sys.stderr.isatty() if progress is None else progress, **settings)
    return manifest["status"]


def stage_flags(flags: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in {**COMMON_TRAIN_FLAGS, **flags}.items()]


@functools.cache
def weights_digest(*paths: str) -> str:
    """sha256 of the weight files under local backbone folders (remade weights keep their paths); read once."""
    digest = hashlib.sha256()
    for folder in paths:
        if Path(folder).is_dir():
            for path in sorted(Path(folder).rglob("*.safetensors")):
                digest.update(path.read_bytes())
    return digest.hexdigest()


def stage_record(flags: dict) -> dict:
    """The stage's flags and the digest of the backbone weights it started from."""
    merged = {**COMMON_TRAIN_FLAGS, **flags}
    return {"flags": stage_flags(flags),
            "backbone_weights_sha256": weights_digest(str(merged["model_name_or_path"]), str(merged["vision_tower"]))}


def stage_complete(out_dir: Path, flags: dict) -> bool:
    summary, recorded = out_dir / "train_summary.json", out_dir / STAGE_RECORD_FILE
    return ((out_dir / "mm_projector.safetensors").is_file() and summary.is_file() and json.loads(summary.read_text()).get("steps") == flags["max_steps"]
            and recorded.is_file() and json.loads(recorded.read_text()) == stage_record(flags))


def train_stage(stage: str, out_dir: Path, data_path: Path, image_folder: Path, flags: dict, launcher: str,
                env: dict, log: Path | None = None, echo: Echo = print) -> str:
    """Run scripts/<stage>.py through the deepspeed launcher (or plain python). Returns the launcher used."""
    script = str(REPO_ROOT / "scripts" / f"{stage}.py")
    args = [f"--data_path={data_path}", f"--image_folder={image_folder}", f"--output_dir={out_dir}"]
    args += stage_flags(flags)
    used = None
    if launcher == "deepspeed":
        ds = deepspeed_launcher()
        try:
            run([ds, "--num_gpus", "1", "--master_port", str(free_port()), script, *args], env, f"{stage} (deepspeed)",
                log=log, echo=echo)
            used = "deepspeed"
        except PipelineError as err:
            echo(f"the deepspeed launcher failed ({err}); running the same script with plain python instead")
    if used is None:
        run([sys.executable, script, *args], env, stage, log=log, echo=echo)
        used = "python"
    (out_dir / STAGE_RECORD_FILE).write_text(json.dumps(stage_record(flags), indent=1))
    return used


# ---------------------------------------------------------------- evaluation
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answers_complete(answers_file: Path, question_ids: list) -> bool:
    if not answers_file.is_file():
        return False
    done = set()
    for line in answers_file.read_text().splitlines():
        try:
            done.add(json.dumps(json.loads(line)["question_id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            return False
    return done >= {json.dumps(q) for q in question_ids}


def answer_benchmarks(jobs: list[tuple[str, list[str], Path]], env: dict, workers: int,
                      echo: Echo = print) -> dict[str, float]:
    """Run the run_vqa commands `jobs` = [(benchmark, cmd, log file)], `workers` at a time (their output goes to
    the log files). Returns {benchmark: seconds}. On a failure the others are stopped and the log's end is shown."""
    pending, running, seconds = list(jobs), [], {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                name, cmd, log = pending.pop(0)
                echo("$ " + " ".join(_quote(c) for c in cmd) + f"  > {log}")
                handle = log.open("w")
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
                running.append((name, proc, handle, log, time.time()))
            time.sleep(0.1)
            for item in list(running):
                name, proc, handle, log, start = item
                if proc.poll() is None:
                    continue
                handle.close()
                running.remove(item)
                if proc.returncode != 0:
                    raise PipelineError(f"run_vqa on {name} failed (exit status {proc.returncode}):"
                                        f"{failure_detail(log)}")
                seconds[name] = round(time.time() - start, 1)
                echo(f"{name}: answered in {seconds[name]:.1f} s")
    finally:
        for _, proc, handle, _, _ in running:  # only after a failure or an interrupt
            proc.terminate()
            proc.wait()
            handle.close()
    return seconds


def evaluate(index: dict, data_root: Path, checkpoint: Path, out_dir: Path, batch_size: int, env: dict,
             workers: int, image_folder: Path | None = None, baseline_from: Path | None = None,
             echo: Echo = print) -> dict[str, dict]:
    """Answer every benchmark of `index` (eval/index.json; its paths relative to `data_root`), resuming incomplete
    answers files, and score the answers with eval/score.py; with `baseline_from` (a finetune.json) the
    majority-answer baseline too. Returns {benchmark: {"questions", "answers", "scores"[, "baseline_scores"]}}."""
    image_folder = image_folder or data_root / index.get("image_folder", "images")
    questions, jobs = {}, []
    for name, info in index["benchmarks"].items():
        bench_dir = out_dir / name
        bench_dir.mkdir(parents=True, exist_ok=True)
        question_file = data_root / info["question_file"]
        questions[name] = read_jsonl(question_file)
        answers_file = bench_dir / "answers.jsonl"
        if answers_complete(answers_file, [q["question_id"] for q in questions[name]]):
            echo(f"{answers_file}: complete, reused")
            continue
        jobs.append((name, [sys.executable, str(REPO_ROOT / "eval" / "run_vqa.py"), "--model", str(checkpoint),
                            "--question-file", str(question_file), "--image-folder", str(image_folder),
                            "--answers-file", str(answers_file), "--batch-size", str(batch_size),
                            "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS)],
                     bench_dir / "run_vqa.log"))
    answer_benchmarks(jobs, env, workers, echo)

    results = {}
    for name, info in index["benchmarks"].items():
        bench_dir = out_dir / name
        answers_file = bench_dir / "answers.jsonl"
        answers = {json.dumps(a["question_id"]): a for a in read_jsonl(answers_file)}
        results[name] = {"questions": questions[name], "answers": answers,
                         "scores": score(name, info, data_root, answers_file, env, echo)}
        if baseline_from is not None:
            baseline_file = bench_dir / "majority_baseline.jsonl"
            baseline = majority_answers(baseline_from, questions[name])
            baseline_file.write_text("".join(
                json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": answer,
                            "metadata": {**q.get("metadata", {}), "category": q.get("category")}}) + "\n"
                for q, answer in zip(questions[name], baseline)))
            results[name]["baseline_scores"] = score(name, info, data_root, baseline_file, env, echo)
    return results


def majority_answers(finetune_json: Path, questions: list[dict]) -> list[str]:
    """The majority-answer baseline's reply to each question (the most common training answer of its type)."""
    per_type = {qtype: entry["majority_answer"] or "" for qtype, entry in
                majority_baseline(finetune_json, questions).items() if qtype != "overall"}
    return [per_type[q["metadata"]["question_type"]] for q in questions]


def score(name: str, info: dict, data_root: Path, answers_file: Path, env: dict, echo: Echo = print) -> dict:
    cmd = [sys.executable, str(REPO_ROOT / "eval" / "score.py"), "--benchmark", info["benchmark"],
           "--answers-file", str(answers_file)]
    for annotation in info["annotation_files"]:
        cmd += ["--annotation-file", str(data_root / annotation)]
    if info.get("split_file"):
        cmd += ["--split-file", str(data_root / info["split_file"])]
    return json.loads(run(cmd, env, f"score.py on {name}", capture=True, echo=echo).stdout)


# ---------------------------------------------------------------- results
def exact_match(answer: str, truth: str) -> bool:
    return normalize_answer(answer) == normalize_answer(truth)


def summarize(evals: dict[str, dict], finetune_json: Path | None = None) -> dict:
    """Per benchmark (official score of model and, with `finetune_json`, of the majority baseline; exact-match
    accuracy), per question type and held-out vs seen combinations (exact match, all benchmarks pooled).
    Exact match needs `metadata.answer` on a question, the breakdowns `metadata.question_type` / `held_out`:
    questions without them (a user's evaluation set) count in the official scores only."""
    benchmarks, records = {}, []
    for name, ev in evals.items():
        baseline = majority_answers(finetune_json, ev["questions"]) if finetune_json else [None] * len(ev["questions"])
        rows = []
        for q, base in zip(ev["questions"], baseline):
            meta = q.get("metadata") or {}
            if "answer" not in meta:
                continue
            answer = ev["answers"][json.dumps(q["question_id"])]["text"]
            rows.append({"benchmark": name, "question_type": meta.get("question_type"),
                         "held_out": meta.get("held_out"), "model": exact_match(answer, str(meta["answer"])),
                         "baseline": None if base is None else exact_match(base, str(meta["answer"]))})
        records += rows
        benchmarks[name] = {"metric": ev["scores"]["overall_metric"], "model": ev["scores"]["overall"],
                            **({"baseline": ev["baseline_scores"]["overall"]} if "baseline_scores" in ev else {}),
                            **(_accuracy(rows) if rows else {"n": len(ev["questions"])})}
    by_type, by_held = defaultdict(list), defaultdict(list)
    for row in records:
        if row["question_type"] is not None:
            by_type[row["question_type"]].append(row)
        if row["held_out"] is not None:
            by_held["held_out" if row["held_out"] else "seen"].append(row)
    return {"benchmarks": benchmarks,
            "question_types": {t: _accuracy(rows) for t, rows in sorted(by_type.items())},
            "combinations": {k: _accuracy(by_held[k]) for k in ("held_out", "seen") if by_held[k]},
            "all_questions": _accuracy(records) if records else {"n": 0}}


def _accuracy(rows: list[dict]) -> dict:
    n = len(rows)
    result = {"n": n, "model_exact_match": 100.0 * sum(r["model"] for r in rows) / n}
    if all(r["baseline"] is not None for r in rows):
        result["baseline_exact_match"] = 100.0 * sum(r["baseline"] for r in rows) / n
    return result
