"""The two-stage training recipe, read top to bottom: setup -> data -> model -> engine -> loop -> save.

Stage "pretrain" trains the projector with the LLM frozen (LLaVA stage 1, `plain` template).
Stage "finetune" injects MoSLoRA (or LoRA) into the LLM and trains it with the projector (stage 2).
Runs under the `deepspeed` launcher (one process per GPU) or as a plain single `python` process.
"""
from __future__ import annotations

import argparse
import functools
import dataclasses
import json
import logging
import math
import os
import re
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..adapters import AdapterConfig, dropout_kernels, format_parameter_report, inject_adapters
from ..checkpoint import config_for_model, save_inference_files
from ..data.collate import collate, collate_packed, epoch_batches, packed_epoch_batches
from ..data.dataset import InstructionDataset
from ..data.images import ImageProcessor, allow_images_outside_folder
from ..data.mixture import (MIXTURE_FILE, load_mixture, mixture_differences, read_mixture, single_source,
                            write_mixture)
from ..data.sources import DataValidationError
from ..model import packed_attention
from ..errors import InputError, report_input_errors
from ..model.build import DTYPE_NAMES, build_model, weights_fingerprint
from ..model.fused_kernels import LigerDecision, apply_liger_kernel, resolve_use_liger_kernel
from ..model.projector import load_pretrained_projector
from ..model.quantize import check_quantized_training, quantize_linears
from .activation_memory import CheckpointingPlanner, first_probe_batch, free_for_activations
from .args import build_parser
from .builtin_defaults import apply_builtin_defaults
from .checkpoint import (check_step_folder, latest_checkpoint, load_training_checkpoint, remove_partial_checkpoints,
                         save_training_checkpoint)
from .ds_config import load_deepspeed_config
from .engine import build_engine, model_inputs, train_micro_step
from .resume import check_resume_flags, training_record
from .torch_compile import check_torch_compile, compile_decoder_layers

log = logging.getLogger("mm_moslora.train")


# ---------------------------------------------------------------- setup
def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). A plain `python` run becomes a one-process group."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def target_modules_flag(value: str | None) -> list[str] | str | None:
    """--lora_target_modules / --vision_lora_target_modules: plain comma-separated names are a list, else a regex."""
    if value and re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", value):
        return [t.strip() for t in value.split(",")]
    return value


def set_trainable(model, args: argparse.Namespace, dtype: torch.dtype) -> AdapterConfig | None:
    """Freeze the LM, make the projector trainable as the stage asks, and (stage 2) inject the adapters.

    Returns the AdapterConfig, or None in stage 1. Trainable afterwards: lora_A/lora_M/lora_B, the projector
    (unless --freeze_mm_mlp_adapter) and the vision tower only with --unfreeze_mm_vision_tower.
    """
    model.llm.requires_grad_(False)
    model.projector.requires_grad_(args.tune_mm_mlp_adapter or (args.stage == "finetune" and not args.freeze_mm_mlp_adapter))
    if args.stage != "finetune":
        return None
    config = AdapterConfig(adapter=args.adapter, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                           mixer_init=args.mixer_init, freeze_mixer=args.freeze_mixer, use_rslora=args.use_rslora,
                           target_modules=target_modules_flag(args.lora_target_modules),
                           base_model=args.model_name_or_path)
    torch.manual_seed(args.seed)  # adapter init does not depend on what was built before
    inject_adapters(model.llm, config, dtype=dtype)
    return config


def add_vision_adapter(model, args: argparse.Namespace, llm_config: AdapterConfig | None,
                       dtype: torch.dtype) -> AdapterConfig | None:
    """--vision_adapter: inject adapters into the frozen tower; returns their config (None without the flag).

    The config is the LM's with the tower's own kind, rank, scale, dropout and targets: every other option
    (mixer initialisation, frozen mixer, rsLoRA) is shared, so the tower honours each exactly as the LM does.
    """
    if args.vision_adapter == "none" or llm_config is None:
        return None
    mixer = {} if args.vision_adapter == "moslora" else {"mixer_init": "kaiming", "freeze_mixer": False}
    config = dataclasses.replace(
        llm_config, adapter=args.vision_adapter, r=args.vision_lora_r, alpha=args.vision_lora_alpha,
        dropout=args.vision_lora_dropout, target_modules=target_modules_flag(args.vision_lora_target_modules),
        base_model=args.vision_tower, **mixer)
    torch.manual_seed(args.seed + 1)  # its own stream: the LM's adapters initialise as without it
    model.vision.add_adapters(config, dtype=dtype)
    return config


