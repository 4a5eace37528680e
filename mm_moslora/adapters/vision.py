"""MoSLoRA (or LoRA) on the open_clip vision tower, through the same layer and injection as the language side.

open_clip's attention keeps q, k and v as one packed parameter (`in_proj_weight`, (3d, d)), not as an nn.Linear
that an adapter could wrap: nn.MultiheadAttention in the default blocks, open_clip's own `Attention` in the custom
ones. Before injecting, each block's attention is replaced by `SplitQKVAttention`, the same computation with q, k
and v as three nn.Linear (rows 0:d, d:2d, 2d:3d of the packed weight) and `out_proj` as a plain nn.Linear — the
layout of Hugging Face's CLIP (`self_attn.q_proj`, ...), so every projection gets its own adapter exactly as the
MoSLoRA paper tunes CLIP with PEFT, and the PEFT export maps one-to-one. `inject_adapters` then wraps these and the
MLP's `c_fc` / `c_proj` with MoSLoRALinear, one code path with the LM. Merging folds the updates into the weights
and `join_attention` packs q, k, v back, so a merged tower is a plain open_clip tower again.

    block: ln_1 ─► attn: q_proj ┐                              (each linear: W x + s·B·M·A·dropout(x))
                         k_proj ├─► scaled dot-product attention ─► out_proj ─► (+) ─► ln_2 ─► c_fc ─► act ─► c_proj
                         v_proj ┘

Module names are relative to the tower's `visual` (e.g. `transformer.resblocks.3.attn.q_proj`); blocks after the
selected feature layer are pruned by VisionTower and so never adapted.
"""
from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from mm_moslora.adapters.inject import inject_adapters, unload_adapters
from mm_moslora.adapters.moslora import AdapterConfig

# Every linear map of an open_clip ViT block, after SplitQKVAttention: attention q/k/v/out and the MLP (only inside
# the blocks: an attention-pooling head, say, has an out_proj too).
_DEFAULT_VISION_PATTERN = (r"transformer\.resblocks\.\d+\.(attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(c_fc|c_proj))")


class VisionAdapterError(ValueError):
    """The tower has a part the vision adapter cannot express; the message names it."""


class SplitQKVAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections; the same function as the module it replaces.

    forward(query, key=None, value=None, need_weights=False, attn_mask=None): nn.MultiheadAttention's call (it
    returns (out, None) for such blocks) and open_clip Attention's `attn(x, attn_mask=...)` (it returns out).
    Shapes: (N, L, d) when batch_first, else (L, N, d). attn_mask: (L, L) or (N * heads, L, L), float (added)
    or bool (True = not attended), as both originals take it.
    Carried over from open_clip's Attention: qk-norm (ln_q, ln_k), per-head scaling, the inner norm, dropouts.
    """

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear, num_heads: int,
                 batch_first: bool, source: str, attn_dropout: float = 0.0, ln_q: nn.Module | None = None,
                 ln_k: nn.Module | None = None, head_scale: nn.Parameter | None = None,
                 ln_inner: nn.Module | None = None, out_drop: nn.Module | None = None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads, self.batch_first, self.source, self.attn_dropout = num_heads, batch_first, source, attn_dropout
        self.ln_q, self.ln_k = ln_q or nn.Identity(), ln_k or nn.Identity()
        self.ln_inner, self.out_drop = ln_inner or nn.Identity(), out_drop or nn.Identity()
        self.head_scale = head_scale  # nn.Parameter (registered) or None

    @property
    def embed_dim(self) -> int:
        return self.q_proj.in_features

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, **unsupported):
        if need_weights or any(v is not None for v in unsupported.values()):
            raise NotImplementedError(f"SplitQKVAttention computes no attention weights and takes no "
                                      f"{sorted(k for k, v in unsupported.items() if v is not None)}")
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:  # (L, N, d) -> (N, L, d)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, width = query.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, L, d) -> (N, heads, L, head_dim)
            return t.reshape(n, t.shape[1], self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        q, k = self.ln_q(q), self.ln_k(k)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True = masked, as in both originals; SDPA takes True = attended
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
            attn_mask = attn_mask.to(q.dtype)
            if attn_mask.dim() == 3:  # (N * heads, L, S)
                attn_mask = attn_mask.reshape(n, self.num_heads, *attn_mask.shape[-2:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        if self.head_scale is not None:
            out = out * self.head_scale
        out = self.ln_inner(out.transpose(1, 2).reshape(n, length, width))
        out = self.out_drop(self.out_proj(out))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, None) if self.source == "mha" else out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain, frozen nn.Linear holding (a copy of) `weight` and `bias`."""
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def _split_one(attn: nn.Module, where: str) -> SplitQKVAttention:
    from open_clip.transformer import Attention as OpenClipAttention

    if isinstance(attn, nn.MultiheadAttention):
        problems = [what for what, bad in (
            ("separate k/v dimensions (kdim/vdim)", not attn._qkv_same_embed_dim),
            ("add_bias_kv", attn.bias_k is not None), ("add_zero_attn", attn.add_zero_attn)) if bad]
        if problems:
            raise VisionAdapterError(f"{where}: nn.MultiheadAttention with {', '.join(problems)} is not supported")
        source, heads, batch_first, dropout = "mha", attn.num_heads, attn.batch_first, attn.dropout
        extras = {}
    elif isinstance(attn, OpenClipAttention):
        if attn.logit_scale is not None:
            raise VisionAdapterError(f"{where}: open_clip Attention with scaled cosine attention is not supported; "
                                     f"adapt only the MLP (--vision_lora_target_modules c_fc,c_proj)")
        source, heads, batch_first, dropout = "open_clip", attn.num_heads, True, attn.attn_drop.p
        extras = dict(ln_q=attn.ln_q, ln_k=attn.ln_k, head_scale=attn.head_scale, ln_inner=attn.ln_inner,
                      out_drop=attn.out_drop)
    else:
        raise VisionAdapterError(f"{where}: attention of type {type(attn).__name__} is not supported (expected "
                                 f"nn.MultiheadAttention or open_clip's Attention)")
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    ws, bs = weight.chunk(3), (bias.chunk(3) if bias is not None else (None,) * 3)
    out = attn.out_proj
    return SplitQKVAttention(*(_linear(w, b) for w, b in zip(ws, bs)), _linear(out.weight, out.bias), heads,
                             batch_first, source, dropout, **extras)


def _blocks(visual: nn.Module):
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        raise VisionAdapterError(f"vision adapters need an open_clip ViT (transformer.resblocks); got "
                                 f"{type(visual).__name__}")
    return transformer.resblocks


def split_attention(visual: nn.Module) -> int:
    """Replace every block's packed attention with SplitQKVAttention, in place; returns how many were replaced.
    Raises VisionAdapterError naming the block before anything changes if one cannot be split."""
    blocks = _blocks(visual)
    todo = [(i, block) for i, block in enumerate(blocks) if not isinstance(block.attn, SplitQKVAttention)]
    replacements = [_split_one(block.attn, f"vision tower block {i}") for i, block in todo]
    for (_, block), split in zip(todo, replacements):
        block.attn = split
    return len(todo)


