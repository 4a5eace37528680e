"""The multimodal model (mm_moslora.model): vision tower, projector, image-feature scatter, building from
flags or from saved checkpoints. Everything is tiny and random; nothing is downloaded."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from mm_moslora.data.conversation import tokenize_conversation
from mm_moslora.data.images import ImageProcessor
from mm_moslora.checkpoint import CheckpointError, config_for_model, load_checkpoint, save_inference_files
from mm_moslora.model.build import TINY_DIR, build_llm, build_model, weights_fingerprint
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID
from mm_moslora.model.projector import build_projector, load_projector_state
from mm_moslora.model.vision import TINY_VISION_NAME, VisionTower, register_tiny_config

TINY_CLIP_CFG = json.loads((TINY_DIR / f"{TINY_VISION_NAME}.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer) of the built-in tiny default; tests that change it build their own."""
    return build_model()


def seeded_clip(seed: int):
    """A full random open_clip model of the tiny architecture, drawn from `seed`."""
    register_tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(TINY_VISION_NAME)


def image_ids(prefix: list[int], n_images: int, n_tok: int, suffix: list[int]) -> list[int]:
    return prefix + [IMAGE_TOKEN_ID] * (n_images * n_tok) + suffix


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------------
# Forward/backward and projectors

def test_tiny_build_forward_backward(tiny):
    model, tokenizer = tiny
    assert tokenizer.pad_token is not None and model.num_image_tokens == 64
    assert model.vision.hidden_size == 128 and model.llm.config.hidden_size == 128
    for kind, n_linear in [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)]:
        model.projector = build_projector(kind, model.vision.hidden_size, model.llm.config.hidden_size)
        linears = [m for m in model.projector.modules() if isinstance(m, torch.nn.Linear)]
        gelus = [m for m in model.projector.modules() if isinstance(m, torch.nn.GELU)]
        assert len(linears) == n_linear and len(gelus) == n_linear - 1
        n_tok = model.num_image_tokens
        row0 = image_ids([1, 40], 1, n_tok, [50, 60, 2])
        row1 = [1] + list(range(10, 10 + len(row0) - 2)) + [2]  # text only, same length
        ids = torch.tensor([row0, row1])
        labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)
        model.zero_grad(set_to_none=True)
        model.train()
        pixels = torch.randn(1, 3, 64, 64)
        out = model(ids, torch.ones_like(ids), pixel_values=pixels, labels=labels)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
        assert model.llm.get_input_embeddings().weight.grad is not None
        assert all(p.grad is None for p in model.vision.parameters())  # frozen tower: no gradient computed
    model.zero_grad(set_to_none=True)


def test_loss_equals_the_hugging_face_loss(tiny):
    model, _ = tiny
    model.eval()
    n_tok = model.num_image_tokens
    row0 = image_ids([1, 40], 1, n_tok, [50, 60, 2])
    row1 = [1] + list(range(10, 10 + len(row0) - 3)) + [3, 3]  # text only, right-padded
    ids = torch.tensor([row0, row1])
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[len(row0)], [len(row0) - 2]])).long()
    labels = ids.masked_fill((ids == IMAGE_TOKEN_ID) | (mask == 0), -100)
    labels[:, :3] = -100  # a masked prompt
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(ids, mask, pixel_values=pixels, labels=labels).loss
        reference = model.llm(inputs_embeds=model.embed(ids, pixels), attention_mask=mask, labels=labels).loss
        logits = model(ids, mask, pixel_values=pixels).logits
    torch.testing.assert_close(ours, reference)
    assert logits.shape == (2, ids.shape[1], model.llm.config.vocab_size)


@pytest.mark.parametrize("kind", ["conv", "mlp0x_gelu", "mlp2x_relu", "mlpx_gelu"])
def test_bad_projector_type(kind):
    with pytest.raises(ValueError, match=r"expected 'linear' or 'mlp<N>x_gelu'"):
        build_projector(kind, 8, 16)


def test_projector_loads_llava_keys():
    source = build_projector("mlp2x_gelu", 16, 32)
    for prefix in ("model.mm_projector.", "base_model.model.model.mm_projector.", "mm_projector.", ""):
        target = build_projector("mlp2x_gelu", 16, 32)
        load_projector_state(target, {prefix + k: v.clone() for k, v in source.state_dict().items()})
        assert_same_tensors(target.state_dict(), source.state_dict())
    # A bare nn.Linear accepts a one-layer Sequential's "0.weight".
    linear_src, linear = build_projector("linear", 16, 32), build_projector("linear", 16, 32)
    load_projector_state(linear, {"model.mm_projector.0." + k: v for k, v in linear_src.state_dict().items()})
    assert_same_tensors(linear.state_dict(), linear_src.state_dict())


