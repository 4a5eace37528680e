"""Exports of a training output: merged weights, a stock PEFT adapter, a transformers LLaVA; atomic writes and CLI.

Equivalence is checked against our own model: same greedy answers on demo evaluation questions and logits within
1e-4 (relative, fp32); for LLaVA also the pieces (pixels, vision features, prompt ids) one by one.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mm_moslora import export as export_module
from mm_moslora.adapters import AdapterConfig, adapter_modules, adapter_state_dict, inject_adapters
from mm_moslora.data.conversation import render
from mm_moslora.data.images import ImageProcessor, load_image
from mm_moslora.demo_data import generate as generate_demo_data
from mm_moslora.export import (
    ExportError,
    OutputPathError,
    build_clip_vision_model,
    clip_image_processor,
    convert_open_clip_vision,
    export_checkpoint,
)
from mm_moslora.checkpoint import config_for_model, load_checkpoint, save_inference_files
from mm_moslora.export_folder import EXPORT_MARKER
from mm_moslora.infer import InferenceEngine
from mm_moslora.model.build import (
    build_llm,
    build_model,
    build_tokenizer,
)
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID
from mm_moslora.model.vision import VisionTower
from tests.helpers import REPO_ROOT, make_images, make_tiny_checkpoint, single_thread, subprocess_env

MAX_NEW = 8
N_QUESTIONS = 6


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoint(root) -> Path:
    """A trained-looking adapter checkpoint, with the DeepSpeed leftovers of a ZeRO-3 run that exports must ignore."""
    ckpt = make_tiny_checkpoint(root / "ckpt")
    step = ckpt / "checkpoints" / "step-4"
    (step / "global_step4").mkdir(parents=True)
    (step / "global_step4" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    (step / "global_step4" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x00" * 64)
    (ckpt / "checkpoints" / "latest").write_text("step-4")
    return ckpt


@pytest.fixture(scope="module")
def demo_questions(root) -> list[tuple[list[dict], list[Image.Image]]]:
    """A handful of demo evaluation questions (square 64×64 images) as engine requests, LLaVA-style prompts."""
    data = root / "demo"
    generate_demo_data(data, n_train=0, n_pretrain=0, n_eval=4, progress=False)
    records = []
    for bench in ("vqav2", "pope", "gqa"):
        info = json.loads((data / "eval" / "index.json").read_text())["benchmarks"][bench]
        lines = (data / info["question_file"]).read_text().splitlines()
        records += [json.loads(line) for line in lines[:2]]
    requests = [([{"role": "user", "content": "<image>\n" + r["text"]}], [load_image(data / "images" / r["image"])])
                for r in records[:N_QUESTIONS]]
    assert all(img.size == (64, 64) for _, imgs in requests for img in imgs)
    return requests


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The adapter checkpoint's own engine (adapters not merged)."""
    return InferenceEngine.from_checkpoint(checkpoint, merge=False)


@pytest.fixture(scope="module")
def merged(root, checkpoint) -> Path:
    return export_checkpoint(checkpoint, root / "merged", "merged", progress=False)


def multimodal_logits(model, engine: InferenceEngine, request) -> torch.Tensor:
    messages, images = request
    ids = torch.tensor([engine.prompt_ids(messages, len(images))])
    pixels = torch.stack([engine.image_processor(img) for img in images])
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits[0]


# ---------------------------------------------------------------------------------------------------------------
# merged


def test_merged_checkpoint_answers_like_the_adapter_checkpoint(checkpoint, merged, reference, demo_questions):
    config = json.loads((merged / "mm_config.json").read_text())
    assert config["merged"] is True and config["merged_adapter"]["r"] == 8 and config["dtype"] == "fp32"
    assert (merged / "llm" / "model.safetensors").is_file() and (merged / "tokenizer").is_dir()
    assert not (merged / "moslora_config.json").exists()
    assert not list(merged.parent.glob(".merged.*")), "staging folder left behind"

    engine = InferenceEngine.from_checkpoint(merged, merge=False)
    assert not adapter_modules(engine.model) and adapter_modules(reference.model.llm)
    for request in demo_questions[:2]:
        expected = multimodal_logits(reference.model, reference, request)
        assert relative_error(multimodal_logits(engine.model, engine, request), expected) <= 1e-4
    answers = reference.generate(demo_questions, max_new_tokens=MAX_NEW)
    assert engine.generate(demo_questions, max_new_tokens=MAX_NEW) == answers and any(answers)
    # The merge changed the LM: the bare base answers differently.
    written = load_file(str(merged / "llm" / "model.safetensors"))
    fresh = build_llm("tiny").state_dict()
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(written[q_proj], fresh[q_proj])
    assert torch.equal(written["model.embed_tokens.weight"], fresh["model.embed_tokens.weight"])


