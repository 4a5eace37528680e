"""LLaVA-style model: vision tower -> projector -> causal LM, with image features written into the
text embeddings at the image-token positions.

The tokenizer side (mm_moslora.data.conversation) expands each `<image>` placeholder into
`vision.num_tokens` copies of IMAGE_TOKEN_ID, so sequences, labels and attention masks already have
their final length and image features are a 1:1 `masked_scatter` into those positions.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger(__name__)

IMAGE_TOKEN_ID = -200  # LLaVA's sentinel; never a vocabulary id, so no embedding resize is needed


class MultimodalLM(nn.Module):
    """Parts: `vision` (VisionTower), `projector` (nn.Module), `llm` (a transformers causal LM);
    `image_token_id` marks image positions in `input_ids` (never a vocabulary id).
    `fused_linear_cross_entropy`: the loss through Liger's fused linear cross-entropy (set by
    model.fused_kernels.apply_liger_kernel)."""

    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module, image_token_id: int = IMAGE_TOKEN_ID):
        super().__init__()
        self.vision, self.projector, self.llm = vision, projector, llm
        self.image_token_id = image_token_id
        self.fused_linear_cross_entropy = False
        self._fused_loss_fallback_logged = False

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (n_images, 3, H, W) -> (n_images, num_image_tokens, llm_hidden)."""
        feats = self.vision(pixel_values)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_counts: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) with image_token_id at image positions; pixel_values: (n_images, 3, H, W),
        the images in reading order of their positions; image_counts: (B,) images per row (optional; a packed
        row holds several samples) -> inputs_embeds (B, T, llm_hidden).

        Raises ValueError when the image positions and the image features differ in number, in all or in a row.
        """
        image_mask = input_ids == self.image_token_id
        if image_counts is not None:
            per_row = image_mask.sum(1).cpu()
            expected = image_counts.cpu() * self.num_image_tokens
            if not torch.equal(per_row, expected):
                row = int((per_row != expected).nonzero()[0])
                raise ValueError(f"image tokens and image features do not match in row {row}: {int(per_row[row])} "
                                 f"image-token positions vs {int(image_counts[row])} images x "
                                 f"{self.num_image_tokens} features")
        # The sentinel is no vocabulary id: look up any valid id there, it is overwritten below.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        n_positions = int(image_mask.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_positions:
                raise ValueError(f"image tokens and image features do not match: {n_positions} image-token positions "
                                 f"in the text vs 0 images x {self.num_image_tokens} features = 0")
            if self.training and any(p.requires_grad for p in self.projector.parameters()):
                # Text-only batch: still run the image path so every rank takes part in the same
                # ZeRO-3 gathers and gradient reductions (otherwise multi-GPU training hangs).
                dummy = torch.zeros(1, 3, self.vision.image_size, self.vision.image_size,
                                    device=embeds.device, dtype=embeds.dtype)
                embeds = embeds + 0.0 * self.encode_images(dummy).sum().to(embeds.dtype)
            return embeds
        feats = self.encode_images(pixel_values)
        n_features = feats.shape[0] * feats.shape[1]
        if n_positions != n_features:
            raise ValueError(f"image tokens and image features do not match: {n_positions} image-token positions "
                             f"in the text vs {feats.shape[0]} images x {feats.shape[1]} features = {n_features}")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), feats.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_counts: torch.Tensor | None = None, **llm_kwargs):
        """input_ids, attention_mask, labels: (B, T); pixel_values: (n_images, 3, H, W); image_counts: (B,).

        Packed rows (data.collate.collate_packed) come without attention_mask, with `position_ids` that restart
        for every sample and the FlashAttention keyword arguments (cu_seq_lens_q, ...): all go to the LM.
        Returns the LM's output (`.loss` when labels are given; labels use -100 for ignored positions).
        With labels, the loss is computed from the supervised positions only (see `supervised_loss`), and
        `.logits` is None.
        """
        inputs_embeds = self.embed(input_ids, pixel_values, image_counts)
        if labels is not None and self._can_select_logits():
            return self.supervised_loss(inputs_embeds, attention_mask, labels, **llm_kwargs)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)

    def _can_select_logits(self) -> bool:
        config = self.llm.config
        return (hasattr(self.llm, "get_decoder") and self.llm.get_output_embeddings() is not None
                and not getattr(config, "final_logit_softcapping", None) and not getattr(config, "logit_scale", None))

    def supervised_loss(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                        labels: torch.Tensor, **llm_kwargs) -> CausalLMOutputWithPast:
        """Next-token cross-entropy over supervised positions only: the LM head runs on those hidden states
        alone, so image and prompt positions (over half of a LLaVA sequence) cost no vocabulary projection
        and no fp32 logits are materialised for them. Equal to the Hugging Face loss (mean over labels != -100).
        With `fused_linear_cross_entropy`, Liger computes the same sum without materialising any logits (falling
        back to this path, once logged, where the LM head cannot be fused, e.g. a ZeRO-3 partition).
        """
        # No KV cache in a loss pass (transformers also reads packed rows from position_ids only without one).
        llm_kwargs.setdefault("use_cache", False)
        hidden = self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        **llm_kwargs).last_hidden_state          # (B, T, H)
        targets = labels[:, 1:]
        keep = targets != -100
        head, selected, supervised = self.llm.get_output_embeddings(), hidden[:, :-1][keep], targets[keep]
        if self.fused_linear_cross_entropy and self._can_fuse_head(head) and supervised.numel():
            from .fused_kernels import linear_cross_entropy_sum

            loss_sum = linear_cross_entropy_sum(selected, head, supervised)
        else:
            logits = head(selected)                                             # (n_supervised, vocab)
            loss_sum = F.cross_entropy(logits.float(), supervised, reduction="sum")
        return CausalLMOutputWithPast(loss=loss_sum / keep.sum().clamp(min=1))

    def _can_fuse_head(self, head: nn.Module) -> bool:
        from .fused_kernels import head_unfusable_reason

        reason = head_unfusable_reason(head)
        if reason and not self._fused_loss_fallback_logged:
            log.warning("fused linear cross-entropy off: %s; the loss runs the LM head and a plain cross-entropy", reason)
            self._fused_loss_fallback_logged = True
        return reason is None
