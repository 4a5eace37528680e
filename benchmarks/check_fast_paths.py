"""GPU check of the training step's fast paths (not a test): each one against the plain path, on CUDA.

    python benchmarks/check_fast_paths.py --out $OUT/fast_paths            # every variant; estimated < 3 min on one H100 (not yet run)
    python benchmarks/check_fast_paths.py --variants liger --no-curves     # the maths part of one variant only

A variant is a name and the flags of scripts/finetune.py that turn its fast path on (VARIANTS below); PLAIN turns
every fast path off. To check a new fast path, add its flag to train/args.py, apply it in
`mm_moslora.train.recipe.apply_fast_kernels` (which this script calls, as training does) and add one Variant here.
`--stage2-flags "..."` adds flags to every stage-2 run (e.g. "--lora_dropout 0.05": the demo trains without
dropout). The adapters' dropout kernels (--use_dropout_kernel, default false) are the same in every variant, PLAIN
included, so the maths part (p = 0.05) sees the same masks everywhere: they draw another random stream than torch's
dropout, so they are checked against the formulas with their own mask by benchmarks/check_dropout_kernels.py.
The compiled variants (--torch_compile) run the maths part with inductor's `fallback_random`, so that their dropout
masks come from torch's random stream as the plain path's do (training itself uses inductor's own stream).

1. Maths (one process per variant: Liger patches an LM family's RoPE process-wide). The loss and the gradient of
   every trainable tensor (MoSLoRA A, M, B with dropout 0.05, non-zero B; the projector) on one batch with images,
   a padded row and masked prompts, for two models: the demo's pretrained tiny backbones, and a random 2-layer LLaMA
   of LLaMA-2-7B's width (4096, MLP 11008, 32 heads, vocabulary 32,000) with the tiny tower. Compared with the plain
   path as max |difference| / max |plain gradient| per tensor (the worst tensor is printed with its max abs diff):
   - fp32 (TF32 off): the two paths differ by summation order only; PASS at <= 1e-4 (loss: <= 1e-5 relative).
   - bf16: PASS when no tensor differs from the plain bf16 path by more than 3x what the plain path itself differs
     between bf16 and fp32 (the rounding noise of bf16 on this batch; printed as "bf16 noise"). A wrong kernel or
     a bypassed adapter is off by order 1.
2. Loss curves: 50 optimizer steps of scripts/finetune.py as the demo runs stage 2 (mm_moslora.pipeline's flags
   and backbones, bf16, the demo data; the stage-1 projector from a short plain stage 1 shared by all), for the
   plain path (seed 42), each variant (seed 42) and two references: plain with seed 43 (other data order and
   adapter init: the run-to-run spread) and plain in fp32 (bf16's rounding drift). Prints the curves and the max
   |variant - plain| over the steps against both; "within bf16 noise" when it is <= 2x the fp32 drift.
The exit status is 1 when a check fails. Everything printed is also written to OUT/fast_paths.json.
`--dry-run` runs the plumbing on a CPU (the tiny model only, tiny batches, 3 steps); a variant that needs CUDA
(Liger) fails there with its one-line error, which is reported like any failure.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]  # flags of scripts/finetune.py; the maths part reads them with the same parser


PLAIN = Variant("plain", ("--use_liger_kernel", "false"))
VARIANTS = (
    Variant("liger", ("--use_liger_kernel", "true")),
    Variant("compile", ("--use_liger_kernel", "false", "--torch_compile")),
    Variant("liger_compile", ("--use_liger_kernel", "true", "--torch_compile")),
)

# The maths part's adapters (the training flags it parses with each variant's flags).
MATHS_FLAGS = ("--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05", "--seed", "42")
LLAMA_7B_WIDTH_2_LAYERS = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000,
                               hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                               num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                               tie_word_embeddings=False)
FP32_TOLERANCE, FP32_LOSS_TOLERANCE, BF16_NOISE_FACTOR = 1e-4, 1e-5, 3.0
CURVE_STEPS, STAGE1_STEPS, CURVE_NOISE_FACTOR = 50, 100, 2.0


# ---------------------------------------------------------------- 1. maths (child process: one variant)
def maths_models(work: Path, dry_run: bool = False) -> dict[str, dict]:
    """name -> build_model keyword arguments and the batch shape (samples, text tokens after 1 + image tokens)."""
    from mm_moslora.model.build import TINY_DIR
    from mm_moslora.pipeline import PRETRAINED_DIR

    wide = work / "llama-7b-width-2-layers"
    wide.mkdir(parents=True, exist_ok=True)
    (wide / "config.json").write_text(json.dumps(LLAMA_7B_WIDTH_2_LAYERS))
    for f in TINY_DIR.iterdir():
        if f.name.startswith("tokenizer"):
            (wide / f.name).write_bytes(f.read_bytes())
    tower = dict(vision_tower=str(PRETRAINED_DIR / "vision"), mm_vision_select_layer=-1)
    tiny = dict(build=dict(model_name_or_path=str(PRETRAINED_DIR / "lm"), **tower), batch=(8, 200))
    if dry_run:
        return {"tiny": {**tiny, "batch": (2, 16)}}
    return {"tiny": tiny, "llama-7b-width-2-layers": dict(build=dict(model_name_or_path=str(wide), random_init_llm=True,
                                                                     **tower), batch=(4, 448))}


def synthetic_batch(model, samples: int, text: int, device) -> dict:
    """BOS, the image's positions, random text; the prompt half unsupervised, row 1 padded at the end."""
    import torch

    from mm_moslora.model.mm_model import IMAGE_TOKEN_ID

    gen = torch.Generator().manual_seed(0)
    n_img = model.num_image_tokens
    vocab = model.llm.config.vocab_size
    ids = torch.randint(10, min(vocab, 700), (samples, 1 + n_img + text), generator=gen)
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + n_img + text // 2] = -100
    mask = torch.ones_like(ids)
    mask[1, -text // 4:] = 0
    labels[1, -text // 4:] = -100
    size = model.vision.image_size
    pixels = torch.randn(samples, 3, size, size, generator=gen)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels,
                                              pixel_values=pixels).items()}


