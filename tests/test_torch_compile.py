"""--torch_compile (mm_moslora/train/torch_compile.py): compiled decoder layers give the plain path's loss and every
gradient, with activation checkpointing and MoSLoRA dropout on and off; training runs through the recipe; the
combinations it cannot run are refused in one line.

Most tests compile with backend "aot_eager" (torch_compile.BACKEND, the documented hook): dynamo traces the same
graphs and AOTAutograd derives the same backward, but eager kernels run them, so nothing is generated in C++ (the
tiny model's inductor compilation takes ~15 s on this machine's CPU). One test runs inductor itself on one adapter.
Its random numbers: inductor draws dropout from its own stream unless `fallback_random`, which that test sets so
the masks, and so the gradients, can be compared exactly; aot_eager runs torch's dropout (the same stream).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from mm_moslora.errors import InputError
from mm_moslora.train import torch_compile
from mm_moslora.train.torch_compile import check_torch_compile, compile_counters, compile_decoder_layers
from tests.helpers import image_batch_loss


@pytest.fixture
def fresh_dynamo():
    """Compile caches and counters of this test only (other tests' compiled frames are not reused or counted)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def tiny_model(dropout: float):
    from mm_moslora.adapters import AdapterConfig, inject_adapters
    from mm_moslora.model.build import build_model

    torch.manual_seed(0)
    model = build_model()[0]
    model.llm.requires_grad_(False)
    inject_adapters(model.llm, AdapterConfig(r=4, alpha=8, dropout=dropout))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):  # B = 0 would give A and M no gradient: nothing to compare
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.train()


def loss_and_gradients(model) -> tuple[float, dict[str, torch.Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    torch.manual_seed(5)  # the same batch and dropout masks on both paths
    loss = image_batch_loss(model)
    return loss.item(), dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named])))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_layers_give_the_plain_loss_and_every_gradient_with_checkpointing(dropout, fresh_dynamo,
                                                                                    monkeypatch):
    """fp32, every decoder layer checkpointed. Dropout 0: LowRankBranch (our autograd.Function) traced as it is;
    dropout 0.1: the adapters' plain-ops form under the compiler (MoSLoRALinear._traced_forward), same masks here
    (aot_eager draws torch's stream). Tolerance 1e-5 of each tensor's largest value: the paths differ only in
    summation order (A' = M A folded vs not), while a bypassed adapter or a wrong mask is off by order 1."""
    monkeypatch.setattr(torch_compile, "BACKEND", "aot_eager")
    model = tiny_model(dropout)
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain_loss, plain = loss_and_gradients(model)
    described = compile_decoder_layers(model.llm)
    assert described.startswith("on (4 LlamaDecoderLayer layers, backend aot_eager")
    compiled_loss, compiled = loss_and_gradients(model)
    counters = compile_counters()
    # Compiled for real, in one piece: no graph break, and the four layers share their graphs.
    assert counters["graph_breaks"] == 0 and 1 <= counters["unique_graphs"] <= 2, counters
    assert compiled_loss == pytest.approx(plain_loss, rel=1e-6)
    assert sum(".lora_" in n for n in plain) == 4 * 7 * 3 and any(n.startswith("projector.") for n in plain)
    for name, reference in plain.items():
        scale = reference.abs().max()
        assert scale > 0, f"{name}: zero gradient, nothing compared"
        assert (compiled[name] - reference).abs().max() <= 1e-5 * scale, name


