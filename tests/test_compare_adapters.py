"""scripts/compare_adapters.py end to end, as issue 15 specifies it: 2 seeds x 2 variants on the smoke preset
through the real recipe (stage 1 shared per seed, stage 2, eval/run_vqa.py, eval/score.py), results.json in the
published schema, report.md and plots; a second run reuses every finished run, and a run whose results are
missing is redone alone."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO_ROOT, subprocess_env

TIMEOUT = 600


def compare(out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "compare_adapters.py"), "--variants", "lora", "moslora",
           "--seeds", "0", "1", "--preset", "smoke", "--output_dir", str(out), "--jobs", "2", "--launcher", "python",
           *extra]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"study failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_smoke_study_runs_reports_and_resumes(tmp_path):
    out = tmp_path / "study"
    first = compare(out)
    progress = [line for line in first.stdout.splitlines() if line.startswith("[study] ") and "/6 " in line]
    assert len(progress) == 6 and "done" in progress[-1] and "ETA" in progress[0], first.stdout

    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"variants", "paired"} and list(results["variants"]) == ["lora", "moslora"]
    for name, variant in results["variants"].items():
        assert [run["seed"] for run in variant["runs"]] == [0, 1]
        metrics = variant["runs"][0]["metrics"]
        assert {"vqav2/overall", "gqa/overall", "all/exact_match", "combination/seen"} <= set(metrics)
        assert any(m.startswith("type/") for m in metrics)
        assert all(0.0 <= v <= 100.0 for v in metrics.values())
        for summary in variant["summary"].values():
            assert set(summary) >= {"mean", "std", "ci95"} and len(summary["ci95"]) == 2
        curve = variant["runs"][0]["loss_curve"]
        assert [step for step, _ in curve] == [1, 2, 3, 4]  # every stage-2 step, from the run's TensorBoard logs
    assert set(results["paired"]) == {"moslora"}
    assert all(set(v) >= {"mean_diff", "p_value"} for v in results["paired"]["moslora"].values())
    # The mixer adds r^2 = 64 trained numbers to each of the 28 adapted layers of the tiny LM.
    lora, moslora = (results["variants"][n]["trainable_params"] for n in ("lora", "moslora"))
    assert moslora - lora == 28 * 8 * 8
    assert sorted(p.name for p in (out / "stage1").iterdir()) == ["seed-0", "seed-1"]  # shared by both variants
    for run_dir in (out / "runs").glob("*/seed-*"):
        flags = json.loads((run_dir / "finetune" / "demo_stage.json").read_text())["flags"]
        seed = run_dir.name.split("-")[1]
        assert f"--seed={seed}" in flags and f"--pretrain_mm_mlp_adapter={out / 'stage1' / f'seed-{seed}'}" in flags
    report = (out / "report.md").read_text()
    assert "| `moslora` | 2 |" in report and "vqav2/overall" in report
    for plot in ("benchmarks.png", "question_types.png", "paired_differences.png", "loss_curves.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG" and f"]({plot})" in report

    # Rerun: everything is reused. Then a run that lost its results (killed before it wrote them) is redone alone,
    # from its finished training and answers (only the scorer runs again).
    second = compare(out)
    assert second.stdout.count(": reused |") == 6
    redone = out / "runs" / "moslora" / "seed-1"
    (redone / "metrics.json").unlink()
    commands = (redone / "run.log").read_text().count("$ ")
    third = compare(out)
    assert third.stdout.count(": reused |") == 5
    log = (redone / "run.log").read_text()
    assert log.count("scripts/finetune.py") == 1 and log.count("eval/run_vqa.py") == 2  # not run again
    assert log.count("$ ") == commands + 2  # the two scorers
    again = json.loads((out / "results.json").read_text())["variants"]
    assert [[r["metrics"] for r in v["runs"]] for v in again.values()] == \
        [[r["metrics"] for r in v["runs"]] for v in results["variants"].values()]
