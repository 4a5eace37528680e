"""Adapter files: our own format (safetensors + JSON config) and an export to a stock PEFT LoRA folder.

Our format, in `directory/`:
    moslora_adapter.safetensors   {"<module name>.lora_A": (r, d_in), ".lora_M": (r, r), ".lora_B": (d_out, r)}
    moslora_config.json           AdapterConfig fields + "format_version"
Module names are relative to the LM the adapters were injected into (e.g. `model.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mm_moslora.adapters.inject import adapter_modules, inject_adapters, unload_adapters
from mm_moslora.adapters.moslora import AdapterConfig, fold_mixer
from mm_moslora.errors import InputError

ADAPTER_WEIGHTS_NAME = "moslora_adapter.safetensors"
ADAPTER_CONFIG_NAME = "moslora_config.json"
FORMAT_VERSION = 1
LORA_PARAM_NAMES = ("lora_A", "lora_M", "lora_B")

# What stock PEFT reads (peft/utils/constants.py, peft/utils/save_and_load.py): keys are
# "base_model.model.<module name>.lora_A.weight" once PEFT has stripped the adapter name ("default").
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of all lora_* tensors of `model` (detached, contiguous, CPU), keyed `<module name>.lora_X`."""
    state = {}
    for name, module in adapter_modules(model).items():
        for param_name in LORA_PARAM_NAMES:
            param = getattr(module, param_name)
            if param is not None:
                state[f"{name}.{param_name}"] = param.detach().to("cpu", copy=True).contiguous()
    return state


def _write_atomically(path: str, write) -> None:
    # A crash mid-write leaves the previous file (or none), never a truncated one.
    tmp_path = path + ".tmp"
    write(tmp_path)
    os.replace(tmp_path, path)


