"""Command-line flags of `scripts/pretrain.py` and `scripts/finetune.py`, named as in LLaVA.

Boolean flags accept LLaVA's `--bf16 True` spelling as well as a bare `--bf16`. Unknown flags are errors.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_DEMO_DIR = "outputs/demo_data"
DEFAULT_OUTPUT = {"pretrain": "outputs/pretrain-tiny", "finetune": "outputs/finetune-tiny"}
VERSION_TO_TEMPLATE = {"plain": "plain", "v1": "vicuna_v1", "vicuna_v1": "vicuna_v1", "llava_v1": "vicuna_v1",
                       "chat_template": "chat_template", "qwen_2": "chat_template", "llama3": "chat_template"}
# adapters.moslora.MIXER_INITS, repeated so that --help answers without importing torch (a test keeps them equal).
MIXER_INITS = ("kaiming", "orthogonal", "normal", "identity", "zero")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "deepspeed_configs"


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def budget_gib(value: str) -> float | str:
    """--activation_memory_budget_gib: a positive number of GiB, or `auto`."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB or auto, got {value!r}")
    return number


def build_parser(stage: str) -> argparse.ArgumentParser:
    """stage: "pretrain" (projector alignment) or "finetune" (MoSLoRA + projector)."""
    p = argparse.ArgumentParser(prog=f"{stage}.py", allow_abbrev=False,
                                description=f"mm_moslora stage {'1: projector alignment' if stage == 'pretrain' else '2: visual instruction tuning'}")
    flag = lambda name, default=False, help="": p.add_argument(  # noqa: E731
        name, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)
    m = p.add_argument_group("model")
    m.add_argument("--model_name_or_path", default="tiny", help="HF causal LM folder or hub id; 'tiny' = built-in")
    m.add_argument("--vision_tower", default="mm-tiny-vit",
                   help="open_clip arch, ARCH:PRETRAINED (tag or local file), hf-hub:ID or a local open_clip folder")
    m.add_argument("--mm_vision_select_layer", type=int, default=-2)
    m.add_argument("--mm_vision_select_feature", default="patch", choices=["patch", "cls_patch"])
    m.add_argument("--mm_projector_type", default="mlp2x_gelu")
    m.add_argument("--pretrain_mm_mlp_adapter", default=None,
                   help="stage-1 projector: our stage-1 output folder or its .safetensors, LLaVA's mm_projector.bin, or "
                        "xtuner's projector folder (config.json + model.safetensors)")
    m.add_argument("--attn_implementation", default="sdpa")
    flag("--tune_mm_mlp_adapter", stage == "pretrain", "train the projector (LLaVA's stage-1 flag)")
    flag("--freeze_mm_mlp_adapter", False, "keep the projector frozen")
    flag("--unfreeze_mm_vision_tower", False, "also train the vision tower")
    flag("--trust_remote_code", False)
    flag("--random_init_llm", False, "build the LM from MODEL_NAME_OR_PATH's config.json with random weights "
                                     "(benchmarks and smoke tests at a real model's shape, no weights needed)")
    a = p.add_argument_group("adapter (stage 2)")
    a.add_argument("--adapter", default="moslora", choices=["moslora", "lora"])
    a.add_argument("--lora_r", type=int, default=64 if stage == "finetune" else 0)
    a.add_argument("--lora_alpha", type=float, default=128)
    a.add_argument("--lora_dropout", type=float, default=0.05)
    a.add_argument("--mixer_init", default="kaiming", choices=list(MIXER_INITS),
                   help="initial MoSLoRA mixer M (the paper's ablation; zero does not train at all)")
    flag("--freeze_mixer", False, "keep the MoSLoRA mixer M at its initial value (still saved and exported)")
    flag("--use_rslora", False)
    a.add_argument("--lora_target_modules", default=None,
                   help="comma-separated module-name suffixes or one regex (default: q,k,v,o,gate,up,down projections)")
    v = p.add_argument_group("vision-tower adapter (stage 2; same layer, --mixer_init and --freeze_mixer as the LM's)")
    v.add_argument("--vision_adapter", default="none", choices=["none", "moslora", "lora"],
                   help="adapters on the frozen vision tower (the MoSLoRA paper: moslora, r 64, alpha 16)")
    v.add_argument("--vision_lora_r", type=int, default=64)
    v.add_argument("--vision_lora_alpha", type=float, default=16)
    v.add_argument("--vision_lora_dropout", type=float, default=0.05)
    v.add_argument("--vision_lora_target_modules", default=None,
                   help="comma-separated suffixes or one regex over the tower's module names (default: every linear "
                        "map of the kept blocks: attn.q_proj/k_proj/v_proj (the packed in_proj, split), "
                        "attn.out_proj, mlp.c_fc, mlp.c_proj)")
    q = p.add_argument_group("quantized base LM (QLoRA; LLaVA's flags)")
    q.add_argument("--bits", type=int, default=16, choices=[4, 8, 16],
                   help="load the frozen LM's linear layers in 4 or 8 bits (bitsandbytes); 16 = not quantized")
    q.add_argument("--quant_type", default="nf4", choices=["nf4", "fp4"], help="4-bit data type")
    flag("--double_quant", True, "4-bit: also quantize the quantization constants (QLoRA's double quantization)")
    d = p.add_argument_group("data")
    d.add_argument("--data_path", default=None,
                   help="JSON/JSONL, Parquet file or folder, datasets save_to_disk folder or hub-layout folder, with "
                        "LLaVA, ShareGPT, OpenAI-messages or cauldron records (detected); a .yaml file is a "
                        "mixture (default: the built-in demo data)")
    d.add_argument("--data_mixture", default=None, metavar="MIX.yaml",
                   help="several sources with sampling ratios or sample counts (see mm_moslora/data/mixture.py)")
    d.add_argument("--image_folder", default=None)
    flag("--allow_images_outside_folder", False, "let image paths leave --image_folder (absolute paths, symlinks "
                                                 "to elsewhere); refused by default")
    d.add_argument("--image_aspect_ratio", default="pad", choices=["pad", "square", "resize"])
    d.add_argument("--version", "--conv_mode", dest="version", default="plain" if stage == "pretrain" else "chat_template",
                   help=f"conversation template: {sorted(VERSION_TO_TEMPLATE)}")
    d.add_argument("--model_max_length", type=int, default=2048)
    flag("--group_by_modality_length", True)
    flag("--skip_bad_samples", False, "train on the good records instead of stopping at bad ones")
    flag("--packing", False, "pack several samples into each sequence of --model_max_length tokens (each attends "
                             "only to itself); --per_device_train_batch_size then counts packed rows")
    flag("--lazy_preprocess", True, "accepted for LLaVA compatibility (data is always tokenized lazily)")
    d.add_argument("--dataloader_num_workers", type=int, default=0)
    t = p.add_argument_group("training")
    t.add_argument("--output_dir", default=DEFAULT_OUTPUT[stage])
    t.add_argument("--deepspeed", default=str(CONFIG_DIR / "zero2.json"), help="DeepSpeed JSON config")
    t.add_argument("--num_train_epochs", type=float, default=1.0)
    t.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --num_train_epochs when > 0")
    t.add_argument("--per_device_train_batch_size", type=int, default=16)
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--learning_rate", type=float, default=1e-3 if stage == "pretrain" else 2e-4)
    t.add_argument("--mm_projector_lr", type=float, default=None)
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--warmup_ratio", type=float, default=0.03)
    t.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant"])
    t.add_argument("--max_grad_norm", type=float, default=1.0)
    flag("--gradient_checkpointing", None, "recompute every decoder layer's activations in backward (LLaVA's flag; "
         "default False)")
    t.add_argument("--activation_memory_budget_gib", type=budget_gib, default=None, metavar="GIB|auto",
                   help="checkpoint as few decoder layers as fit the LM's activations into GIB (the activations "
                        "only, measured on the first micro-batch and scaled to the largest one), or `auto`: what a "
                        "GPU has free after the first optimizer step; the choice is logged and in the summary")
    t.add_argument("--use_liger_kernel", type=str.lower, nargs="?", const="true", default="auto",
                   choices=["auto", "true", "false"],
                   help="Liger Kernel's fused RoPE, RMSNorm, SwiGLU/GeGLU and linear cross-entropy (pip install "
                        "'mm_moslora[speed]'); auto = on with a CUDA device, liger-kernel installed and an LM family "
                        "it supports; true where it cannot run is an error")
    t.add_argument("--use_dropout_kernel", type=str.lower, nargs="?", const="true", default="false",
                   choices=["auto", "true", "false"],
                   help="the adapters' dropout drawn inside Triton matmuls (no dropped-out copy of the input is "
                        "written; same maths, another random stream than torch's dropout); auto = on with a CUDA "
                        "device and Triton; true where it cannot run is an error. Default false: slower than "
                        "torch's path at LLaVA-7B's shape on an H100 (docs/benchmarks.md)")
    flag("--torch_compile", False, "compile each decoder layer of the LM with torch.compile (inductor), after the "
         "adapters, Liger and checkpointing are in place; the first steps are slower (compilation). Not with --bits "
         "4/8, ZeRO-3, --packing or --use_dropout_kernel true")
    flag("--bf16", False)
    flag("--fp16", False)
    flag("--tf32", False)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--save_steps", type=int, default=500, help="checkpoint every N optimizer steps (0 = only at the end)")
    t.add_argument("--save_strategy", default="steps", choices=["steps", "no"])
    t.add_argument("--save_total_limit", type=int, default=2)
    t.add_argument("--logging_steps", type=int, default=1)
    t.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"])
    flag("--resume", True, "continue from OUTPUT_DIR/checkpoints/latest when it exists")
    t.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def parse_args(stage: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(stage)
    args = parser.parse_args(argv)
    if args.version not in VERSION_TO_TEMPLATE:
        parser.error(f"--version {args.version!r}: choose one of {sorted(VERSION_TO_TEMPLATE)}")
    args.template = VERSION_TO_TEMPLATE[args.version]
    if args.bf16 and args.fp16:
        parser.error("--bf16 and --fp16 are exclusive")
    if args.adapter == "lora" and (args.mixer_init != "kaiming" or args.freeze_mixer):
        parser.error("--mixer_init and --freeze_mixer apply to --adapter moslora only: LoRA has no mixer")
    if stage == "finetune" and args.lora_r <= 0:
        parser.error("--lora_r must be positive for finetuning")
    if args.vision_adapter != "none":
        if stage != "finetune":
            parser.error("--vision_adapter applies to stage 2 (finetune.py): stage 1 trains the projector only")
        if args.unfreeze_mm_vision_tower:
            parser.error("--vision_adapter and --unfreeze_mm_vision_tower are exclusive: tune the tower by its "
                         "adapters or fully, not both")
        if args.vision_lora_r <= 0 or args.vision_lora_alpha <= 0 or not 0 <= args.vision_lora_dropout < 1:
            parser.error("--vision_lora_r and --vision_lora_alpha must be positive, --vision_lora_dropout in [0, 1)")
        if args.vision_adapter == "lora" and (args.mixer_init != "kaiming" or args.freeze_mixer):
            parser.error("--mixer_init and --freeze_mixer apply to MoSLoRA only: --vision_adapter lora has no mixer")
    if args.activation_memory_budget_gib is not None and args.gradient_checkpointing is False:
        parser.error("--gradient_checkpointing False and --activation_memory_budget_gib contradict each other: the "
                     "budget chooses which decoder layers are checkpointed; give one of them")
    args.gradient_checkpointing = bool(args.gradient_checkpointing)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.data_path and Path(args.data_path).suffix.lower() in (".yaml", ".yml"):
        if args.data_mixture:
            parser.error("--data_path is a mixture file and --data_mixture is given too: give one")
        args.data_mixture, args.data_path = args.data_path, None  # LLaVA-NeXT passes mixtures as --data_path
    if args.data_path and args.data_mixture:
        parser.error("--data_path and --data_mixture are exclusive (list every source in the mixture file)")
    if args.save_strategy == "no":
        args.save_steps = 0
    args.stage = stage
    return args
