"""The adapter study's parts (mm_moslora/study): statistics against published values, variant syntax, parameter
matching from real widths, learning-rate selection, and the report built from given run results."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from scipy import stats as scipy_stats

from mm_moslora.study.cli import build_parser, config_from_args
from mm_moslora.study.params import adapted_layer_shapes, adapter_parameters, param_matched_lora_rank
from mm_moslora.study.report import PLOTS, write_report
from mm_moslora.study.runner import RunResult, Study, StudyConfig
from mm_moslora.study.stats import paired_test, summary
from mm_moslora.study.variants import VariantError, parse_variant, parse_variants
from tests.helpers import REPO_ROOT, subprocess_env

# Student's sleep data (Cushny & Peebles 1905): extra hours of sleep with two drugs, the same 10 patients.
# R: t.test(extra ~ group, data = sleep, paired = TRUE) -> t = -4.0621, df = 9, p-value = 0.002833,
# 95 % CI of the mean difference (group1 - group2) [-2.4598858, -0.7001142], mean difference -1.58.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_test_matches_the_published_sleep_data_result():
    result = paired_test(SLEEP_2, SLEEP_1)  # other - reference = group1 - group2
    assert result["n"] == 10
    assert result["mean_diff"] == pytest.approx(-1.58, abs=1e-12)
    assert result["t"] == pytest.approx(-4.0621, abs=5e-5)
    assert result["p_value"] == pytest.approx(0.002833, abs=5e-7)
    assert result["ci95"] == pytest.approx([-2.4598858, -0.7001142], abs=1e-6)
    assert result["p_value"] == pytest.approx(scipy_stats.ttest_rel(SLEEP_1, SLEEP_2).pvalue, rel=1e-12)


def test_summary_interval_uses_student_t():
    # 1..5: mean 3, sample std sqrt(2.5); t(0.975, 4) = 2.7764451 -> half width 2.7764451 * sqrt(2.5) / sqrt(5)
    result = summary([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451052 * math.sqrt(2.5) / math.sqrt(5)
    assert result["mean"] == 3.0 and result["std"] == pytest.approx(math.sqrt(2.5))
    assert result["ci95"] == pytest.approx([3 - half, 3 + half], abs=1e-8)
    # R: t.test(sleep$extra[1:10])$conf.int -> [-0.5297804, 2.0297804]
    assert summary(SLEEP_1)["ci95"] == pytest.approx([-0.5297804, 2.0297804], abs=1e-6)


def test_degenerate_statistics_are_explicit():
    assert summary([]) == {"n": 0, "mean": None, "std": None, "ci95": None}
    assert summary([4.0]) == {"n": 1, "mean": 4.0, "std": None, "ci95": None}
    assert paired_test([1.0, 2.0], [1.0, 2.0])["p_value"] == 1.0  # no difference at all
    constant = paired_test([1.0, 2.0], [2.0, 3.0])  # the same difference every seed: undefined
    assert constant["p_value"] is None and constant["ci95"] is None and constant["mean_diff"] == 1.0
    assert paired_test([1.0], [2.0])["p_value"] is None
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([1.0, 2.0], [1.0])


def test_variant_syntax():
    assert parse_variant("lora").options == {}
    v = parse_variant("moslora:init=identity:freeze_mixer")
    assert v.adapter == "moslora" and v.options == {"init": "identity", "freeze_mixer": True}
    preset = {"lora_r": 64, "lora_alpha": 128}
    assert v.finetune_flags(preset) == {"adapter": "moslora", "mixer_init": "identity", "freeze_mixer": True}
    assert parse_variant("lora:r=80").finetune_flags(preset) == {"adapter": "lora", "lora_r": 80, "lora_alpha": 160.0}
    assert parse_variant("lora:r=80:alpha=16").finetune_flags(preset)["lora_alpha"] == 16.0
    assert parse_variant("lora:params=moslora").finetune_flags(preset, lambda r: r + 12)["lora_r"] == 76
    assert parse_variant("moslora:lr=5e-4").fixed_lr == 5e-4
    assert parse_variant("moslora:init=orthogonal").slug == "moslora_init=orthogonal"


@pytest.mark.parametrize("text,reason", [
    ("dora", "adapter must be one of"), ("lora:init=orthogonal", "moslora only"), ("lora:freeze_mixer", "moslora only"),
    ("moslora:init=uniform", "init must be one of"), ("lora:r=0", "positive integer"), ("lora:r=8.5", "positive integer"),
    ("moslora:rank=8", "unknown option 'rank'"), ("lora:r", "needs a value"), ("lora:r=8:r=16", "given twice"),
    ("moslora:params=moslora", "applies to lora"), ("lora:params=lora", "can only be 'moslora'"),
    ("moslora:freeze_mixer=no", "takes no value"), ("lora:dropout=1", "in [0, 1)")])
def test_bad_variants_name_the_variant_and_reason(text, reason):
    with pytest.raises(VariantError, match=re.escape(reason)) as err:
        parse_variant(text)
    assert repr(text) in str(err.value)


def test_duplicate_variants_are_refused():
    with pytest.raises(VariantError, match="listed twice"):
        parse_variants(["lora", "moslora", "lora"])


def test_param_matched_rank_from_real_widths():
    shapes = adapted_layer_shapes("tiny")
    assert len(shapes) == 4 * 7 and (128, 352) in shapes and (352, 128) in shapes  # 4 blocks x q,k,v,o,gate,up,down
    r = param_matched_lora_rank(shapes, 64)
    assert r == 76  # 64 + 7 * 64^2 / (4 * 128 + 3 * 480) per block = 75.6
    moslora = adapter_parameters(shapes, 64, mixer=True)
    assert abs(adapter_parameters(shapes, r, False) - moslora) <= abs(adapter_parameters(shapes, r + 1, False) - moslora)
    # LLaMA-7B's widths (4096, MLP 11008, 32 blocks): r = 128 -> 129 (the "about 130").
    llama = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    assert param_matched_lora_rank(llama * 32, 128) == 129


def parse(argv):
    return config_from_args(build_parser().parse_args(argv))


def test_cli_checks(tmp_path):
    with pytest.raises(ValueError, match="together"):
        parse(["--data_path", str(tmp_path / "x.json")])
    (tmp_path / "eval").mkdir()
    index = tmp_path / "eval" / "index.json"
    index.write_text(json.dumps({"benchmarks": {"vqav2": {"benchmark": "vqav2", "question_file": "q.jsonl",
                                                          "annotation_files": ["a.json"]}}}))
    (tmp_path / "p.json").write_text("[]")
    own = ["--pretrain_data_path", str(tmp_path / "p.json"), "--data_path", str(tmp_path / "p.json"),
           "--image_folder", str(tmp_path), "--eval_index", str(index)]
    with pytest.raises(ValueError, match="q.jsonl does not exist"):
        parse(own)
    (tmp_path / "q.jsonl").write_text("")
    (tmp_path / "a.json").write_text("{}")
    config = parse(own)
    assert config.data.eval_root == tmp_path.resolve() and not config.data.builtin
    with pytest.raises(ValueError, match="needs --sweep_eval_index"):
        parse([*own, "--lr_sweep", "1e-3", "2e-3"])
    with pytest.raises(ValueError, match="STAGE.FLAG=VALUE"):
        parse(["--set", "max_steps=3"])
    with pytest.raises(ValueError, match="cannot change seed"):
        parse(["--set", "finetune.seed=3"])
    assert parse(["--set", "finetune.max_steps=7", "--set", "finetune.bf16=true"]).overrides["finetune"] == \
        {"max_steps": 7, "bf16": True}


def test_cli_errors_are_one_line():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "compare_adapters.py"), "--variants", "lora",
                           "lora:init=zero"], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "variant 'lora:init=zero'" in proc.stderr.strip().splitlines()[-1]


def study(tmp_path, **kw) -> Study:
    config = StudyConfig(variants=parse_variants(["lora", "moslora", "lora:params=moslora"]), seeds=[0, 1, 2],
                         output_dir=tmp_path, preset="smoke", **kw)
    return Study(config, execute=False)


def test_learning_rate_selection_and_sweep_benchmarks(tmp_path):
    s = study(tmp_path, lr_sweep=[1e-3, 2e-3, 4e-3])
    sweep = [RunResult("sweep", 1000, "lora", lr, metrics={"all/exact_match": m}) for lr, m in
             ((1e-3, 50.0), (2e-3, 60.0), (4e-3, 60.0))]
    assert s.select_lr(sweep) == 2e-3  # a tie goes to the smaller learning rate
    sweep[1].error, sweep[1].metrics = "diverged", {}
    assert s.select_lr(sweep) == 4e-3  # a failed run loses
    sweep[0].missing = True
    assert s.select_lr(sweep) is None  # not every point known yet
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"benchmarks": {b: {} for b in ("vqav2", "pope", "gqa")}}))
    assert list(s.eval_index(index, "run")["benchmarks"]) == ["vqav2", "gqa"]  # the smoke preset's two
    s.config.select_metric = "gqa/overall"
    assert list(s.eval_index(index, "sweep")["benchmarks"]) == ["gqa"]  # a sweep answers what it is scored by


def test_param_matched_variant_trains_at_the_matched_rank(tmp_path):
    s = study(tmp_path)
    flags = s.finetune_flags(s.config.variants[2], seed=1, lr=1e-3)
    # smoke preset: r = 8 on the demo's LM -> 8 + 7 * 64 / 2464 per block = 8.18 -> 8; alpha follows r
    shapes = adapted_layer_shapes(s.config.backbones["model_name_or_path"])
    assert flags.get("lora_r", 8) == param_matched_lora_rank(shapes, 8)
    s.config.overrides["finetune"] = {"lora_r": 64, "lora_alpha": 128}
    flags = s.finetune_flags(s.config.variants[2], seed=1, lr=1e-3)
    assert flags["deepspeed"] == tmp_path.resolve() / "deepspeed_zero2_small_buckets.json"
    s.write_deepspeed_config()
    zero = json.loads(flags["deepspeed"].read_text())["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == "auto" and zero["allgather_bucket_size"] <= 2e7
    assert (flags["adapter"], flags["lora_r"], flags["lora_alpha"], flags["seed"]) == ("lora", 76, 152.0, 1)
    assert flags["pretrain_mm_mlp_adapter"] == tmp_path.resolve() / "stage1" / "seed-1"


def fake_results() -> dict:
    runs = []
    for seed in (0, 1, 2):
        for name, shift, params in (("lora", 0.0, 1000), ("moslora", 1.0 + seed, 1100), ("lora:params=moslora", 0.5, 1100)):
            metrics = {"vqav2/overall": 70.0 + seed + shift, "type/color": 90.0 - seed, "combination/held_out": 60.0}
            info = {"trainable_params": params, "wall_time_s": 30.0 + seed, "final_loss": 0.5 - 0.1 * seed,
                    "loss_curve": [[1, 2.0 + seed], [2, 1.0 + shift]], "max_abs_lora_B": 0.1}
            runs.append(RunResult("run", seed, name, 1e-3, metrics=metrics, info=info))
    runs.append(RunResult("run", 3, "moslora", 1e-3, error="run_vqa on pope failed (exit status 1)"))
    return {"stage1": [], "sweep": [], "runs": runs}


def test_report_from_run_results(tmp_path):
    s = study(tmp_path)
    data = write_report(s, fake_results(), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(data))
    lora, _ = data["variants"]["lora"], data["variants"]["moslora"]
    assert [r["seed"] for r in lora["runs"]] == [0, 1, 2] and lora["runs"][0]["metrics"]["vqav2/overall"] == 70.0
    assert set(lora["summary"]["vqav2/overall"]) >= {"mean", "std", "ci95"}
    assert lora["summary"]["vqav2/overall"]["mean"] == pytest.approx(71.0)
    assert lora["trainable_params"] == 1000 and lora["wall_time_s"]["mean"] == pytest.approx(31.0)
    # moslora - lora per seed: 1, 2, 3 on vqav2 -> mean 2, t = 2 / (1 / sqrt 3), df 2
    paired = data["paired"]["moslora"]["vqav2/overall"]
    assert paired["mean_diff"] == pytest.approx(2.0)
    assert paired["p_value"] == pytest.approx(2 * scipy_stats.t.sf(2 * math.sqrt(3), 2))
    assert data["paired"]["moslora"]["type/color"]["p_value"] == 1.0 and "lora" not in data["paired"]
    assert data["incomplete"] == [{"kind": "run", "variant": "moslora", "seed": 3, "learning_rate": 1e-3,
                                   "error": "run_vqa on pope failed (exit status 1)"}]
    report = (tmp_path / "report.md").read_text()
    assert "| vqav2/overall | 71.0 ± 1.0" in report and "Δ 2.0 [-0.5, 4.5], p 0.074" in report and "## Not finished" in report
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
