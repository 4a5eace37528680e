"""Trainable-parameter counts of adapters, from the real widths of the layers they adapt.

LoRA at rank r on a (d_out, d_in) layer trains r*(d_in + d_out) numbers; MoSLoRA adds the r*r mixer. The LoRA
rank matching MoSLoRA's count is the integer r' closest to (r*S + n*r^2) / S, S = sum of d_in + d_out over the n
adapted layers: about 130 for r = 128 at LLaMA-7B's widths.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open


def adapted_layer_shapes(model_name_or_path: str, target_modules: list[str] | str | None = None,
                         trust_remote_code: bool = False) -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear layer an adapter would be injected into, from the model's config alone
    (built on the meta device: no weights are read)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..adapters.inject import is_target_module
    from ..model.build import TINY_DIR

    if model_name_or_path == "tiny":
        config = AutoConfig.for_model(**json.loads((TINY_DIR / "llm_config.json").read_text()))
    else:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if type(m) is nn.Linear and is_target_module(name, target_modules)]


def adapter_parameters(shapes: list[tuple[int, int]], r: int, mixer: bool) -> int:
    return sum(r * (d_in + d_out) + (r * r if mixer else 0) for d_in, d_out in shapes)


def param_matched_lora_rank(shapes: list[tuple[int, int]], r: int) -> int:
    """The LoRA rank whose trainable-parameter count is closest to MoSLoRA's at rank r."""
    if not shapes:
        raise ValueError("no adapted layers: cannot match parameter counts")
    target = adapter_parameters(shapes, r, mixer=True)
    width = sum(d_in + d_out for d_in, d_out in shapes)
    low = target // width
    return min((low, low + 1), key=lambda k: (abs(k * width - target), k))


def trainable_adapter_parameters(adapter_dir: Path) -> int:
    """Trained adapter numbers of a stage-2 output: lora_A, lora_B and (unless frozen) lora_M."""
    config = json.loads((adapter_dir / "moslora_config.json").read_text())
    frozen_mixer = bool(config.get("freeze_mixer"))
    total = 0
    with safe_open(str(adapter_dir / "moslora_adapter.safetensors"), "np") as f:
        for key in f.keys():
            if key.endswith(".lora_M") and frozen_mixer:
                continue
            shape = f.get_slice(key).get_shape()
            count = 1
            for size in shape:
                count *= size
            total += count
    return total


def adapter_update_size(adapter_dir: Path) -> float:
    """The largest |lora_B| entry: 0 means the update B M A never left its zero start (e.g. a zero mixer)."""
    with safe_open(str(adapter_dir / "moslora_adapter.safetensors"), "np") as f:
        return max((float(abs(f.get_tensor(k)).max()) for k in f.keys() if k.endswith(".lora_B")), default=0.0)