@dataclasses.dataclass(frozen=True)
class FastKernels:
    """What apply_fast_kernels chose, with reasons (for the log and the run's summary)."""
    liger: LigerDecision
    dropout_kernel: str
    torch_compile: str = "off"


def apply_fast_kernels(model, args: argparse.Namespace, device: torch.device) -> FastKernels:
    """The fused kernels the flags ask for (--use_liger_kernel, --use_dropout_kernel, --torch_compile), applied
    last: on the module tree that trains, with adapters, quantized layers, attention and activation checkpointing in
    place; returns what was chosen and why. benchmarks/check_fast_paths.py calls this too, so each fast path it
    compares is the one training runs. The compiler comes after Liger, so that it traces Liger's kernels."""
    dropout = dropout_kernels.configure(args.use_dropout_kernel, device)
    log.info("adapter dropout kernels: %s", dropout)
    liger = resolve_use_liger_kernel(args.use_liger_kernel, device, model.llm.config.model_type)
    if liger.on:
        apply_liger_kernel(model)
    log.info("Liger Kernel: %s", liger.describe())
    compiled = "off"
    if args.torch_compile:
        compiled = compile_decoder_layers(model.llm)
        if dropout_kernels.enabled:
            dropout += " (the vision tower's adapters only: the compiled LM layers draw their own dropout)"
    log.info("torch.compile of the decoder layers: %s", compiled)
    return FastKernels(liger, dropout, compiled)


