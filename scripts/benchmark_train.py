"""Training-speed benchmark (not a test): our real training step at LLaVA-1.5-7B's shape with random weights.

    python scripts/benchmark_train.py --adapter moslora --lora_r 128 --batch 16 --seq 1025 --gradient_checkpointing
    python scripts/benchmark_train.py --lengths mix665k --packing both --batch 16 --rows 8 --gradient_checkpointing
    deepspeed --num_gpus 2 scripts/benchmark_train.py --deepspeed deepspeed_configs/zero2.json ...
    # the MoSLoRA paper's QLoRA setup: 4-bit NF4 LM + MoSLoRA r128 on it + tower MoSLoRA r64, batch 16 then 4
    python scripts/benchmark_train.py --bits 4 --vision_adapter moslora --gradient_checkpointing --batch 16,4
    # Liger Kernel (on by default on a GPU with liger-kernel installed) against the plain kernels: one process each,
    # since Liger patches the LM family's RoPE process-wide
    python scripts/benchmark_train.py --use_liger_kernel true; python scripts/benchmark_train.py --use_liger_kernel false
    # torch.compile of each decoder layer (scripts/finetune.py --torch_compile) against the eager layers; more warmup
    # steps, since the first ones compile
    python scripts/benchmark_train.py --adapter moslora --batch 8 --text-tokens 448 --use_liger_kernel true --torch_compile
    # memory regimes: the fewest checkpointed decoder layers that fit a peak of 80 / 40 GiB (on any larger card)
    python scripts/benchmark_train.py --activation_memory_budget_gib auto --memory_limit_gib 80
    python scripts/benchmark_train.py --checkpoint_layers 12      # a fixed policy: the first 12 of 32 layers

Builds the stack (LLaMA-2-7B-shaped LM, open_clip ViT-L-14-336, mlp2x_gelu), injects the adapter, wraps it in the
same DeepSpeed engine and runs the same micro-step as scripts/finetune.py (mm_moslora.train.engine), on a fixed
synthetic batch of 1 + 576 image + TEXT tokens per sample. Prints one JSON line per batch size: median step
seconds, tokens/s (per GPU), model TFLOP/s (6N per token with checkpointing, 4N without, plus the vision forward,
as shared/bench/peer_llava_peft.py counts), peak GiB, and the loss of every step (the same batch each step, so a
training step that works makes it fall). Compare with the peer only within one device call.
--bits 4|8 quantizes the LM as scripts/finetune.py --bits does (mm_moslora.model.quantize); --vision_adapter adds
adapters to the tower (with --gradient_checkpointing the tower's blocks are checkpointed too, as in training).
--activation_memory_budget_gib and --checkpoint_layers choose the policy as training does
(mm_moslora/train/activation_memory.py); the BENCH line then gives the layers checkpointed, the budget, the
predicted activations, what was allocated after the first step (weights, gradients, optimizer states) and the peak.

`--lengths mix665k` draws the samples' lengths from a LLaVA-1.5 mix665k-like distribution (MIX665K below) and
batches them as training does: padded batches of --batch samples in the modality-grouped order, or (--packing)
--rows rows of --max_length tokens filled by the packing order, attention through FlashAttention varlen on a GPU.
It then reports samples/s over the timed steps (--packing both: one line each, same model, same samples) and, for
packing, the largest difference between the packed and the padded loss of the same samples (dropout off).
"""
import argparse
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mm_moslora.adapters import AdapterConfig, dropout_kernels, inject_adapters  # noqa: E402
from mm_moslora.data.collate import collate, collate_packed, epoch_batches, packed_epoch_batches  # noqa: E402
from mm_moslora.errors import InputError  # noqa: E402
from mm_moslora.model import packed_attention  # noqa: E402
from mm_moslora.model.build import TINY_DIR, build_model  # noqa: E402
from mm_moslora.model.fused_kernels import LigerKernelError, apply_liger_kernel, resolve_use_liger_kernel  # noqa: E402
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID  # noqa: E402
from mm_moslora.model.quantize import check_quantized_training, quantize_linears  # noqa: E402
from mm_moslora.train.activation_memory import CheckpointingPlanner  # noqa: E402
from mm_moslora.train.args import budget_gib  # noqa: E402
from mm_moslora.train.engine import MODEL_INPUTS, build_engine, model_inputs, train_micro_step  # noqa: E402
from mm_moslora.train.recipe import init_distributed  # noqa: E402
from mm_moslora.train.torch_compile import check_torch_compile, compile_counters, compile_decoder_layers  # noqa: E402

