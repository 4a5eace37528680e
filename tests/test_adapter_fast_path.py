"""The training path of MoSLoRALinear (LowRankBranch: dropout mask replayed in backward, nothing but r-wide
tensors saved; the frozen base layer fused in or computed outside) against the plain reference formula
y = Wx + b + s·B(M(A·dropout(x))), forward and gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mm_moslora.adapters.moslora import MoSLoRALinear
from tests.helpers import adapter_reference


@pytest.mark.parametrize("adapter", ["moslora", "lora"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("fuse_base", [True, False])
def test_fast_path_matches_reference_formula(adapter, p, fuse_base, monkeypatch):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20)
    layer = MoSLoRALinear(base, r=6, alpha=12, dropout=p, adapter=adapter)
    if not fuse_base:  # what ZeRO-3 partitions, quantized bases and autocast take
        monkeypatch.setattr(layer, "_can_fuse_base", lambda x: False)
    assert layer._can_fuse_base(torch.zeros(1, 24)) is fuse_base
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 7, 24, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B] + ([layer.lora_M] if layer.lora_M is not None else [])

    torch.manual_seed(123)
    y = layer(x)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, upstream)

    torch.manual_seed(123)  # the reference draws the same dropout mask
    ref = adapter_reference(layer, x, F.dropout(x, p, True) if p > 0 else x)
    ref_grads = torch.autograd.grad(ref, params, upstream)

    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["x", "A", "B", "M"], grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_dropout_masks_differ_between_calls_but_replay_within_one():
    torch.manual_seed(0)
    layer = MoSLoRALinear(torch.nn.Linear(16, 16), r=4, alpha=8, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16)
    assert not torch.equal(layer(x), layer(x))  # fresh masks per call in training mode
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # no dropout at eval


def test_base_is_fused_only_when_it_is_a_whole_frozen_weight():
    layer = MoSLoRALinear(torch.nn.Linear(8, 8), r=2, alpha=4)
    x = torch.randn(2, 8)
    assert layer._can_fuse_base(x)
    assert not layer._can_fuse_base(x.double())             # dtypes differ
    layer.base.weight.ds_id = 7                              # a ZeRO-3 partition: only its module's hooks gather it
    assert not layer._can_fuse_base(x)
    del layer.base.weight.ds_id
    layer.base.weight.requires_grad_(True)                  # a trainable base needs its own gradient
    assert not layer._can_fuse_base(x)


class _MatmulsOnStorage(TorchDispatchMode):
    """Counts the matrix products that read the storage of `tensor` (views such as Wᵀ included)."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.storage, self.count = tensor.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.storage
                              for a in args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fuse_base", [True, False])
def test_the_frozen_weight_enters_two_matmuls_per_training_step(fuse_base, monkeypatch):
    """One for the output and one for the input gradient: the 7B-scale GEMMs dominate a step's time."""
    layer = MoSLoRALinear(torch.nn.Linear(32, 24, bias=False), r=4, alpha=8, dropout=0.1)
    if not fuse_base:
        monkeypatch.setattr(layer, "_can_fuse_base", lambda x: False)
    x = torch.randn(5, 32, requires_grad=True)
    with _MatmulsOnStorage(layer.base.weight) as counter:
        layer(x).sum().backward()
    assert counter.count == 2
