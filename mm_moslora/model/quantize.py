"""The frozen LM in 4 or 8 bits (QLoRA), through bitsandbytes as LLaVA's `--bits 4` and PEFT load it.

    nn.Linear (bf16/fp16/fp32) ──quantize_linears──► bnb Linear4bit (NF4/FP4, double quant) | Linear8bitLt
                                                      └─ wrapped by MoSLoRALinear like any base layer (adapters stay
                                                         in full precision, its non-fused path adds s·B·M·A·x to y)
    merge: dequantize_linears ──► nn.Linear holding dequant(quant(W)) in fp32 ──► MoSLoRALinear.merge (fp32 sum)

Every linear layer of the LM's decoder is quantized; the LM head, the embeddings, the norms, the vision tower and
the projector are not (as in LLaVA and PEFT). The adapter learns against dequant(quant(W)), so a merge adds its
update to exactly that, not to the original W: `quantize_linears` quantizes from the weights rounded to the
training dtype (`source_dtype`), which a later export reproduces from the checkpoint's config.

`check_quantized_training` refuses, before anything is loaded, what cannot work: no bitsandbytes, a device where
its kernels do not run, ZeRO-3 parameter partitioning (it would shard the packed 4-bit storage and lose its
quantization state).
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters.moslora import is_quantized_linear
from ..errors import InputError

QUANT_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")


class QuantizationError(InputError):
    """A quantization request that cannot run here; the message says why and what to do instead."""


def import_bitsandbytes(what: str):
    try:
        import bitsandbytes
    except ImportError as err:
        raise QuantizationError(f"{what} needs bitsandbytes, which is not installed here: pip install "
                                f"'mm_moslora[quant]' (or pip install bitsandbytes) ({err})") from None
    return bitsandbytes


def _check_kernels(bits: int, quant_type: str, device: torch.device, what: str) -> None:
    """Run one tiny quantized forward and backward on `device`: bitsandbytes builds without kernels for a device
    fail here, in a second, instead of after the model has loaded."""
    bnb = import_bitsandbytes(what)
    try:
        layer = _quantized_linear(bnb, nn.Linear(64, 64), bits, quant_type, True, torch.float32, torch.float32,
                                  device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
    except Exception as err:  # noqa: BLE001 - any failure means: no usable kernels here
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise QuantizationError(f"{what}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {bits}-bit "
                                f"layers on {device.type} here ({reason}); use a CUDA GPU or a bitsandbytes "
                                f"release with {device.type} kernels, or drop --bits") from None


def check_quantized_training(bits: int, quant_type: str, device: torch.device, zero_stage: int,
                             deepspeed_config: str = "") -> None:
    """Raise QuantizationError (one line, naming the flag) for --bits combinations that cannot train here."""
    if bits == 16:
        return
    if bits not in QUANT_BITS:
        raise QuantizationError(f"--bits {bits}: choose 4, 8 or 16")
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"--quant_type {quant_type!r}: choose one of {QUANT_TYPES}")
    if zero_stage == 3:
        raise QuantizationError(f"--bits {bits} with ZeRO-3 ({deepspeed_config}): ZeRO-3 partitions every parameter "
                                f"across GPUs, and a {bits}-bit weight cannot be partitioned (its packed storage and "
                                f"quantization state would be split apart); use a ZeRO-2 config "
                                f"(deepspeed_configs/zero2.json): the quantized LM is small enough to keep whole")
    _check_kernels(bits, quant_type, device, f"--bits {bits}")


def _quantized_linear(bnb, linear: nn.Linear, bits: int, quant_type: str, double_quant: bool,
                      compute_dtype: torch.dtype, source_dtype: torch.dtype, device) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight, quantized on `device` (bitsandbytes quantizes on .to())."""
    weight = linear.weight.detach().to(source_dtype)
    has_bias = linear.bias is not None
    if bits == 4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant_type, module=layer)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.to(device)


def quantize_linears(llm: nn.Module, bits: int, quant_type: str = "nf4", double_quant: bool = True,
                     compute_dtype: torch.dtype = torch.bfloat16, source_dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None) -> int:
    """Replace every nn.Linear of `llm` but its output head with a frozen bitsandbytes layer, in place, on `device`
    (default: where each weight is). Returns how many were replaced.

    compute_dtype: what the layers compute in (the training dtype). source_dtype: the dtype the weights are rounded
    to before quantizing (default compute_dtype), so an fp32 rebuild of a bf16-trained model quantizes alike.
    """
    bnb = import_bitsandbytes(f"--bits {bits}")
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    names = [name for name, module in llm.named_modules() if type(module) is nn.Linear and module is not head]
    for name in names:
        linear = llm.get_submodule(name)
        target = device if device is not None else linear.weight.device
        llm.set_submodule(name, _quantized_linear(bnb, linear, bits, quant_type, double_quant, compute_dtype,
                                                  source_dtype or compute_dtype, target))
    return len(names)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 (d_out, d_in) weight a bitsandbytes layer computes with: dequant(quant(W))."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    scale = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return weight.data.float() * (scale.float().unsqueeze(1) / 127.0)


def dequantize_linears(module: nn.Module) -> int:
    """Replace every bitsandbytes layer in `module` (also those inside MoSLoRALinear as `.base`) with an fp32
    nn.Linear of its dequantized weight, in place; returns how many. Merging adapters afterwards is exact in fp32."""
    names = [name for name, sub in module.named_modules() if is_quantized_linear(sub)]
    for name in names:
        layer = module.get_submodule(name)
        weight = dequantized_weight(layer)
        with torch.device("meta"):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        module.set_submodule(name, linear)
    return len(names)


def count_quantized(module: nn.Module) -> int:
    return sum(is_quantized_linear(m) for m in module.modules())