def make_bf16_base_checkpoint(root: Path) -> Path:
    """A base LM stored in bf16 (as hub models are) and an adapter saved in bf16 (as a bf16 run saves it)."""
    base = root / "base-bf16"
    build_llm("tiny").to(torch.bfloat16).save_pretrained(base)
    build_tokenizer("tiny").save_pretrained(base)
    model, tokenizer = build_model(str(base))
    config = AdapterConfig(r=4, alpha=8.0, dropout=0.0)
    inject_adapters(model.llm, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    state = {k: v.to(torch.bfloat16) for k, v in adapter_state_dict(model.llm).items()}
    ckpt = root / "ckpt-bf16"
    save_inference_files(ckpt, config_for_model(model, str(base), "mlp2x_gelu", "vicuna_v1", "pad"), tokenizer,
                       model.projector.state_dict(), adapter=(config, state))
    return ckpt


def test_bf16_merge_equals_fp32_merge_cast_to_bf16(root):
    ckpt = make_bf16_base_checkpoint(root)
    out_bf16 = export_checkpoint(ckpt, root / "merged-bf16", progress=False)  # dtype: the base's stored bf16
    out_fp32 = export_checkpoint(ckpt, root / "merged-fp32", dtype="fp32", progress=False)
    assert json.loads((out_bf16 / "mm_config.json").read_text())["dtype"] == "bf16"
    merged_bf16 = load_file(str(out_bf16 / "llm" / "model.safetensors"))
    merged_fp32 = load_file(str(out_fp32 / "llm" / "model.safetensors"))
    assert merged_bf16.keys() == merged_fp32.keys()
    for key, tensor in merged_bf16.items():
        assert tensor.dtype == torch.bfloat16 and merged_fp32[key].dtype == torch.float32
        assert torch.equal(tensor, merged_fp32[key].to(torch.bfloat16)), key
    # The fp32 merge is W + (alpha/r)·B·M·A computed from the stored tensors.
    base = load_file(str(root / "base-bf16" / "model.safetensors"))
    adapter = load_file(str(ckpt / "moslora_adapter.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    lora_A, lora_M, lora_B = (adapter[f"{name}.lora_{x}"].float() for x in "AMB")
    delta = 2.0 * lora_B @ (lora_M @ lora_A)  # alpha / r = 8 / 4
    expected = base[f"{name}.weight"].float() + delta
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(merged_fp32[f"{name}.weight"], expected, rtol=1e-6, atol=1e-6)
    model, _, _ = load_checkpoint(out_bf16, dtype="bf16")  # and our loader reads it
    assert model.llm.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# peft


def test_peft_export_loads_in_stock_peft_with_the_merged_logits(root, checkpoint, merged, reference, demo_questions):
    out = export_checkpoint(checkpoint, root / "peft", "peft", progress=False)
    adapter_config = json.loads((out / "llm_adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    assert torch.equal(load_file(str(out / "mm_projector.safetensors"))["0.weight"],
                       load_file(str(checkpoint / "mm_projector.safetensors"))["0.weight"])

    peft_llm = PeftModel.from_pretrained(build_llm("tiny"), str(out / "llm_adapter")).eval()
    merged_llm = build_llm(str(merged / "llm")).eval()
    ids = torch.randint(4, 700, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(peft_llm(input_ids=ids).logits, merged_llm(input_ids=ids).logits) <= 1e-4
    # Our own loader still rebuilds the full adapted model from the PEFT export folder.
    model, _, config = load_checkpoint(out)
    assert config.peft_adapter == "llm_adapter"
    assert relative_error(multimodal_logits(model, reference, demo_questions[0]),
                          multimodal_logits(reference.model, reference, demo_questions[0])) <= 1e-6


def test_peft_export_needs_an_adapter(root):
    stage1 = make_tiny_checkpoint(root / "stage1", adapter=False)
    with pytest.raises(ExportError, match="no MoSLoRA adapter"):
        export_checkpoint(stage1, root / "stage1-peft", "peft", progress=False)
    assert not (root / "stage1-peft").exists()


# ---------------------------------------------------------------------------------------------------------------
# hf-llava


@pytest.fixture(scope="module")
def llava(root, checkpoint):
    out = export_checkpoint(checkpoint, root / "llava", "hf-llava", progress=False)
    return LlavaForConditionalGeneration.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)


def llava_inputs(processor, request):
    messages, images = request
    text = messages[0]["content"].removeprefix("<image>\n")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], add_generation_prompt=True)
    return prompt, processor(images=images, text=prompt, add_special_tokens=False, return_tensors="pt")


def test_llava_pieces_match_ours(llava, reference, demo_questions):
    model, processor = llava
    config = model.config
    assert config.vision_feature_select_strategy == "default" and config.image_seq_length == 64
    for request in demo_questions[:3]:
        messages, images = request
        prompt, inputs = llava_inputs(processor, request)
        assert prompt == render(messages, reference.tokenizer, "vicuna_v1", add_generation_prompt=True).text
        pixels = torch.stack([reference.image_processor(img) for img in images])
        torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=0, atol=1e-6)
        with torch.no_grad():
            hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            ours = reference.model.vision(pixels)
        torch.testing.assert_close(hidden[config.vision_feature_layer][:, 1:], ours, rtol=1e-4, atol=1e-4)
        ids = inputs["input_ids"][0].tolist()
        assert [IMAGE_TOKEN_ID if t == config.image_token_id else t for t in ids] == \
            reference.prompt_ids(messages, len(images))
        with torch.no_grad():
            logits = model(**inputs).logits[0, :, :reference.model.llm.config.vocab_size]
        assert relative_error(logits, multimodal_logits(reference.model, reference, request)) <= 1e-4


def test_llava_greedy_answers_match_our_engine(llava, reference, demo_questions):
    model, processor = llava
    answers = []
    for request in demo_questions:
        _, inputs = llava_inputs(processor, request)
        output = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert answers == reference.generate(demo_questions, max_new_tokens=MAX_NEW)
    assert any(answers)


def content_parts(messages: list[dict]) -> list[dict]:
    """Our string messages ("<image>\\n" in front) as HF content parts ({"type": "image"}, {"type": "text"})."""
    parts = []
    for m in messages:
        text = m["content"]
        content = [{"type": "image"}] if text.startswith("<image>\n") else []
        parts.append({"role": m["role"], "content": content + [{"type": "text", "text": text.removeprefix("<image>\n")}]})
    return parts


def test_llava_export_answers_through_the_stock_pipeline(llava, reference, demo_questions):
    """transformers' pipeline("image-text-to-text") with content-part messages, as llava-hf users call it."""
    from transformers import pipeline

    model, processor = llava
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [[{"role": "user", "content": [{"type": "image", "image": images[0]},
                                              {"type": "text", "text": msgs[0]["content"].removeprefix("<image>\n")}]}]
                for msgs, images in demo_questions]
    outputs = pipe(text=messages, max_new_tokens=MAX_NEW, do_sample=False, return_full_text=False)
    answers = [out[0]["generated_text"].strip() for out in outputs]
    assert answers == reference.generate(demo_questions, max_new_tokens=MAX_NEW) and any(answers)


def test_llava_export_of_a_cls_patch_plain_stage1_checkpoint(root):
    """select_feature cls_patch -> strategy "full" (+1 token), a positive select_layer, the `plain` template."""
    model, tokenizer = build_model("tiny", mm_vision_select_layer=2, mm_vision_select_feature="cls_patch")
    ckpt = root / "stage1-cls"
    save_inference_files(ckpt, config_for_model(model, "tiny", "mlp2x_gelu", "plain", "square"), tokenizer,
                       model.projector.state_dict())
    out = export_checkpoint(ckpt, root / "llava-cls", "hf-llava", progress=False)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert llava.config.vision_feature_select_strategy == "full" and llava.config.vision_feature_layer == 2
    assert llava.config.image_seq_length == 65
    image = Image.open(make_images(root / "cls-images", 1, size=(96, 72))[0])  # square mode: resize + crop
    engine = InferenceEngine(model.eval(), tokenizer, "plain", image_aspect_ratio="square")
    messages = [{"role": "user", "content": "<image>\ndescribe"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, add_special_tokens=False, return_tensors="pt")
    ids = [IMAGE_TOKEN_ID if t == llava.config.image_token_id else t for t in inputs["input_ids"][0].tolist()]
    assert ids == engine.prompt_ids(messages, 1)
    with torch.no_grad():
        logits = llava(**inputs).logits[0, :, :model.llm.config.vocab_size]
    assert relative_error(logits, multimodal_logits(model, engine, (messages, [image]))) <= 1e-4
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and newline[0] in llava.generation_config.eos_token_id  # plain captions end at "\n"


def test_llava_export_keeps_the_lm_chat_template(root):
    ckpt = make_tiny_checkpoint(root / "ckpt-chat", adapter=False, conv_mode="chat_template")
    out = export_checkpoint(ckpt, root / "llava-chat", "hf-llava", progress=False)
    processor = AutoProcessor.from_pretrained(out)
    engine = InferenceEngine.from_checkpoint(ckpt)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == render(messages, engine.tokenizer, "chat_template", add_generation_prompt=True).text
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    ids = processor(images=[image], text=prompt, add_special_tokens=False)["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert [IMAGE_TOKEN_ID if t == image_id else t for t in ids] == engine.prompt_ids(messages, 1)
    # The LM's own template printed content lists as text; the export renders them as our string form.
    turns = messages + [{"role": "assistant", "content": "A red square."}, {"role": "user", "content": "Sure?"}]
    assert processor.apply_chat_template(content_parts(turns), add_generation_prompt=True) == \
        render(turns, engine.tokenizer, "chat_template", add_generation_prompt=True).text


@pytest.mark.parametrize("aspect_ratio", ["square", "resize", "pad"])
def test_clip_image_processor_matches_ours(root, aspect_ratio):
    vision = VisionTower()
    # pad: square images only. square: sizes whose crop margin is even (HF floors an odd margin's half, open_clip's
    # torchvision CenterCrop rounds it: a one-pixel shift, see clip_image_processor).
    sizes = [(64, 64), (96, 96)] + ([] if aspect_ratio == "pad" else [(80, 48), (48, 81)])
    for size in sizes:
        image = Image.open(make_images(root / f"pp-{size[0]}x{size[1]}", 1, size=size)[0])
        ours = ImageProcessor.for_tower(vision, aspect_ratio)(image)
        theirs = clip_image_processor(vision, aspect_ratio)(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def tower_variant(tmp_path: Path, name: str, **vision_cfg) -> VisionTower:
    """The tiny ViT with changed open_clip settings, registered under `name`."""
    config = json.loads((Path(export_module.__file__).parent / "model" / "tiny" / "mm-tiny-vit.json").read_text())
    top_level = {k: vision_cfg.pop(k) for k in list(vision_cfg) if k == "quick_gelu"}
    config["vision_cfg"].update(vision_cfg)
    config.update(top_level)
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / f"{name}.json"))
    return VisionTower(name, select_layer=-1)


def test_quick_gelu_tower_converts_exactly(tmp_path):
    vision = tower_variant(tmp_path, "mm-test-vit-qg", quick_gelu=True)
    config, _ = convert_open_clip_vision(vision)
    assert config.hidden_act == "quick_gelu" and config.num_hidden_layers == 3
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = build_clip_vision_model(vision)(pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(hidden[-1][:, 1:], vision(pixels), rtol=1e-4, atol=1e-4)


def test_unconvertible_towers_and_projectors_are_named(tmp_path, root, checkpoint):
    with pytest.raises(ExportError, match="layer scale"):
        convert_open_clip_vision(tower_variant(tmp_path, "mm-test-vit-ls", ls_init_value=0.1))
    with pytest.raises(ExportError, match="CustomResidualAttentionBlock"):
        convert_open_clip_vision(tower_variant(tmp_path, "mm-test-vit-qk", qk_norm=True))
    timm_like = VisionTower()
    timm_like.visual = nn.Sequential(nn.Conv2d(3, 8, 8))
    with pytest.raises(ExportError, match="not open_clip's VisionTransformer"):
        convert_open_clip_vision(timm_like)

    model, tokenizer = build_model("tiny", mm_projector_type="linear")
    ckpt = tmp_path / "linear"
    save_inference_files(ckpt, config_for_model(model, "tiny", "linear", "vicuna_v1", "pad"), tokenizer,
                       model.projector.state_dict())
    with pytest.raises(ExportError, match="'linear' projector cannot"):
        export_checkpoint(ckpt, tmp_path / "out", "hf-llava", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# atomic writes, refusals, CLI


def load_cli():
    spec = importlib.util.spec_from_file_location("merge_cli", REPO_ROOT / "scripts" / "merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_export_leaves_nothing(tmp_path, checkpoint, monkeypatch, interrupt):
    def fail(*args, **kwargs):
        raise interrupt

    monkeypatch.setattr(export_module, "_write_common", fail)  # after the LM is written
    with pytest.raises(type(interrupt)):
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
    # With --overwrite, an interrupted export keeps the previous OUT (an earlier export) as it was.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("keep")
    (tmp_path / "out" / EXPORT_MARKER).write_text("{}")
    with pytest.raises(type(interrupt)):
        export_checkpoint(checkpoint, tmp_path / "out", overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [EXPORT_MARKER, "previous.txt"]


def test_cli_refuses_existing_output_and_overwrites_only_an_earlier_export(tmp_path, checkpoint, capsys):
    main = load_cli()
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("keep")
    with pytest.raises(OutputPathError, match="already exists"):
        export_checkpoint(checkpoint, out, progress=False)
    assert main(["--checkpoint", str(checkpoint), "--output", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--overwrite" in error
    assert (out / "previous.txt").exists()
    assert main(["--checkpoint", str(checkpoint), "--output", str(checkpoint / "inside")]) == 2
    assert "overlaps" in capsys.readouterr().err
    # A folder of the user's own files is never replaced, --overwrite or not.
    assert main(["--checkpoint", str(checkpoint), "--output", str(out), "--overwrite", "--export", "peft"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not an mm_moslora export" in error
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    # An earlier export is.
    export = tmp_path / "export"
    assert main(["--checkpoint", str(checkpoint), "--output", str(export), "--export", "peft"]) == 0
    assert main(["--checkpoint", str(checkpoint), "--output", str(export), "--overwrite", "--export", "peft"]) == 0
    assert sorted(p.name for p in export.iterdir()) == [EXPORT_MARKER, "llm_adapter", "mm_config.json",
                                                        "mm_projector.safetensors", "moslora_adapter.safetensors",
                                                        "moslora_config.json", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out"]
    assert main(["--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2


def test_script_exit_status_2_when_output_exists(tmp_path, checkpoint):
    (tmp_path / "out").mkdir()
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "merge.py"), "--checkpoint", str(checkpoint),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, env=subprocess_env(),
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --output") and "--overwrite" in result.stderr


def test_export_from_a_step_folder_ignores_deepspeed_state(tmp_path, checkpoint, merged):
    """A resumable step folder holds the same inference files next to DeepSpeed's: the export reads only those."""
    step = checkpoint / "checkpoints" / "step-4"
    for name in ("mm_config.json", "mm_projector.safetensors", "moslora_adapter.safetensors", "moslora_config.json"):
        (step / name).write_bytes((checkpoint / name).read_bytes())
    (step / "tokenizer").mkdir(exist_ok=True)
    for file in (checkpoint / "tokenizer").iterdir():
        (step / "tokenizer" / file.name).write_bytes(file.read_bytes())
    out = export_checkpoint(step, tmp_path / "from-step", progress=False)
    ours = load_file(str(out / "llm" / "model.safetensors"))
    theirs = load_file(str(merged / "llm" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
