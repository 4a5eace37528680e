"""Triton kernels that apply the adapter's dropout inside its matmuls, so no dropped-out copy of x is ever written.

The adapter computes A'·dropout(x) (A' = M·A) in forward, and in backward A'-gradient = guᵀ·dropout(x) and the
input gradient's adapter term dropout-mask ⊙ (gu·A'). With torch ops each of these costs a full pass that writes
and re-reads an (N, d_in) tensor (the dropped-out x, regenerated in backward; the masked input gradient), which
at LLaVA's shape is about half of the adapter's memory traffic. Here the keep-mask is drawn inside each kernel
from a counter-based generator (Philox, `tl.rand(seed, offset)` with offset = the element's flat index in the
(N, d_in) input), so the forward and both backward kernels see the very same mask without storing it.

The maths is torch's dropout: each element kept with probability 1 - p and scaled by 1/(1 - p); only the random
stream differs from `F.dropout`'s. `dropout_mask` materialises the same mask, so tests compare these kernels with
the plain formulas given that mask. The scale is applied to the fp32 accumulator, after the dot product.

Used by `moslora.LowRankBranch` when `usable()` says so: CUDA (or, for tests, Triton's CPU interpreter),
dropout on, one floating dtype, fewer than 2³¹ input elements (the generator's offsets are 32-bit).
"""
from __future__ import annotations

import os

import torch

from ..errors import InputError

try:
    import triton
    import triton.language as tl
except ImportError:  # an optional speed-up: without Triton the torch path runs
    triton = None

# Off unless asked (`--use_dropout_kernel`, `configure`): at LLaVA-7B's shape on an H100 the torch path's step is
# faster (docs/benchmarks.md). Benchmarks set it per mode to compare both in one process.
enabled = False
CHOICES = ("auto", "true", "false")
# On the CPU the kernels run only under Triton's interpreter and only when asked (tests): it is slow, and the
# torch path's dropout stream is what CPU users' runs are reproduced with.
allow_cpu_interpreter = False
_MAX_ELEMENTS = 2**31
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1, read when the kernels below were decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable(x: torch.Tensor, weight: torch.Tensor, p: float) -> bool:
    """These kernels can run the dropout of input x (N, d_in) against adapter weight `weight` (r, d_in)."""
    if triton is None or not enabled or p <= 0 or x.dtype != weight.dtype or x.dtype not in _DTYPES:
        return False
    if x.numel() >= _MAX_ELEMENTS:
        return False
    return x.is_cuda or (x.device.type == "cpu" and allow_cpu_interpreter and interpreting())


def configure(choice: str, device: torch.device) -> str:
    """--use_dropout_kernel: `auto` = these kernels wherever they can run (CUDA with Triton), `true` = the same but
    an error (InputError) where they cannot, `false` = torch's dropout. Sets `enabled`; returns the decision."""
    if choice not in CHOICES:
        raise InputError(f"--use_dropout_kernel {choice!r}: choose one of {', '.join(CHOICES)}")
    reason = ("Triton is not installed" if triton is None else
              None if device.type == "cuda" else f"no CUDA device (the run is on {device.type})")
    if choice == "true" and reason:
        raise InputError(f"--use_dropout_kernel true: {reason}, and the fused dropout kernels are Triton GPU kernels")
    global enabled
    enabled = choice != "false"
    if choice == "false":
        return "--use_dropout_kernel false (torch dropout)"
    return f"{choice}: {'torch dropout, ' + reason if reason else 'Triton ' + triton.__version__ + ', CUDA'}"


def draw_seed(device: torch.device) -> int:
    """A 62-bit seed taken from torch's generator for `device`, which it advances.

    On CUDA it comes from the device generator's seed and Philox offset (read on the host: no synchronisation),
    so activation checkpointing, which restores the device RNG state before recomputing, redraws the same seed.
    The offset is advanced by 4 (the unit of CUDA's Philox offsets), so the next call gets another seed.
    """
    if device.type == "cuda":
        torch.cuda.init()  # the default generators exist once CUDA is initialised (no-op after the first call)
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)
        mixed = (gen.initial_seed() * 0x9E3779B97F4A7C15 + offset) & ((1 << 62) - 1)
    else:
        mixed = int(torch.randint(0, 2**62, (1,)).item())
    return mixed | (1 << 61)  # always above 2³¹: one compiled kernel signature (int64 seed)


