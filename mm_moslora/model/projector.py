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
    """Load a projector state dict, accepting LLaVA's prefixed keys (`model.mm_projector.0.weight`).

    Raises ValueError naming the keys on missing/unexpected keys or a shape mismatch.
    """
    cleaned: dict[str, torch.Tensor] = {}
    source_key: dict[str, str] = {}  # cleaned key -> key as written in the checkpoint, for messages
    for key, value in state.items():
        short = key
        for prefix in ("base_model.model.model.mm_projector.", "model.mm_projector.", "mm_projector."):
            if key.startswith(prefix):
                short = key[len(prefix):]
                break
        cleaned[short], source_key[short] = value, key
    if isinstance(projector, nn.Linear) and set(cleaned) == {"0.weight", "0.bias"}:
        # A one-layer nn.Sequential checkpoint ("0.weight") for a bare nn.Linear. Only that exact
        # layout is renamed: an MLP checkpoint must not collapse onto "weight"/"bias" and load silently.
        cleaned = {k[2:]: v for k, v in cleaned.items()}
        source_key = {k[2:]: v for k, v in source_key.items()}
    expected = projector.state_dict()
    missing, unexpected = expected.keys() - cleaned.keys(), cleaned.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"projector weights do not fit the projector: missing {sorted(missing)}, "
                         f"unexpected {sorted(source_key[k] for k in unexpected)}")
    for key, tensor in expected.items():
        if cleaned[key].shape != tensor.shape:
            raise ValueError(f"projector weight {source_key[key]}: checkpoint shape {tuple(cleaned[key].shape)} "
                             f"!= model shape {tuple(tensor.shape)}")
    projector.load_state_dict(cleaned)
