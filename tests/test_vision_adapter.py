"""Adapters on the open_clip vision tower: the split attention computes what open_clip's does, the default targets
cover every linear map of the kept blocks, merge equals the unmerged forward, only adapters and the projector
train, the saved adapter loads strictly, and every export answers as the adapter checkpoint does (a dropped tower
adapter would change the answers: the tests check that it does).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mm_moslora.adapters import AdapterConfig, adapter_modules, adapter_state_dict, inject_adapters
from mm_moslora.adapters.vision import (
    VISION_ADAPTER_DIR,
    SplitQKVAttention,
    inject_vision_adapters,
    join_attention,
    split_attention,
    unload_vision_adapters,
)
from mm_moslora.export import ExportError, export_checkpoint
from mm_moslora.infer import InferenceEngine
from mm_moslora.checkpoint import CheckpointError, config_for_model, load_checkpoint, save_inference_files
from mm_moslora.model.build import build_model
from mm_moslora.model.vision import VisionTower
from mm_moslora.train.args import parse_args
from mm_moslora.train.recipe import add_vision_adapter, set_trainable
from tests.helpers import image_batch_loss, make_images, single_thread

MAX_NEW = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


def randomise_lora_B(module: nn.Module, seed: int, std: float) -> None:
    """B starts at zero (the update is zero): give it values so the adapter changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def custom_attention_tower(tmp_path: Path) -> VisionTower:
    """A tiny open_clip ViT whose blocks use open_clip's own Attention (qk-norm, head scaling, inner norm)."""
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                           "head_width": 32, "qk_norm": True, "scale_heads": True,
                                           "scale_attn_inner": True},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    folder = tmp_path / "custom_tower"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return VisionTower(str(folder), select_layer=-1)


# ---------------------------------------------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize("tower_kind", ["multihead", "open_clip_attention"])
def test_split_attention_computes_the_same_and_joins_back(tower_kind, tmp_path):
    torch.manual_seed(0)
    tower = VisionTower() if tower_kind == "multihead" else custom_attention_tower(tmp_path)
    original_class = type(tower.visual.transformer.resblocks[0].attn)
    with torch.no_grad():  # non-trivial norms and head scales, so dropping one would show
        for name, param in tower.visual.named_parameters():
            if "ln_" in name or "head_scale" in name:
                param.add_(torch.randn_like(param) * 0.3)
    before = dict(tower.visual.state_dict())
    pixels = torch.randn(2, 3, tower.image_size, tower.image_size)
    expected = tower(pixels)
    assert split_attention(tower.visual) == len(tower.visual.transformer.resblocks)
    assert all(isinstance(b.attn, SplitQKVAttention) for b in tower.visual.transformer.resblocks)
    torch.testing.assert_close(tower(pixels), expected, rtol=0, atol=1e-5)
    assert join_attention(tower.visual) == len(tower.visual.transformer.resblocks)
    assert type(tower.visual.transformer.resblocks[0].attn) is original_class
    after = tower.visual.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("adapter", ["moslora", "lora"])
def test_default_targets_every_linear_map_and_merge_equals_unmerged(adapter):
    torch.manual_seed(0)
    tower = VisionTower(select_layer=-2)  # 3 blocks, the last one pruned
    pixels = torch.randn(2, 3, tower.image_size, tower.image_size)
    base = tower(pixels)
    names = inject_vision_adapters(tower.visual, AdapterConfig(adapter=adapter, r=4, alpha=8, dropout=0.1))
    blocks = len(tower.visual.transformer.resblocks)
    assert blocks == 2 and len(names) == 6 * blocks
    # Nothing left out: every linear map inside the blocks is adapted (none stays a bare nn.Linear).
    bare = [n for n, m in tower.visual.transformer.named_modules() if isinstance(m, nn.Linear)
            and not any(n.startswith(a + ".") or n == a for a in (x.removeprefix("transformer.") for x in names))]
    assert bare == []
    randomise_lora_B(tower.visual, seed=1, std=0.2)
    tower.eval()
    unmerged = tower(pixels)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter changes the features
    unload_vision_adapters(tower.visual, merge=True)
    assert not adapter_modules(tower.visual)
    assert isinstance(tower.visual.transformer.resblocks[0].attn, nn.MultiheadAttention)
    torch.testing.assert_close(tower(pixels), unmerged, rtol=0, atol=1e-5)


