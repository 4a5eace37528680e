"""Vision-to-language projectors with LLaVA's names: `linear` and `mlp{N}x_gelu`."""
from __future__ import annotations

import re

import torch
from torch import nn


def build_projector(kind: str, vision_hidden: int, llm_hidden: int) -> nn.Module:
    """(B, n_tok, vision_hidden) -> (B, n_tok, llm_hidden).

    `mlp2x_gelu` is Linear, GELU, Linear: the same nn.Sequential layout as LLaVA-1.5, so its
    `mm_projector.bin` keys ("0.weight", "2.weight", ...) load directly.
    """
    if kind == "linear":
        return nn.Linear(vision_hidden, llm_hidden)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"--mm_projector_type {kind!r}: expected 'linear' or 'mlp<N>x_gelu' (e.g. mlp2x_gelu)")
    layers: list[nn.Module] = [nn.Linear(vision_hidden, llm_hidden)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden)]
    return nn.Sequential(*layers)


def load_projector_state(projector: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a projector state dict, accepting LLaVA's prefixed keys (`model.mm_projector.0.weight`)."""
    cleaned = {}
    for key, value in state.items():
        for prefix in ("model.mm_projector.", "mm_projector.", "base_model.model.model.mm_projector."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        cleaned[key] = value
    if isinstance(projector, nn.Linear) and "0.weight" in cleaned and "weight" not in cleaned:
        cleaned = {k[2:]: v for k, v in cleaned.items()}
    expected = projector.state_dict()
    missing, unexpected = expected.keys() - cleaned.keys(), cleaned.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"projector weights do not fit the projector: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    for key, tensor in expected.items():
        if cleaned[key].shape != tensor.shape:
            raise ValueError(f"projector weight {key}: checkpoint shape {tuple(cleaned[key].shape)} "
                             f"!= model shape {tuple(tensor.shape)}")
    projector.load_state_dict(cleaned)
