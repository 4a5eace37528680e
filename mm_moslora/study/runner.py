"""Run a study: K seeds x adapter variants through the real two-stage recipe, evaluation and scorers.

Layout of OUTPUT_DIR:
    data/, val_data/            the built-in data (test sets) and a validation set from another data seed (sweep)
    stage1/seed-S/              stage 1 of seed S, shared by every variant of that seed
    sweep/VARIANT/lr-LR/seed-S/ learning-rate sweep runs (evaluated on the validation set)
    runs/VARIANT/seed-S/        the study's runs: finetune/ (stage 2), eval/ (answers, scores), metrics.json, run.log
    results.json, report.md, *.png

A run is done when its metrics.json holds the same record (flags, data, learning rate); done runs are reused, so
a killed study resumes where it stopped. Stage 1 of a seed runs first; the runs of a variant wait for its sweep.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import pipeline
from .variants import Variant

STUDY_PRESETS: dict[str, dict] = {
    "demo": pipeline.PRESETS["full"],
    # The smallest settings that still train (the loss moves): for tests and dry runs of a study command. Two
    # benchmarks only: each answered set costs a process start (seconds on a small CPU).
    "smoke": {
        "benchmarks": ["vqav2", "gqa"],
        "data": {"seed": 0, "n_train": 48, "n_pretrain": 24, "n_eval": 4, "image_size": 64},
        "pretrain": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 2e-3},
        "finetune": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                     "mm_projector_lr": 3e-3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "eval_batch_size": 16,
    },
}
VALIDATION_DATA_SEED_OFFSET = 1000  # the sweep's validation scenes come from data seed + this
# Many runs share one GPU: zero2.json's fixed 5e8-element buckets cost each process ~7 GiB (two fp32 buffers with
# overlap_comm), so 16 runs at once ran out of an 80 GiB card. One process has nothing to reduce: small buckets.
STUDY_DEEPSPEED_FILE = "deepspeed_zero2_small_buckets.json"
SMALL_BUCKETS = {"reduce_bucket_size": "auto", "allgather_bucket_size": 20_000_000}


@dataclass
class DataSpec:
    """Where the study's data is. Built-in by default (generated under OUTPUT_DIR/data)."""

    pretrain_json: Path
    finetune_json: Path
    image_folder: Path
    eval_index: Path
    eval_root: Path
    sweep_eval_index: Path | None = None
    sweep_eval_root: Path | None = None
    builtin: bool = False

    def record(self) -> dict:
        return {k: str(v) for k, v in self.__dict__.items() if k != "builtin"}


@dataclass
class StudyConfig:
    variants: list[Variant]
    seeds: list[int]
    output_dir: Path
    preset: str = "demo"
    lr_sweep: list[float] = field(default_factory=list)
    sweep_seed: int = 1000
    select_metric: str | None = None
    jobs: int = 1
    launcher: str = "auto"
    backbones: dict = field(default_factory=lambda: dict(pipeline.BACKBONES))
    overrides: dict = field(default_factory=lambda: {"pretrain": {}, "finetune": {}})
    data: DataSpec | None = None

    def stage_settings(self, stage: str) -> dict:
        return {**STUDY_PRESETS[self.preset][stage], **self.overrides.get(stage, {})}


@dataclass
class RunResult:
    kind: str                  # "stage1" | "sweep" | "run"
    seed: int
    variant: str | None = None
    learning_rate: float | None = None
    metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    error: str | None = None
    reused: bool = False
    missing: bool = False      # not run: report-only mode, or what it needed failed


RESULT_GROUPS = {"stage1": "stage1", "sweep": "sweep", "run": "runs"}


