"""Command line of scripts/compare_adapters.py: parse, check, run the study, write the report."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import pipeline
from . import variants as variants_module
from .runner import STUDY_PRESETS, DataSpec, Study, StudyConfig
from .variants import VariantError, parse_variants

STAGES = ("pretrain", "finetune")

EPILOG = f"""variants: ADAPTER[:OPTION[=VALUE]]...
{variants_module.__doc__.split(chr(10), 2)[2]}
Each seed S: stage 1 once (shared by every variant), then per variant stage 2 with --seed S (adapter init and data
order), evaluation (eval/run_vqa.py) and scoring (eval/score.py) of every benchmark of the evaluation index.
Data: built-in (generated under OUTPUT_DIR/data) unless --data_path/--pretrain_data_path/--image_folder and
--eval_index are given. --lr_sweep trains each variant once per learning rate (seed --sweep_seed), scores it on a
validation set (built-in: another data seed; yours: --sweep_eval_index) and uses the best one for every seed.
Finished runs are reused: re-running the same command resumes a killed study.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare_adapters.py", allow_abbrev=False,
                                description="Compare adapter variants (LoRA, MoSLoRA and their options) over seeds "
                                            "through the real two-stage recipe; writes results.json, report.md and "
                                            "PNG plots.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["lora", "moslora"],
                   help="adapter variants (syntax below); the first is the reference of the paired tests")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--preset", choices=sorted(STUDY_PRESETS), default="demo",
                   help="demo: the demo's data and training settings; smoke: the smallest that still train")
    p.add_argument("--output_dir", type=Path, default=Path("outputs/adapter_study"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (a GPU fits many tiny runs at once)")
    p.add_argument("--launcher", choices=["auto", "deepspeed", "python"], default="auto",
                   help="how training starts (auto: the deepspeed launcher when installed)")
    p.add_argument("--lr_sweep", nargs="+", type=float, default=[], metavar="LR",
                   help="stage-2 learning rates tried for every variant (same budget for each)")
    p.add_argument("--sweep_seed", type=int, default=1000)
    p.add_argument("--select_metric", default=None,
                   help="metric that picks the learning rate (default: all/exact_match, else the first benchmark)")
    m = p.add_argument_group("backbones (default: the demo's pretrained tiny LM and tower)")
    m.add_argument("--model_name_or_path", default=pipeline.BACKBONES["model_name_or_path"])
    m.add_argument("--vision_tower", default=pipeline.BACKBONES["vision_tower"])
    m.add_argument("--mm_vision_select_layer", type=int, default=pipeline.BACKBONES["mm_vision_select_layer"])
    d = p.add_argument_group("your own data (default: the built-in data)")
    d.add_argument("--pretrain_data_path", type=Path, help="stage-1 LLaVA JSON")
    d.add_argument("--data_path", type=Path, help="stage-2 LLaVA JSON")
    d.add_argument("--image_folder", type=Path)
    d.add_argument("--eval_index", type=Path,
                   help="evaluation index JSON, as OUTPUT_DIR/data/eval/index.json: {\"benchmarks\": {NAME: "
                        "{\"benchmark\": SCORER, \"question_file\", \"annotation_files\": [...], \"split_file\"?}}} "
                        "with paths relative to the folder above the index's folder")
    d.add_argument("--sweep_eval_index", type=Path, help="validation index for --lr_sweep with --eval_index")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FLAG=VALUE", dest="overrides",
                   help="change a preset's training flag, e.g. --set finetune.max_steps=200 --set finetune.bf16=True")
    p.add_argument("--report_only", action="store_true",
                   help="start nothing: write the report from the runs finished so far")
    return p


def parse_override(text: str) -> tuple[str, str, object]:
    stage_flag, has_value, value = text.partition("=")
    stage, _, flag = stage_flag.partition(".")
    if not has_value or stage not in STAGES or not flag:
        raise ValueError(f"--set {text!r}: expected STAGE.FLAG=VALUE with STAGE one of {STAGES}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return stage, flag, parsed


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """A StudyConfig, or ValueError naming the bad flag."""
    variants = parse_variants(args.variants)
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds {args.seeds}: a seed is listed twice")
    if args.jobs < 1:
        raise ValueError("--jobs must be >= 1")
    if any(not lr > 0 for lr in args.lr_sweep) or len(set(args.lr_sweep)) != len(args.lr_sweep):
        raise ValueError(f"--lr_sweep {args.lr_sweep}: learning rates must be positive and distinct")
    overrides = {stage: {} for stage in STAGES}
    for text in args.overrides:
        stage, flag, value = parse_override(text)
        overrides[stage][flag] = value
    if {"seed", "adapter"} & overrides["finetune"].keys() | {"seed"} & overrides["pretrain"].keys():
        raise ValueError("--set cannot change seed or adapter: use --seeds and --variants")
    own = [args.pretrain_data_path, args.data_path, args.image_folder]
    data = None
    if any(own) or args.eval_index:
        if not all(own) or not args.eval_index:
            raise ValueError("your own data needs --pretrain_data_path, --data_path, --image_folder and --eval_index "
                             "together")
        if args.lr_sweep and not args.sweep_eval_index:
            raise ValueError("--lr_sweep with --eval_index needs --sweep_eval_index (a validation set, so that the "
                             "learning rate is not picked on the test set)")
        for flag, path in (("--pretrain_data_path", args.pretrain_data_path), ("--data_path", args.data_path),
                           ("--eval_index", args.eval_index), ("--sweep_eval_index", args.sweep_eval_index)):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if not args.image_folder.is_dir():
            raise ValueError(f"--image_folder {args.image_folder}: no such folder")
        for flag, index in (("--eval_index", args.eval_index), ("--sweep_eval_index", args.sweep_eval_index)):
            if index is not None:
                check_index(flag, index)
        sweep_index = args.sweep_eval_index.resolve() if args.sweep_eval_index else None
        data = DataSpec(args.pretrain_data_path.resolve(), args.data_path.resolve(), args.image_folder.resolve(),
                        args.eval_index.resolve(), args.eval_index.resolve().parent.parent, sweep_index,
                        sweep_index.parent.parent if sweep_index else None)
    elif args.sweep_eval_index:
        raise ValueError("--sweep_eval_index goes with --eval_index (the built-in data has its own validation set)")
    backbones = {"model_name_or_path": args.model_name_or_path, "vision_tower": args.vision_tower,
                 "mm_vision_select_layer": args.mm_vision_select_layer}
    return StudyConfig(variants=variants, seeds=args.seeds, output_dir=args.output_dir, preset=args.preset,
                       lr_sweep=args.lr_sweep, sweep_seed=args.sweep_seed, select_metric=args.select_metric,
                       jobs=args.jobs, launcher=args.launcher, backbones=backbones, overrides=overrides, data=data)


def check_index(flag: str, index_file: Path) -> None:
    try:
        index = json.loads(index_file.read_text())
        benchmarks = index["benchmarks"]
        if not isinstance(benchmarks, dict) or not benchmarks:
            raise KeyError
        root = index_file.resolve().parent.parent
        for name, info in benchmarks.items():
            for path in [info["question_file"], *info["annotation_files"]]:
                if not (root / path).exists():
                    raise ValueError(f"{flag} {index_file}: benchmark {name}: {root / path} does not exist")
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {index_file}: not JSON ({err.msg})") from None
    except (KeyError, TypeError):
        raise ValueError(f"{flag} {index_file}: expected {{\"benchmarks\": {{NAME: {{\"benchmark\", "
                         f"\"question_file\", \"annotation_files\"}}}}}}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, VariantError) as err:
        parser.error(str(err))
    from .report import write_report

    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    study = Study(config, execute=not args.report_only)
    try:
        results = study.run()
    except (ValueError, OSError) as err:  # e.g. a params= rank on a model whose config cannot be read
        print(f"error: {err}", file=sys.stderr)
        return 1
    data = write_report(study, results, out.resolve())
    missing = [i for i in data["incomplete"] if i["kind"] == "run"]
    print(f"[study] report: {out / 'report.md'}, {out / 'results.json'}"
          + (f"; {len(missing)} runs not finished (listed in the report)" if missing else ""), flush=True)
    return 1 if missing and not args.report_only else 0