def quantization_fields(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """What a reader needs to rebuild a QLoRA adapter's base exactly (bits, type, double quant, source dtype)."""
    if args.bits == 16:
        return {}
    return {"bits": args.bits, "quant_type": args.quant_type, "double_quant": args.double_quant,
            "quantized_from": DTYPE_NAMES[dtype]}


def gathered(named_params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full CPU copies of parameters, gathering ZeRO-3 partitions first (collective under ZeRO-3)."""
    import deepspeed

    partitioned = [p for _, p in named_params if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None, enabled=bool(partitioned)):
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in named_params}


def _worker_image_policy(allowed: bool, worker_id: int) -> None:
    """Loader processes started by spawn (not fork) begin with the default image rule: give them the run's."""
    allow_images_outside_folder(allowed)


# ---------------------------------------------------------------- the recipe
def train(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world_size, device = init_distributed()
    allow_images_outside_folder(args.allow_images_outside_folder)
    logging.getLogger("mm_moslora").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # A bad --deepspeed file fails now, not after minutes of model loading (bucket sizes wait for the model).
    early_ds_config = load_deepspeed_config(args.deepspeed, micro_batch=args.per_device_train_batch_size,
                          grad_accum=args.gradient_accumulation_steps, world_size=world_size, bf16=args.bf16,
                          fp16=args.fp16, max_grad_norm=args.max_grad_norm, hidden_size=None)
    # So is a --bits combination that cannot run (no bitsandbytes, no kernels for this device, ZeRO-3).
    check_quantized_training(args.bits, args.quant_type, device,
                             early_ds_config.get("zero_optimization", {}).get("stage", 0), args.deepspeed)
    # And --use_liger_kernel true without CUDA or liger-kernel (the LM's family is checked once it is built).
    resolve_use_liger_kernel(args.use_liger_kernel, device, model_type=None)
    dropout_kernels.configure(args.use_dropout_kernel, device)  # and --use_dropout_kernel true without them
    # And --torch_compile with what it cannot be combined with.
    check_torch_compile(args.torch_compile, bits=args.bits, packing=args.packing,
                        zero_stage=early_ds_config.get("zero_optimization", {}).get("stage", 0),
                        dropout_kernel=args.use_dropout_kernel)
    if args.activation_memory_budget_gib == "auto" and device.type != "cuda":
        free_for_activations(device)  # refuses: `auto` reads a GPU's memory
    torch.manual_seed(args.seed)
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(args.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(ckpt_dir)
    apply_builtin_defaults(args, rank)
    # Resume: refused now, before minutes of loading, if the flags or the files do not match the checkpoint.
    derived = {"world_size": world_size, "zero_stage": early_ds_config.get("zero_optimization", {}).get("stage", 0)}
    defaults = vars(build_parser(args.stage).parse_args([]))
    tag = latest_checkpoint(ckpt_dir) if args.resume else None
    recorded_flags = None
    if tag:
        recorded_flags = check_resume_flags(ckpt_dir / tag, training_record(args, **derived), defaults)
        check_step_folder(ckpt_dir / tag, world_size, derived["zero_stage"])

    # Model: base weights in the training dtype; adapters and projector are trainable.
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    model, tokenizer = build_model(args.model_name_or_path, args.vision_tower, None, args.mm_vision_select_layer,
                                   args.mm_vision_select_feature, args.mm_projector_type, dtype,
                                   args.attn_implementation, args.trust_remote_code, args.unfreeze_mm_vision_tower,
                                   random_init_llm=args.random_init_llm, init_device=device)
    llm_fingerprint = weights_fingerprint(model.llm)  # of the weights as loaded, before any quantization
    if args.bits != 16:  # QLoRA: the frozen LM in 4/8 bits on the device; adapters and projector stay in `dtype`
        n = quantize_linears(model.llm, args.bits, args.quant_type, args.double_quant, compute_dtype=dtype,
                             device=device)
        log.info("quantized %d linear layers of the LM to %d bits (%s%s)", n, args.bits,
                 args.quant_type if args.bits == 4 else "int8", ", double quant" if args.double_quant else "")
    if args.pretrain_mm_mlp_adapter:
        load_pretrained_projector(model.projector, args.pretrain_mm_mlp_adapter, args.mm_projector_type)
    elif args.stage == "finetune":
        log.warning("no --pretrain_mm_mlp_adapter: the projector starts from random weights")
    adapter_config = set_trainable(model, args, dtype)
    vision_adapter_config = add_vision_adapter(model, args, adapter_config, dtype)
    if args.packing and device.type == "cuda" and args.attn_implementation == "sdpa":
        # Packed rows on a GPU: FlashAttention varlen over the samples instead of a (T x T) block mask.
        packed_attention.register()
        model.llm.set_attn_implementation(packed_attention.NAME)
        log.info("--packing: attention through FlashAttention varlen (%s)", packed_attention.NAME)
    planner = None
    if args.activation_memory_budget_gib is not None:  # decides the LM's and the tower's checkpointing below
        planner = CheckpointingPlanner(model, args.activation_memory_budget_gib, device)
        if args.gradient_checkpointing:
            log.info("--activation_memory_budget_gib decides which decoder layers are checkpointed "
                     "(--gradient_checkpointing True would checkpoint all)")
    elif args.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if vision_adapter_config is not None or args.unfreeze_mm_vision_tower:  # activations kept for backward
            model.vision.set_gradient_checkpointing(True)
    fast_kernels = apply_fast_kernels(model, args, device)
    liger = fast_kernels.liger
    log.info(format_parameter_report(model))

    # Data: every source validated up front (exact token lengths come out of it), tokenized lazily.
    specs = (read_mixture(args.data_mixture, args.image_folder) if args.data_mixture
             else single_source(args.data_path, args.image_folder))
    mixture = load_mixture(specs, tokenizer, args.template, model.num_image_tokens, args.model_max_length,
                           args.skip_bad_samples, args.seed, exact_lengths=args.packing, progress=rank == 0)
    for entry in mixture.record["sources"]:
        log.info("data: %s (%s, %s records): %d records, %d bad, %d taken", entry["path"], entry["kind"],
                 entry["format"], entry["records"], entry["bad_records"], entry["taken"])
    dataset = InstructionDataset(mixture.parts, mixture.source_ids, mixture.rows, mixture.lengths, tokenizer,
                                 args.template, model.num_image_tokens,
                                 ImageProcessor.for_tower(model.vision, args.image_aspect_ratio), args.model_max_length)
    lengths = dataset.lengths()
    if tag and (ckpt_dir / tag / MIXTURE_FILE).is_file():
        diffs = mixture_differences(json.loads((ckpt_dir / tag / MIXTURE_FILE).read_text()), mixture.record)
        if diffs:
            raise DataValidationError(f"{ckpt_dir / tag}: the training data differs from the checkpoint's "
                                      f"({'; '.join(diffs)}): resume with the same data, or use another --output_dir")

    def collate_fn(samples: list) -> dict:
        return (collate_packed if args.packing else collate)(samples, tokenizer.pad_token_id)

    def epoch_order(epoch: int) -> list:
        """Global steps of one epoch; each rank's part is a batch (or, packed, rows of samples)."""
        if args.packing:
            return packed_epoch_batches(lengths, args.model_max_length, args.per_device_train_batch_size, world_size,
                                        args.seed, epoch)
        return epoch_batches(lengths, args.per_device_train_batch_size, world_size, args.seed, epoch,
                             args.group_by_modality_length)

    steps_per_epoch = len(epoch_order(0)) // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        unit = f"packed rows of {args.model_max_length} tokens" if args.packing else "samples"
        raise DataValidationError(f"{args.data_mixture or args.data_path}: {len(dataset)} usable records are fewer than one "
                         f"optimizer step needs ({args.per_device_train_batch_size} {unit} x accumulation "
                         f"{args.gradient_accumulation_steps} x {world_size} processes)")
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    flags_record = training_record(args, **derived, total_steps=total_steps)
    if recorded_flags and recorded_flags.get("total_steps") not in (None, total_steps):
        log.warning("resuming a %d-step run as a %d-step run: the learning-rate schedule is recomputed for the new "
                    "length", recorded_flags["total_steps"], total_steps)

    if planner:  # activations measured on a real micro-batch, before the engine exists (no ZeRO-3 hooks yet)
        model.to(device).train()  # where the engine puts it (ZeRO-3 too: it partitions from the device)
        probe = first_probe_batch(collate_fn([dataset[i] for i in step[rank]]) for step in epoch_order(0))
        planner.measure(model_inputs(probe, device), max_rows=args.per_device_train_batch_size,
                        max_length=args.model_max_length)
        planner.start()

    # Engine: our AdamW (fused on GPU) with a separate projector learning rate; DeepSpeed does ZeRO.
    engine, optimizer, scheduler = build_engine(
        model, deepspeed_config=args.deepspeed, learning_rate=args.learning_rate, mm_projector_lr=args.mm_projector_lr,
        weight_decay=args.weight_decay, lr_scheduler_type=args.lr_scheduler_type, warmup_ratio=args.warmup_ratio,
        total_steps=total_steps, micro_batch=args.per_device_train_batch_size,
        grad_accum=args.gradient_accumulation_steps, world_size=world_size, bf16=args.bf16, fp16=args.fp16,
        max_grad_norm=args.max_grad_norm, device=device)

    checkpoint_config = config_for_model(
        model, args.model_name_or_path, args.mm_projector_type, "plain" if args.stage == "pretrain" else args.template,
        args.image_aspect_ratio, args.attn_implementation, stage=args.stage, llm_fingerprint=llm_fingerprint,
        vision_adapter=vision_adapter_config.to_dict() if vision_adapter_config else None,
        **quantization_fields(args, dtype))

    def write_inference_files(folder: Path) -> None:
        projector = gathered(list(engine.module.projector.named_parameters()))
        adapter = None
        if adapter_config is not None:
            named = [(n, p) for n, p in engine.module.llm.named_parameters() if ".lora_" in n]
            adapter = (adapter_config, gathered(named))
        vision = (gathered(list(engine.module.vision.visual.named_parameters()))
                  if args.unfreeze_mm_vision_tower else None)
        vision_adapter = None
        if vision_adapter_config is not None:
            named = [(n, p) for n, p in engine.module.vision.visual.named_parameters() if ".lora_" in n]
            vision_adapter = (vision_adapter_config, gathered(named))
        if rank == 0:
            save_inference_files(folder, checkpoint_config, tokenizer, projector, adapter, vision, vision_adapter)
            write_mixture(mixture.record, folder)  # the exact data a checkpoint was trained on

    def save(step: int) -> None:
        if state["samples"] == 0:  # nothing trained yet (every batch skipped): such weights are not a checkpoint
            log.warning("step %d: no checkpoint written, no sample has been trained yet", step)
            return
        save_training_checkpoint(engine, ckpt_dir, step, dict(state), write_inference_files, args.save_total_limit,
                                 training_args=flags_record)

    # Resume: model, optimizer, scheduler, RNG and data position.
    # Counters are totals over all ranks; last_loss is kept so a run resumed at its end still reports it.
    state = {"global_step": 0, "micro_step": 0, "samples": 0, "skipped_images": 0, "skipped_steps": 0,
             "tokens": 0, "last_loss": float("nan")}
    if tag:
        client = load_training_checkpoint(engine, ckpt_dir, tag)
        state.update({k: client[k] for k in state if k in client})
        log.info("resumed from %s (step %d)", ckpt_dir / tag, state["global_step"])

    writer = None
    if rank == 0 and args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        # A resumed run hides what the interrupted one logged after its checkpoint: those steps are redone.
        writer = SummaryWriter(str(out_dir / "runs"), purge_step=state["global_step"] + 1 if tag else None)
    bar = tqdm(total=total_steps, initial=state["global_step"], desc=args.stage, disable=rank != 0, dynamic_ncols=True)
    engine.train()
    loss_sum, loss_count, step_samples, t_window, samples_window = 0.0, 0, 0, time.time(), 0
    t_start, start_counts = time.time(), dict(state)  # throughput counts this session only, not resumed steps
    session_images = {"decoded": 0, "skipped": 0}
    micro_per_epoch = steps_per_epoch * args.gradient_accumulation_steps
    while state["global_step"] < total_steps:
        epoch, micro_in_epoch = divmod(state["micro_step"], micro_per_epoch)
        order = epoch_order(epoch)[:micro_per_epoch]
        # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, which dropout
        # uses too, and a resumed run creates its loader at another point of that stream.
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=[b[rank] for b in order[micro_in_epoch:]],
            collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch),
            worker_init_fn=functools.partial(_worker_image_policy, args.allow_images_outside_folder))
        for batch in loader:
            loss, n_samples, n_tokens = train_micro_step(engine, batch, device, tokenizer.pad_token_id)
            if n_samples:  # this rank's loss; a micro-batch whose every sample was skipped has none
                loss_sum, loss_count = loss_sum + loss, loss_count + 1  # a tensor: no device sync per micro-step
            n_skipped = batch["n_skipped"]
            n_images = 0 if batch.get("pixel_values") is None else batch["pixel_values"].shape[0]
            if world_size > 1:  # ranks skip different images; a single process needs no device round trip
                counts = torch.tensor([n_samples, n_skipped, n_tokens, n_images], dtype=torch.long, device=device)
                dist.all_reduce(counts)
                n_samples, n_skipped, n_tokens, n_images = counts.tolist()
            state["samples"] += n_samples
            state["skipped_images"] += n_skipped
            state["tokens"] += n_tokens
            state["micro_step"] += 1
            samples_window += n_samples
            step_samples += n_samples
            session_images["decoded"] += n_images
            session_images["skipped"] += n_skipped
            if session_images["skipped"] >= UNREADABLE_IMAGES_VERDICT and not session_images["decoded"]:
                bar.close()  # the error goes on a line of its own
                raise UnreadableImagesError(
                    f"--image_folder {args.image_folder}: none of the {session_images['skipped']} images drawn so far "
                    f"could be decoded (see the warnings above); stopped before writing a checkpoint")
            if state["micro_step"] % args.gradient_accumulation_steps:
                continue
            state["global_step"] += 1
            step = state["global_step"]
            if planner and planner.pending:  # `auto`: weights, gradients and optimizer states are allocated now
                planner.after_first_step()
            lrs = scheduler.get_last_lr()  # one per optimizer group (engine.param_groups)
            lr = lrs[0]
            if not step_samples:  # every sample of the step was skipped (images that failed to decode)
                state["skipped_steps"] += 1
                log.warning("step %d: every sample failed to load; the step is counted as skipped, no loss", step)
                if writer:
                    writer.add_scalar("train/skipped_steps", state["skipped_steps"], step)
            elif loss_count:
                state["last_loss"] = last_loss = float(loss_sum) / loss_count
                if not math.isfinite(last_loss):
                    # The bf16 configs skip DeepSpeed's per-gradient overflow scan (bf16 has fp32's range, and the
                    # scan costs ~0.3 ms per parameter tensor each step), so a diverged run stops here instead.
                    bar.close()
                    raise DivergenceError(f"the loss is {last_loss} at step {step}: training diverged. Resume from "
                                          f"the last checkpoint in {ckpt_dir} with a lower --learning_rate")
                if step % args.logging_steps == 0 or step == total_steps:
                    rate = samples_window / max(1e-9, time.time() - t_window)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}",
                                    **({"skipped": state["skipped_steps"]} if state["skipped_steps"] else {}))
                    if writer:
                        writer.add_scalar("train/loss", last_loss, step)
                        writer.add_scalar("train/lr", lr, step)
                        for index, (group, group_lr) in enumerate(zip(optimizer.param_groups, lrs)):
                            writer.add_scalar(f"train/lr_{group.get('name', index)}", group_lr, step)
                        writer.add_scalar("train/samples_per_s", rate, step)
                    t_window, samples_window = time.time(), 0
            loss_sum, loss_count, step_samples = 0.0, 0, 0
            bar.update(1)
            if args.save_steps > 0 and step % args.save_steps == 0 and step < total_steps:
                if writer:
                    writer.flush()  # the logs up to a checkpoint survive a crash, like the checkpoint
                save(step)
            if step >= total_steps:
                break
    bar.close()

    # Save: a resumable last checkpoint (unless this run resumed from it) plus the inference files in OUTPUT_DIR.
    if state["samples"] == 0:
        raise UnreadableImagesError(f"--data_path {args.data_path}: no sample could be trained in "
                                    f"{state['global_step']} steps ({state['skipped_images']} images failed to "
                                    f"decode); nothing was written")
    if tag != f"step-{state['global_step']}":
        save(state["global_step"])
    write_inference_files(out_dir)
    elapsed = time.time() - t_start
    summary = {"stage": args.stage, "steps": state["global_step"], "samples": state["samples"],
               "final_loss": round(state["last_loss"], 6), "train_seconds": round(elapsed, 1),
               "samples_per_second": round((state["samples"] - start_counts["samples"]) / max(elapsed, 1e-9), 2),
               "tokens_per_second_per_device": round((state["tokens"] - start_counts["tokens"]) / world_size
                                                     / max(elapsed, 1e-9)),
               "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
               "world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
               "skipped_images": state["skipped_images"], "skipped_steps": state["skipped_steps"],
               "dropped_records": mixture.n_bad, "packing": args.packing, "liger_kernel": liger.describe(),
               "dropout_kernel": fast_kernels.dropout_kernel, "torch_compile": fast_kernels.torch_compile,
               "activation_checkpointing": planner.fields() if planner else None,
               "output_dir": str(out_dir)}
    if rank == 0:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if writer:
            writer.close()
        whole_steps = f" ({summary['skipped_steps']} whole steps)" if summary["skipped_steps"] else ""
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        checkpointing = f", {planner.describe(peak)}" if planner else ""
        print(f"[mm_moslora] {args.stage} done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
              f"{summary['samples_per_second']} samples/s, {summary['skipped_images']} images skipped{whole_steps}, "
              f"{summary['dropped_records']} records dropped, Liger Kernel {'on' if liger.on else 'off'}"
              f"{checkpointing} -> {out_dir}", flush=True)
    dist.barrier()
    return summary


# A run stops when this many images were drawn and none decoded (a wrong --image_folder, a broken copy).
UNREADABLE_IMAGES_VERDICT = 8


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


class UnreadableImagesError(InputError):
    """No image of the run could be decoded: training on nothing would only look like success."""


def run(args: argparse.Namespace) -> int:
    """Entry point of the scripts: train; bad input (data, flags, config, checkpoint, images) ends in one
    `error:` line and exit status 2, a diverged run in one line and exit status 1."""
    def main() -> int:
        try:
            train(args)
        except DivergenceError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        return 0
    return report_input_errors(main)
