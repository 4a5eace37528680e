"""open_clip vision tower that returns the patch features of a chosen transformer block.

LLaVA convention for the feature layer: `select_layer` indexes Hugging Face CLIP's `hidden_states`,
where entry 0 is the embedding output and entry i the output of block i, so -1 is the last block and
-2 (LLaVA's default) the penultimate one. Index 0 (raw embeddings) is not offered by open_clip.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import torch
from torch import nn

TINY_VISION_NAME = "mm-tiny-vit"
_TINY_DIR = Path(__file__).parent / "tiny"
_registered = False


def register_tiny_config() -> None:
    """Make the shipped tiny ViT config known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(str(_TINY_DIR / f"{TINY_VISION_NAME}.json"))
        _registered = True


def _resolve_model_name(name_or_path: str) -> tuple[str, str | None]:
    """Map a user's `--vision_tower` to (open_clip model name, pretrained tag or file).

    Accepts an open_clip architecture name, "NAME:PRETRAINED" (a tag such as openai or a local file),
    "hf-hub:org/repo", or a local folder holding open_clip_config.json (+ weights).
    """
    if os.path.isdir(name_or_path):
        cfg_file = Path(name_or_path) / "open_clip_config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"--vision_tower {name_or_path}: folder has no open_clip_config.json")
        cfg = json.loads(cfg_file.read_text())
        model_cfg = cfg.get("model_cfg", cfg)
        arch = f"local-{Path(name_or_path).resolve().name}"
        open_clip.factory._MODEL_CONFIGS[arch] = model_cfg  # open_clip has no public API for a config dict
        weights = next((str(p) for p in (Path(name_or_path) / f for f in
                        ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")) if p.exists()), None)
        return arch, weights
    if ":" in name_or_path and not name_or_path.startswith("hf-hub:"):
        arch, pretrained = name_or_path.split(":", 1)
        return arch, pretrained
    return name_or_path, None


class VisionTower(nn.Module):
    """Frozen open_clip ViT returning features of one block.

    forward(pixels: (B, 3, H, W)) -> (B, num_tokens, hidden_size); num_tokens counts patches, plus one
    for CLS when `select_feature="cls_patch"`.
    """

    def __init__(self, name_or_path: str = TINY_VISION_NAME, pretrained: str | None = None,
                 select_layer: int = -2, select_feature: str = "patch", trainable: bool = False,
                 init_seed: int = 0):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"--mm_vision_select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        register_tiny_config()
        arch, tag = _resolve_model_name(name_or_path)
        pretrained = pretrained or tag
        if arch not in open_clip.list_models() and not arch.startswith("hf-hub:"):
            raise ValueError(f"unknown open_clip architecture {arch!r} (from --vision_tower {name_or_path!r}); "
                             f"see open_clip.list_models()")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)  # random towers (tiny default, tests) must rebuild identically
            clip = open_clip.create_model(arch, pretrained=pretrained)
        self.name_or_path, self.pretrained = name_or_path, pretrained
        self.visual = clip.visual
        pre = open_clip.get_model_preprocess_cfg(clip)
        self.image_mean, self.image_std = tuple(pre["mean"]), tuple(pre["std"])
        size = pre["size"]
        self.image_size = size if isinstance(size, int) else size[0]
        del clip  # the text tower is not needed

        n_blocks = len(self.visual.transformer.resblocks) if hasattr(self.visual, "transformer") else None
        if select_layer == 0 or (n_blocks is not None and not -n_blocks <= select_layer <= n_blocks):
            raise ValueError(f"--mm_vision_select_layer {select_layer} out of range for a {n_blocks}-block tower "
                             f"(use -1..-{n_blocks} or 1..{n_blocks})")
        self.block_index = (n_blocks + select_layer) if select_layer < 0 else select_layer - 1
        self.select_layer, self.select_feature = select_layer, select_feature
        self.hidden_size = self.visual.transformer.width
        grid = self.visual.grid_size
        self.num_patches = grid[0] * grid[1]
        self.num_tokens = self.num_patches + (1 if select_feature == "cls_patch" else 0)
        self.trainable = trainable
        self.visual.requires_grad_(trainable)
        if not trainable:
            self.visual.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.visual.eval()  # frozen tower keeps eval-mode behaviour (no dropout)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.visual.forward_intermediates(
                pixels.to(self.dtype), indices=[self.block_index], intermediates_only=True,
                output_fmt="NLC", output_extra_tokens=self.select_feature == "cls_patch")
            feats = out["image_intermediates"][0]
            if self.select_feature == "cls_patch":
                feats = torch.cat([out["image_intermediates_prefix"][0], feats], dim=1)
        return feats