def maths_child(variant: Variant, out: Path, dry_run: bool = False) -> None:
    """Loss and gradients of every trainable tensor, fp32 then bf16, for each model: torch.save'd to `out`."""
    import torch

    from mm_moslora.model.build import build_model
    from mm_moslora.train.args import parse_args
    from mm_moslora.train.recipe import apply_fast_kernels, set_trainable

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cpu" if dry_run else "cuda")
    args = parse_args("finetune", [*MATHS_FLAGS, *variant.flags])
    if args.torch_compile:  # torch's dropout stream in the compiled layers: the plain path's masks
        import torch._inductor.config

        torch._inductor.config.fallback_random = True
    results = {}
    for name, spec in maths_models(out.parent / "models", dry_run).items():
        torch.manual_seed(0)  # the projector's random init: the same in every variant's process
        model, _ = build_model(mm_projector_type="mlp2x_gelu", dtype=torch.float32, init_device=device,
                               **spec["build"])
        set_trainable(model, args, torch.float32)  # adapters as the recipe injects them (seeded by --seed)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("lora_B"):  # B = 0 would give A and M no gradient: nothing to compare
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        model.to(device).train()
        decision = apply_fast_kernels(model, args, device)
        batch = synthetic_batch(model, *spec["batch"], device)
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            torch.manual_seed(2)  # the same dropout masks in every variant
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, [p for _, p in named])
            results[f"{name}/{str(dtype).removeprefix('torch.')}"] = {
                "loss": loss.item(), "grads": {n: g.float().cpu() for (n, _), g in zip(named, grads)},
                "liger": decision.liger.describe(), "dropout_kernel": decision.dropout_kernel}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch.save(results, out)


