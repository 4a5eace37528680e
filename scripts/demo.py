"""The one-command demo: synthetic visual-QA data -> stage 1 -> stage 2 -> evaluation -> chat -> results.

    bash scripts/run_demo.sh                     # sets up .venv, then runs: python scripts/demo.py
    python scripts/demo.py --adapter lora        # plain LoRA instead of MoSLoRA (outputs/demo-lora/)
    python scripts/demo.py --fresh               # redo everything (data included)

Every step runs the command a user would run, as a subprocess:
  1. data     mm_moslora.demo_data.generate -> outputs/demo_data (shared by both adapters)
  2. stage 1  deepspeed --num_gpus 1 scripts/pretrain.py ...  -> OUT/pretrain   (projector alignment)
  3. stage 2  deepspeed --num_gpus 1 scripts/finetune.py ...  -> OUT/finetune   (MoSLoRA/LoRA + projector)
  4. eval     python eval/run_vqa.py + python eval/score.py for each benchmark of eval/index.json -> OUT/eval/
  5. chat     python -m mm_moslora.chat --model OUT/finetune --image IMG --prompt "..."
  6. results  a table (per benchmark, per question type, held-out combinations) next to the majority-answer
              baseline, also written to OUT/demo_results.json
OUT is outputs/demo-<adapter> unless --out is given. Re-running reuses what is complete (a stage that ran its
planned steps with the same flags and backbone weights, complete answers files, the chat reply); a stage that
has to run again invalidates everything after it. Without a usable `deepspeed` launcher the training scripts
run as plain `python` processes (the same code path, one process), and the demo says so.
"""
from __future__ import annotations

import argparse
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

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout, no install

from mm_moslora.demo_data import (SHORT_ANSWER_SUFFIX, generate, majority_baseline,  # noqa: E402
                                  normalize_answer, read_manifest)

# The tiny backbones the demo starts from: pretrained on their own data and tasks (text for the LM, patch labels
# for the tower), as a real run starts from Vicuna and CLIP; made by scripts/pretrain_tiny_backbones.py (see
# mm_moslora/model/tiny_pretrain.py, whose PRETRAINED_DIR this is; not imported: this orchestrator needs no torch).
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
STAGE_OUTPUTS = ("pretrain", "finetune", "eval", "chat.json", "demo_results.json")  # in pipeline order


class DemoError(RuntimeError):
    """A step failed; the message says which command and where its output is."""


# ---------------------------------------------------------------- running commands
def subprocess_env(threads: int) -> dict:
    """The environment of every step: the checkout importable, `threads` torch threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run(cmd: list[str], env: dict, what: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Run `cmd` in the repository root, its output going to the terminal (or captured)."""
    print("$ " + " ".join(_quote(c) for c in cmd), flush=True)
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        detail = f"\n{result.stderr.strip()}" if capture and result.stderr else ""
        raise DemoError(f"{what} failed (exit status {result.returncode}): {' '.join(cmd)}{detail}")
    return result


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in " \n?") else arg


