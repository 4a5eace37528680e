"""Where the adapters' share of the training step goes, at LLaVA-1.5-7B's shape (a GPU benchmark, not a test).

    python benchmarks/adapter_overhead.py [--tokens 8200] [--layers 2] [--iters 10]     # about 1-2 min on one H100
    python benchmarks/adapter_overhead.py --dry-run                                      # the plumbing on a CPU

On an H100 (2026-12-08, docs/benchmarks.md) the whole step without adapters ran 20,718 tokens/s and with MoSLoRA
r 128 12,969, while the adapters add about 8 % of the FLOPs. This splits that difference into its two places:
1. Decoder layers: forward + backward of a LLaMA-2-7B-shaped LlamaModel with --layers random frozen layers (bf16,
   SDPA), fed a (tokens/1025, 1025, 4096) input that needs a gradient (as the projector's output does), per layer:
   median ms, and the stack's 32 layers as tokens/s. Variants: no adapters; ours MoSLoRA and LoRA (r 128, alpha
   256, every linear layer) with dropout 0.05 (torch's dropout, and the fused dropout kernels) and with dropout 0;
   PEFT LoRA (bf16, dropout 0.05), where peft is installed. The peak column is activation memory per layer.
2. Optimizer: the adapters' parameters of all 32 layers (A, M, B of q, k, v, o, gate, up, down: 344 M in 672
   tensors, bf16) with a trivial loss that gives every one a gradient: its backward + optimizer step as the peer
   runs it (torch fused AdamW on the bf16 parameters) and as our engine does (DeepSpeed ZeRO-2, bf16 with fp32
   master weights, gradient clipping 1.0; and ZeRO-0). The difference is DeepSpeed's cost per optimizer step.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.timing import median_ms  # noqa: E402
from mm_moslora.adapters import AdapterConfig, dropout_kernels, inject_adapters  # noqa: E402

SEQ = 1025  # tokens per LLaVA-1.5 sample: 576 image tokens + 448 text + 1
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(dry_run: bool, layers: int):
    from transformers import LlamaConfig

    if dry_run:
        return LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
                           num_hidden_layers=layers, vocab_size=128, attn_implementation="sdpa")
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096,
                       attn_implementation="sdpa")


def layer_variants(base: nn.Module, dtype: torch.dtype, r: int):
    """(name, model, dropout-kernel switch) for each variant, each on its own copy of the frozen base."""
    yield "no adapters", base, False
    for adapter, p, kernels in (("moslora", 0.05, False), ("moslora", 0.05, True), ("moslora", 0.0, False),
                                ("lora", 0.05, False)):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        inject_adapters(model, AdapterConfig(adapter=adapter, r=r, alpha=2 * r, dropout=p), dtype=dtype)
        yield f"ours {adapter}, dropout {p}{', dropout kernels' if kernels else ''}", model, kernels
        del model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print("PEFT: not installed, skipped", flush=True)
        return
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                           target_modules=list(LINEARS)))
    model.to(dtype)  # PEFT makes fp32 adapters; the peer trains them in bf16
    yield "PEFT LoRA, dropout 0.05", model, False


def bench_layers(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from transformers import LlamaModel

    config = llama_config(args.dry_run, args.layers)
    torch.manual_seed(0)
    base = LlamaModel(config).to(device=device, dtype=dtype).requires_grad_(False)
    batch = max(1, args.tokens // SEQ)
    x = torch.randn(batch, SEQ, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    rows = []
    for name, model, kernels in layer_variants(base, dtype, args.r):
        dropout_kernels.enabled = kernels
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            model(inputs_embeds=x).last_hidden_state.backward(grad)
            x.grad = None
            for p in params:
                p.grad = None

        if device.type == "cuda":
            torch.cuda.synchronize()
            persistent = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, args.iters, device) / args.layers
        row = {"variant": name, "ms_per_layer": round(ms, 3),
               "stack_tok_s": round(batch * SEQ / (ms * 32 / 1e3)) if not args.dry_run else None}
        if device.type == "cuda":
            row["act_gib_per_layer"] = round((torch.cuda.max_memory_allocated() - persistent) / 2**30 / args.layers, 2)
        rows.append(row)
        print("LAYER " + json.dumps(row), flush=True)
    dropout_kernels.enabled = False
    base_ms = rows[0]["ms_per_layer"]
    for row in rows[1:]:
        row["vs_no_adapters"] = round(row["ms_per_layer"] / base_ms, 3)
    return rows


def adapter_shapes(dry_run: bool, r: int) -> list[tuple[int, int]]:
    """(rows, cols) of every adapter tensor of 32 LLaMA-2-7B decoder layers: A (r, d_in), M (r, r), B (d_out, r)."""
    h, m = (64, 176) if dry_run else (4096, 11008)  # the dry run keeps the 672 tensors: host-side costs are per tensor
    layers = 32
    dims = [(h, h)] * 4 + [(h, m), (h, m), (m, h)]  # (d_in, d_out) of q, k, v, o, gate, up, down
    return [shape for _ in range(layers) for d_in, d_out in dims for shape in ((r, d_in), (r, r), (d_out, r))]


class AdapterParameters(nn.Module):
    """The adapters' tensors alone; forward is a loss that gives each one a gradient (of ones)."""

    def __init__(self, shapes, device, dtype):
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.01)
                                        for s in shapes)

    def forward(self):
        return torch.stack([t.sum(dtype=torch.float32) for t in self.tensors]).sum()