def _precision(dtype: torch.dtype) -> int:
    """The `_dot` mode for inputs of `dtype` (see there)."""
    if dtype == torch.float32:
        return 1
    return 2 if dtype == torch.bfloat16 and interpreting() else 0


def _block(n: int, low: int = 16, high: int = 128) -> int:
    """A power-of-two block size covering n, within [low, high] (tl.dot needs at least 16)."""
    return max(low, min(high, triton.next_power_of_2(n)))


if triton is not None:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """a @ b with an fp32 accumulator. PRECISION 0: the tensor cores' default for the dtype; 1: exact fp32
        (no TF32, as torch's fp32 matmuls); 2: both upcast to fp32 first (bf16 under the CPU interpreter,
        whose dot cannot read bf16)."""
        if PRECISION == 2:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif PRECISION == 1:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit(do_not_specialize=["seed"])
    def _dropout_matmul_kernel(X, A, U, N, D, R, seed, p, scale,
                               BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        # U[N, R] = (keep ⊙ X)[N, D] @ A[R, D]ᵀ · scale
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        ranks = tl.program_id(1) * BR + tl.arange(0, BR)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, D, BK):
            cols = k0 + tl.arange(0, BK)
            inside = (rows[:, None] < N) & (cols[None, :] < D)
            x = tl.load(X + rows[:, None] * D + cols[None, :], mask=inside, other=0.0)
            keep = tl.rand(seed, rows[:, None] * D + cols[None, :]) >= p
            x = tl.where(keep, x, 0.0)
            a = tl.load(A + ranks[None, :] * D + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < D),
                        other=0.0)
            acc += _dot(x, a, PRECISION)
        tl.store(U + rows[:, None] * R + ranks[None, :], (acc * scale).to(U.dtype.element_ty),
                 mask=(rows[:, None] < N) & (ranks[None, :] < R))

    @triton.jit(do_not_specialize=["seed"])
    def _dropout_grad_weight_kernel(G, X, OUT, N, D, R, rows_per_split, seed, p, scale,
                                    BN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        # OUT[split, R, D] = G[rows of split, R]ᵀ @ (keep ⊙ X)[rows of split, D] · scale   (fp32 partial sums)
        cols = tl.program_id(0) * BD + tl.arange(0, BD)
        ranks = tl.program_id(1) * BR + tl.arange(0, BR)
        split = tl.program_id(2)
        start = split * rows_per_split
        acc = tl.zeros((BR, BD), dtype=tl.float32)
        for n0 in range(start, start + rows_per_split, BN):
            rows = n0 + tl.arange(0, BN)
            in_rows = (rows < N) & (rows < start + rows_per_split)
            g = tl.load(G + rows[:, None] * R + ranks[None, :], mask=in_rows[:, None] & (ranks[None, :] < R),
                        other=0.0)
            x = tl.load(X + rows[:, None] * D + cols[None, :], mask=in_rows[:, None] & (cols[None, :] < D), other=0.0)
            keep = tl.rand(seed, rows[:, None] * D + cols[None, :]) >= p
            x = tl.where(keep, x, 0.0)
            acc += _dot(tl.trans(g), x, PRECISION)
        tl.store(OUT + split * R * D + ranks[:, None] * D + cols[None, :], acc * scale,
                 mask=(ranks[:, None] < R) & (cols[None, :] < D))

    @triton.jit(do_not_specialize=["seed"])
    def _matmul_dropout_kernel(G, A, GX, N, D, R, seed, p, scale, ACCUMULATE: tl.constexpr,
                               BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        # GX[N, D] (+)= keep ⊙ (G[N, R] @ A[R, D]) · scale
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        for k0 in range(0, R, BK):
            ranks = k0 + tl.arange(0, BK)
            g = tl.load(G + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < N) & (ranks[None, :] < R),
                        other=0.0)
            a = tl.load(A + ranks[:, None] * D + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < D),
                        other=0.0)
            acc += _dot(g, a, PRECISION)
        keep = tl.rand(seed, rows[:, None] * D + cols[None, :]) >= p
        acc = tl.where(keep, acc * scale, 0.0)
        inside = (rows[:, None] < N) & (cols[None, :] < D)
        pointers = GX + rows[:, None] * D + cols[None, :]
        if ACCUMULATE:
            acc += tl.load(pointers, mask=inside, other=0.0).to(tl.float32)
        tl.store(pointers, acc.to(GX.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["seed"])
    def _mask_kernel(OUT, N, D, seed, p, scale, BM: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        keep = tl.rand(seed, rows[:, None] * D + cols[None, :]) >= p
        tl.store(OUT + rows[:, None] * D + cols[None, :], tl.where(keep, scale, 0.0),
                 mask=(rows[:, None] < N) & (cols[None, :] < D))


def dropout_matmul(x: torch.Tensor, A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """dropout(x) @ Aᵀ. x: (N, d_in) contiguous, A: (r, d_in) -> (N, r) in x's dtype."""
    x, A = x.contiguous(), A.contiguous()
    N, D = x.shape
    R = A.shape[0]
    out = torch.empty(N, R, dtype=x.dtype, device=x.device)
    BM, BR, BK = 64, _block(R), 64
    grid = (triton.cdiv(N, BM), triton.cdiv(R, BR))
    _dropout_matmul_kernel[grid](x, A, out, N, D, R, seed, p, 1.0 / (1.0 - p), BM=BM, BR=BR, BK=BK,
                                 PRECISION=_precision(x.dtype), num_warps=4, num_stages=3)
    return out


def dropout_grad_weight(g: torch.Tensor, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """gᵀ @ dropout(x), the mask as `dropout_matmul` drew it. g: (N, r), x: (N, d_in) -> (r, d_in) in x's dtype.

    The sum over N (long) is split across programs into fp32 partials, added in a fixed order (deterministic).
    """
    g, x = g.contiguous(), x.contiguous()
    N, D = x.shape
    R = g.shape[1]
    BN, BR, BD = 64, _block(R), 128
    tiles = triton.cdiv(D, BD) * triton.cdiv(R, BR)
    # Enough programs to fill a large GPU (~2 per SM of an H100), each with a few blocks of rows at least.
    splits = max(1, min(triton.cdiv(264, tiles), triton.cdiv(N, 4 * BN)))
    rows_per_split = triton.cdiv(triton.cdiv(N, splits), BN) * BN
    splits = triton.cdiv(N, rows_per_split)
    partial = torch.empty(splits, R, D, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(D, BD), triton.cdiv(R, BR), splits)
    _dropout_grad_weight_kernel[grid](g, x, partial, N, D, R, rows_per_split, seed, p, 1.0 / (1.0 - p), BN=BN,
                                      BR=BR, BD=BD, PRECISION=_precision(x.dtype), num_warps=4, num_stages=3)
    return (partial[0] if splits == 1 else partial.sum(0)).to(x.dtype)


def matmul_dropout(g: torch.Tensor, A: torch.Tensor, seed: int, p: float, out: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """dropout-mask ⊙ (g @ A), the mask of the input that `dropout_matmul` drew: the input gradient of the
    adapter branch. g: (N, r), A: (r, d_in). With `out` (N, d_in) the result is added into it in place (the
    sum taken in fp32, rounded once), else a new tensor in g's dtype."""
    g, A = g.contiguous(), A.contiguous()
    N, R = g.shape
    D = A.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.empty(N, D, dtype=g.dtype, device=g.device)
    elif not out.is_contiguous() or out.shape != (N, D):
        raise ValueError(f"out must be a contiguous ({N}, {D}) tensor, got {tuple(out.shape)}")
    BM, BD, BK = 64, 128, _block(R, high=64)
    grid = (triton.cdiv(N, BM), triton.cdiv(D, BD))
    _matmul_dropout_kernel[grid](g, A, out, N, D, R, seed, p, 1.0 / (1.0 - p), ACCUMULATE=accumulate, BM=BM,
                                 BD=BD, BK=BK, PRECISION=_precision(g.dtype), num_warps=4, num_stages=3)
    return out


def dropout_mask(shape: tuple[int, int], seed: int, p: float, device, dtype=torch.float32) -> torch.Tensor:
    """The kernels' mask for an (N, d_in) input, materialised: 1/(1-p) where kept, 0 where dropped (tests)."""
    N, D = shape
    out = torch.empty(N, D, dtype=dtype, device=device)
    grid = (triton.cdiv(N, 32), triton.cdiv(D, 32))
    _mask_kernel[grid](out, N, D, seed, p, 1.0 / (1.0 - p), BM=32, BD=32)
    return out
