"""MoSLoRA layer: a frozen nn.Linear plus a low-rank update whose two subspaces are fused by a learnable mixer.

    x (..., d_in) ──────────── base: frozen W (d_out, d_in), b ─────────────────┐
      │                                                                         ▼
      └─ dropout ─► A (r, d_in) ─► M (r, r) mixer ─► × s ─► B (d_out, r) ──► (+) ─► y (..., d_out)
                    Kaiming-uniform  see MIXER_INITS;          zeros, so the
                                     identity (no parameter)   adapted model starts
                                     for LoRA                  equal to the base

    y = W x + b + s · B M A dropout(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

Mixture-of-Subspaces LoRA (Wu et al., "Mixture-of-Subspaces in Low-Rank Adaptation", arXiv 2406.11909): plain
LoRA's B A is a sum of r rank-1 subspaces paired one-to-one; the r×r mixer M between A and B lets every
A-subspace feed every B-subspace. The paper trains M jointly with A and B and compares mixer initialisations
(its ablation: zero, identity, normal, orthogonal, Kaiming-uniform; Kaiming is the default here). With
`freeze_mixer` M keeps its initial value (it is still a tensor of the adapter, saved and folded like a trained one). Because B M A is still a (d_out, d_in) rank-r matrix, it merges
into W exactly like LoRA, and folding M into A (A' = M A) turns a MoSLoRA adapter into a plain LoRA one.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import dropout_kernels

ADAPTER_KINDS = ("moslora", "lora")
# The paper's ablation. "normal" is N(0, 1/r²) (PEFT's Gaussian LoRA init); "zero" makes B M A's gradients all
# zero (B and M start at 0), so nothing trains: the paper's "does not converge", kept so it can be shown.
MIXER_INITS = ("kaiming", "orthogonal", "normal", "identity", "zero")


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (a QLoRA base; checked by class, without importing bitsandbytes)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor s on the low-rank branch: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def fold_mixer(lora_A: torch.Tensor, lora_M: torch.Tensor | None) -> torch.Tensor:
    """M·A in fp32, the down-projection of an equivalent plain LoRA. lora_A: (r, d_in), lora_M: (r, r) or None."""
    A = lora_A.float()
    return A if lora_M is None else lora_M.float() @ A


@dataclass
class AdapterConfig:
    """What an adapter is; saved next to its weights so it can be rebuilt on the same base LM.

    Defaults follow LLaVA-1.5's LoRA recipe (r=128, alpha=256, dropout=0.05), which the MoSLoRA paper reuses
    for visual instruction tuning.

    target_modules: None targets every linear layer of the decoder blocks named in
        `inject.DEFAULT_TARGET_MODULES`; a list selects modules whose qualified name ends with one of the
        given suffixes (e.g. ["q_proj", "v_proj"]); a string is a regex that must fullmatch the qualified name.
    base_model: name or path of the base LM the adapter was trained on (informational, used by exports).
    """

    adapter: str = "moslora"
    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    mixer_init: str = "kaiming"
    freeze_mixer: bool = False
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    base_model: str | None = None

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTER_KINDS:
            raise ValueError(f"adapter must be one of {ADAPTER_KINDS}, got {self.adapter!r}")
        if self.mixer_init not in MIXER_INITS:
            raise ValueError(f"mixer_init must be one of {MIXER_INITS}, got {self.mixer_init!r}")
        if self.adapter == "lora" and (self.mixer_init != "kaiming" or self.freeze_mixer):
            raise ValueError("adapter 'lora' has no mixer (M is the identity): mixer_init and freeze_mixer apply to "
                             "'moslora' only (moslora with mixer_init='identity' and freeze_mixer=True is LoRA)")
        if not isinstance(self.freeze_mixer, bool):
            raise ValueError(f"freeze_mixer must be true or false, got {self.freeze_mixer!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"target_modules regex {self.target_modules!r} is invalid: {err}") from err
        elif self.target_modules is not None:
            names = list(self.target_modules)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"target_modules must be None, a regex string or a non-empty list of names, "
                                 f"got {self.target_modules!r}")
            self.target_modules = names

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)


class MoSLoRALinear(nn.Module):
    """A frozen `nn.Linear` (kept as `.base`) with a MoSLoRA (or plain LoRA) update.

    Parameters: `lora_A` (r, d_in), `lora_B` (d_out, r) and, for adapter="moslora" only, `lora_M` (r, r). For
    adapter="lora", `lora_M` is None: the mixer is the identity, so the same forward skips it.
    dtype: dtype of the adapter parameters (fp32 by default; bf16 trades precision for speed).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, adapter: str = "moslora",
                 mixer_init: str = "kaiming", use_rslora: bool = False, dtype: torch.dtype = torch.float32,
                 freeze_mixer: bool = False):
        super().__init__()
        if adapter not in ADAPTER_KINDS:
            raise ValueError(f"adapter must be one of {ADAPTER_KINDS}, got {adapter!r}")
        if mixer_init not in MIXER_INITS:
            raise ValueError(f"mixer_init must be one of {MIXER_INITS}, got {mixer_init!r}")
        if adapter == "lora" and freeze_mixer:
            raise ValueError("freeze_mixer applies to adapter 'moslora' only: 'lora' has no mixer")
        self.base = base.requires_grad_(False)
        self.adapter, self.r, self.alpha, self.mixer_init = adapter, r, alpha, mixer_init
        self.scaling = lora_scaling(r, alpha, use_rslora)
        # nn.Identity when dropout is off: no masked copy of the activations is materialised.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # in/out_features rather than weight.shape: the weight may be a ZeRO-3 partition.
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=device))
        if adapter == "moslora":
            self.lora_M = nn.Parameter(torch.empty(r, r, dtype=dtype, device=device), requires_grad=not freeze_mixer)
        else:
            self.register_parameter("lora_M", None)
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, dtype=dtype, device=device))
        self.merged = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A: Kaiming-uniform(a=√5); M: as `mixer_init` says; B: zeros, so the update starts at 0.

        Drawn in fp32 and then cast, so bf16 adapters get the same distribution (orthogonal_ needs fp32 QR).
        identity and zero draw no random numbers, so MoSLoRA with a frozen identity mixer equals LoRA exactly.
        """
        for name in ("lora_A", "lora_M"):
            param = getattr(self, name)
            if param is None:
                continue
            values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            init = self.mixer_init if name == "lora_M" else "kaiming"
            if init == "orthogonal":
                nn.init.orthogonal_(values)
            elif init == "normal":
                nn.init.normal_(values, std=1.0 / self.r)
            elif init == "identity":
                nn.init.eye_(values)
            elif init == "zero":
                values.zero_()
            else:
                nn.init.kaiming_uniform_(values, a=math.sqrt(5))
            param.copy_(values)
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.training else 0.0
        if p > 0 and not self.merged and torch.is_grad_enabled() and torch.compiler.is_compiling():
            return self._traced_forward(x, p)
        if torch.is_grad_enabled() and self._can_fuse_base(x):
            # Base layer inside the branch: its input gradient and the adapter's come out of one GEMM.
            return LowRankBranch.apply(x, None, self.base.weight, self.base.bias, self.lora_A, self.lora_M,
                                       self.lora_B, self.scaling, p)
        y = self.base(x)
        if self.merged:
            return y
        h = x.to(self.lora_A.dtype)
        if torch.is_grad_enabled():
            return LowRankBranch.apply(h, y, None, None, self.lora_A, self.lora_M, self.lora_B, self.scaling, p)
        h = F.dropout(h, p, True) if p > 0 else h
        h = F.linear(h, self.lora_A)                   # (..., r)
        if self.lora_M is not None:
            h = F.linear(h, self.lora_M)               # (..., r): h @ Mᵀ = M applied to each A x
        h = F.linear(h * self.scaling, self.lora_B)    # scale the r-wide tensor, cheaper than the d_out-wide one
        # Back to the base output's dtype (x's dtype, except under autocast where both follow the autocast dtype).
        return y + h.to(y.dtype)

    def _traced_forward(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """The same maths in plain differentiable ops, for torch.compile (`--torch_compile`) with dropout on.

        LowRankBranch replays its dropout mask in backward from a saved RNG state (torch.get_rng_state), which
        dynamo cannot trace: every adapter would be a graph break. Here the compiler sees the whole branch, derives
        its backward and fuses the dropout, scaling and casts into neighbouring kernels (the mask comes from
        inductor's own random stream). With dropout off LowRankBranch traces as it is, so it is used there.
        """
        y = self.base(x)
        A_eff = self.lora_A if self.lora_M is None else self.lora_M @ self.lora_A  # fold M once, as LowRankBranch
        h = F.linear(F.dropout(x.to(self.lora_A.dtype), p, True), A_eff)           # (..., r)
        return y + F.linear(h * self.scaling, self.lora_B).to(y.dtype)

    def _can_fuse_base(self, x: torch.Tensor) -> bool:
        """The frozen base can be computed inside LowRankBranch: a plain nn.Linear whose weight is a whole,
        frozen tensor (not a ZeRO-3 partition, which only the base module's own hooks gather), everything in
        one dtype and no autocast (which the base layer would follow and the branch would not)."""
        weight = self.base.weight
        return (not self.merged and type(self.base) is nn.Linear and not weight.requires_grad
                and not hasattr(weight, "ds_id") and x.dtype == weight.dtype == self.lora_A.dtype
                and not torch.is_autocast_enabled(x.device.type))

    def folded_A(self) -> torch.Tensor:
        """M·A in fp32, (r, d_in): the down-projection of the equivalent plain LoRA."""
        return fold_mixer(self.lora_A, self.lora_M)

    def delta_weight(self) -> torch.Tensor:
        """s·B·M·A in fp32, (d_out, d_in): what merge() adds to base.weight."""
        return self.scaling * (self.lora_B.float() @ self.folded_A())

    def _check_mergeable(self) -> None:
        if is_quantized_linear(self.base):  # its weight is packed 4/8-bit storage: adding to it would corrupt it
            raise RuntimeError("cannot merge into a quantized base layer: dequantize it first "
                               "(mm_moslora.model.quantize.dequantize_linears), then merge in fp32")

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into base.weight (summed in fp32, then cast to the weight's dtype). No-op if merged."""
        if self.merged:
            return
        self._check_mergeable()
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from base.weight again. No-op if not merged. Exact in fp32 up to rounding."""
        if not self.merged:
            return
        self._check_mergeable()
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        mixer = "" if self.lora_M is None else f", mixer={self.mixer_init}{'' if self.lora_M.requires_grad else ' (frozen)'}"
        return (f"adapter={self.adapter}, r={self.r}, scaling={self.scaling:g}{mixer}, "
                f"dtype={self.lora_A.dtype}, merged={self.merged}")


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _replay_dropout(t: torch.Tensor, p: float, state) -> torch.Tensor:
    """F.dropout(t, p) with the mask drawn from RNG `state`: the same mask as the forward pass drew."""
    devices = [t.device] if t.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=t.device.type if devices else "cuda"):
        if t.device.type == "cuda":
            torch.cuda.set_rng_state(state, t.device)
        else:
            torch.set_rng_state(state)
        return F.dropout(t, p, True)


class LowRankBranch(torch.autograd.Function):
    """W·x + b + s·B·M·A·dropout(x) for training, lean on time and activation memory.

    Two forms: given the frozen base weight W (and bias b), the base layer is computed here too, so that in
    backward its input gradient and the adapter's come out of one GEMM (g·W + the adapter's term in the epilogue)
    instead of two tensors that autograd then adds; given the base output y instead (ZeRO-3 partitions,
    quantized or trainable bases, autocast), only the branch is computed and y is added to it.
    - The mixer is folded into A once per call (A' = M·A: r·r·d_in FLOPs, against N·r·r per token when applied
      to activations), so MoSLoRA costs per token what LoRA does; gradients of A and M follow from A'
      (dA = Mᵀ·dA', dM = dA'·Aᵀ). A' is kept for backward (r×d_in, small) rather than recomputed.
    - The base output is added in the epilogue of the last matmul (addmm) instead of a separate add.
    - Saved for backward: x itself (the same tensor the sibling projections of q/k/v or gate/up receive, so it
      costs nothing extra), the r-wide A'·x, and an RNG state: the dropout mask is regenerated in backward
      instead of storing a masked copy of x per module, which is what makes LoRA fine-tuning run out of memory
      without activation checkpointing. Where Triton runs (`dropout_kernels.usable`), not even that: the mask is
      drawn inside the three matmuls that read it (from a seed), so no dropped-out x is written in forward or
      backward and the masked input gradient is added straight into the base layer's.
    Shapes: x (..., d_in), y (..., d_out) or None, W (d_out, d_in) or None, b (d_out) or None, A (r, d_in),
    M (r, r) or None (plain LoRA), B (d_out, r) -> (..., d_out).
    """

    @staticmethod
    def forward(ctx, x, y, W, b, A, M, B, scaling: float, p: float):
        x2 = x.reshape(-1, x.shape[-1])                                    # (N, d_in)
        if W is not None:
            y2 = torch.addmm(b, x2, W.t()) if b is not None else x2 @ W.t()
        else:
            y2 = y.reshape(-1, y.shape[-1]).to(B.dtype)
        A_eff = M @ A if M is not None else A
        fused = p > 0 and dropout_kernels.usable(x2, A_eff, p)
        if fused:  # the mask is drawn inside the kernels from a seed: no dropped-out copy of x is written
            state = dropout_kernels.draw_seed(x.device)
            u = dropout_kernels.dropout_matmul(x2, A_eff, state, p)          # (N, r)
        else:
            state = _rng_state(x.device) if p > 0 else None
            h = F.dropout(x2, p, True) if p > 0 else x2
            u = h @ A_eff.t()                                              # (N, r)
        out = torch.addmm(y2, u, B.t(), alpha=scaling)                     # (N, d_out)
        ctx.save_for_backward(x, W, A, M, A_eff, B, u)  # A_eff is A itself for LoRA: saved once
        ctx.scaling, ctx.p, ctx.rng, ctx.fused = scaling, p, state, fused
        out_dtype = x.dtype if W is not None else y.dtype
        return out.reshape(*x.shape[:-1], B.shape[0]).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, W, A, M, A_eff, B, u = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(B.dtype)           # (N, d_out)
        grad_B = (g.t() @ u) * s if ctx.needs_input_grad[6] else None
        gu = (g @ B) * s                                                   # (N, r)
        grad_A = grad_M = grad_x = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            x2 = x.reshape(-1, x.shape[-1])
            if ctx.fused:
                grad_A_eff = dropout_kernels.dropout_grad_weight(gu, x2, ctx.rng, p)
            else:
                h = _replay_dropout(x2, p, ctx.rng) if p > 0 else x2
                grad_A_eff = gu.t() @ h                                    # (r, d_in)
            if M is None:
                grad_A = grad_A_eff
            else:
                grad_A = M.t() @ grad_A_eff if ctx.needs_input_grad[4] else None
                grad_M = grad_A_eff @ A.t() if ctx.needs_input_grad[5] else None
        if ctx.needs_input_grad[0] and ctx.fused:
            # The base layer's input gradient first; the kernel adds the masked adapter term into it.
            base_grad = (g @ W) if W is not None else None
            grad_x = dropout_kernels.matmul_dropout(gu, A_eff, ctx.rng, p, out=base_grad)
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        elif ctx.needs_input_grad[0]:
            grad_x = gu @ A_eff                                            # (N, d_in)
            if p > 0:
                grad_x = _replay_dropout(grad_x, p, ctx.rng)
            if W is not None:  # the base layer's input gradient, with the adapter's added in the epilogue
                grad_x = torch.addmm(grad_x.to(g.dtype), g, W)
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        grad_y = grad_out if W is None and ctx.needs_input_grad[1] else None
        return grad_x, grad_y, None, None, grad_A, grad_M, grad_B, None, None
