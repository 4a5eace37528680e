"""Put MoSLoRA layers into a causal LM by module name, and take them out again.

Matching works on qualified module names (`model.layers.3.self_attn.q_proj`), the same names PEFT matches, so
targeting rules carry over to LLaMA, Qwen2 and Mistral without per-architecture code.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mm_moslora.adapters.moslora import AdapterConfig, MoSLoRALinear, is_quantized_linear

# Every linear layer of a LLaMA / Qwen2 / Mistral decoder block: attention and MLP projections.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Never adapted, whatever the pattern: the output head, and the vision side of a multimodal model.
_PROTECTED_NAME_PARTS = ("lm_head", "vision", "mm_projector")


def _in_decoder_block(name: str) -> bool:
    # Decoder blocks live in a ModuleList, so their modules have a numeric path component (`layers.3`).
    return any(part.isdigit() for part in name.split(".")[:-1])


def _ends_with_suffix(name: str, suffixes) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def is_target_module(name: str, target_modules: list[str] | str | None) -> bool:
    """Whether the linear layer called `name` is adapted under `target_modules` (see AdapterConfig)."""
    if any(part in name for part in _PROTECTED_NAME_PARTS):
        return False
    if target_modules is None:
        return _in_decoder_block(name) and _ends_with_suffix(name, DEFAULT_TARGET_MODULES)
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return _ends_with_suffix(name, target_modules)


def adapter_modules(model: nn.Module) -> dict[str, MoSLoRALinear]:
    """All MoSLoRA layers of `model`, by qualified name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoSLoRALinear)}


def inject_adapters(llm: nn.Module, config: AdapterConfig, dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze every parameter of `llm` and replace each targeted nn.Linear with a MoSLoRALinear, in place.

    dtype: dtype of the new adapter parameters. Returns the qualified names of the replaced modules.
    Raises RuntimeError if `llm` already holds adapters, ValueError if the targeting matched no linear layer.
    """
    existing = adapter_modules(llm)
    if existing:
        raise RuntimeError(f"the model already has {len(existing)} MoSLoRA layers (e.g. {next(iter(existing))}); "
                           "call unload_adapters() before injecting again")
    # Exactly nn.Linear (other subclasses may hold weights merge() cannot add into), or a bitsandbytes 4/8-bit
    # layer (QLoRA: dequantized before merging).
    linears = [name for name, module in llm.named_modules()
               if type(module) is nn.Linear or is_quantized_linear(module)]
    targets = [name for name in linears if is_target_module(name, config.target_modules)]
    if not targets:
        patterns = config.target_modules if config.target_modules is not None else list(DEFAULT_TARGET_MODULES)
        examples = ", ".join(linears[:12]) or "none"
        raise ValueError(f"target_modules {patterns!r} matched no nn.Linear module of {type(llm).__name__}. "
                         f"Available linear modules ({len(linears)}): {examples}"
                         f"{', ...' if len(linears) > 12 else ''}")
    llm.requires_grad_(False)
    for name in targets:
        layer = MoSLoRALinear(llm.get_submodule(name), r=config.r, alpha=config.alpha, dropout=config.dropout,
                              adapter=config.adapter, mixer_init=config.mixer_init,
                              use_rslora=config.use_rslora, dtype=dtype, freeze_mixer=config.freeze_mixer)
        llm.set_submodule(name, layer)
    return targets


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (idempotent); forward then costs what the base model costs."""
    for module in adapter_modules(model).values():
        module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo merge_adapters (idempotent)."""
    for module in adapter_modules(model).values():
        module.unmerge()


def unload_adapters(model: nn.Module, merge: bool = True) -> list[str]:
    """Put plain nn.Linear modules back: with the update merged into them (merge=True) or the original weights.

    Base parameters stay frozen (inject_adapters froze them). Returns the names of the restored modules.
    """
    modules = adapter_modules(model)
    for name, module in modules.items():
        if merge:
            module.merge()
        else:
            module.unmerge()
        model.set_submodule(name, module.base)
    return list(modules)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; under ZeRO-3 the full sizes (`ds_numel`), not the local partitions."""
    trainable = total = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        if param.requires_grad:
            trainable += numel
    return trainable, total


def format_parameter_report(model: nn.Module) -> str:
    """One line for logs, e.g. 'MoSLoRA layers: 14 | trainable params: 9,216 / 105,760 (8.71%)'."""
    trainable, total = count_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    return (f"MoSLoRA layers: {len(adapter_modules(model))} | "
            f"trainable params: {trainable:,} / {total:,} ({share:.2f}%)")
