"""open_clip vision tower that returns the patch features of a chosen transformer block.

LLaVA convention for the feature layer: `select_layer` indexes Hugging Face CLIP's `hidden_states`,
where entry 0 is the embedding output and entry i the output of block i, so -1 is the last block and
-2 (LLaVA's default) the penultimate one. Index 0 (raw embeddings) is not offered by open_clip.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn


def _import_open_clip():
    """open_clip imports timm, whose training utilities import wandb when it is installed (lmms-eval installs it):
    about 2 s of every command's start, for a logger nothing here uses. wandb is hidden during that import only."""
    if "wandb" not in sys.modules:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError: timm then goes on as without wandb
        try:
            import open_clip
        finally:
            del sys.modules["wandb"]  # a later `import wandb` (the user's) works as usual
    import open_clip
    return open_clip


open_clip = _import_open_clip()

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
    "hf-hub:org/repo", or a local folder holding open_clip_config.json (+ weights), the layout of
    open_clip's Hugging Face repos. A folder goes through open_clip's own "local-dir:" schema, which
    also reads the folder's preprocess_cfg (mean/std differ between model families).
    """
    if os.path.isdir(name_or_path):
        if not (Path(name_or_path) / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"--vision_tower {name_or_path}: folder has no open_clip_config.json")
        return f"local-dir:{name_or_path}", None
    if ":" in name_or_path and not name_or_path.startswith(("hf-hub:", "local-dir:")):
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
        has_schema = arch.startswith(("hf-hub:", "local-dir:"))
        if not has_schema and arch not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {arch!r} (from --vision_tower {name_or_path!r}); "
                             f"see open_clip.list_models()")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)  # random towers (tiny default, tests) must rebuild identically
            # open_clip ignores `pretrained` for schema names: a folder or hub repo brings its own weights.
            clip = open_clip.create_model(arch, pretrained=None if has_schema else pretrained)
        if has_schema and pretrained:  # explicit weights file on top of a folder/hub config
            open_clip.load_checkpoint(clip, pretrained)
        self.name_or_path, self.pretrained = name_or_path, pretrained
        self.visual = clip.visual
        pre = open_clip.get_model_preprocess_cfg(clip)
        self.image_mean, self.image_std = tuple(pre["mean"]), tuple(pre["std"])
        size = pre["size"]
        self.image_size = size if isinstance(size, int) else size[0]
        del clip  # the text tower is not needed

        if not hasattr(self.visual, "transformer") or not hasattr(self.visual, "forward_intermediates"):
            raise ValueError(f"--vision_tower {name_or_path!r}: only open_clip ViT towers are supported "
                             f"(got {type(self.visual).__name__})")
        n_blocks = len(self.visual.transformer.resblocks)
        if select_layer == 0 or not -n_blocks <= select_layer <= n_blocks:
            raise ValueError(f"--mm_vision_select_layer {select_layer} out of range for a {n_blocks}-block tower "
                             f"(use -1..-{n_blocks} or 1..{n_blocks})")
        self.block_index = (n_blocks + select_layer) if select_layer < 0 else select_layer - 1
        # Blocks after the selected one, the final norm and the projection head are never used: drop
        # them (less memory, and no parameters without gradients when the tower is tuned).
        self.visual.prune_intermediate_layers([self.block_index], prune_norm=True, prune_head=True)
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
            for module in self.adapter_layers():  # its adapters (dropout) follow the mode
                module.train(mode)
        return self

    def adapter_layers(self) -> list[nn.Module]:
        """The tower's MoSLoRA layers (see mm_moslora.adapters.vision); empty when it has none."""
        from ..adapters.inject import adapter_modules

        return list(adapter_modules(self.visual).values())

    def add_adapters(self, config, dtype: torch.dtype | None = None) -> list[str]:
        """Inject MoSLoRA/LoRA layers by `config` (an AdapterConfig) into the frozen tower; returns their names."""
        from ..adapters.vision import inject_vision_adapters

        if self.trainable:
            raise ValueError("the vision tower is fully trainable (--unfreeze_mm_vision_tower): an adapter on it "
                             "would train alongside every weight it adapts; choose one of the two")
        names = inject_vision_adapters(self.visual, config, dtype=dtype or self.dtype)
        self.train(self.training)
        return names

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations (open_clip's own checkpointing)."""
        self.visual.set_grad_checkpointing(enabled)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Gradients flow through the tower when it is tuned, fully or by its adapters.
        needs_grad = self.trainable or any(p.requires_grad for p in self.visual.parameters())
        with torch.set_grad_enabled(needs_grad and torch.is_grad_enabled()):
            out = self.visual.forward_intermediates(
                pixels.to(self.dtype), indices=[self.block_index], stop_early=True, intermediates_only=True,
                output_fmt="NLC", output_extra_tokens=self.select_feature == "cls_patch")
            feats = out["image_intermediates"][0]
            if self.select_feature == "cls_patch":
                feats = torch.cat([out["image_intermediates_prefix"][0], feats], dim=1)
        return feats