def test_inductor_compiles_an_adapter_to_the_plain_outputs_and_gradients(fresh_dynamo):
    """The real default backend (C++ kernels on the CPU) on one MoSLoRA layer with dropout, in a block shaped like
    a decoder layer's use of it (norm, adapter, residual)."""
    from torch._inductor import config as inductor_config

    from mm_moslora.adapters.moslora import MoSLoRALinear

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.LayerNorm(32), MoSLoRALinear(torch.nn.Linear(32, 32), r=4, alpha=8,
                                                                      dropout=0.1))
    block.requires_grad_(False)
    adapter = block[1]
    for param in (adapter.lora_A, adapter.lora_M, adapter.lora_B):
        param.requires_grad_(True)
    with torch.no_grad():
        adapter.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 7, 32, requires_grad=True)

    def run(module):
        torch.manual_seed(3)
        out = module(x)
        grads = torch.autograd.grad((out * out).sum(), [x, adapter.lora_A, adapter.lora_M, adapter.lora_B])
        return out.detach(), grads

    plain = run(block)
    compiled_block = torch.compile(block, backend=torch_compile.BACKEND)
    assert torch_compile.BACKEND == "inductor"
    with inductor_config.patch(fallback_random=True):  # torch's dropout stream: the same masks as the plain run
        compiled = run(compiled_block)
    assert compile_counters()["graph_breaks"] == 0
    torch.testing.assert_close(compiled[0], plain[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled[1], plain[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [["--gradient_checkpointing"], ["--activation_memory_budget_gib", "0.4"]],
                         ids=["all_layers", "budget"])
def test_finetune_trains_with_compiled_layers(checkpointing, small_demo_data, tmp_path, recipe_in_process,
                                              monkeypatch, fresh_dynamo):
    """The recipe end to end under ZeRO-2 (the default config), checkpointing and dropout on: the compile decision
    is logged and in the summary, the layers really ran compiled (graphs, no break) and the loss is finite. With a
    budget the planner probes the layers eagerly (set_stance force_eager) and checkpoints only some of them."""
    monkeypatch.setattr(torch_compile, "BACKEND", "aot_eager")
    out = tmp_path / "out"
    proc = recipe_in_process("finetune", [
        "--data_path", small_demo_data / "finetune.json", "--image_folder", small_demo_data / "images",
        "--output_dir", out, "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
        "--per_device_train_batch_size", "4", "--max_steps", "3", "--save_steps", "0", "--report_to", "none",
        *checkpointing, "--torch_compile"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["torch_compile"].startswith("on (4 LlamaDecoderLayer layers, backend aot_eager"), summary
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert "torch.compile of the decoder layers: on" in proc.stderr
    counters = compile_counters()
    assert counters["graph_breaks"] == 0 and counters["unique_graphs"] >= 1, counters
    if "--activation_memory_budget_gib" in checkpointing:  # some layers checkpointed, some not: both graphs ran
        assert 0 < summary["activation_checkpointing"]["checkpointed_layers"] < 4, summary


@pytest.mark.parametrize("flags, reason", [
    (dict(bits=4), "--torch_compile with --bits 4: bitsandbytes' quantized layers are opaque to the compiler"),
    (dict(zero_stage=3), "--torch_compile with ZeRO-3: DeepSpeed gathers each parameter in module hooks"),
    (dict(packing=True), "--torch_compile with --packing: the packed rows' varlen attention"),
    (dict(dropout_kernel="true"), "--torch_compile with --use_dropout_kernel true: the compiled layers draw"),
])
def test_combinations_it_cannot_run_are_refused_in_one_line(flags, reason):
    base = dict(bits=16, zero_stage=2, packing=False, dropout_kernel="false")
    with pytest.raises(InputError) as err:
        check_torch_compile(True, **{**base, **flags})
    assert str(err.value).startswith(reason) and "\n" not in str(err.value)
    check_torch_compile(False, **{**base, **flags})  # the flag off: nothing to refuse
    check_torch_compile(True, **base)
    check_torch_compile(True, **{**base, "dropout_kernel": "auto"})  # auto: the tower's adapters may use them


def test_the_recipe_refuses_before_loading_anything(tmp_path, recipe_in_process):
    proc = recipe_in_process("finetune", ["--packing", "--torch_compile", "--output_dir", tmp_path / "out",
                                          "--report_to", "none"])
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].startswith("error: --torch_compile with --packing:"), proc.stderr
    assert not (tmp_path / "out" / "train_summary.json").exists()


def test_flag_spelling_and_resume_with_it_changed():
    from mm_moslora.train.args import parse_args
    from mm_moslora.train.resume import resume_differences

    assert parse_args("finetune", []).torch_compile is False
    assert parse_args("finetune", ["--torch_compile"]).torch_compile is True
    assert parse_args("finetune", ["--torch_compile", "False"]).torch_compile is False
    # Same maths, other kernels: a run may resume with the layers compiled or not.
    recorded, current = {"torch_compile": False, "lora_r": 8}, {"torch_compile": True, "lora_r": 8}
    assert resume_differences(recorded, current, defaults={}) == []
