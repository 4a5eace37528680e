"""`--torch_compile`: every decoder layer of the LM compiled by torch.compile, one layer at a time.

Why per layer (as torchtune's compile_model and fairseq2 do): the layers are alike, so their graphs are small and
the same (the parameters are graph inputs: one compilation serves every layer; a second one for the first layer,
whose input needs no gradient when nothing before it trains, and one per activation-checkpointing setting), and
what runs between them (the vision tower, the projector, the merge of image features, the loss) stays eager
instead of breaking the graph. What it is for: the adapters' elementwise work around their skinny r-wide matmuls
(dropout, scaling, dtype casts, adds), which inductor can fuse.

Applied last (recipe.apply_fast_kernels), on the module tree that trains: adapters, Liger's kernels and the
checkpointing switch of each layer in place. Activation checkpointing is traced into the compiled layer
(transformers checkpoints inside the layer's call; torch.compile supports non-reentrant checkpoint). With dropout
on, the adapters run their plain-ops form under the compiler (MoSLoRALinear._traced_forward: same maths, inductor's
random stream); with dropout off LowRankBranch is traced as it is.

Refused (one-line InputError) where it is not known to work: 4/8-bit bitsandbytes layers (their matmuls are opaque
to the compiler: a graph break at every one), ZeRO-3 (DeepSpeed gathers each parameter from module hooks inside
the layer), --packing (the varlen attention and its per-batch sample boundaries), --use_dropout_kernel true (the
compiled layers draw their dropout themselves).
"""
from __future__ import annotations

import logging

import torch

from ..errors import InputError
from .activation_memory import decoder_layers

log = logging.getLogger(__name__)

# The compiler backend: inductor generates fused kernels (C++ on a CPU, Triton on a GPU). A hook for tests, which
# set "aot_eager" (the same traced graphs and derived backward, run by eager kernels: no code generation).
BACKEND = "inductor"


def refusal(*, bits: int, zero_stage: int, packing: bool, dropout_kernel: str) -> str | None:
    """Why --torch_compile cannot be combined with the other flags, or None."""
    if bits != 16:
        return (f"--bits {bits}: bitsandbytes' quantized layers are opaque to the compiler (a graph break at each of "
                f"them); train with one or the other")
    if zero_stage == 3:
        return ("ZeRO-3: DeepSpeed gathers each parameter in module hooks inside the decoder layers; use a ZeRO-2 "
                "config (deepspeed_configs/zero2.json)")
    if packing:
        return ("--packing: the packed rows' varlen attention and per-batch sample boundaries are not supported "
                "under torch.compile")
    if dropout_kernel == "true":
        return "--use_dropout_kernel true: the compiled layers draw the adapters' dropout themselves"
    return None


def check_torch_compile(enabled: bool, **flags) -> None:
    """Raise InputError when --torch_compile is on and `refusal(**flags)` says why it cannot be."""
    reason = refusal(**flags) if enabled else None
    if reason:
        raise InputError(f"--torch_compile with {reason}")


def compile_decoder_layers(llm: torch.nn.Module, backend: str | None = None) -> str:
    """Compile each decoder layer of `llm` in place (nn.Module.compile: its call, hooks and checkpointing
    included); returns what was done, for the log and the run's summary. Compilation happens at the first step."""
    layers = decoder_layers(llm)
    backend = backend or BACKEND
    # transformers' attention routes hub kernels through a context variable it sets and resets around each call: a
    # side effect inside a checkpointed region that dynamo refuses to trace (a graph break that leaves the whole
    # layer eager) unless told that recomputation need not replay it (torchtitan sets the same). Process-wide.
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile(backend=backend)
    return f"on ({len(layers)} {type(layers[0]).__name__} layers, backend {backend}, torch {torch.__version__})"


def compile_counters() -> dict:
    """Dynamo's graph breaks and distinct graphs so far in this process (benchmarks print them: a break inside a
    layer splits it into smaller graphs and costs fusion)."""
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"].get("unique_graphs", 0)}
