"""MoSLoRA mixer options (issue 18, item 3): --mixer_init {kaiming,orthogonal,normal,identity,zero} and
--freeze_mixer. Each option trains as the paper describes (zero not at all), is saved in the adapter config,
round-trips, and every export (merged, PEFT fold, hf-llava) answers as the adapter checkpoint does.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import LlavaForConditionalGeneration

from mm_moslora.adapters import AdapterConfig, MoSLoRALinear, adapter_modules, inject_adapters, read_adapter_config
from mm_moslora.adapters.moslora import MIXER_INITS
from mm_moslora.export import export_checkpoint
from mm_moslora.checkpoint import load_checkpoint
from mm_moslora.model.build import build_llm, build_model
from mm_moslora.train import args as train_args
from tests.helpers import REPO_ROOT, make_tiny_checkpoint, subprocess_env

OPTIONS = [(init, frozen) for init in MIXER_INITS for frozen in (False, True)]


def layer(init: str = "kaiming", frozen: bool = False, adapter: str = "moslora", seed: int = 0) -> MoSLoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(24, 12)
    return MoSLoRALinear(base, r=4, alpha=8.0, adapter=adapter, mixer_init=init, freeze_mixer=frozen)


def train_steps(module: MoSLoRALinear, steps: int = 20) -> list[float]:
    """Adam on a fixed regression target; returns the loss per step."""
    generator = torch.Generator().manual_seed(1)
    x, target = torch.randn(32, 24, generator=generator), torch.randn(32, 12, generator=generator)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (module(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_flag_choices_match_the_layer():
    assert train_args.MIXER_INITS == MIXER_INITS  # repeated in args.py so --help needs no torch


def test_initial_mixer_values():
    r = 4
    assert torch.equal(layer("identity").lora_M, torch.eye(r))
    assert torch.equal(layer("zero").lora_M, torch.zeros(r, r))
    M = layer("orthogonal").lora_M.detach()
    torch.testing.assert_close(M @ M.T, torch.eye(r), atol=1e-5, rtol=0)
    big = MoSLoRALinear(nn.Linear(8, 8), r=64, alpha=8.0, mixer_init="normal").lora_M.detach()
    assert abs(big.std().item() - 1 / 64) < 0.002 and abs(big.mean().item()) < 0.002
    bound = 1 / 2  # kaiming_uniform(a=√5) on fan_in r: U(-1/√r, 1/√r)
    kaiming = layer("kaiming").lora_M.detach()
    assert kaiming.abs().max() <= bound and kaiming.std() > 0.1
    for init in MIXER_INITS:
        assert layer(init).lora_M.requires_grad and not layer(init, frozen=True).lora_M.requires_grad


@pytest.mark.parametrize("init,frozen", OPTIONS)
def test_each_option_trains_as_described(init, frozen):
    module = layer(init, frozen)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith("lora_")}
    losses = train_steps(module)
    changed = {n for n, p in module.named_parameters() if n in before and not torch.equal(p, before[n])}
    if init == "zero":  # B = 0 and M = 0: every adapter gradient is zero, nothing ever moves
        assert changed == set() and losses[-1] == losses[0]
        return
    assert losses[-1] < 0.9 * losses[0], losses
    assert changed == ({"lora_A", "lora_B"} if frozen else {"lora_A", "lora_M", "lora_B"})


def test_frozen_identity_mixer_is_exactly_lora():
    moslora, lora = layer("identity", frozen=True), layer(adapter="lora")
    assert torch.equal(moslora.lora_A, lora.lora_A)  # identity draws no random numbers: same A as LoRA's
    assert train_steps(moslora) == train_steps(lora)


def test_lora_refuses_mixer_options():
    with pytest.raises(ValueError, match="no mixer"):
        AdapterConfig(adapter="lora", freeze_mixer=True)
    with pytest.raises(ValueError, match="no mixer"):
        AdapterConfig(adapter="lora", mixer_init="orthogonal")
    with pytest.raises(ValueError, match="mixer_init must be one of"):
        AdapterConfig(mixer_init="uniform")
    assert AdapterConfig.from_dict({"adapter": "moslora", "r": 8}).freeze_mixer is False  # configs saved before


@pytest.mark.parametrize("argv", [["--adapter", "lora", "--freeze_mixer"], ["--adapter", "lora", "--mixer_init",
                                                                              "zero"], ["--mixer_init", "uniform"]])
def test_flag_errors_are_one_line(argv):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "finetune.py"), *argv], capture_output=True,
                          text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--mixer_init" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("init,frozen", [("normal", True), ("orthogonal", False), ("identity", True),
                                         ("zero", False)])
def test_checkpoint_round_trip_and_exports_answer_alike(tmp_path, init, frozen):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", mixer_init=init, freeze_mixer=frozen)
    config = read_adapter_config(ckpt)
    assert (config.mixer_init, config.freeze_mixer) == (init, frozen)
    model, _, _ = load_checkpoint(ckpt)
    modules = adapter_modules(model.llm)
    assert all(m.mixer_init == init and m.lora_M.requires_grad == (not frozen) for m in modules.values())
    saved = load_file(str(ckpt / "moslora_adapter.safetensors"))
    assert all(torch.equal(m.lora_M, saved[f"{n}.lora_M"]) for n, m in modules.items())  # M saved even if frozen

    ids = torch.randint(4, 700, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.llm(input_ids=ids).logits
        merged = export_checkpoint(ckpt, tmp_path / "merged", "merged", progress=False)
        assert json.loads((merged / "mm_config.json").read_text())["merged_adapter"]["freeze_mixer"] is frozen
        torch.testing.assert_close(build_llm(str(merged / "llm"))(input_ids=ids).logits, expected,
                                   rtol=1e-4, atol=1e-4)
        peft = export_checkpoint(ckpt, tmp_path / "peft", "peft", progress=False)
        peft_llm = PeftModel.from_pretrained(build_llm("tiny"), str(peft / "llm_adapter")).eval()
        torch.testing.assert_close(peft_llm(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        if init == "normal":  # the hf-llava export is the merged LM in another layout: one option suffices
            llava = export_checkpoint(ckpt, tmp_path / "llava", "hf-llava", progress=False)
            hf = LlavaForConditionalGeneration.from_pretrained(llava).eval()
            logits = hf(input_ids=ids).logits[..., :expected.shape[-1]]
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_training_keeps_a_frozen_mixer_and_resumes(small_demo_data, tmp_path, recipe_in_process):
    """The real recipe (scripts/finetune.py's entry point, in this process): a frozen orthogonal M is saved as it
    was drawn, also after a resumed run."""
    out = tmp_path / "out"
    base = ["--data_path", small_demo_data / "finetune.json", "--image_folder", small_demo_data / "images",
            "--lora_r", "4", "--lora_alpha", "8", "--per_device_train_batch_size", "4", "--report_to", "none",
            "--mixer_init", "orthogonal", "--freeze_mixer", "--save_steps", "1", "--output_dir", out]
    for steps in (2, 3):  # the second run resumes from step 2
        proc = recipe_in_process("finetune", [*base, "--max_steps", steps])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    config = json.loads((out / "moslora_config.json").read_text())
    assert config["mixer_init"] == "orthogonal" and config["freeze_mixer"] is True
    model, _ = build_model("tiny")
    torch.manual_seed(42)  # the recipe seeds right before injecting (--seed 42)
    inject_adapters(model.llm, AdapterConfig(r=4, alpha=8.0, mixer_init="orthogonal", freeze_mixer=True))
    saved = load_file(str(out / "moslora_adapter.safetensors"))
    for name, module in adapter_modules(model.llm).items():
        assert torch.equal(saved[f"{name}.lora_M"], module.lora_M.detach()), name
        assert not torch.equal(saved[f"{name}.lora_A"], module.lora_A.detach()), name  # A did train
