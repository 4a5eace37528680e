"""The fused dropout kernels (mm_moslora/adapters/dropout_kernels.py) against the plain formulas with the same mask,
and the adapter's training path through them against the reference y = Wx + b + s·B(M(A·dropout(x))).

The kernels run here in Triton's CPU interpreter (TRITON_INTERPRET=1 before Triton decorates them,
set by tests/conftest.py); on a GPU they compile for real (benchmarks/check_fast_paths.py checks them there)."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

pytest.importorskip("triton")

from mm_moslora.adapters import dropout_kernels as dk  # noqa: E402
from mm_moslora.adapters.moslora import MoSLoRALinear  # noqa: E402
from tests.helpers import adapter_reference  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """The kernels run on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET)."""
    if not torch.cuda.is_available() and not dk.interpreting():
        pytest.skip("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    monkeypatch.setattr(dk, "allow_cpu_interpreter", True)
    monkeypatch.setattr(dk, "enabled", True)  # an in-process training run with --use_dropout_kernel false sets it


SEED = (1 << 61) + 12345


def test_mask_keeps_one_minus_p_and_depends_on_the_seed_only():
    p = 0.3
    mask = dk.dropout_mask((300, 200), SEED, p, "cpu")
    values = mask.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / (1 - p))
    kept = (mask > 0).float().mean().item()
    sigma = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma
    torch.testing.assert_close(dk.dropout_mask((300, 200), SEED, p, "cpu"), mask, rtol=0, atol=0)
    other = dk.dropout_mask((300, 200), SEED + 1, p, "cpu")
    assert (other != mask).float().mean() > 0.3  # independent masks disagree on 2p(1-p) = 42 % of elements


def test_draw_seed_advances_and_follows_torch_rng():
    torch.manual_seed(7)
    first, second = dk.draw_seed(torch.device("cpu")), dk.draw_seed(torch.device("cpu"))
    assert first != second and min(first, second) >= 2**61 and max(first, second) < 2**62
    torch.manual_seed(7)
    assert dk.draw_seed(torch.device("cpu")) == first


@pytest.mark.parametrize("N,D,R", [(70, 40, 6), (700, 40, 6), (33, 48, 130)])
def test_kernels_equal_the_formulas_with_the_same_mask(N, D, R):
    torch.manual_seed(0)
    p = 0.25
    x, A, g = torch.randn(N, D), torch.randn(R, D), torch.randn(N, R)
    mask = dk.dropout_mask((N, D), SEED, p, "cpu")
    torch.testing.assert_close(dk.dropout_matmul(x, A, SEED, p), (x * mask) @ A.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dk.dropout_grad_weight(g, x, SEED, p), g.t() @ (x * mask), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dk.matmul_dropout(g, A, SEED, p), (g @ A) * mask, rtol=1e-5, atol=1e-4)
    base = torch.randn(N, D)
    expected = base + (g @ A) * mask
    dk.matmul_dropout(g, A, SEED, p, out=base)  # added in place
    torch.testing.assert_close(base, expected, rtol=1e-5, atol=1e-4)


def test_bf16_kernels_round_once():
    torch.manual_seed(0)
    N, D, R, p = 64, 48, 16, 0.1
    x, A, g = (torch.randn(*s).bfloat16() for s in ((N, D), (R, D), (N, R)))
    mask = dk.dropout_mask((N, D), SEED, p, "cpu")
    want = ((x.float() * mask) @ A.float().t()).bfloat16()
    got = dk.dropout_matmul(x, A, SEED, p)
    assert got.dtype == torch.bfloat16
    # fp32 accumulation, one rounding to bf16 at the end: within one bf16 ulp of the fp32 result.
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(dk.matmul_dropout(g, A, SEED, p).float(), (g.float() @ A.float()) * mask,
                               rtol=2**-7, atol=1e-2)


def test_usable_only_where_the_kernels_apply(monkeypatch):
    x, A = torch.randn(4, 8), torch.randn(2, 8)
    assert dk.usable(x, A, 0.1)
    assert not dk.usable(x, A, 0.0)                       # no dropout: the torch path writes no mask either
    assert not dk.usable(x, A.double(), 0.1)               # one dtype only
    monkeypatch.setattr(dk, "enabled", False)
    assert not dk.usable(x, A, 0.1)
    monkeypatch.setattr(dk, "enabled", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")            # a CPU without the interpreter: torch path
    assert not dk.usable(x, A, 0.1)


@pytest.mark.parametrize("adapter", ["moslora", "lora"])
@pytest.mark.parametrize("fuse_base", [True, False])
def test_adapter_training_path_through_the_kernels_matches_reference(adapter, fuse_base, monkeypatch):
    torch.manual_seed(0)
    p = 0.3
    base = torch.nn.Linear(40, 36)
    layer = MoSLoRALinear(base, r=6, alpha=12, dropout=p, adapter=adapter)
    if not fuse_base:
        monkeypatch.setattr(layer, "_can_fuse_base", lambda x: False)
    torch.nn.init.normal_(layer.lora_B)
    monkeypatch.setattr(dk, "draw_seed", lambda device: SEED)
    calls = []
    real = dk.dropout_matmul
    monkeypatch.setattr(dk, "dropout_matmul", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 7, 40, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B] + ([layer.lora_M] if layer.lora_M is not None else [])

    y = layer(x)
    assert calls, "the kernel path was not taken"
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, upstream)

    mask = dk.dropout_mask((21, 40), SEED, p, "cpu").reshape(3, 7, 40)
    ref = adapter_reference(layer, x, x * mask)
    ref_grads = torch.autograd.grad(ref, params, upstream)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["x", "A", "B", "M"], grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_checkpoint_recompute_draws_the_same_mask():
    """Under activation checkpointing the forward runs again in backward: it must draw the same seed, so the
    gradients equal the un-checkpointed ones (a different mask would give different gradients)."""
    torch.manual_seed(0)
    layer = MoSLoRALinear(torch.nn.Linear(32, 24), r=4, alpha=8, dropout=0.4)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 32, requires_grad=True)
    results = []
    for use_checkpoint in (False, True):
        torch.manual_seed(99)
        y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
        results.append(torch.autograd.grad(y.square().sum(), [x, layer.lora_A, layer.lora_B, layer.lora_M]))
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-6)
    torch.manual_seed(100)  # and a different RNG state gives another mask, so the check above can fail
    other = torch.autograd.grad(layer(x).square().sum(), [layer.lora_A])[0]
    assert not torch.allclose(other, results[0][1])


def test_use_dropout_kernel_flag_sets_the_switch_and_refuses_true_without_cuda(monkeypatch, capsys):
    from mm_moslora.errors import InputError
    from mm_moslora.train.args import parse_args
    from mm_moslora.train.resume import resume_differences

    assert parse_args("finetune", []).use_dropout_kernel == "false"
    assert parse_args("finetune", ["--use_dropout_kernel", "False"]).use_dropout_kernel == "false"
    with pytest.raises(SystemExit) as exit_info:
        parse_args("finetune", ["--use_dropout_kernel", "maybe"])
    assert exit_info.value.code == 2 and "invalid choice: 'maybe'" in capsys.readouterr().err
    assert "off" not in dk.configure("auto", torch.device("cpu")) and dk.enabled
    assert "no CUDA device" in dk.configure("auto", torch.device("cpu"))
    assert "false" in dk.configure("false", torch.device("cpu")) and not dk.enabled
    with pytest.raises(InputError, match=r"^--use_dropout_kernel true: no CUDA device"):
        dk.configure("true", torch.device("cpu"))
    monkeypatch.setattr(dk, "triton", None)
    with pytest.raises(InputError, match="Triton is not installed"):
        dk.configure("true", torch.device("cuda"))
    assert dk.configure("auto", torch.device("cuda")).startswith("auto: torch dropout, Triton is not installed")
    # Same maths, another random stream: resuming with it changed is allowed, as with the attention kernel.
    recorded, current = {"use_dropout_kernel": "false", "lora_r": 8}, {"use_dropout_kernel": "auto", "lora_r": 8}
    assert resume_differences(recorded, current, defaults={}) == []