def save_adapter(directory: str, config: AdapterConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write `moslora_adapter.safetensors` and `moslora_config.json` into `directory` (created if needed)."""
    if not state_dict:
        raise ValueError("state_dict is empty: there are no adapter tensors to save")
    os.makedirs(directory, exist_ok=True)
    _write_atomically(os.path.join(directory, ADAPTER_WEIGHTS_NAME),
                      lambda path: save_file(state_dict, path, metadata={"format": "pt"}))

    def write_config(path: str) -> None:
        with open(path, "w") as f:
            json.dump({"format_version": FORMAT_VERSION, **config.to_dict()}, f, indent=2)
            f.write("\n")
    _write_atomically(os.path.join(directory, ADAPTER_CONFIG_NAME), write_config)


class AdapterFileError(InputError, RuntimeError):
    """Adapter files that cannot be read or do not fit the model; the message names the file or module."""


def read_adapter_config(directory: str) -> AdapterConfig:
    """The AdapterConfig saved in `directory` by save_adapter."""
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {directory}: not a MoSLoRA adapter folder")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(values, dict):
        raise AdapterFileError(f"{path}: must hold a JSON object, found {type(values).__name__}")
    version = values.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise AdapterFileError(f"{path} has format_version {version!r}; this version of mm_moslora reads "
                               f"{FORMAT_VERSION}")
    try:
        return AdapterConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise AdapterFileError(f"{path}: {err}") from None


def read_adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter weights file; AdapterFileError for a missing, empty, truncated or garbled one."""
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: adapter weights file not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        reason = "empty file" if os.path.getsize(path) == 0 else f"not a readable safetensors file ({err})"
        raise AdapterFileError(f"{path}: adapter weights: {reason}") from None


def _loading_problems(modules: dict, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                      strict: bool) -> list[str]:
    """Every reason `tensors` cannot be loaded into `modules`; shape mismatches count even when not strict."""
    problems = []
    params = {}
    for name, module in modules.items():
        if module.merged:
            problems.append(f"module {name} is merged; unmerge it before loading new adapter weights")
        if module.adapter != config.adapter or not math.isclose(module.scaling, config.scaling):
            problems.append(f"module {name} is a {module.adapter} layer with scaling {module.scaling:g}, "
                            f"the checkpoint is {config.adapter} with scaling {config.scaling:g}")
        for param_name in LORA_PARAM_NAMES:
            param = getattr(module, param_name)
            if param is not None:
                params[f"{name}.{param_name}"] = param
    for key, param in params.items():
        module_name = key.rsplit(".", 1)[0]
        if key not in tensors:
            if strict:
                problems.append(f"missing from the checkpoint: {key} (module {module_name}, shape "
                                f"{tuple(param.shape)})")
        elif tensors[key].shape != param.shape:
            problems.append(f"shape mismatch for module {module_name}: {key} has shape {tuple(tensors[key].shape)} "
                            f"in the checkpoint but {tuple(param.shape)} in the model")
    if strict:
        for key in tensors.keys() - params.keys():
            module_name, param_name = key.rsplit(".", 1)
            reason = (f"module {module_name} has no {param_name}" if module_name in modules
                      else f"the model has no adapter module named {module_name}")
            problems.append(f"unexpected key in the checkpoint: {key} ({reason})")
    return problems


def load_adapter(model: nn.Module, directory: str, strict: bool = True,
                 dtype: torch.dtype = torch.float32) -> AdapterConfig:
    """Load an adapter saved by save_adapter into `model`; returns its config.

    If `model` has no adapters yet, they are injected first with the saved config (adapter params in `dtype`).
    strict: every adapter parameter of the model must be in the file and vice versa. A shape mismatch, or any
    key problem when strict, raises RuntimeError naming the module (and both shapes); a model injected here is
    then restored to plain linears.
    """
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    modules = adapter_modules(model)
    injected_here = not modules
    if injected_here:
        inject_adapters(model, config, dtype=dtype)
        modules = adapter_modules(model)
    problems = _loading_problems(modules, config, tensors, strict)
    if problems:
        if injected_here:
            unload_adapters(model, merge=False)
        shown = "\n  ".join(sorted(problems)[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AdapterFileError(f"cannot load the adapter in {directory} into {type(model).__name__}:\n  {shown}{more}")
    with torch.no_grad():
        for name, module in modules.items():
            for param_name in LORA_PARAM_NAMES:
                param = getattr(module, param_name)
                key = f"{name}.{param_name}"
                if param is not None and key in tensors:
                    param.copy_(tensors[key])
    return config


def export_peft(directory: str, config: AdapterConfig, state_dict: dict[str, torch.Tensor],
                base_model_name_or_path: str | None = None) -> None:
    """Write a stock PEFT LoRA folder (`adapter_config.json`, `adapter_model.safetensors`) with the same update.

    MoSLoRA's mixer is folded into the down-projection (A' = M·A, computed in fp32), so `PeftModel.from_pretrained`
    on the same base LM reproduces s·B·M·A with no mm_moslora code. Tensors are written in fp32. target_modules
    lists the adapted modules by full name, so PEFT adapts exactly those.
    """
    from peft import LoraConfig  # imported here: only exports need PEFT, and importing it is slow

    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module_name, param_name = key.rsplit(".", 1)
        if param_name not in LORA_PARAM_NAMES:
            raise ValueError(f"unexpected key {key!r} in an adapter state dict")
        layers.setdefault(module_name, {})[param_name] = tensor
    peft_state = {}
    for module_name, params in layers.items():
        if "lora_A" not in params or "lora_B" not in params:
            raise ValueError(f"module {module_name} lacks lora_A or lora_B in the adapter state dict")
        prefix = f"{PEFT_KEY_PREFIX}{module_name}"
        peft_state[f"{prefix}.lora_A.weight"] = fold_mixer(params["lora_A"], params.get("lora_M")).contiguous()
        peft_state[f"{prefix}.lora_B.weight"] = params["lora_B"].float().contiguous()
    peft_config = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.use_rslora,
        target_modules=sorted(layers), bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path or config.base_model)
    os.makedirs(directory, exist_ok=True)
    peft_config.save_pretrained(directory)
    save_file(peft_state, os.path.join(directory, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})


def export_peft_layers(directory: str, layers: dict[str, dict], base_model_name_or_path: str | None = None) -> None:
    """A stock PEFT LoRA folder for adapters of several configs (e.g. an LM's and a vision tower's in one model).

    layers: {module name in the PEFT base model: {"config": AdapterConfig, "lora_A", "lora_B"[, "lora_M"]}}.
    Each module keeps its own rank and scale through PEFT's rank_pattern / alpha_pattern (alpha = scale x rank,
    so rsLoRA adapters map exactly too); M is folded into A in fp32. Raises ValueError on an incomplete module.
    """
    from collections import Counter

    from peft import LoraConfig

    if not layers:
        raise ValueError("no adapter layers to export")
    peft_state, ranks, alphas = {}, {}, {}
    for name, params in layers.items():
        if "lora_A" not in params or "lora_B" not in params:
            raise ValueError(f"module {name} lacks lora_A or lora_B")
        config = params["config"]
        peft_state[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = fold_mixer(params["lora_A"], params.get("lora_M")).contiguous()
        peft_state[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = params["lora_B"].float().contiguous()
        ranks[name], alphas[name] = config.r, config.scaling * config.r
    (r, alpha), _ = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0]
    # Escaped full module names as patterns: PEFT matches a pattern (a regex) against the end of each module name.
    rank_pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    alpha_pattern = {re.escape(name): a for name, a in alphas.items() if a != alpha}
    dropout = next(iter(layers.values()))["config"].dropout
    peft_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(layers),
                             rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, bias="none",
                             base_model_name_or_path=base_model_name_or_path)
    os.makedirs(directory, exist_ok=True)
    peft_config.save_pretrained(directory)
    save_file(peft_state, os.path.join(directory, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
