"""GPU check and timing of the fused dropout kernels (mm_moslora/adapters/dropout_kernels.py) at LLaVA-7B's shapes.

    python benchmarks/check_dropout_kernels.py [--tokens 16400]

1. Each kernel against the torch formula with the kernel's own mask (`dropout_mask`): max abs / relative error,
   bf16 and fp32 (fp32 must agree to fp32 rounding: no TF32), PASS/FAIL against the stated tolerance.
2. One adapted linear layer (MoSLoRALinear, r 128, dropout 0.05, bf16), forward + backward, kernels on vs the torch
   path: median milliseconds (CUDA events), for the 4096->4096 (q/k/v/o), 4096->11008 (gate/up) and 11008->4096
   (down) layers of a LLaMA-2-7B block.
Exit status 1 when a check fails.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.timing import median_ms  # noqa: E402
from mm_moslora.adapters import dropout_kernels as dk  # noqa: E402
from mm_moslora.adapters.moslora import MoSLoRALinear  # noqa: E402


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30))


def check_kernels(tokens: int) -> bool:
    ok = True
    p, seed = 0.05, dk.draw_seed(torch.device("cuda"))
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        for D in (4096, 11008):
            N = tokens if dtype == torch.bfloat16 else 2048
            x = torch.randn(N, D, device="cuda", dtype=dtype)
            A = torch.randn(128, D, device="cuda", dtype=dtype) / D**0.5
            g = torch.randn(N, 128, device="cuda", dtype=dtype)
            mask = dk.dropout_mask((N, D), seed, p, "cuda")
            xm = x.float() * mask
            base = torch.randn(N, D, device="cuda", dtype=dtype)
            want_acc = base.float() + (g.float() @ A.float()) * mask
            cases = {
                "dropout_matmul": (dk.dropout_matmul(x, A, seed, p), xm @ A.float().t()),
                "dropout_grad_weight": (dk.dropout_grad_weight(g, x, seed, p), g.float().t() @ xm),
                "matmul_dropout": (dk.matmul_dropout(g, A, seed, p), (g.float() @ A.float()) * mask),
                "matmul_dropout+=": (dk.matmul_dropout(g, A, seed, p, out=base), want_acc),
            }
            kept = float((mask > 0).float().mean())
            for name, (got, want) in cases.items():
                err = relative_error(got, want)
                passed = err < tol
                ok &= passed
                print(f"CHECK {name:20s} {str(dtype):15s} N={N} D={D}: relative error {err:.2e} (tol {tol:g}) "
                      f"{'PASS' if passed else 'FAIL'}", flush=True)
            print(f"CHECK mask keep fraction {kept:.5f} (1 - p = {1 - p})", flush=True)
            ok &= abs(kept - (1 - p)) < 1e-3
    return ok


def time_layer(d_in: int, d_out: int, tokens: int, repeats: int = 20) -> dict:
    torch.manual_seed(0)
    layer = MoSLoRALinear(torch.nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16), r=128,
                          alpha=256, dropout=0.05, dtype=torch.bfloat16).train()
    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
    cuda = torch.device("cuda")
    out = {}
    for mode in ("on", "off", "on", "off"):
        dk.enabled = mode == "on"
        out.setdefault(mode, []).append(median_ms(lambda: layer(x).backward(g), repeats, cuda, warmup=3))
    dk.enabled = False  # the default (--use_dropout_kernel false)
    # the frozen base alone (forward + input gradient): what no adapter at all costs
    w = layer.base.weight
    base_only = median_ms(lambda: (x @ w.t(), g @ w), repeats, cuda, warmup=3)
    return {"kernels_ms": min(out["on"]), "torch_ms": min(out["off"]), "base_only_ms": base_only}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16400, help="rows N (batch 16 x 1025 tokens)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_dropout_kernels.py: needs a CUDA GPU (on the CPU, tests/test_dropout_kernels.py runs them "
                 "in Triton's interpreter)")
    ok = check_kernels(args.tokens)
    for d_in, d_out in ((4096, 4096), (4096, 11008), (11008, 4096)):
        r = time_layer(d_in, d_out, args.tokens)
        print(f"TIME layer {d_in}->{d_out} fwd+bwd, N={args.tokens}: kernels {r['kernels_ms']:.3f} ms, torch "
              f"{r['torch_ms']:.3f} ms ({r['torch_ms'] / r['kernels_ms']:.2f}x), frozen base alone "
              f"{r['base_only_ms']:.3f} ms", flush=True)
    print("ALL CHECKS PASS" if ok else "SOME CHECKS FAILED", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
