"""Liger Kernel's fused Triton kernels in the training step (`--use_liger_kernel`, as in Hugging Face's Trainer and
ms-swift), for every model family Liger supports: its RoPE, RMSNorm, SwiGLU / GeGLU MLP and LayerNorm kernels,
and its fused linear cross-entropy for our supervised-positions loss (`MultimodalLM.supervised_loss`).

- The kernels come from Liger's own per-instance dispatch by `config.model_type` (`_apply_liger_kernel_to_instance`,
  the entry point transformers' Trainer calls), with each family's own choice of kernels (Liger leaves RoPE off
  for DeepSeek, GLM-4, Gemma 4, Qwen3-Next/3.5, for instance). Its loss patches stay off: we compute the loss
  ourselves from the selected supervised hidden states (`linear_cross_entropy_sum` below), so no patched
  `forward` of the causal LM is involved.
- Liger binds new `forward` methods to the norm and MLP modules that exist; the MLP's still calls
  `self.gate_proj(x)`, `self.up_proj(x)`, `self.down_proj(...)`, so the MoSLoRA layers that replaced those children
  run inside it (tests/test_fused_kernels.py checks every adapter gradient). It is applied last, after adapter
  injection and quantization, so that what Liger patches is the module tree that trains: nothing it bound a method
  to is replaced afterwards, and the loss sees the final LM head.
- RoPE, and the norm and MLP classes of models built later, are patched in the family's transformers module:
  process-wide, and not undone. A process that needs both (benchmarks) runs each setting in its own process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

log = logging.getLogger(__name__)

CHOICES = ("auto", "true", "false")


class LigerKernelError(InputError):
    """--use_liger_kernel true where Liger Kernel cannot run (no CUDA device, not installed, unsupported LM)."""


@dataclass(frozen=True)
class LigerDecision:
    """Whether the run uses Liger Kernel, and why (the reason goes into the log and the run's summary)."""
    on: bool
    reason: str

    def describe(self) -> str:
        return f"{'on' if self.on else 'off'} ({self.reason})"


def liger_version() -> str | None:
    """The installed liger-kernel's version, or None when it is not installed or does not import."""
    try:
        from importlib.metadata import version

        import liger_kernel.transformers  # noqa: F401  (the import that fails on a broken install)
        return version("liger-kernel")
    except Exception:  # noqa: BLE001 - ImportError, or a Triton that cannot load: either way, not usable
        return None


def supported_model_types() -> frozenset[str]:
    """The `config.model_type` values Liger Kernel has kernels for (empty when it is not installed)."""
    if liger_version() is None:
        return frozenset()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def unavailable_reason(device: torch.device, model_type: str | None) -> str | None:
    """Why Liger Kernel cannot run here, or None when it can. model_type None: not known yet (not checked)."""
    if device.type != "cuda":
        return f"no CUDA device (the run is on {device.type}), and Liger's kernels are Triton GPU kernels"
    version = liger_version()
    if version is None:
        return "liger-kernel is not installed (pip install 'mm_moslora[speed]')"
    if model_type is not None and model_type not in supported_model_types():
        return f"model_type {model_type!r} is not supported by liger-kernel {version}"
    return None


def resolve_use_liger_kernel(choice: str, device: torch.device, model_type: str | None) -> LigerDecision:
    """--use_liger_kernel: `auto` = on when the device is CUDA, liger-kernel imports and it supports `model_type`;
    `true` where it cannot run raises LigerKernelError naming the reason; `false` = off."""
    if choice not in CHOICES:
        raise LigerKernelError(f"--use_liger_kernel {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "false":
        return LigerDecision(False, "--use_liger_kernel false")
    reason = unavailable_reason(device, model_type)
    if choice == "true":
        if reason:
            raise LigerKernelError(f"--use_liger_kernel true: {reason}")
        return LigerDecision(True, f"--use_liger_kernel true, liger-kernel {liger_version()}, {model_type}")
    if reason:
        return LigerDecision(False, f"auto: {reason}")
    return LigerDecision(True, f"auto: CUDA, liger-kernel {liger_version()}, {model_type}")


def apply_liger_kernel(model: nn.Module) -> None:
    """Liger's kernels on `model.llm` (a transformers causal LM, adapters already injected) and the fused linear
    cross-entropy in `model`'s loss. model: a MultimodalLM. Raises LigerKernelError for an unsupported LM."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    model_type = getattr(model.llm.config, "model_type", None)
    if model_type not in supported_model_types():
        raise LigerKernelError(f"--use_liger_kernel: model_type {model_type!r} is not supported by liger-kernel "
                               f"{liger_version()}")
    # Our loss is fused below; Liger's own loss patches would replace the LM's forward (and, for some families,
    # torch's cross_entropy process-wide).
    _apply_liger_kernel_to_instance(model=model.llm, cross_entropy=False, fused_linear_cross_entropy=False)
    model.fused_linear_cross_entropy = True


def head_unfusable_reason(head: nn.Module) -> str | None:
    """Why the LM head cannot go through the fused linear cross-entropy, or None when it can."""
    if type(head) is not nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    if hasattr(head.weight, "ds_id"):
        return "the LM head's weight is a ZeRO-3 partition (gathered only by the module's own hooks)"
    return None


def linear_cross_entropy_sum(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of cross_entropy(hidden @ head.weight.T + head.bias, targets), without materialising the
    logits: Liger computes them chunk by chunk (in hidden's dtype, softmax in fp32, as the plain path's
    `.float()` logits) and keeps only the loss and the input gradient. hidden: (N, H), N >= 1; targets: (N,)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, head.bias)
