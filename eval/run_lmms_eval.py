"""Run lmms-eval, and fail when it fails: lmms-eval 0.7 exits 0 even when the model or a task raised.

    python eval/run_lmms_eval.py --model mm_moslora --model_args pretrained=CKPT,batch_size=32 \
        --tasks pope_local --include_path eval/lmms_tasks --output_path outputs/lmms_eval

Every argument goes to `python -m lmms_eval` unchanged (without --output_path, `--output_path outputs/lmms_eval`
is added). The run succeeds (exit 0) only when lmms-eval exited 0 AND a results file written during this run
under --output_path has a result for every task named in --tasks; otherwise the exit status is lmms-eval's own
or 1, with one line saying what is missing (lmms-eval's log above it says why).

Offline by default: HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 are set unless the environment sets them, so a
local task (Parquet with embedded images, see eval/lmms_tasks/) never waits on the hub.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUTPUT = "outputs/lmms_eval"


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def results_since(output_path: Path, started: float) -> dict:
    """Task name -> metrics, from every *_results.json under output_path written after `started`."""
    results = {}
    for path in sorted(output_path.rglob("*_results.json")):
        if path.stat().st_mtime >= started:
            data = json.loads(path.read_text())
            results.update(data.get("results", {}))
            results.update(data.get("groups", {}))
    return results


def check(returncode: int, output_path: Path, tasks: list[str], started: float) -> tuple[int, str | None]:
    """(exit status, reason or None) of a finished lmms-eval run."""
    if returncode != 0:
        return returncode, f"lmms-eval exited with status {returncode}"
    found = results_since(output_path, started)
    missing = [task for task in tasks if task not in found]
    if not found:
        return 1, f"lmms-eval exited 0 but wrote no results under {output_path}: the run failed (see its log above)"
    if missing:
        return 1, f"lmms-eval exited 0 but has no results for {missing} (see its log above)"
    return 0, None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tasks = [t for t in (option(argv, "--tasks") or "").split(",") if t]
    if not tasks:
        print("error: give --tasks (comma-separated task names)", file=sys.stderr)
        return 2
    if option(argv, "--output_path") is None:
        argv += ["--output_path", DEFAULT_OUTPUT]
    output_path = Path(option(argv, "--output_path"))
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ}
    started = time.time() - 1  # file times may be coarser than a second
    returncode = subprocess.call([sys.executable, "-m", "lmms_eval", *argv], env=env)
    status, reason = check(returncode, output_path, tasks, started)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
    else:
        print(f"[run_lmms_eval] results for {tasks} under {output_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
