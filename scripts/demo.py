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
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout, no install

from mm_moslora.demo_data import SHORT_ANSWER_SUFFIX  # noqa: E402
from mm_moslora.pipeline import (MAX_NEW_TOKENS, PRESETS, PipelineError, deepspeed_launcher,  # noqa: E402
                                 evaluate, prepare_data, run, stage_complete, subprocess_env, summarize,
                                 train_stage, usable_cpus)

STAGE_OUTPUTS = ("pretrain", "finetune", "eval", "chat.json", "demo_results.json")  # in pipeline order
DemoError = PipelineError


def say(message: str) -> None:
    print(f"[demo] {message}" if not message.startswith("$ ") else message, flush=True)


# ---------------------------------------------------------------- chat
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
            data_file = data_dir / ("pretrain.json" if stage == "pretrain" else "finetune.json")
            used[stage] = timed(stage, train_stage, stage, stage_dir, data_file, data_dir / "images", flags,
                                launcher, env, echo=say)
        checkpoint = out / "finetune"

        index = json.loads((data_dir / "eval" / "index.json").read_text())
        workers = max(1, min(usable_cpus(), len(index["benchmarks"])))  # a process per core: imports parallelize too
        evals = timed("eval", evaluate, index, data_dir, checkpoint, out / "eval", preset["eval_batch_size"],
                      subprocess_env(max(1, threads // workers)), workers, baseline_from=data_dir / "finetune.json",
                      echo=say)

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