def test_projector_state_errors_name_the_key():
    target = build_projector("mlp2x_gelu", 16, 32)
    wrong_width = {"model.mm_projector." + k: v for k, v in build_projector("mlp2x_gelu", 16, 24).state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.mm_projector\.0\.weight: checkpoint shape \(24, 16\) "
                                         r"!= model shape \(32, 16\)"):
        load_projector_state(target, wrong_width)
    deeper = {"model.mm_projector." + k: v for k, v in build_projector("mlp3x_gelu", 16, 32).state_dict().items()}
    with pytest.raises(ValueError, match=r"unexpected \['model\.mm_projector\.4\.bias', 'model\.mm_projector\.4\.weight'\]"):
        load_projector_state(target, deeper)
    # An MLP checkpoint must not collapse onto a square nn.Linear ("0."/"2." both -> "weight").
    square = build_projector("linear", 32, 32)
    with pytest.raises(ValueError, match="do not fit"):
        load_projector_state(square, build_projector("mlp2x_gelu", 32, 32).state_dict())


# ---------------------------------------------------------------------------------------------------
# Image features written into the embeddings

def test_features_scattered_into_image_positions(tiny):
    model, _ = tiny
    model.eval()
    n_tok = model.num_image_tokens
    # Row 0: two images around text; row 1: one image, then right padding.
    row0 = image_ids([1, 30], 1, n_tok, [31]) + [IMAGE_TOKEN_ID] * n_tok + [32, 2]
    row1 = image_ids([1], 1, n_tok, [33, 34, 2])
    row1 += [3] * (len(row0) - len(row1))
    ids = torch.tensor([row0, row1])
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        feats = model.encode_images(pixels)  # (3, n_tok, hidden)
        table = model.llm.get_input_embeddings().weight
    assert feats.shape == (3, n_tok, model.llm.config.hidden_size)
    starts = [(0, 2, 0), (0, 3 + n_tok, 1), (1, 1, 2)]  # (row, first position, image index) in reading order
    image_positions = set()
    for row, start, image in starts:
        assert torch.equal(embeds[row, start:start + n_tok], feats[image])
        image_positions |= {(row, p) for p in range(start, start + n_tok)}
    for row in range(2):
        for pos in range(ids.shape[1]):
            if (row, pos) not in image_positions:
                assert torch.equal(embeds[row, pos], table[ids[row, pos]])


def test_feature_count_mismatch_names_both_counts(tiny):
    model, _ = tiny
    n_tok = model.num_image_tokens
    two_placeholders = torch.tensor([image_ids([1], 2, n_tok, [2])])
    with pytest.raises(ValueError, match=rf"{2 * n_tok} image-token positions.*1 images x {n_tok} features = {n_tok}"):
        model.embed(two_placeholders, torch.randn(1, 3, 64, 64))
    text_only = torch.tensor([[1, 30, 31, 2]])
    with pytest.raises(ValueError, match=rf"0 image-token positions.*2 images x {n_tok} features = {2 * n_tok}"):
        model.embed(text_only, torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=rf"{n_tok} image-token positions.*0 images.* = 0"):
        model.embed(torch.tensor([image_ids([1], 1, n_tok, [2])]), None)