def scale_relative(a, b) -> float:
    """max |a - b| / max |b| (b: the reference tensor)."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def worst(results: dict, reference: dict) -> tuple[str, float, float]:
    """(tensor, scale-relative diff, max abs diff) of the tensor that differs most."""
    rows = [(n, scale_relative(g, reference["grads"][n]), float((g - reference["grads"][n]).abs().max()))
            for n, g in results["grads"].items()]
    return max(rows, key=lambda r: r[1])


def compare_maths(plain: dict, variant: dict, name: str) -> tuple[list[str], bool]:
    """Report lines and whether every check passed, for one variant against the plain results."""
    lines, ok = [], True
    for key in plain:
        if not key.endswith("/float32"):
            continue
        model = key.split("/")[0]
        fp32, bf16 = f"{model}/float32", f"{model}/bfloat16"
        for dtype_key in (fp32, bf16):
            loss_rel = abs(variant[dtype_key]["loss"] - plain[dtype_key]["loss"]) / abs(plain[dtype_key]["loss"])
            tensor, rel, absolute = worst(variant[dtype_key], plain[dtype_key])
            if dtype_key == fp32:
                passed = rel <= FP32_TOLERANCE and loss_rel <= FP32_LOSS_TOLERANCE
                bound = f"tolerance {FP32_TOLERANCE:g} (loss {FP32_LOSS_TOLERANCE:g})"
            else:
                _, noise, _ = worst(plain[bf16], plain[fp32])  # the plain path's own bf16 rounding
                noise_loss = abs(plain[bf16]["loss"] - plain[fp32]["loss"]) / abs(plain[fp32]["loss"])
                passed = rel <= BF16_NOISE_FACTOR * noise and loss_rel <= BF16_NOISE_FACTOR * max(noise_loss, 1e-3)
                bound = (f"bf16 noise {noise:.2e} (loss {noise_loss:.2e}), tolerance {BF16_NOISE_FACTOR:g}x")
            ok &= passed
            lines.append(f"  {'PASS' if passed else 'FAIL'} {name} {dtype_key}: loss {plain[dtype_key]['loss']:.6f} "
                         f"-> {variant[dtype_key]['loss']:.6f} (rel {loss_rel:.2e}); worst gradient {tensor}: "
                         f"{rel:.2e} of its scale, max abs {absolute:.2e}; {bound}; "
                         f"{len(variant[dtype_key]['grads'])} tensors; Liger {variant[dtype_key]['liger']}")
    return lines, ok


# ---------------------------------------------------------------- 2. loss curves (scripts/finetune.py)
def child_env(threads: int = 2) -> dict:
    from mm_moslora.pipeline import subprocess_env

    return {**subprocess_env(threads), "PYTHONUNBUFFERED": "1"}


def stage_command(stage: str, out_dir: Path, data_dir: Path, steps: int, flags: dict, extra=()) -> list[str]:
    from mm_moslora.pipeline import PRESETS, stage_flags

    settings = {**PRESETS["full"][stage], "max_steps": steps, "report_to": "tensorboard", "logging_steps": 1,
                "bf16": True, **flags}
    data = data_dir / ("pretrain.json" if stage == "pretrain" else "finetune.json")
    return [sys.executable, str(REPO_ROOT / "scripts" / f"{stage}.py"), f"--data_path={data}",
            f"--image_folder={data_dir / 'images'}", f"--output_dir={out_dir}", *stage_flags(settings), *extra]


def losses(out_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / "runs")).Reload()
    return [e.value for e in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


def run_all(commands: dict[str, list[str]], logs: Path, timeout: float) -> dict[str, int]:
    """Run the commands side by side (small models: the GPU has room); {name: exit status}."""
    procs = {}
    for name, cmd in commands.items():
        handle = (logs / f"{name}.log").open("w")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(), stdout=handle,
                                        stderr=subprocess.STDOUT), handle)
    codes, deadline = {}, time.time() + timeout
    for name, (proc, handle) in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = proc.wait()
        handle.close()
    return codes


def tail(log: Path, n: int = 6) -> str:
    return "\n".join("      " + line for line in log.read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for logs and fast_paths.json (default: a temporary folder)")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                    help=f"comma-separated, of: {', '.join(v.name for v in VARIANTS)}")
    ap.add_argument("--no-maths", action="store_true")
    ap.add_argument("--no-curves", action="store_true")
    ap.add_argument("--steps", type=int, default=CURVE_STEPS, help="optimizer steps of each stage-2 run")
    ap.add_argument("--stage2-flags", default="", help="extra scripts/finetune.py flags for every stage-2 run")
    ap.add_argument("--dry-run", action="store_true", help="the plumbing on a CPU: tiny shapes, 3 steps")
    ap.add_argument("--maths-child", default=None, help=argparse.SUPPRESS)  # internal: NAME:RESULT_FILE
    args = ap.parse_args()
    by_name = {v.name: v for v in (PLAIN, *VARIANTS)}
    if args.maths_child:
        name, result_file = args.maths_child.split(":", 1)
        maths_child(by_name[name], Path(result_file), args.dry_run)
        return 0
    unknown = [n for n in args.variants.split(",") if n not in by_name or n == "plain"]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {[v.name for v in VARIANTS]}")
    variants = [by_name[n] for n in args.variants.split(",")]
    stage1_steps = STAGE1_STEPS
    if args.dry_run:
        args.steps, stage1_steps = 3, 3
    out = Path(args.out or tempfile.mkdtemp(prefix="fast_paths-"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    report, ok, start = {"variants": {v.name: list(v.flags) for v in variants}}, True, time.time()

    def say(line: str) -> None:
        print(line, flush=True)
        report.setdefault("lines", []).append(line)

    # Maths children start first and run beside the data, stage 1 and the curves.
    maths = {}
    if not args.no_maths:
        maths = {v.name: subprocess.Popen(
            [sys.executable, __file__, "--maths-child", f"{v.name}:{out / f'maths-{v.name}.pt'}",
             *(["--dry-run"] if args.dry_run else [])], cwd=REPO_ROOT,
            env=child_env(4), stdout=(out / "logs" / f"maths-{v.name}.log").open("w"), stderr=subprocess.STDOUT)
            for v in (PLAIN, *variants)}

    if not args.no_curves:
        from mm_moslora.pipeline import BACKBONES, prepare_data

        data_dir = out / "data"
        prepare_data(data_dir, {"seed": 0, "n_train": 32 * args.steps, "n_pretrain": 32 * stage1_steps, "n_eval": 8,
                                "image_size": 64}, fresh=False, progress=False)
        stage1 = out / "stage1"
        code = run_all({"stage1": stage_command("pretrain", stage1, data_dir, stage1_steps, {}, PLAIN.flags)},
                       out / "logs", 300)["stage1"]
        if code != 0:
            say(f"FAIL stage 1 (exit status {code}):\n{tail(out / 'logs' / 'stage1.log')}")
            return 1
        runs = {"plain": ({}, PLAIN.flags), "plain_seed43": ({"seed": 43}, PLAIN.flags),
                "plain_fp32": ({"bf16": False}, PLAIN.flags), **{v.name: ({}, v.flags) for v in variants}}
        commands = {name: stage_command("finetune", out / name, data_dir, args.steps,
                                        {"pretrain_mm_mlp_adapter": stage1, "adapter": "moslora", **flags},
                                        (*extra, *shlex.split(args.stage2_flags)))
                    for name, (flags, extra) in runs.items()}
        say(f"stage 2 ({args.steps} steps each, {BACKBONES['model_name_or_path']}): " + " ".join(commands["plain"]))
        codes = run_all(commands, out / "logs", 400)
        curves = {}
        for name, code in codes.items():
            if code != 0:
                say(f"FAIL {name} (exit status {code}):\n{tail(out / 'logs' / f'{name}.log')}")
                ok = False
                continue
            curves[name] = losses(out / name)
            summary = json.loads((out / name / "train_summary.json").read_text())
            say(f"  {name}: Liger Kernel {summary.get('liger_kernel')}, {summary['samples_per_second']} samples/s")
        report["curves"] = curves
        if "plain" in curves:
            plain = curves["plain"]
            say("step  " + "  ".join(f"{n:>12}" for n in curves))
            for step in sorted({0, *range(4, len(plain), 5), len(plain) - 1}):
                say(f"{step + 1:>4}  " + "  ".join(f"{c[step]:12.5f}" if step < len(c) else " " * 12
                                                   for c in curves.values()))

            def max_diff(name: str) -> float:
                return max(abs(a - b) for a, b in zip(curves[name], plain)) if name in curves else math.nan

            drift, spread = max_diff("plain_fp32"), max_diff("plain_seed43")
            say(f"references: max |plain fp32 - plain bf16| = {drift:.5f} (bf16 drift), max |seed 43 - seed 42| = "
                f"{spread:.5f} (run-to-run spread)")
            for v in variants:
                if v.name in curves:
                    diff = max_diff(v.name)
                    within = diff <= CURVE_NOISE_FACTOR * drift
                    ok &= within and len(curves[v.name]) == len(plain)
                    say(f"  {'PASS' if within else 'FAIL'} {v.name}: max |{v.name} - plain| = {diff:.5f} over "
                        f"{len(curves[v.name])} steps ({diff / drift if drift else math.inf:.2f}x the bf16 drift, "
                        f"{diff / spread if spread else math.inf:.2f}x the spread): "
                        f"{'within' if within else 'NOT within'} bf16 noise ({CURVE_NOISE_FACTOR:g}x drift)")

    if maths:
        import torch

        codes = {name: proc.wait(timeout=max(1.0, 420 - (time.time() - start))) for name, proc in maths.items()}
        for name, code in codes.items():
            if code != 0:
                say(f"FAIL maths {name} (exit status {code}):\n{tail(out / 'logs' / f'maths-{name}.log', 12)}")
                ok = False
        if codes.get("plain") == 0:
            plain = torch.load(out / "maths-plain.pt", weights_only=True)
            say("maths: loss and gradients against the plain path (worst tensor of each model and dtype)")
            for v in variants:
                if codes.get(v.name) == 0:
                    lines, passed = compare_maths(plain, torch.load(out / f"maths-{v.name}.pt", weights_only=True),
                                                  v.name)
                    for line in lines:
                        say(line)
                    ok &= passed
    say(f"{'ALL PASS' if ok else 'SOME CHECKS FAILED'} in {time.time() - start:.0f} s; logs in {out / 'logs'}")
    (out / "fast_paths.json").write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