def free_port() -> int:
    """A free TCP port for the launcher's rendezvous, so two demos (or a test) can run side by side."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def deepspeed_launcher() -> str | None:
    """The `deepspeed` launcher next to this interpreter (the venv's), else on PATH, else None."""
    local = Path(sys.executable).with_name("deepspeed")
    return str(local) if local.is_file() else shutil.which("deepspeed")


# ---------------------------------------------------------------- steps
def prepare_data(data_dir: Path, settings: dict, fresh: bool) -> str:
    """Generate the demo data unless a complete run with the same settings is there. Returns the status."""
    if fresh and read_manifest(data_dir) is not None:
        (data_dir / "manifest.json").unlink()  # the generator then clears and rewrites only its own files
    manifest = generate(data_dir, workers=min(2, os.cpu_count() or 1), overwrite=fresh, progress=sys.stderr.isatty(),
                        **settings)
    return manifest["status"]


STAGE_RECORD_FILE = "demo_stage.json"  # what a stage ran with: flags and backbone weights; other ones are not reused


def stage_flags(flags: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in {**COMMON_TRAIN_FLAGS, **flags}.items()]


@functools.cache
def backbone_digest() -> str:
    """sha256 of the backbone weight files (remade weights keep their paths); read once per run."""
    digest = hashlib.sha256()
    for path in sorted(PRETRAINED_DIR.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def stage_record(flags: dict) -> dict:
    """The stage's flags and the digest of the backbone weights it started from."""
    return {"flags": stage_flags(flags), "backbone_weights_sha256": backbone_digest()}


def stage_complete(out_dir: Path, flags: dict) -> bool:
    summary, recorded = out_dir / "train_summary.json", out_dir / STAGE_RECORD_FILE
    return (summary.is_file() and json.loads(summary.read_text()).get("steps") == flags["max_steps"]
            and recorded.is_file() and json.loads(recorded.read_text()) == stage_record(flags))


def train_stage(stage: str, out_dir: Path, data_dir: Path, flags: dict, launcher: str, env: dict) -> str:
    """Run scripts/<stage>.py through the deepspeed launcher (or plain python). Returns the launcher used."""
    script = str(REPO_ROOT / "scripts" / f"{stage}.py")
    args = [f"--data_path={data_dir / ('pretrain.json' if stage == 'pretrain' else 'finetune.json')}",
            f"--image_folder={data_dir / 'images'}", f"--output_dir={out_dir}"]
    args += stage_flags(flags)
    used = None
    if launcher == "deepspeed":
        ds = deepspeed_launcher()
        try:
            run([ds, "--num_gpus", "1", "--master_port", str(free_port()), script, *args], env, f"{stage} (deepspeed)")
            used = "deepspeed"
        except DemoError as err:
            print(f"[demo] the deepspeed launcher failed ({err}); running the same script with plain python "
                  f"instead", flush=True)
    if used is None:
        run([sys.executable, script, *args], env, stage)
        used = "python"
    (out_dir / STAGE_RECORD_FILE).write_text(json.dumps(stage_record(flags), indent=1))
    return used


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


def answer_benchmarks(jobs: list[tuple[str, list[str], Path]], env: dict, workers: int) -> dict[str, float]:
    """Run the run_vqa commands `jobs` = [(benchmark, cmd, log file)], `workers` at a time (their output goes to
    the log files). Returns {benchmark: seconds}. On a failure the others are stopped and the log's end is shown."""
    pending, running, seconds = list(jobs), [], {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                name, cmd, log = pending.pop(0)
                print("$ " + " ".join(_quote(c) for c in cmd) + f"  > {log}", flush=True)
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
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                    raise DemoError(f"run_vqa on {name} failed (exit status {proc.returncode}); log {log}:\n{tail}")
                seconds[name] = round(time.time() - start, 1)
                print(f"[demo] {name}: answered in {seconds[name]:.1f} s", flush=True)
    finally:
        for _, proc, handle, _, _ in running:  # only after a failure or an interrupt
            proc.terminate()
            proc.wait()
            handle.close()
    return seconds


def evaluate(index: dict, data_dir: Path, checkpoint: Path, out_dir: Path, batch_size: int, env: dict,
             workers: int) -> dict[str, dict]:
    """Answer every benchmark's questions (resuming incomplete answers files) and score the answers, and the
    majority-answer baseline, with eval/score.py. Returns {benchmark: {"questions", "answers", "scores",
    "baseline_scores"}}."""
    questions, jobs = {}, []
    for name, info in index["benchmarks"].items():
        bench_dir = out_dir / name
        bench_dir.mkdir(parents=True, exist_ok=True)
        question_file = data_dir / info["question_file"]
        questions[name] = [json.loads(line) for line in question_file.read_text().splitlines() if line.strip()]
        answers_file = bench_dir / "answers.jsonl"
        if answers_complete(answers_file, [q["question_id"] for q in questions[name]]):
            print(f"[demo] {answers_file}: complete, reused", flush=True)
            continue
        jobs.append((name, [sys.executable, str(REPO_ROOT / "eval" / "run_vqa.py"), "--model", str(checkpoint),
                            "--question-file", str(question_file), "--image-folder", str(data_dir / "images"),
                            "--answers-file", str(answers_file), "--batch-size", str(batch_size),
                            "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS)],
                     bench_dir / "run_vqa.log"))
    answer_benchmarks(jobs, env, workers)

    results = {}
    for name, info in index["benchmarks"].items():
        bench_dir = out_dir / name
        answers_file = bench_dir / "answers.jsonl"
        answers = {json.dumps(a["question_id"]): a for a in map(json.loads, answers_file.read_text().splitlines())}
        baseline_file = bench_dir / "majority_baseline.jsonl"
        baseline = majority_answers(data_dir / "finetune.json", questions[name])
        baseline_file.write_text("".join(
            json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": answer,
                        "metadata": {**q.get("metadata", {}), "category": q.get("category")}}) + "\n"
            for q, answer in zip(questions[name], baseline)))
        results[name] = {"questions": questions[name], "answers": answers,
                         "scores": score(name, info, data_dir, answers_file, env),
                         "baseline_scores": score(name, info, data_dir, baseline_file, env)}
    return results


def majority_answers(finetune_json: Path, questions: list[dict]) -> list[str]:
    """The majority-answer baseline's reply to each question (the most common training answer of its type)."""
    per_type = {qtype: entry["majority_answer"] or "" for qtype, entry in
                majority_baseline(finetune_json, questions).items() if qtype != "overall"}
    return [per_type[q["metadata"]["question_type"]] for q in questions]


def score(name: str, info: dict, data_dir: Path, answers_file: Path, env: dict) -> dict:
    cmd = [sys.executable, str(REPO_ROOT / "eval" / "score.py"), "--benchmark", info["benchmark"],
           "--answers-file", str(answers_file)]
    for annotation in info["annotation_files"]:
        cmd += ["--annotation-file", str(data_dir / annotation)]
    if info.get("split_file"):
        cmd += ["--split-file", str(data_dir / info["split_file"])]
    return json.loads(run(cmd, env, f"score.py on {name}", capture=True).stdout)


def pick_chat_question(data_dir: Path, index: dict) -> dict:
    """An open question (colour or shape) about a held-out combination from the VQAv2 look-alike, else the first."""
    info = index["benchmarks"].get("vqav2") or next(iter(index["benchmarks"].values()))
    questions = [json.loads(line) for line in (data_dir / info["question_file"]).read_text().splitlines() if line]
    wanted = [q for q in questions if q.get("image") and q["metadata"].get("held_out")
              and q["metadata"].get("question_type") in ("color", "shape")]
    return (wanted or questions)[0]


def ask_chat(checkpoint: Path, data_dir: Path, question: dict, env: dict) -> dict:
    image = data_dir / "images" / question["image"]
    result = run([sys.executable, "-m", "mm_moslora.chat", "--model", str(checkpoint), "--image", str(image),
                  "--prompt", question["text"], "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS),
                  "--json"], env, "chat", capture=True)
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    return {"image": str(image), "prompt": question["text"], "answer": reply["answer"],
            "expected": question["metadata"]["answer"], "held_out": question["metadata"].get("held_out")}


# ---------------------------------------------------------------- results
def exact_match(answer: str, truth: str) -> bool:
    return normalize_answer(answer) == normalize_answer(truth)


def summarize(evals: dict[str, dict], finetune_json: Path) -> dict:
    """Per benchmark (official score of model and baseline, exact-match accuracy of both), per question type and
    held-out vs seen combinations (exact match, all benchmarks pooled)."""
    benchmarks, records = {}, []
    for name, ev in evals.items():
        baseline = majority_answers(finetune_json, ev["questions"])
        rows = []
        for q, base in zip(ev["questions"], baseline):
            answer = ev["answers"][json.dumps(q["question_id"])]["text"]
            meta = q["metadata"]
            rows.append({"benchmark": name, "question_type": meta["question_type"], "held_out": meta["held_out"],
                         "model": exact_match(answer, meta["answer"]), "baseline": exact_match(base, meta["answer"])})
        records += rows
        benchmarks[name] = {"metric": ev["scores"]["overall_metric"], "model": ev["scores"]["overall"],
                            "baseline": ev["baseline_scores"]["overall"], **_accuracy(rows)}
    by_type, by_held = defaultdict(list), defaultdict(list)
    for row in records:
        by_type[row["question_type"]].append(row)
        by_held["held_out" if row["held_out"] else "seen"].append(row)
    return {"benchmarks": benchmarks,
            "question_types": {t: _accuracy(rows) for t, rows in sorted(by_type.items())},
            "combinations": {k: _accuracy(by_held[k]) for k in ("held_out", "seen") if by_held[k]},
            "all_questions": _accuracy(records)}


def _accuracy(rows: list[dict]) -> dict:
    n = len(rows)
    return {"n": n, "model_exact_match": 100.0 * sum(r["model"] for r in rows) / n,
            "baseline_exact_match": 100.0 * sum(r["baseline"] for r in rows) / n}


def format_table(results: dict) -> str:
    lines = [f"{'benchmark':12s} {'tuned model':>12s} {'majority':>9s}   {'exact match':>11s} {'majority':>9s}  metric",
             "-" * 96]
    for name, b in results["benchmarks"].items():
        metric = b["metric"].split(":")[0].split(" (")[0]
        lines.append(f"{name:12s} {b['model']:12.1f} {b['baseline']:9.1f}   {b['model_exact_match']:10.1f}% "
                     f"{b['baseline_exact_match']:8.1f}%  {metric}")
    lines += ["", f"{'question type':18s} {'n':>5s} {'tuned model':>12s} {'majority':>9s}", "-" * 48]
    for name, t in results["question_types"].items():
        mark = "" if t["model_exact_match"] > t["baseline_exact_match"] else "   <- not above the baseline"
        lines.append(f"{name:18s} {t['n']:5d} {t['model_exact_match']:11.1f}% {t['baseline_exact_match']:8.1f}%{mark}")
    lines += ["", f"{'combinations':18s} {'n':>5s} {'tuned model':>12s} {'majority':>9s}", "-" * 48]
    for name, t in results["combinations"].items():
        label = "held-out (unseen)" if name == "held_out" else "seen in training"
        lines.append(f"{label:18s} {t['n']:5d} {t['model_exact_match']:11.1f}% {t['baseline_exact_match']:8.1f}%")
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", choices=["moslora", "lora"], default="moslora")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: outputs/demo-<adapter>)")
    parser.add_argument("--data", type=Path, default=None,
                        help="demo data folder (default: outputs/demo_data, outputs/demo_data-quick with --quick)")
    parser.add_argument("--fresh", action="store_true", help="redo everything: data, both stages, evaluation, chat")
    parser.add_argument("--quick", action="store_true", help="a few samples and steps: checks the pipeline, not the model")
    parser.add_argument("--launcher", choices=["auto", "deepspeed", "python"], default="auto",
                        help="how to start training (auto: deepspeed when its launcher is installed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: $OMP_NUM_THREADS, else every usable core); the evaluation "
                             "answers several benchmarks at once, one thread each")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else "full"
    args.out = args.out or REPO_ROOT / "outputs" / (f"demo-{args.adapter}" + ("-quick" if args.quick else ""))
    args.data = args.data or REPO_ROOT / "outputs" / ("demo_data-quick" if args.quick else "demo_data")
    args.preset = preset
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    out, data_dir = args.out.resolve(), args.data.resolve()
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or usable_cpus()
    env = subprocess_env(threads)
    launcher = args.launcher
    if launcher == "auto":
        launcher = "deepspeed" if deepspeed_launcher() else "python"
        if launcher == "python":
            print("[demo] no `deepspeed` launcher found: training runs as plain `python scripts/...` processes",
                  flush=True)
    timings: dict[str, float] = {}
    t_total = time.time()

    def timed(name: str, fn, *a, **kw):
        start = time.time()
        print(f"\n==== {name}", flush=True)
        value = fn(*a, **kw)
        timings[name] = round(time.time() - start, 1)
        print(f"==== {name}: {timings[name]:.1f} s", flush=True)
        return value

    def invalidate_from(stage: str) -> None:
        """Remove this stage's outputs and everything downstream of it."""
        for name in STAGE_OUTPUTS[STAGE_OUTPUTS.index(stage):]:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.fresh:
            invalidate_from("pretrain")
        status = timed("data", prepare_data, data_dir, preset["data"], args.fresh)
        print(f"[demo] data {data_dir}: {status}")
        if status == "generated":
            invalidate_from("pretrain")  # new data: nothing trained on the old data is reused

        used = {}
        for stage in ("pretrain", "finetune"):
            flags = dict(preset[stage])
            if stage == "finetune":
                flags.update(adapter=args.adapter, pretrain_mm_mlp_adapter=out / "pretrain")
            stage_dir = out / stage
            if stage_complete(stage_dir, flags):
                print(f"\n==== {stage}: {stage_dir} is complete, reused")
                timings[stage] = 0.0
                continue
            invalidate_from(stage)
            used[stage] = timed(stage, train_stage, stage, stage_dir, data_dir, flags, launcher, env)
        checkpoint = out / "finetune"

        index = json.loads((data_dir / "eval" / "index.json").read_text())
        workers = max(1, min(usable_cpus(), len(index["benchmarks"])))  # a process per core: imports parallelize too
        evals = timed("eval", evaluate, index, data_dir, checkpoint, out / "eval", preset["eval_batch_size"],
                      subprocess_env(max(1, threads // workers)), workers)

        chat_file = out / "chat.json"
        if chat_file.is_file():
            chat = json.loads(chat_file.read_text())
            timings["chat"] = 0.0
        else:
            chat = timed("chat", ask_chat, checkpoint, data_dir, pick_chat_question(data_dir, index), env)
            chat_file.write_text(json.dumps(chat, indent=2) + "\n")
    except DemoError as err:
        print(f"\n[demo] error: {err}", file=sys.stderr)
        return 1
    timings["total"] = round(time.time() - t_total, 1)

    results = summarize(evals, data_dir / "finetune.json")
    results.update(adapter=args.adapter, preset=args.preset, checkpoint=str(checkpoint), data=str(data_dir),
                   launcher=used or "reused", chat=chat, timings_s=timings,
                   settings={k: preset[k] for k in ("data", "pretrain", "finetune")})
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")

    if timings["chat"]:
        print("\n==== chat: python -m mm_moslora.chat --model", checkpoint, "--image", chat["image"], "--prompt ...")
    else:
        print(f"\n==== chat (answer of an earlier run, {chat_file})")
    print(f"USER: {chat['prompt'].replace(SHORT_ANSWER_SUFFIX, '')}")
    print(f"ASSISTANT: {chat['answer']}    (expected: {chat['expected']}"
          f"{', a held-out colour-shape combination' if chat.get('held_out') else ''})")
    print(f"\n==== results ({args.adapter}, {sum(b['n'] for b in results['benchmarks'].values())} questions; "
          f"majority = most common training answer of the question's type)\n")
    print(format_table(results))
    print("\n==== time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"results: {out / 'demo_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
