"""The DeepSpeed engine around a MultimodalLM and one training micro-step.

Shared by scripts/finetune.py, scripts/pretrain.py (through recipe.py) and scripts/benchmark_train.py, so
the benchmark measures exactly the step that training runs.
"""
from __future__ import annotations

import math

import torch

from .ds_config import load_deepspeed_config


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate at optimizer step `step` (linear warmup, then cosine/linear/constant)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
    return factor


def param_groups(model: torch.nn.Module, learning_rate: float, mm_projector_lr: float | None,
                 weight_decay: float) -> list[dict]:
    """Adapter (and any other trainable LM/vision) parameters at --learning_rate; the projector at --mm_projector_lr.

    Groups are named ("adapter", "projector"; empty ones left out) so logs can tell their learning rates apart.
    """
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")]
    projector = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("projector.")]
    groups = [{"name": "adapter", "params": rest, "lr": learning_rate, "weight_decay": weight_decay},
              {"name": "projector", "params": projector, "lr": mm_projector_lr or learning_rate, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    return groups


def build_engine(model: torch.nn.Module, *, deepspeed_config: str, learning_rate: float,
                 mm_projector_lr: float | None = None, weight_decay: float = 0.0, lr_scheduler_type: str = "cosine",
                 warmup_ratio: float = 0.03, total_steps: int = 1, micro_batch: int = 1, grad_accum: int = 1,
                 world_size: int = 1, bf16: bool = False, fp16: bool = False, max_grad_norm: float = 1.0,
                 device: torch.device = torch.device("cpu")):
    """Wrap `model` in a DeepSpeed engine with AdamW (fused on GPU) and a warmup+decay schedule.

    Returns (engine, optimizer, scheduler). The DeepSpeed JSON's "auto" fields are filled from these arguments.
    """
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(model, learning_rate, mm_projector_lr, weight_decay),
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(lr_scheduler_type, math.ceil(warmup_ratio * total_steps), total_steps))
    config = load_deepspeed_config(deepspeed_config, micro_batch=micro_batch, grad_accum=grad_accum,
                                   world_size=world_size, bf16=bf16, fp16=fp16, max_grad_norm=max_grad_norm,
                                   hidden_size=model.llm.config.hidden_size)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=config)
    return engine, optimizer, scheduler


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_counts", "position_ids",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The model's keyword arguments from a collated batch, on `device`."""
    return {k: (batch[k].to(device, non_blocking=True) if isinstance(batch[k], torch.Tensor) else batch[k])
            for k in MODEL_INPUTS if k in batch}


def train_micro_step(engine, batch: dict, device: torch.device, pad_token_id: int) -> tuple[torch.Tensor, int, int]:
    """Forward, backward and (at accumulation boundaries) optimizer step on one micro-batch.

    batch: the output of data.collate.collate or collate_packed. Returns (detached loss, samples, non-pad
    tokens). A micro-batch whose every image failed to decode still runs a zero-loss step, so all ranks stay
    in step.
    """
    if "input_ids" in batch:
        loss = engine(**model_inputs(batch, device)).loss
        n_samples, n_tokens = batch["n_samples"], batch["n_tokens"]
    else:
        dummy = torch.full((1, 1), pad_token_id, device=device)
        loss = engine(input_ids=dummy, labels=torch.full_like(dummy, -100)).loss * 0.0
        n_samples, n_tokens = 0, 0
    engine.backward(loss)
    engine.step()
    return loss.detach(), n_samples, n_tokens