def bench_optimizer(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    import deepspeed

    from mm_moslora.train.recipe import init_distributed

    init_distributed()
    shapes = adapter_shapes(args.dry_run, args.r)
    fused = device.type == "cuda"
    rows = []

    module = AdapterParameters(shapes, device, dtype)
    n_params = sum(p.numel() for p in module.parameters())
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=fused)

    def torch_step():
        module().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows.append({"optimizer": "torch fused AdamW on bf16 parameters (the peer)",
                 "ms": round(median_ms(torch_step, args.iters, device), 3)})
    print("OPT " + json.dumps(rows[-1]), flush=True)
    del module, optimizer
    for stage in (2, 0):
        module = AdapterParameters(shapes, device, dtype)
        config = {"bf16": {"enabled": dtype == torch.bfloat16}, "train_micro_batch_size_per_gpu": 1,
                  "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "steps_per_print": 10**9,
                  "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                        "allgather_bucket_size": 5e8, "reduce_bucket_size": 5e8}}
        name = f"DeepSpeed ZeRO-{stage}, bf16, fp32 master, clipping (ours)"
        try:
            engine, *_ = deepspeed.initialize(model=module, config=config, optimizer=torch.optim.AdamW(
                module.parameters(), lr=1e-5, fused=fused))

            def ds_step():
                engine.backward(engine())
                engine.step()

            rows.append({"optimizer": name, "ms": round(median_ms(ds_step, args.iters, device), 3)})
        except Exception as err:  # a benchmark row that cannot run is reported, the others still run
            rows.append({"optimizer": name, "error": f"{type(err).__name__}: {str(err)[:300]}"})
        print("OPT " + json.dumps(rows[-1]), flush=True)
        del module
    for row in rows:
        row["tensors"], row["parameters_m"] = len(shapes), round(n_params / 1e6, 1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8 * SEQ, help="tokens per step (batch = tokens // 1025)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers timed together (per-layer = total / layers)")
    ap.add_argument("--r", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", help="also write the rows to this JSON file")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, fp32: the plumbing only")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("adapter_overhead.py: needs a CUDA GPU (--dry-run runs the plumbing on a CPU)")
    if args.dry_run:
        args.tokens, args.iters = SEQ, 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    result = {"layers": bench_layers(args, device, dtype), "optimizer": bench_optimizer(args, device, dtype)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
