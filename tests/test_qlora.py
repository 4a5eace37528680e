"""QLoRA on the CPU (bitsandbytes >= 0.49 ships CPU 4-bit and 8-bit kernels): the frozen LM in 4/8 bits trains
its full-precision adapters and projector only, a checkpoint rebuilds the same quantized base, merging
dequantizes and merges in fp32 (same answers as the adapter model), and combinations that cannot run are refused
before anything loads, in one line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="the quant extra (bitsandbytes) is not installed")

from mm_moslora.adapters import AdapterConfig, adapter_modules, adapter_state_dict, inject_adapters  # noqa: E402
from mm_moslora.adapters.moslora import MoSLoRALinear  # noqa: E402
from mm_moslora.export import export_checkpoint  # noqa: E402
from mm_moslora.infer import InferenceEngine  # noqa: E402
from mm_moslora.checkpoint import config_for_model, save_inference_files  # noqa: E402
from mm_moslora.model.build import build_model, weights_fingerprint  # noqa: E402
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID  # noqa: E402
from mm_moslora.model.quantize import (QuantizationError, check_quantized_training, count_quantized,  # noqa: E402
                                       dequantize_linears, quantize_linears)
from tests.helpers import REPO_ROOT, make_images, single_thread  # noqa: E402

MAX_NEW = 8
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


def randomise_lora_B(module, seed: int, std: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def batch(model):
    n_img = model.num_image_tokens
    ids = torch.randint(5, 700, (2, n_img + 12), generator=torch.Generator().manual_seed(0))
    ids[:, 1:1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :n_img + 4] = -100
    pixels = torch.randn(2, 3, model.vision.image_size, model.vision.image_size)
    return ids, labels, pixels


@pytest.mark.parametrize("bits,quant_type", [(4, "nf4"), (4, "fp4"), (8, "nf4")])
def test_a_step_on_a_quantized_lm_changes_only_adapters_and_projector(bits, quant_type):
    torch.manual_seed(0)
    model, _ = build_model()
    n = quantize_linears(model.llm, bits, quant_type, double_quant=True, compute_dtype=torch.float32, device=CPU)
    assert n == count_quantized(model.llm) == 7 * model.llm.config.num_hidden_layers  # every decoder linear
    assert type(model.llm.get_output_embeddings()) is torch.nn.Linear  # the head stays full precision
    inject_adapters(model.llm, AdapterConfig(r=4, alpha=8, dropout=0.1))
    layers = adapter_modules(model.llm)
    assert len(layers) == n and all(type(m.base).__name__.startswith("Linear") for m in layers.values())
    assert all(m.lora_A.dtype == torch.float32 for m in layers.values())  # adapters in full precision
    randomise_lora_B(model.llm, seed=0, std=0.05)
    model.projector.requires_grad_(True)
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point() or v.dtype == torch.uint8
              or v.dtype == torch.int8}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels, pixels = batch(model)
    loss = model(ids, torch.ones_like(ids), pixels, labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert {k for k in changed if ".lora_" in k} == {k for k in before if ".lora_" in k}
    assert changed and all(".lora_" in k or k.startswith("projector.") for k in changed), sorted(changed)


def test_merge_refuses_a_quantized_base_until_it_is_dequantized():
    torch.manual_seed(0)
    model, _ = build_model()
    quantize_linears(model.llm, 4, compute_dtype=torch.float32, device=CPU)
    inject_adapters(model.llm, AdapterConfig(r=4, alpha=8, dropout=0.0))
    randomise_lora_B(model.llm, seed=0, std=0.05)
    ids = torch.randint(5, 700, (2, 16))
    with torch.no_grad():
        adapted = model.llm(input_ids=ids).logits
    layer = next(iter(adapter_modules(model.llm).values()))
    with pytest.raises(RuntimeError, match="cannot merge into a quantized base layer: dequantize it first"):
        layer.merge()
    assert dequantize_linears(model.llm) == 28 and count_quantized(model.llm) == 0
    assert all(type(m.base) is torch.nn.Linear for m in adapter_modules(model.llm).values())
    for module in adapter_modules(model.llm).values():
        module.merge()
    with torch.no_grad():
        torch.testing.assert_close(model.llm(input_ids=ids).logits, adapted, rtol=0, atol=1e-4)


def write_qlora_checkpoint(directory: Path, bits: int = 4) -> Path:
    """A tiny QLoRA adapter checkpoint (LM adapters on a 4-bit base, tower adapters), non-zero B."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, tokenizer = build_model("tiny")
        fingerprint = weights_fingerprint(model.llm)
        with torch.no_grad():
            for param in model.projector.parameters():
                param.copy_(torch.randn(param.shape) * 0.5)
        quantize_linears(model.llm, bits, "nf4", True, compute_dtype=torch.float32, device=CPU)
        config = AdapterConfig(r=8, alpha=16.0, dropout=0.0, base_model="tiny")
        inject_adapters(model.llm, config)
        randomise_lora_B(model.llm, seed=1, std=0.05)
        vision_config = AdapterConfig(r=4, alpha=16.0, dropout=0.0, base_model="mm-tiny-vit")
        model.vision.add_adapters(vision_config)
        randomise_lora_B(model.vision.visual, seed=2, std=0.3)
    checkpoint_config = config_for_model(
        model, "tiny", "mlp2x_gelu", conv_mode="vicuna_v1", image_aspect_ratio="pad", stage="finetune",
        llm_fingerprint=fingerprint, vision_adapter=vision_config.to_dict(), bits=bits, quant_type="nf4",
        double_quant=True, quantized_from="fp32")
    save_inference_files(directory, checkpoint_config, tokenizer, model.projector.state_dict(),
                       adapter=(config, adapter_state_dict(model.llm)),
                       vision_adapter=(vision_config, adapter_state_dict(model.vision.visual)))
    return directory


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    from mm_moslora.data.images import load_image

    paths = make_images(tmp_path_factory.mktemp("images"), 4, size=(64, 64))
    return [([{"role": "user", "content": "<image>\nWhat is in the picture?"}], [load_image(p)]) for p in paths]


