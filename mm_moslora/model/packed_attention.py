"""Attention for packed rows (several samples per sequence, each attending only to itself), registered with
transformers as attention implementation "mm_varlen".

A packed batch reaches the attention layers as (B, H, T, D) tensors plus transformers' FlashAttention keyword
arguments `cu_seq_lens_q` (cumulative segment starts over the flattened B*T tokens, int32) and `max_length_q`.
On CUDA the segments go through PyTorch's own FlashAttention varlen kernel (torch.nn.attention.varlen, no
flash-attn package needed); elsewhere through one causal SDPA call per segment (the same result, for tests).
With the `sdpa` / `eager` / `flex_attention` implementations instead, transformers builds a block-diagonal
causal mask from the restarting `position_ids` (attention_mask=None); `flash_attention_2` reads the same
keyword arguments as this module.
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

NAME = "mm_varlen"
backend: str | None = None  # which kernel the last packed batch went through (benchmarks report it)
log = logging.getLogger(__name__)


def _torch_varlen():
    """PyTorch's varlen FlashAttention, called causally whatever its version's spelling; None when absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "window_size" in inspect.signature(varlen_attn).parameters:  # torch >= 2.11
        return lambda q, k, v, cu, n, scale: varlen_attn(q, k, v, cu, cu, n, n, scale=scale, window_size=(-1, 0))
    return lambda q, k, v, cu, n, scale: varlen_attn(q, k, v, cu, cu, n, n, scale=scale, is_causal=True)


def varlen_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """query: (B, H, T, D); key, value: (B, H_kv, T, D) -> ((B, T, H, D), None), as transformers' interface."""
    cu_seq_lens, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seq_lens is None or max_length is None:
        raise ValueError(f"attention implementation {NAME!r} needs cu_seq_lens_q and max_length_q (packed batches)")
    if dropout:
        raise ValueError(f"attention implementation {NAME!r} has no attention dropout")
    batch, heads, length, dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: one K/V head per group of query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    q, k, v = (t.transpose(1, 2).reshape(batch * length, heads, dim) for t in (query, key, value))
    global backend
    varlen = _torch_varlen() if q.is_cuda and backend != "sdpa per segment (varlen failed)" else None
    out = None
    if varlen is not None:
        try:
            out = varlen(q, k, v, cu_seq_lens.to(torch.int32), int(max_length), scaling)
            backend = "torch varlen FlashAttention"
        except RuntimeError as err:  # e.g. a GPU or dtype the kernel does not support: same result, slower
            log.warning("FlashAttention varlen failed (%s); packed attention runs one SDPA call per sample", err)
            backend = "sdpa per segment (varlen failed)"
    if out is None:
        if backend is None:
            backend = "sdpa per segment"
        bounds = cu_seq_lens.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                           is_causal=True, scale=scaling).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])])
    return out.reshape(batch, length, heads, dim), None


def register() -> None:
    """Make "mm_varlen" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)  # no mask: the segments say it all


def cu_seq_lens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """position_ids: (B, T), restarting at 0 for every segment -> (cumulative starts over B*T tokens (n+1,) int32,
    longest segment)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