def test_tower_adapter_honours_mixer_options_and_dropout_follows_the_mode():
    torch.manual_seed(0)
    tower = VisionTower()
    tower.add_adapters(AdapterConfig(r=4, alpha=8, dropout=0.5, mixer_init="identity", freeze_mixer=True))
    layers = tower.adapter_layers()
    assert layers and all(torch.equal(m.lora_M, torch.eye(4)) and not m.lora_M.requires_grad for m in layers)
    tower.train()
    assert all(m.training for m in layers) and not tower.visual.training  # frozen tower stays in eval mode
    tower.eval()
    assert not any(m.training for m in layers)
    with pytest.raises(ValueError, match="exclusive|fully trainable"):
        VisionTower(trainable=True).add_adapters(AdapterConfig(r=4))


def test_finetune_step_changes_only_adapters_and_projector():
    torch.manual_seed(0)
    model, _ = build_model()
    args = parse_args("finetune", ["--lora_r", "4", "--vision_adapter", "moslora", "--vision_lora_r", "4",
                                   "--vision_lora_dropout", "0.1", "--mixer_init", "orthogonal"])
    llm_config = set_trainable(model, args, torch.float32)
    vision_config = add_vision_adapter(model, args, llm_config, torch.float32)
    assert vision_config.r == 4 and vision_config.alpha == 16 and vision_config.mixer_init == "orthogonal"
    randomise_lora_B(model, seed=0, std=0.05)  # B = 0 would leave A and M without gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    image_batch_loss(model).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    tower_lora = {n for n in before if n.startswith("vision.") and ".lora_" in n}
    assert tower_lora and tower_lora <= changed  # A, M and B of every tower adapter trained
    assert {n.rsplit(".", 1)[-1] for n in tower_lora} == {"lora_A", "lora_M", "lora_B"}
    assert all(".lora_" in n or n.startswith("projector.") for n in changed), sorted(changed)


# ---------------------------------------------------------------------------------------------------------------
# files and exports