def test_qlora_checkpoint_rebuilds_its_quantized_base_and_merged_exports_answer_alike(tmp_path, requests):
    checkpoint = write_qlora_checkpoint(tmp_path / "ckpt")
    adapter_model = InferenceEngine.from_checkpoint(checkpoint, merge=False)
    assert count_quantized(adapter_model.model.llm) == 28
    assert all(isinstance(m, MoSLoRALinear) for m in adapter_modules(adapter_model.model).values())
    answers = adapter_model.generate(requests, max_new_tokens=MAX_NEW)
    assert any(answers)
    merged_on_load = InferenceEngine.from_checkpoint(checkpoint, merge=True)
    assert count_quantized(merged_on_load.model.llm) == 0 and not adapter_modules(merged_on_load.model)
    assert merged_on_load.generate(requests, max_new_tokens=MAX_NEW) == answers
    out = export_checkpoint(checkpoint, tmp_path / "merged", "merged", progress=False)
    config = json.loads((out / "mm_config.json").read_text())
    assert config["bits"] == 16 and config["quant_type"] is None and config["merged"] is True
    merged = InferenceEngine.from_checkpoint(out, merge=False)
    assert count_quantized(merged.model.llm) == 0
    assert merged.generate(requests, max_new_tokens=MAX_NEW) == answers
    # The base is the quantized LM: merging into the original (unquantized) weights would answer otherwise.
    ids = torch.tensor([adapter_model.prompt_ids(*[requests[0][0], 1])])
    pixels = adapter_model.image_processor(requests[0][1][0])[None]
    with torch.no_grad():
        expected = adapter_model.model(ids, pixel_values=pixels).logits
        got = merged.model(ids, pixel_values=pixels).logits
    assert ((got - expected).abs().max() / expected.abs().max()) <= 1e-4


def test_impossible_combinations_are_refused_in_one_line_before_loading(tmp_path, monkeypatch, recipe_in_process):
    with pytest.raises(QuantizationError, match=r"--bits 4 with ZeRO-3 .*cannot be partitioned"):
        check_quantized_training(4, "nf4", CPU, zero_stage=3, deepspeed_config="zero3.json")
    with pytest.raises(QuantizationError, match=r"cannot run 4-bit layers on meta here"):
        check_quantized_training(4, "nf4", torch.device("meta"), zero_stage=2)
    check_quantized_training(16, "nf4", torch.device("meta"), zero_stage=3)  # nothing quantized: nothing to refuse
    # As a user (scripts/finetune.py's entry point; tests/test_train.py runs the command itself for a refused
    # --deepspeed file): the ZeRO-3 refusal comes before the (here missing) model is looked at, in one line.
    common = ["--model_name_or_path", tmp_path / "no_such_model", "--output_dir", tmp_path / "out", "--report_to",
              "none", "--bits", "4"]
    runs = [(recipe_in_process("finetune", [*common, "--deepspeed", REPO_ROOT / "deepspeed_configs" / "zero3.json"]),
             "with ZeRO-3")]

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    with pytest.raises(QuantizationError, match=r"--bits 8 needs bitsandbytes, which is not installed here: "
                                                r"pip install 'mm_moslora\[quant\]'"):
        check_quantized_training(8, "nf4", CPU, zero_stage=2)
    runs.append((recipe_in_process("finetune", common), "needs bitsandbytes, which is not installed here"))
    for proc, expected in runs:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert expected in errors[0] and "no_such_model" not in errors[0], errors[0]


def test_qlora_finetune_trains_on_a_4_bit_base(small_demo_data, tmp_path, recipe_in_process):
    """scripts/finetune.py's entry point in this process (the command itself runs --bits 4 on two ranks in
    tests/test_train.py)."""
    out = tmp_path / "out"
    proc = recipe_in_process("finetune", ["--data_path", small_demo_data / "finetune.json",
                                          "--image_folder", small_demo_data / "images", "--bits", "4", "--quant_type",
                                          "nf4", "--double_quant", "True", "--gradient_checkpointing", "True",
                                          "--vision_adapter", "moslora", "--vision_lora_r", "4", "--lora_r", "8",
                                          "--lora_alpha", "16", "--per_device_train_batch_size", "4", "--max_steps",
                                          "3", "--save_steps", "0", "--report_to", "none", "--output_dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quantized 28 linear layers of the LM to 4 bits (nf4, double quant)" in proc.stderr
    config = json.loads((out / "mm_config.json").read_text())
    assert (config["bits"], config["quant_type"], config["double_quant"]) == (4, "nf4", True)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