def _join_one(split: SplitQKVAttention) -> nn.Module:
    from open_clip.transformer import Attention as OpenClipAttention

    layers = (split.q_proj, split.k_proj, split.v_proj, split.out_proj)
    if any(type(layer) is not nn.Linear for layer in layers):
        raise RuntimeError("join_attention: unload the adapters first (q/k/v/out_proj must be plain nn.Linear)")
    has_bias = split.q_proj.bias is not None
    weight = torch.cat([split.q_proj.weight, split.k_proj.weight, split.v_proj.weight]).detach()
    bias = torch.cat([split.q_proj.bias, split.k_proj.bias, split.v_proj.bias]).detach() if has_bias else None
    with torch.device("meta"):  # every tensor is assigned below
        if split.source == "mha":
            attn = nn.MultiheadAttention(split.embed_dim, split.num_heads, dropout=split.attn_dropout, bias=has_bias,
                                         batch_first=split.batch_first)
        else:
            attn = OpenClipAttention(split.embed_dim, split.num_heads, qkv_bias=has_bias, attn_drop=split.attn_dropout)
    attn.in_proj_weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        attn.in_proj_bias = nn.Parameter(bias, requires_grad=False)
    attn.out_proj.weight, attn.out_proj.bias = split.out_proj.weight, split.out_proj.bias
    if split.source == "open_clip":
        attn.ln_q, attn.ln_k, attn.ln_inner, attn.out_drop = split.ln_q, split.ln_k, split.ln_inner, split.out_drop
        attn.head_scale = split.head_scale
    left = [name for name, t in [*attn.named_parameters(), *attn.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"join_attention left tensors unset: {left}")
    return attn


def join_attention(visual: nn.Module) -> int:
    """Undo split_attention (packed in_proj again, the original attention class); returns how many were joined."""
    count = 0
    for block in _blocks(visual):
        if isinstance(block.attn, SplitQKVAttention):
            block.attn = _join_one(block.attn)
            count += 1
    return count


def resolve_vision_targets(target_modules: list[str] | str | None) -> list[str] | str:
    """The targeting rule passed to inject_adapters: None = every linear map of every (kept) block."""
    return _DEFAULT_VISION_PATTERN if target_modules is None else target_modules


def inject_vision_adapters(visual: nn.Module, config: AdapterConfig, dtype: torch.dtype = torch.float32) -> list[str]:
    """Split the tower's attention and inject adapters by `config` (same layer, options and initialisation as the
    LM's); freezes the tower. Returns the adapted module names. On a targeting error the tower is left as it was."""
    split_attention(visual)
    try:
        return inject_adapters(visual, dataclasses.replace(config, target_modules=resolve_vision_targets(
            config.target_modules)), dtype=dtype)
    except Exception:
        join_attention(visual)
        raise


def unload_vision_adapters(visual: nn.Module, merge: bool = True) -> list[str]:
    """Put plain linears back (updates merged into them when `merge`) and re-pack the attention."""
    names = unload_adapters(visual, merge=merge)
    join_attention(visual)
    return names


# open_clip block names -> Hugging Face CLIPEncoderLayer names (the hf-llava export's CLIPVisionModel).
_TO_HF_CLIP = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
               "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def hf_clip_module_name(name: str) -> str:
    """`transformer.resblocks.3.attn.q_proj` -> `encoder.layers.3.self_attn.q_proj` (relative to the HF CLIP vision
    transformer). Raises VisionAdapterError for a module HF CLIP has no counterpart of."""
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
    if not match or match.group(2) not in _TO_HF_CLIP:
        raise VisionAdapterError(f"vision adapter module {name} has no Hugging Face CLIP counterpart")
    return f"encoder.layers.{match.group(1)}.{_TO_HF_CLIP[match.group(2)]}"


# ---------------------------------------------------------------------------------------------------------------
# Files: the tower's adapter is an adapter folder of its own (adapters/io.py's format), beside the LM's.

VISION_ADAPTER_DIR = "vision_adapter"


def save_vision_adapter(checkpoint_dir, config: AdapterConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write CHECKPOINT/vision_adapter/{moslora_adapter.safetensors, moslora_config.json}."""
    from pathlib import Path

    from mm_moslora.adapters.io import save_adapter

    save_adapter(Path(checkpoint_dir) / VISION_ADAPTER_DIR, config, state_dict)


def load_vision_adapter(visual: nn.Module, directory, dtype: torch.dtype = torch.float32) -> AdapterConfig:
    """Split the tower's attention, inject the adapters saved in `directory` (a vision_adapter folder) and load
    them strictly (io.load_adapter: a missing, unexpected or mis-shaped tensor is an error naming the module)."""
    from mm_moslora.adapters.io import load_adapter, read_adapter_config

    config = read_adapter_config(directory)
    inject_vision_adapters(visual, config, dtype=dtype)
    try:
        load_adapter(visual, directory, dtype=dtype)
    except Exception:
        unload_vision_adapters(visual, merge=False)
        raise
    return config