def write_checkpoint(directory: Path) -> Path:
    """A tiny checkpoint with adapters on the LM and on the tower (non-zero B in both)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, tokenizer = build_model("tiny")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.projector.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        llm_config = AdapterConfig(r=8, alpha=16.0, dropout=0.0, base_model="tiny")
        inject_adapters(model.llm, llm_config)
        randomise_lora_B(model.llm, seed=1, std=0.05)
        vision_config = AdapterConfig(r=4, alpha=16.0, dropout=0.0, mixer_init="orthogonal", base_model="mm-tiny-vit")
        model.vision.add_adapters(vision_config)
        randomise_lora_B(model.vision.visual, seed=2, std=0.3)
    config = config_for_model(model, "tiny", "mlp2x_gelu", conv_mode="vicuna_v1", image_aspect_ratio="pad",
                              stage="finetune", vision_adapter=vision_config.to_dict())
    save_inference_files(directory, config, tokenizer, model.projector.state_dict(),
                       adapter=(llm_config, adapter_state_dict(model.llm)),
                       vision_adapter=(vision_config, adapter_state_dict(model.vision.visual)))
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("vision_adapter") / "ckpt")


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    from mm_moslora.data.images import load_image

    paths = make_images(tmp_path_factory.mktemp("images"), 4, size=(64, 64))  # square: hf-llava's exact inputs
    return [([{"role": "user", "content": "<image>\nWhat is in the picture?"}], [load_image(p)]) for p in paths]


@pytest.fixture(scope="module")
def reference(checkpoint):
    return InferenceEngine.from_checkpoint(checkpoint, merge=False)


def image_logits(engine: InferenceEngine, request, model=None) -> torch.Tensor:
    messages, images = request
    ids = torch.tensor([engine.prompt_ids(messages, len(images))])
    pixels = torch.stack([engine.image_processor(img) for img in images])
    with torch.no_grad():
        return (model or engine.model)(ids, pixel_values=pixels).logits[0]


def relative_error(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_saved_tower_adapter_loads_strictly_and_matters(checkpoint, reference, requests, tmp_path):
    assert adapter_modules(reference.model.vision.visual)
    # The same checkpoint without its tower adapter answers differently: a dropped adapter cannot go unnoticed.
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    shutil.rmtree(bare / VISION_ADAPTER_DIR)
    config = json.loads((bare / "mm_config.json").read_text())
    with pytest.raises(CheckpointError, match="names a vision-tower adapter but vision_adapter/ is missing"):
        load_checkpoint(bare)
    (bare / "mm_config.json").write_text(json.dumps({**config, "vision_adapter": None}))
    without = InferenceEngine.from_checkpoint(bare, merge=False)
    assert relative_error(image_logits(without, requests[0]), image_logits(reference, requests[0])) > 1e-2
    # A saved adapter missing a tensor is refused, naming the module.
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / VISION_ADAPTER_DIR / "moslora_adapter.safetensors"
    tensors = load_file(str(weights))
    del tensors["transformer.resblocks.1.attn.v_proj.lora_M"]
    save_file(tensors, str(weights))
    with pytest.raises(RuntimeError, match=r"missing from the checkpoint: transformer\.resblocks\.1\.attn\.v_proj"
                                           r"\.lora_M"):
        load_checkpoint(broken)


def test_merged_export_answers_as_the_adapter_checkpoint(checkpoint, reference, requests, tmp_path):
    out = export_checkpoint(checkpoint, tmp_path / "merged", "merged", progress=False)
    config = json.loads((out / "mm_config.json").read_text())
    assert config["merged_vision_adapter"]["r"] == 4 and not (out / VISION_ADAPTER_DIR).exists()
    engine = InferenceEngine.from_checkpoint(out, merge=False)
    assert not adapter_modules(engine.model)
    for request in requests[:2]:
        assert relative_error(image_logits(engine, request), image_logits(reference, request)) <= 1e-4
    answers = reference.generate(requests, max_new_tokens=MAX_NEW)
    assert engine.generate(requests, max_new_tokens=MAX_NEW) == answers and any(answers)
    merged_on_load = InferenceEngine.from_checkpoint(checkpoint, merge=True)  # load_checkpoint(merge=True)
    assert not adapter_modules(merged_on_load.model)
    assert merged_on_load.generate(requests, max_new_tokens=MAX_NEW) == answers


def llava_inputs(processor, request):
    messages, images = request
    text = messages[0]["content"].removeprefix("<image>\n")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], add_generation_prompt=True)
    return processor(images=images, text=prompt, add_special_tokens=False, return_tensors="pt")


def llava_answers(model, processor, requests) -> list[str]:
    answers = []
    for request in requests:
        inputs = llava_inputs(processor, request)
        output = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def llava_logits(model, processor, request, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        return model(**llava_inputs(processor, request)).logits[0, :, :vocab]


def test_hf_llava_export_answers_as_the_adapter_checkpoint(checkpoint, reference, requests, tmp_path):
    out = export_checkpoint(checkpoint, tmp_path / "llava", "hf-llava", progress=False)
    model, processor = LlavaForConditionalGeneration.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    vocab = reference.model.llm.config.vocab_size
    assert relative_error(llava_logits(model, processor, requests[0], vocab), image_logits(reference, requests[0])) <= 1e-4
    assert llava_answers(model, processor, requests) == reference.generate(requests, max_new_tokens=MAX_NEW)


def test_peft_export_carries_the_tower_adapter_on_the_hf_llava_base(checkpoint, reference, requests, tmp_path):
    out = export_checkpoint(checkpoint, tmp_path / "peft", "peft", progress=False)
    adapter_config = json.loads((out / "llava_adapter" / "adapter_config.json").read_text())
    targets = adapter_config["target_modules"]
    assert any("vision_tower" in t and t.endswith("self_attn.q_proj") for t in targets)
    assert any("language_model" in t and t.endswith("mlp.down_proj") for t in targets)
    assert not (out / "llm_adapter").exists()  # an LM-only PEFT adapter would drop the tower's
    base = LlavaForConditionalGeneration.from_pretrained(out / "hf_llava_base").eval()
    processor = AutoProcessor.from_pretrained(out / "hf_llava_base")
    vocab = reference.model.llm.config.vocab_size
    expected = image_logits(reference, requests[0])
    assert relative_error(llava_logits(base, processor, requests[0], vocab), expected) > 1e-2  # adapters matter
    peft_model = PeftModel.from_pretrained(base, str(out / "llava_adapter")).eval()
    lora_layers = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora_layers) == len(targets) == len(adapter_modules(reference.model))
    assert relative_error(llava_logits(peft_model, processor, requests[0], vocab), expected) <= 1e-4
    assert llava_answers(peft_model, processor, requests) == reference.generate(requests, max_new_tokens=MAX_NEW)
    # Our own loader still rebuilds the adapted model from the folder.
    model, _, _ = load_checkpoint(out)
    assert relative_error(image_logits(reference, requests[0], model), expected) <= 1e-6


def test_peft_export_refuses_a_tower_adapter_it_cannot_place(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    config = json.loads((ckpt / "mm_config.json").read_text())
    (ckpt / "mm_config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(ExportError, match="vision-tower adapter, which stock PEFT can carry only on the "
                                          "transformers LLaVA form"):
        export_checkpoint(ckpt, tmp_path / "peft", "peft", progress=False)
    assert not (tmp_path / "peft").exists()


def test_unknown_module_kinds_are_named(tmp_path):
    tower = VisionTower()
    tower.visual.transformer.resblocks[1].attn = nn.Identity()
    with pytest.raises(ValueError, match="vision tower block 1: attention of type Identity is not supported"):
        split_attention(tower.visual)
    assert isinstance(tower.visual.transformer.resblocks[0].attn, nn.MultiheadAttention)  # nothing changed