LLM_PRESETS = {
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-tiny": dict(model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=688,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096, tie_word_embeddings=False),
}


# LLaVA-1.5's mix665k, roughly (Liu et al. 2023, table 7; LLaVA-1.5 merges the QA pairs of one image): share of
# samples, whether they have an image, and the range of their text tokens (drawn log-uniformly).
MIX665K = (
    (0.60, True, (12, 90)),      # single-turn VQA (VQAv2, GQA, OCR-VQA, OKVQA, A-OKVQA, RefCOCO, VG): short
    (0.20, True, (100, 1400)),   # multi-turn conversations about one image (LLaVA-Instruct, merged VQA)
    (0.10, True, (150, 450)),    # detailed descriptions and complex reasoning
    (0.10, False, (40, 2048)),   # text-only ShareGPT chats
)


def mix665k_lengths(n: int, n_image_tokens: int, max_length: int, seed: int = 0) -> list[int]:
    """Signed sample lengths (positive with an image, as data.dataset gives them), truncated to max_length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        share, image, (low, high) = rng.choices(MIX665K, weights=[m[0] for m in MIX665K])[0]
        text = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        length = min(max_length, 1 + (n_image_tokens if image else 0) + text)
        out.append(length if image else -length)
    return out


def synthetic_sample(length: int, n_image_tokens: int, image_size: int, bos: int, gen: torch.Generator) -> dict:
    """A sample of |length| tokens: BOS, the image's positions (length > 0), text; the second half supervised."""
    n = abs(length)
    ids = torch.randint(100, 700, (n,), generator=gen)
    ids[0] = bos
    n_img = n_image_tokens if length > 0 else 0
    ids[1:1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:1 + n_img + (n - 1 - n_img) // 2] = -100
    pixels = torch.randn(1, 3, image_size, image_size, generator=gen) if n_img else None
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def config_only_model_dir(preset: str) -> str:
    """A folder with a config.json (and the tiny tokenizer) that build_model can random-initialise."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{preset}-"))
    (folder / "config.json").write_text(json.dumps({**LLM_PRESETS[preset], "architectures": ["LlamaForCausalLM"]}))
    for f in TINY_DIR.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            (folder / f.name).write_bytes(f.read_bytes())
    return str(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="llama2-7b", choices=sorted(LLM_PRESETS))
    ap.add_argument("--vision_tower", default="ViT-L-14-336")
    ap.add_argument("--mm_projector_type", default="mlp2x_gelu")
    ap.add_argument("--adapter", default="moslora", choices=["moslora", "lora", "none"])
    ap.add_argument("--lora_r", type=int, default=128)
    ap.add_argument("--lora_alpha", type=float, default=256)
    ap.add_argument("--lora_dropout", type=float, default=0.05)
    ap.add_argument("--batch", default="16", help="per-GPU micro-batch; a comma-separated list runs each in turn "
                    "on the same model (peak memory measured per batch size)")
    ap.add_argument("--bits", type=int, default=16, choices=[4, 8, 16], help="quantize the LM (QLoRA)")
    ap.add_argument("--quant_type", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--no_double_quant", action="store_true")
    ap.add_argument("--vision_adapter", default="none", choices=["none", "moslora", "lora"])
    ap.add_argument("--vision_lora_r", type=int, default=64)
    ap.add_argument("--vision_lora_alpha", type=float, default=16)
    ap.add_argument("--learning_rate", type=float, default=1e-5)
    ap.add_argument("--text-tokens", type=int, default=448, help="text tokens per sample (after 1 + image tokens)")
    ap.add_argument("--seq", type=int, help="tokens per sample in all (1 + image tokens + text); overrides --text-tokens")
    ap.add_argument("--lengths", default="fixed", choices=["fixed", "mix665k"],
                    help="fixed: every sample --seq tokens; mix665k: LLaVA-1.5-like lengths (see MIX665K)")
    ap.add_argument("--packing", default="off", choices=["off", "on", "both"], help="with --lengths mix665k")
    ap.add_argument("--rows", type=int, default=8, help="packed rows per step (--packing)")
    ap.add_argument("--max_length", type=int, default=2048, help="--model_max_length: packed row / truncation length")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--activation_memory_budget_gib", type=budget_gib, metavar="GIB|auto",
                    help="as in training: the fewest checkpointed decoder layers whose activations fit GIB, or auto "
                         "(what the GPU, or --memory_limit_gib, leaves free after the first step)")
    ap.add_argument("--memory_limit_gib", type=float, help="with auto: budget as if the GPU had this much memory "
                    "(e.g. 80 or 40 on a larger card, for a peak <= 80 / 40 GiB regime)")
    ap.add_argument("--checkpoint_layers", type=int, metavar="K", help="a fixed policy: checkpoint the first K "
                    "decoder layers (and the tower's blocks when K > 0), to measure each policy's speed and memory")
    ap.add_argument("--dropout_kernel", default="off", choices=["on", "off", "both"],
                    help="the adapter's dropout inside Triton matmuls (adapters/dropout_kernels.py) or torch ops; "
                    "both: each batch size timed both ways on the same model, alternating")
    ap.add_argument("--use_liger_kernel", default="auto", choices=["auto", "true", "false"],
                    help="Liger Kernel's fused kernels, as scripts/finetune.py --use_liger_kernel (auto: on with CUDA, "
                         "liger-kernel installed and a supported LM)")
    ap.add_argument("--torch_compile", action="store_true",
                    help="compile each decoder layer, as scripts/finetune.py --torch_compile (after Liger); the BENCH "
                         "line then counts dynamo's graph breaks and graphs")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--deepspeed", default=str(Path(__file__).resolve().parent.parent / "deepspeed_configs" / "zero2.json"))
    ap.add_argument("--profile", metavar="DIR", help="after timing, profile one more step with torch.profiler and "
                    "write its op tables (by GPU and by CPU time) to DIR")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()

    batches = [int(b) for b in args.batch.split(",")]
    planned = args.activation_memory_budget_gib is not None or args.checkpoint_layers is not None
    if planned and (args.gradient_checkpointing or args.lengths != "fixed"):
        ap.error("--activation_memory_budget_gib / --checkpoint_layers choose the checkpointing of fixed-length "
                 "batches: not with --gradient_checkpointing or --lengths mix665k")
    if args.activation_memory_budget_gib is not None and args.checkpoint_layers is not None:
        ap.error("--activation_memory_budget_gib and --checkpoint_layers are exclusive")
    if args.memory_limit_gib is not None and args.activation_memory_budget_gib != "auto":
        ap.error("--memory_limit_gib goes with --activation_memory_budget_gib auto")
    if args.activation_memory_budget_gib == "auto" and args.warmup < 1:
        ap.error("--activation_memory_budget_gib auto decides after the first step: --warmup must be >= 1")
    try:
        check_torch_compile(args.torch_compile, bits=args.bits, packing=args.packing != "off",
                            zero_stage=json.loads(Path(args.deepspeed).read_text()).get("zero_optimization", {})
                            .get("stage", 0), dropout_kernel="true" if args.dropout_kernel != "off" else "false")
    except InputError as err:
        ap.error(str(err))
    rank, world_size, device = init_distributed()
    bf16 = args.dtype == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    check_quantized_training(args.bits, args.quant_type, device, zero_stage=2)
    model, tokenizer = build_model(config_only_model_dir(args.llm), args.vision_tower, None, -2, "patch",
                                   args.mm_projector_type, dtype, "sdpa", random_init_llm=True, init_device=device)
    model.llm.requires_grad_(False)
    n_llm = sum(p.numel() for p in model.llm.parameters())
    n_vis = sum(p.numel() for p in model.vision.parameters())
    if args.bits != 16:
        quantize_linears(model.llm, args.bits, args.quant_type, not args.no_double_quant, compute_dtype=dtype,
                         device=device)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    config = None
    if args.adapter != "none":
        torch.manual_seed(0)
        config = AdapterConfig(adapter=args.adapter, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
        inject_adapters(model.llm, config, dtype=dtype)
    if args.vision_adapter != "none":
        torch.manual_seed(1)
        model.vision.add_adapters(AdapterConfig(adapter=args.vision_adapter, r=args.vision_lora_r,
                                                alpha=args.vision_lora_alpha, dropout=args.lora_dropout), dtype=dtype)
    if args.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.vision_adapter != "none":
            model.vision.set_gradient_checkpointing(True)
    model.to(device)
    try:  # last, on the module tree that trains, as the recipe does
        liger = resolve_use_liger_kernel(args.use_liger_kernel, device, model.llm.config.model_type)
    except LigerKernelError as err:
        ap.error(str(err))
    if liger.on:
        apply_liger_kernel(model)
    args.liger = liger.on
    if rank == 0:
        print(f"Liger Kernel: {liger.describe()}", flush=True)
    if args.torch_compile:  # after Liger and checkpointing, as the recipe does; compiles at the first (warmup) step
        described = compile_decoder_layers(model.llm)
        if rank == 0:
            print(f"torch.compile of the decoder layers: {described}", flush=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_img = model.num_image_tokens
    if args.lengths == "mix665k":
        args.batch = batches[0]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        engine, _, _ = build_engine(model, deepspeed_config=args.deepspeed, learning_rate=args.learning_rate,
                                    total_steps=1000, micro_batch=args.batch, world_size=world_size, bf16=bf16,
                                    device=device)
        engine.train()
        if rank == 0:
            for line in mixed_length_benchmark(args, engine, model, tokenizer, device, world_size, rank, sync):
                print("BENCH " + json.dumps({**line, "adapter": args.adapter, "r": args.lora_r,
                                             "gc": args.gradient_checkpointing, "liger": args.liger,
                                             "torch_compile": args.torch_compile,
                                             "world_size": world_size,
                                             "zero_stage": engine.zero_optimization_stage(),
                                             "trainable_m": round(trainable / 1e6, 1)}), flush=True)
        else:
            mixed_length_benchmark(args, engine, model, tokenizer, device, world_size, rank, sync)
        return
    if args.packing != "off":
        ap.error("--packing needs --lengths mix665k (fixed-length samples leave nothing to pack)")
    if args.seq is not None:
        if args.seq < 2 + n_img:
            ap.error(f"--seq {args.seq}: a sample holds 1 + {n_img} image tokens and at least one text token")
        args.text_tokens = args.seq - 1 - n_img
    kernel_modes = ["on", "off"] if args.dropout_kernel == "both" else [args.dropout_kernel]
    for batch_size in batches:  # largest first: a later engine's peak can only include leftovers, never flatter
        run_batch(args, model, tokenizer, batch_size, rank, world_size, device, bf16, n_llm, n_vis, trainable,
                  kernel_modes)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_batch(args, model, tokenizer, batch_size, rank, world_size, device, bf16, n_llm, n_vis, trainable,
              kernel_modes=("on",)):
    """Time args.steps micro-steps (after args.warmup) at `batch_size` on a fresh engine; print one BENCH line per
    dropout-kernel mode (several modes share the engine: DeepSpeed allows one engine per model)."""
    args.batch = batch_size

    n_img = model.num_image_tokens
    seq = 1 + n_img + args.text_tokens
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(100, 700, (args.batch, seq), generator=gen)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, 1:1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + n_img] = -100
    size = model.vision.image_size
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(args.batch, 3, size, size, generator=gen),
             "n_samples": args.batch, "n_tokens": ids.numel()}
    planner = None  # measured on this batch before the engine exists, as training does
    if args.activation_memory_budget_gib is not None or args.checkpoint_layers is not None:
        model.train()
        planner = CheckpointingPlanner(model, args.activation_memory_budget_gib, device, args.memory_limit_gib)
        planner.measure(model_inputs(batch, device), args.batch, seq, every_batch_alike=True)
        planner.start() if args.checkpoint_layers is None else planner.fix(args.checkpoint_layers)
    engine, _, _ = build_engine(model, deepspeed_config=args.deepspeed, learning_rate=args.learning_rate,
                                total_steps=1000, micro_batch=batch_size, world_size=world_size, bf16=bf16,
                                device=device)
    engine.train()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for mode in kernel_modes:
        dropout_kernels.enabled = mode == "on"
        time_steps(args, engine, batch, tokenizer, rank, world_size, device, seq, n_img, n_llm, n_vis, trainable, sync,
                   planner)


def time_steps(args, engine, batch, tokenizer, rank, world_size, device, seq, n_img, n_llm, n_vis, trainable, sync,
               planner=None):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss, _, _ = train_micro_step(engine, batch, device, tokenizer.pad_token_id)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(round(float(loss), 4))  # after the sync: costs no extra wait
        if len(times) == 1:  # weights, gradients and optimizer states allocated; activations freed
            persistent = torch.cuda.memory_allocated() if device.type == "cuda" else None
            if planner:
                planner.after_first_step()  # `auto` decides (once per engine)
    steady = sorted(times[args.warmup:])
    step_s = steady[len(steady) // 2]
    recomputed = (planner.n_checkpointed / len(planner.layers) if planner else float(args.gradient_checkpointing))
    flops = (4 + 2 * recomputed) * n_llm * args.batch * seq + 2 * n_vis * args.batch * n_img
    result = {"adapter": args.adapter, "r": args.lora_r, "bits": args.bits,
              "dropout_kernel": dropout_kernels.enabled and args.lora_dropout > 0 and device.type == "cuda",
              "vision_adapter": args.vision_adapter, "vision_r": args.vision_lora_r if args.vision_adapter != "none"
              else None, "gc": args.gradient_checkpointing, "liger": args.liger,
              "torch_compile": compile_counters() if args.torch_compile else False, "batch": args.batch,
              "seq": seq, "world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
              "step_s": round(step_s, 4), "tok_s_per_gpu": round(args.batch * seq / step_s),
              "samples_s_per_gpu": round(args.batch / step_s, 2), "tflops_per_gpu": round(flops / step_s / 1e12, 1),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
              "trainable_m": round(trainable / 1e6, 1), "losses": losses}
    if planner:
        fields = planner.fields()
        result.update(ckpt_layers=planner.n_checkpointed, n_layers=len(planner.layers),
                      budget_gib=fields["budget_gib"], predicted_act_gib=fields["predicted_activations_gib"],
                      persistent_gib=None if persistent is None else round(persistent / 2**30, 1),
                      policy=planner.describe(torch.cuda.max_memory_allocated() if device.type == "cuda" else None))
    if rank == 0:
        print("BENCH " + json.dumps(result), flush=True)
    if args.profile:
        profile_step(lambda: train_micro_step(engine, batch, device, tokenizer.pad_token_id), sync,
                     Path(args.profile) / f"{args.adapter}-rank{rank}")


def mixed_length_benchmark(args, engine, model, tokenizer, device, world_size: int, rank: int, sync) -> list[dict]:
    """Time padded and/or packed steps over the same mix665k-like samples; one result dict per mode."""
    n_img, size = model.num_image_tokens, model.vision.image_size
    n_steps = args.warmup + args.steps
    lengths = mix665k_lengths(max(4000, 64 * args.batch * world_size * n_steps), n_img, args.max_length)
    gen = torch.Generator().manual_seed(rank)
    modes = ["off", "on"] if args.packing == "both" else [args.packing]
    results = []
    for mode in modes:
        if mode == "on":
            order = packed_epoch_batches(lengths, args.max_length, args.rows, world_size, seed=0, epoch=0)[:n_steps]
            batches = [collate_packed([{**synthetic_sample(lengths[i], n_img, size, tokenizer.bos_token_id, gen),
                                        "row": row} for row, i in step[rank]], tokenizer.pad_token_id)
                       for step in order]
            if device.type == "cuda":
                packed_attention.register()
                model.llm.set_attn_implementation(packed_attention.NAME)
        else:
            order = epoch_batches(lengths, args.batch, world_size, seed=0, epoch=0)[:n_steps]
            batches = [collate([synthetic_sample(lengths[i], n_img, size, tokenizer.bos_token_id, gen)
                                for i in step[rank]], tokenizer.pad_token_id) for step in order]
            model.llm.set_attn_implementation("sdpa")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for batch in batches:
            sync()
            start = time.perf_counter()
            train_micro_step(engine, batch, device, tokenizer.pad_token_id)
            sync()
            times.append(time.perf_counter() - start)
        timed = batches[args.warmup:]
        seconds = sum(times[args.warmup:])
        samples, tokens = sum(b["n_samples"] for b in timed), sum(b["n_tokens"] for b in timed)
        slots = sum(b["input_ids"].numel() for b in timed)
        result = {"lengths": "mix665k", "packing": mode == "on", "steps": len(timed),
                  "samples_per_step": round(samples / len(timed), 1), "step_s": round(seconds / len(timed), 4),
                  "samples_s_per_gpu": round(samples / seconds, 2), "tok_s_per_gpu": round(tokens / seconds),
                  "pad_fraction": round(1 - tokens / slots, 3),
                  "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None}
        if mode == "on":
            result["loss_diff_vs_padded"] = packed_loss_difference(model, order[0][rank], lengths, tokenizer, device)
            result["attention"] = model.llm.config._attn_implementation + (
                f" ({packed_attention.backend})" if packed_attention.backend else "")
        results.append(result)
    model.llm.set_attn_implementation("sdpa")
    return results


def packed_loss_difference(model, rows: list, lengths: list[int], tokenizer, device) -> float:
    """|packed loss - padded loss| of one packed batch's samples, dropout off: the packed path must not change it."""
    gen = torch.Generator().manual_seed(12345)
    samples = [synthetic_sample(lengths[i], model.num_image_tokens, model.vision.image_size, tokenizer.bos_token_id,
                                gen) for _, i in rows]
    packed = collate_packed([{**s, "row": row} for s, (row, _) in zip(samples, rows)], tokenizer.pad_token_id)
    padded = collate(samples, tokenizer.pad_token_id)
    attn = model.llm.config._attn_implementation
    model.eval()
    losses = []
    with torch.no_grad():
        for batch, implementation in ((packed, attn), (padded, "sdpa")):
            model.llm.set_attn_implementation(implementation)
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
                      if k in MODEL_INPUTS}
            losses.append(float(model(**inputs).loss))
    model.train()
    model.llm.set_attn_implementation(attn)
    return round(abs(losses[0] - losses[1]), 5)


def profile_step(step, sync, out: Path) -> None:
    """One step under torch.profiler -> out.cuda.txt / out.cpu.txt: op tables by self GPU / CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    out.parent.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    if torch.cuda.is_available():
        out.with_suffix(".cuda.txt").write_text(averages.table(sort_by="self_cuda_time_total", row_limit=60))
    out.with_suffix(".cpu.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=60))


if __name__ == "__main__":
    main()