def test_text_only_training_batch_touches_the_projector(tiny):
    model, _ = tiny
    ids = torch.tensor([[1, 30, 31, 32, 2], [1, 40, 41, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    model.zero_grad(set_to_none=True)
    model.train()
    model(ids, mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for param in model.projector.parameters():
        assert param.grad is not None and not param.grad.any()
    assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    # Inference (eval mode) skips the dummy image pass.
    model.zero_grad(set_to_none=True)
    model.eval()
    model(ids, mask, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.projector.parameters())


# ---------------------------------------------------------------------------------------------------
# Vision tower

def manual_hidden_states(visual, pixels: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """open_clip ViT by hand: patch embedding, CLS, positions, ln_pre, then the first `n_blocks` blocks.
    Returns (B, 1 + n_patches, width): Hugging Face CLIP's hidden_states[n_blocks]."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    batch_first = getattr(visual.transformer, "batch_first", True)
    x = x if batch_first else x.transpose(0, 1)
    for block in visual.transformer.resblocks[:n_blocks]:
        x = block(x)
    return x if batch_first else x.transpose(0, 1)


@pytest.fixture(scope="module")
def reference_visual():
    return seeded_clip(0).visual.eval()  # the tiny tower is drawn from seed 0 too


@pytest.mark.parametrize("select_layer, n_blocks, select_feature", [
    (-1, 3, "patch"), (-2, 2, "patch"), (-3, 1, "patch"), (1, 1, "patch"), (-2, 2, "cls_patch"), (3, 3, "cls_patch")])
def test_select_layer_matches_manual_run(reference_visual, select_layer, n_blocks, select_feature):
    reference = reference_visual
    tower = VisionTower(select_layer=select_layer, select_feature=select_feature)
    assert torch.equal(tower.visual.conv1.weight, reference.conv1.weight)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = manual_hidden_states(reference, pixels, n_blocks)
        out = tower(pixels)
    if select_feature == "patch":
        expected = expected[:, 1:]
    assert tower.num_patches == 64 and tower.num_tokens == 64 + (select_feature == "cls_patch")
    assert out.shape == (2, tower.num_tokens, tower.hidden_size) == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_vision_tower_frozen_by_default():
    tower = VisionTower()
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.visual.training  # a frozen tower keeps eval behaviour inside a training model
    pixels = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = tower(pixels)
    assert not out.requires_grad and out.grad_fn is None
    tuned = VisionTower(trainable=True).train()
    assert all(p.requires_grad for p in tuned.parameters()) and tuned.visual.training
    tuned(pixels).sum().backward()
    assert all(p.grad is not None for p in tuned.parameters())  # pruned: no unused parameter left


@pytest.mark.parametrize("select_layer", [0, 4, -4])
def test_select_layer_out_of_range(select_layer):
    with pytest.raises(ValueError, match=rf"--mm_vision_select_layer {select_layer} out of range for a 3-block"):
        VisionTower(select_layer=select_layer)


def test_vision_tower_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'patch' or 'cls_patch'"):
        VisionTower(select_feature="cls")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        VisionTower("no-such-vit")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        VisionTower(str(tmp_path))


@pytest.mark.parametrize("weights_file", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_vision_tower_from_local_folder(tmp_path, weights_file):
    saved = seeded_clip(123)  # not the tower's own init seed: the weights must come from the file
    state = saved.state_dict()
    if weights_file.endswith(".bin"):
        torch.save(state, tmp_path / weights_file)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / weights_file))
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    tower = VisionTower(str(tmp_path))
    for key, value in tower.visual.state_dict().items():
        assert torch.equal(value, saved.visual.state_dict()[key]), key
    assert not torch.equal(tower.visual.conv1.weight, seeded_clip(0).visual.conv1.weight)
    assert tower.image_mean == (0.5, 0.5, 0.5) and tower.image_std == (0.25, 0.25, 0.25)
    assert tower.image_size == 64 and tower.num_tokens == 64
    # The image processor follows the tower's own preprocessing: white -> (1 - 0.5) / 0.25.
    pixels = ImageProcessor.for_tower(tower, "pad")(Image.new("RGB", (80, 80), (255, 255, 255)))
    torch.testing.assert_close(pixels, torch.full((3, 64, 64), 2.0))


def test_vision_tower_arch_colon_file(tmp_path):
    saved = seeded_clip(7)
    path = tmp_path / "weights.bin"
    torch.save(saved.state_dict(), path)
    tower = VisionTower(f"{TINY_VISION_NAME}:{path}", select_layer=-1)
    assert tower.pretrained == str(path)
    for key, value in tower.visual.state_dict().items():
        assert torch.equal(value, saved.visual.state_dict()[key]), key


# ---------------------------------------------------------------------------------------------------
# Building from flags and from saved Hugging Face checkpoints

def test_tiny_model_is_deterministic(tiny):
    model, _ = tiny
    again, _ = build_model()
    assert weights_fingerprint(model.llm) == weights_fingerprint(again.llm)
    assert_same_tensors(model.llm.state_dict(), again.llm.state_dict())
    assert_same_tensors(model.vision.state_dict(), again.vision.state_dict())
    assert weights_fingerprint(build_llm("tiny", init_seed=1)) != weights_fingerprint(model.llm)


CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def saved_tokenizer(family: str, directory) -> PreTrainedTokenizerFast:
    """The tiny vocabulary dressed as a LLaMA (USER/ASSISTANT template) or Qwen2 (ChatML) tokenizer."""
    if family == "llama":
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(TINY_DIR))
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TINY_DIR / "tokenizer.json"), eos_token="<|im_end|>",
                                            pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_build_from_saved_hf_checkpoint_and_train_a_step(tmp_path, family):
    tokenizer = saved_tokenizer(family, tmp_path)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(5)
    llm = (LlamaForCausalLM(LlamaConfig(**shape)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape)))
    llm.save_pretrained(tmp_path)

    model, loaded_tokenizer = build_model(model_name_or_path=str(tmp_path), mm_projector_type="mlp2x_gelu")
    assert type(model.llm) is type(llm)
    assert_same_tensors(model.llm.state_dict(), llm.state_dict())
    assert loaded_tokenizer.chat_template == tokenizer.chat_template and loaded_tokenizer.pad_token is not None
    assert model.projector[0].in_features == model.vision.hidden_size and model.projector[-1].out_features == 64

    turns = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A red circle."}]
    ids, labels = tokenize_conversation(turns, loaded_tokenizer, "chat_template", model.num_image_tokens)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.projector[0].weight.detach().clone()
    out = model(ids[None], torch.ones_like(ids)[None], pixel_values=torch.randn(1, 3, 64, 64), labels=labels[None])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    assert not torch.equal(model.projector[0].weight, before)


# ---------------------------------------------------------------------------------------------------
# Checkpoints written by training, read by eval/chat

def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model, tokenizer = build_model(mm_projector_type="mlp3x_gelu", mm_vision_select_layer=-1,
                                   mm_vision_select_feature="cls_patch")
    with torch.no_grad():  # a "tuned" tower: saved weights must replace the seeded ones
        model.vision.visual.conv1.weight.mul_(1.5)
    config = config_for_model(model, "tiny", "mlp3x_gelu", conv_mode="vicuna_v1", image_aspect_ratio="pad",
                           llm_fingerprint=weights_fingerprint(model.llm), stage="finetune")
    save_inference_files(tmp_path, config, tokenizer, model.projector.state_dict(),
                       vision_state=model.vision.visual.state_dict())
    loaded, loaded_tokenizer, loaded_config = load_checkpoint(tmp_path)
    assert loaded_config == config
    assert loaded.vision.select_layer == -1 and loaded.vision.select_feature == "cls_patch"
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert not loaded.training

    n_tok = model.num_image_tokens
    ids = torch.tensor([image_ids([1, 30], 1, n_tok, [31, 32, 2])])
    pixels = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(ids, torch.ones_like(ids), pixel_values=pixels).logits
        got = loaded(ids, torch.ones_like(ids), pixel_values=pixels).logits
    assert torch.equal(expected, got)


def test_checkpoint_with_another_base_model_is_refused(tmp_path):
    model, tokenizer = build_model()
    config = config_for_model(model, "tiny", "mlp2x_gelu", conv_mode="vicuna_v1", image_aspect_ratio="pad",
                           llm_fingerprint="0123456789abcdef")
    save_inference_files(tmp_path, config, tokenizer, model.projector.state_dict())
    with pytest.raises(ValueError, match="not the one this adapter was trained on.*fingerprint differs"):
        load_checkpoint(tmp_path)


def test_fingerprint_same_for_fp32_and_bf16_copies(tiny):
    model, _ = tiny
    assert weights_fingerprint(model.llm) == weights_fingerprint(build_llm("tiny", torch.bfloat16))
    fp16 = build_llm("tiny", torch.float16)
    assert weights_fingerprint(fp16) == weights_fingerprint(model.llm, via_dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checkpoint_trained_in_half_precision_loads(tmp_path, dtype):
    model, tokenizer = build_model(dtype=dtype)  # training builds the base in its own dtype
    config = config_for_model(model, "tiny", "mlp2x_gelu", conv_mode="vicuna_v1", image_aspect_ratio="pad",
                           llm_fingerprint=weights_fingerprint(model.llm))
    save_inference_files(tmp_path, config, tokenizer, model.projector.state_dict())
    loaded, _, _ = load_checkpoint(tmp_path, dtype=dtype)
    assert next(loaded.llm.parameters()).dtype == dtype


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not an mm_moslora checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "mm_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(tmp_path)