class Progress:
    """One line per finished job, with an ETA from the pace of the jobs run so far (reused ones cost nothing)."""

    def __init__(self, total: int):
        self.total, self.done, self.ran, self.start = total, 0, 0, time.time()
        self.lock = threading.Lock()

    def finished(self, label: str, result: RunResult, seconds: float, headline: str | None) -> None:
        with self.lock:
            self.done += 1
            self.ran += not result.reused
            elapsed = time.time() - self.start
            left = self.total - self.done
            eta = f"ETA {_duration(elapsed / self.ran * left)}" if self.ran and left else ("done" if not left else "")
            what = ("reused" if result.reused else f"FAILED: {result.error.splitlines()[0][:160]}" if result.error
                    else f"{seconds:.0f} s" + (f", {headline}" if headline else ""))
            print(f"[study] {self.done}/{self.total} {label}: {what} | {_duration(elapsed)} elapsed, {eta}",
                  flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Study:
    def __init__(self, config: StudyConfig, execute: bool = True):
        """execute=False: start nothing, collect the runs that are done (for a report of a study in progress)."""
        self.config, self.execute = config, execute
        self.out = config.output_dir.resolve()
        self.preset = STUDY_PRESETS[config.preset]
        cpus = pipeline.usable_cpus()
        self.threads = max(1, cpus // max(1, config.jobs))
        self.env = pipeline.subprocess_env(self.threads)
        self.launcher = config.launcher
        if self.launcher == "auto":
            self.launcher = "deepspeed" if pipeline.deepspeed_launcher() else "python"
        self._rank_cache: dict[int, int] = {}
        self.deepspeed_config = self.out / STUDY_DEEPSPEED_FILE

    def write_deepspeed_config(self) -> None:
        """zero2.json with small ZeRO buckets (SMALL_BUCKETS), for every stage unless --set STAGE.deepspeed=..."""
        config = json.loads((pipeline.REPO_ROOT / "deepspeed_configs" / "zero2.json").read_text())
        config["zero_optimization"].update(SMALL_BUCKETS)
        text = json.dumps(config, indent=1) + "\n"
        if not self.deepspeed_config.is_file() or self.deepspeed_config.read_text() != text:
            self.out.mkdir(parents=True, exist_ok=True)
            self.deepspeed_config.write_text(text)

    # ------------------------------------------------------------ data
    def prepare_data(self) -> DataSpec:
        """The built-in data (and its validation set when sweeping), generated once; or the user's, as given."""
        spec = self.config.data
        if spec is not None and not spec.builtin:
            return spec
        settings = dict(self.preset["data"])
        data_dir, val_dir = self.out / "data", self.out / "val_data"
        status = pipeline.prepare_data(data_dir, settings, fresh=False, progress=False)
        print(f"[study] built-in data {data_dir}: {status}", flush=True)
        spec = DataSpec(data_dir / "pretrain.json", data_dir / "finetune.json", data_dir / "images",
                        data_dir / "eval" / "index.json", data_dir, builtin=True)
        if self.config.lr_sweep:
            val = {**settings, "seed": settings["seed"] + VALIDATION_DATA_SEED_OFFSET, "n_train": 0, "n_pretrain": 0}
            status = pipeline.prepare_data(val_dir, val, fresh=False, progress=False)
            print(f"[study] validation data for the learning-rate sweep {val_dir}: {status}", flush=True)
            spec.sweep_eval_index, spec.sweep_eval_root = val_dir / "eval" / "index.json", val_dir
        self.config.data = spec
        return spec

    # ------------------------------------------------------------ flags
    def param_matched_rank(self, r: int) -> int:
        if r not in self._rank_cache:
            from .params import adapted_layer_shapes, param_matched_lora_rank

            targets = self.config.stage_settings("finetune").get("lora_target_modules")
            if isinstance(targets, str) and "," in targets:
                targets = [t.strip() for t in targets.split(",")]
            shapes = adapted_layer_shapes(str(self.config.backbones["model_name_or_path"]), targets)
            self._rank_cache[r] = param_matched_lora_rank(shapes, r)
        return self._rank_cache[r]

    def stage1_flags(self, seed: int) -> dict:
        return {"deepspeed": self.deepspeed_config, **self.config.stage_settings("pretrain"), **self.config.backbones,
                "seed": seed}

    def finetune_flags(self, variant: Variant, seed: int, lr: float) -> dict:
        preset = self.config.stage_settings("finetune")
        return {"deepspeed": self.deepspeed_config, **preset, **self.config.backbones,
                **variant.finetune_flags(preset, self.param_matched_rank),
                "learning_rate": lr, "seed": seed, "report_to": "tensorboard",
                "pretrain_mm_mlp_adapter": self.stage1_dir(seed)}

    def stage1_dir(self, seed: int) -> Path:
        return self.out / "stage1" / f"seed-{seed}"

    def run_dir(self, kind: str, variant: Variant, seed: int, lr: float) -> Path:
        if kind == "sweep":
            return self.out / "sweep" / variant.slug / f"lr-{lr:g}" / f"seed-{seed}"
        return self.out / "runs" / variant.slug / f"seed-{seed}"

    # ------------------------------------------------------------ jobs
    def run_stage1(self, seed: int) -> RunResult:
        result = RunResult("stage1", seed)
        out_dir, flags = self.stage1_dir(seed), self.stage1_flags(seed)
        if pipeline.stage_complete(out_dir, flags):
            result.reused = True
            return result
        if not self.execute:
            result.error, result.missing = "not run", True
            return result
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        spec = self.config.data
        try:
            pipeline.train_stage("pretrain", out_dir, spec.pretrain_json, spec.image_folder, flags, self.launcher,
                                 self.env, log=out_dir / "run.log", echo=_to_log(out_dir / "run.log"))
        except pipeline.PipelineError as err:
            result.error = str(err)
        return result

    def run_finetune(self, kind: str, variant: Variant, seed: int, lr: float, stage1: Future) -> RunResult:
        """Stage 2 of one variant and seed, then its evaluation; reused when done with the same record."""
        result = RunResult(kind, seed, variant.name, lr)
        first = stage1.result()
        if first.error:
            result.error, result.missing = f"stage 1 of seed {seed} {'not run' if first.missing else 'failed'}", True
            return result
        run_dir = self.run_dir(kind, variant, seed, lr)
        flags = self.finetune_flags(variant, seed, lr)
        spec = self.config.data
        index_file, root = ((spec.sweep_eval_index, spec.sweep_eval_root) if kind == "sweep"
                            else (spec.eval_index, spec.eval_root))
        record = {"flags": pipeline.stage_flags(flags), "data": spec.record(), "eval_index": str(index_file),
                  "eval_batch_size": self.preset["eval_batch_size"]}
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            saved = json.loads(metrics_file.read_text())
            if saved.get("record") == record:
                result.metrics, result.info, result.reused = saved["metrics"], saved["info"], True
                return result
        if not self.execute:
            result.error, result.missing = "not run", True
            return result
        finetune_dir = run_dir / "finetune"
        if not pipeline.stage_complete(finetune_dir, flags):
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "run.log"
        echo = _to_log(log)
        start = time.time()
        try:
            train_seconds = 0.0
            if not pipeline.stage_complete(finetune_dir, flags):
                pipeline.train_stage("finetune", finetune_dir, spec.finetune_json, spec.image_folder, flags,
                                     self.launcher, self.env, log=log, echo=echo)
                train_seconds = time.time() - start
            index = self.eval_index(index_file, kind)
            workers = max(1, min(self.threads, len(index["benchmarks"])))
            evals = pipeline.evaluate(index, root, finetune_dir, run_dir / "eval", self.preset["eval_batch_size"],
                                      pipeline.subprocess_env(max(1, self.threads // workers)), workers,
                                      image_folder=_eval_images(index, root, spec), echo=echo)
        except pipeline.PipelineError as err:
            result.error = str(err)
            return result
        result.metrics = metrics_of(pipeline.summarize(evals))
        result.info = run_info(finetune_dir, train_seconds, time.time() - start)
        metrics_file.write_text(json.dumps({"record": record, "metrics": result.metrics, "info": result.info},
                                           indent=1) + "\n")
        return result

    # ------------------------------------------------------------ the whole study
    def run(self) -> dict:
        """Everything not done yet; returns {"stage1": [...], "sweep": [...], "runs": [...]} of RunResults."""
        cfg = self.config
        self.prepare_data()
        if self.execute:
            self.write_deepspeed_config()
        for variant in cfg.variants:  # a bad params= or target fails now, not after stage 1
            variant.finetune_flags(cfg.stage_settings("finetune"), self.param_matched_rank)
        sweep_seeds = [cfg.sweep_seed] if cfg.lr_sweep else []
        swept = [v for v in cfg.variants if cfg.lr_sweep and v.fixed_lr is None]
        seeds_needed = list(dict.fromkeys(sweep_seeds + cfg.seeds))
        total = len(seeds_needed) + len(swept) * len(cfg.lr_sweep) + len(cfg.variants) * len(cfg.seeds)
        progress = Progress(total)
        results: dict[str, list[RunResult]] = {"stage1": [], "sweep": [], "runs": []}

        def tracked(label, fn, *args):
            start = time.time()
            result = fn(*args)
            results[RESULT_GROUPS[result.kind]].append(result)
            if self.execute:
                progress.finished(label, result, time.time() - start, self.headline(result.metrics))
            return result

        def main_run(variant: Variant, seed: int, sweep_futures: list[Future], stage1: Future) -> RunResult:
            lr = variant.fixed_lr or cfg.stage_settings("finetune")["learning_rate"]
            if sweep_futures:
                lr = self.select_lr([f.result() for f in sweep_futures])
                if lr is None:
                    return RunResult("run", seed, variant.name, None, error="no sweep run finished", missing=True)
            return self.run_finetune("run", variant, seed, lr, stage1)

        if self.execute:
            print(f"[study] {len(cfg.variants)} variants x {len(cfg.seeds)} seeds"
              + (f", learning-rate sweep {cfg.lr_sweep} on seed {cfg.sweep_seed} for {len(swept)} variants"
                     if swept else "") + f": {total} jobs, {cfg.jobs} at a time, {self.threads} threads each, "
                  f"launcher {self.launcher} -> {self.out}", flush=True)
        # Submission order is the start order (FIFO): every job waits only on jobs submitted before it.
        with ThreadPoolExecutor(max_workers=max(1, cfg.jobs)) as pool:
            stage1 = {s: pool.submit(tracked, f"stage 1 seed {s}", self.run_stage1, s) for s in seeds_needed}
            sweeps = {v.name: [pool.submit(tracked, f"sweep {v.name} lr {lr:g}", self.run_finetune, "sweep", v,
                                           cfg.sweep_seed, lr, stage1[cfg.sweep_seed]) for lr in cfg.lr_sweep]
                      for v in swept}
            runs = [pool.submit(tracked, f"{v.name} seed {s}", main_run, v, s, sweeps.get(v.name, []), stage1[s])
                    for s in cfg.seeds for v in cfg.variants]
            for future in [*stage1.values(), *(f for fs in sweeps.values() for f in fs), *runs]:
                future.result()
        return results

    def eval_index(self, index_file: Path, kind: str) -> dict:
        """The benchmarks a run answers: the preset's (all by default); a sweep run scored by one benchmark's
        overall score answers that benchmark alone (the learning rate is picked by it, nothing else is read)."""
        index = json.loads(index_file.read_text())
        keep = self.preset.get("benchmarks") or list(index["benchmarks"])
        metric = self.config.select_metric or ""
        if kind == "sweep" and metric.endswith("/overall") and metric.split("/")[0] in index["benchmarks"]:
            keep = [metric.split("/")[0]]
        index["benchmarks"] = {k: v for k, v in index["benchmarks"].items() if k in keep}
        return index

    def headline(self, metrics: dict) -> str | None:
        name = self.selection_metric(metrics)
        return f"{name} {metrics[name]:.1f}" if name else None

    def selection_metric(self, metrics: dict) -> str | None:
        if self.config.select_metric:
            return self.config.select_metric if self.config.select_metric in metrics else None
        if "all/exact_match" in metrics:
            return "all/exact_match"
        return next((k for k in metrics if k.endswith("/overall")), None)

    def select_lr(self, sweep: list[RunResult]) -> float | None:
        """The swept learning rate with the best selection metric on the validation set (the smaller one on a
        tie); None when a sweep run is missing or none finished (a diverged learning rate just loses)."""
        if any(r.missing for r in sweep):
            return None
        scored = [(r.metrics.get(self.selection_metric(r.metrics) or "", float("-inf")), -r.learning_rate, r)
                  for r in sweep if not r.error]
        return max(scored, key=lambda item: item[:2])[2].learning_rate if scored else None


def _to_log(log: Path):
    def echo(message: str) -> None:
        with log.open("a") as f:
            f.write(message + "\n")
    return echo


def _eval_images(index: dict, root: Path, spec: DataSpec) -> Path:
    return root / index["image_folder"] if index.get("image_folder") else spec.image_folder


def metrics_of(summary: dict) -> dict[str, float]:
    """results.json metric names: BENCH/overall (official score), type/QTYPE, combination/held_out|seen and
    all/exact_match (exact match, %)."""
    metrics = {f"{name}/overall": row["model"] for name, row in summary["benchmarks"].items()}
    metrics.update({f"type/{t}": row["model_exact_match"] for t, row in summary["question_types"].items()})
    metrics.update({f"combination/{k}": row["model_exact_match"] for k, row in summary["combinations"].items()})
    if "model_exact_match" in summary["all_questions"]:
        metrics["all/exact_match"] = summary["all_questions"]["model_exact_match"]
    return metrics


def run_info(finetune_dir: Path, train_seconds: float, wall_seconds: float) -> dict:
    """Trainable adapter parameters, losses and times of a finished stage-2 run."""
    from .params import adapter_update_size, trainable_adapter_parameters

    summary = json.loads((finetune_dir / "train_summary.json").read_text())
    return {"trainable_params": trainable_adapter_parameters(finetune_dir),
            "max_abs_lora_B": adapter_update_size(finetune_dir),
            "final_loss": summary["final_loss"], "train_seconds": round(train_seconds, 1),
            "wall_time_s": round(wall_seconds, 1), "loss_curve": loss_curve(finetune_dir / "runs")}


def loss_curve(run_dir: Path) -> list[list[float]]:
    """[[step, loss], ...] from the run's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not run_dir.is_dir():
        return []
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    if "train/loss" not in events.Tags()["scalars"]:
        return []
    return [[e.step, round(e.value, 5)] for e in events.Scalars("train/loss")]
