"""Liger Kernel in the training step (mm_moslora/model/fused_kernels.py, --use_liger_kernel): the same loss and
adapter gradients as the plain path, the fused linear cross-entropy only where it applies, and the flag's
resolution (auto / true / false) with one-line refusals."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from mm_moslora.errors import InputError
from mm_moslora.model import fused_kernels
from mm_moslora.model.fused_kernels import LigerKernelError, resolve_use_liger_kernel
from mm_moslora.train.args import parse_args
from mm_moslora.train.resume import resume_differences
from tests.helpers import REPO_ROOT, image_batch_loss, subprocess_env

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # CUDA: only its type is read, no GPU is touched
needs_liger = pytest.mark.skipif(fused_kernels.liger_version() is None,
                                 reason="the speed extra (liger-kernel) is not installed")


# ---------------------------------------------------------------- the maths: Liger's kernels against the plain path
@needs_liger
def test_liger_path_gives_the_plain_loss_and_every_adapter_gradient_in_the_triton_interpreter():
    """Liger's RoPE, RMSNorm, SwiGLU / GeGLU and fused linear cross-entropy kernels, run on the CPU in Triton's
    interpreter (tests/liger_in_interpreter.py, a subprocess: the interpreter is chosen when Liger is imported), on
    a LLaMA and a Gemma with MoSLoRA (dropout on) on every default target.

    Tolerance: both paths are fp32; they differ only in summation order (row sums of RMSNorm, chunked logits,
    numpy vs torch), about 1e-6 of each tensor's largest value here. 1e-4 of it leaves margin, while a kernel on
    the wrong formula, or an adapter that Liger's MLP would bypass, is off by order 1."""
    env = {**subprocess_env(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.liger_in_interpreter", "llama", "gemma"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["family"]: r for r in map(json.loads, proc.stdout.splitlines())}
    kernels = {"llama": "LigerSiLUMulFunctionBackward", "gemma": "LigerGELUMulFunctionBackward"}  # per family
    for family, mlp_kernel in kernels.items():
        result = results[family]
        # Every Liger kernel is in the loss's autograd graph (so each one ran, forward and backward).
        assert result["liger_functions"] == sorted(["LigerFusedLinearCrossEntropyFunctionBackward",
                                                    "LigerRMSNormFunctionBackward", "LigerRopeFunctionBackward",
                                                    mlp_kernel]), result["liger_functions"]
        assert result["liger_loss"] == pytest.approx(result["plain_loss"], rel=1e-5)
        grads = result["grads"]
        adapters = [name for name in grads if ".lora_" in name]
        assert len(adapters) == 2 * 7 * 3  # 2 layers x q,k,v,o,gate,up,down x A, M, B
        assert any(name.startswith("projector.") for name in grads)
        for name, diff in grads.items():
            assert diff["scale"] > 0, f"{family} {name}: zero gradient, nothing compared"
            assert diff["max_abs"] <= 1e-4 * diff["scale"], (family, name, diff)


# ---------------------------------------------------------------- the fused loss: where it applies, where it falls back
@pytest.fixture
def tiny_model():
    from mm_moslora.adapters import AdapterConfig, inject_adapters
    from mm_moslora.model.build import build_model

    torch.manual_seed(0)
    model = build_model()[0]
    model.llm.requires_grad_(False)
    inject_adapters(model.llm, AdapterConfig(r=4, alpha=8, dropout=0.0))
    return model


def test_fused_loss_is_used_only_where_the_head_can_be_fused(tiny_model, monkeypatch, caplog):
    calls = []

    def spy(hidden, head, targets):  # stands for Liger's kernel (Triton needs a GPU here): the plain sum
        calls.append(hidden.shape[0])
        return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")

    monkeypatch.setattr(fused_kernels, "linear_cross_entropy_sum", spy)
    torch.manual_seed(1)
    plain = image_batch_loss(tiny_model)
    assert not calls  # off unless apply_liger_kernel turned it on

    tiny_model.fused_linear_cross_entropy = True
    torch.manual_seed(1)
    fused = image_batch_loss(tiny_model)
    assert len(calls) == 1 and calls[0] > 0  # the selected supervised rows only
    torch.testing.assert_close(fused, plain)

    # ZeRO-3: the head's weight is a partition (DeepSpeed marks it with ds_id): the plain path, logged once.
    head = tiny_model.llm.get_output_embeddings()
    head.weight.ds_id = 7
    with caplog.at_level(logging.WARNING, logger="mm_moslora.model.mm_model"):
        for _ in range(2):
            torch.manual_seed(1)
            torch.testing.assert_close(image_batch_loss(tiny_model), plain)
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if "fused linear cross-entropy off" in r.getMessage()]
    assert len(warnings) == 1 and "ZeRO-3 partition" in warnings[0], warnings
    del head.weight.ds_id

    # No supervised position at all: nothing for the fused kernel (its chunking needs a row); the loss is 0.
    ids = torch.randint(5, 700, (1, 6))
    loss = tiny_model(ids, torch.ones_like(ids), None, torch.full_like(ids, -100)).loss
    assert len(calls) == 1 and loss.item() == 0.0


def test_head_that_is_not_a_plain_linear_is_not_fused():
    assert fused_kernels.head_unfusable_reason(torch.nn.Linear(4, 8)) is None
    wrapped = torch.nn.Sequential(torch.nn.Linear(4, 8))
    assert "not a plain nn.Linear" in fused_kernels.head_unfusable_reason(wrapped)


# ---------------------------------------------------------------- the flag
def test_auto_true_false_resolve_by_device_install_and_model_family(monkeypatch):
    off = resolve_use_liger_kernel("auto", CPU, "llama")
    assert not off.on and off.describe().startswith("off (auto: no CUDA device")
    assert not resolve_use_liger_kernel("false", CUDA, "llama").on
    with pytest.raises(LigerKernelError, match=r"^--use_liger_kernel true: no CUDA device \(the run is on cpu\), and"):
        resolve_use_liger_kernel("true", CPU, "llama")
    assert issubclass(LigerKernelError, InputError)  # one `error:` line and exit status 2 at the entry points

    monkeypatch.setattr(fused_kernels, "liger_version", lambda: "0.8.5")
    monkeypatch.setattr(fused_kernels, "supported_model_types", lambda: frozenset({"llama", "qwen2", "gemma"}))
    for family in ("llama", "qwen2", "gemma"):
        on = resolve_use_liger_kernel("auto", CUDA, family)
        assert on.on and on.describe() == f"on (auto: CUDA, liger-kernel 0.8.5, {family})"
        assert resolve_use_liger_kernel("true", CUDA, family).on
    assert resolve_use_liger_kernel("true", CUDA, None).on  # early check: the family is not known yet
    unsupported = resolve_use_liger_kernel("auto", CUDA, "internlm2")
    assert not unsupported.on and "model_type 'internlm2' is not supported by liger-kernel 0.8.5" in unsupported.reason
    with pytest.raises(LigerKernelError, match=r"--use_liger_kernel true: model_type 'internlm2' is not supported"):
        resolve_use_liger_kernel("true", CUDA, "internlm2")

    monkeypatch.setattr(fused_kernels, "liger_version", lambda: None)
    assert "liger-kernel is not installed" in resolve_use_liger_kernel("auto", CUDA, "llama").reason
    with pytest.raises(LigerKernelError, match=r"liger-kernel is not installed \(pip install 'mm_moslora\[speed\]'\)"):
        resolve_use_liger_kernel("true", CUDA, "llama")


@needs_liger
def test_liger_knows_the_families_we_train():
    """Liger's own dispatch table has the families of the README's runs (LLaMA/Vicuna, Qwen2, Mistral, Gemma)."""
    assert {"llama", "qwen2", "mistral", "gemma"} <= fused_kernels.supported_model_types()


def test_flag_spellings_and_resume_treats_it_as_a_speed_setting(capsys):
    assert parse_args("finetune", []).use_liger_kernel == "auto"
    assert parse_args("pretrain", ["--use_liger_kernel"]).use_liger_kernel == "true"
    assert parse_args("finetune", ["--use_liger_kernel", "False"]).use_liger_kernel == "false"  # HF's spelling
    with pytest.raises(SystemExit) as exit_info:
        parse_args("finetune", ["--use_liger_kernel", "maybe"])
    assert exit_info.value.code == 2 and "invalid choice: 'maybe'" in capsys.readouterr().err
    # Same maths, other kernels: resuming with it changed is allowed.
    recorded, current = {"use_liger_kernel": "false", "lora_r": 8}, {"use_liger_kernel": "true", "lora_r": 8}
    assert resume_differences(recorded, current, defaults={}) == []


@pytest.mark.parametrize("flag", ["--use_liger_kernel", "--use_dropout_kernel"])
def test_a_triton_kernel_flag_true_on_the_cpu_is_one_line_before_the_model_loads(flag, tmp_path, recipe_in_process):
    run = recipe_in_process("finetune", ["--model_name_or_path", tmp_path / "no_such_model",
                                         "--output_dir", tmp_path / "out", "--report_to", "none", flag, "true"])
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert errors[0].startswith(f"error: {flag} true: no CUDA device"), errors[0]
    assert "no_such_model" not in run.stderr and not (tmp_path / "out" / "train_summary.json").exists()
