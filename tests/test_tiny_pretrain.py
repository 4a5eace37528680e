"""The pretrained tiny backbones the demo starts from (mm_moslora/model/tiny/pretrained, made by
scripts/pretrain_tiny_backbones.py): the committed folders load through the paths users load real
checkpoints from and hold trained weights; the pretraining code's labels and texts; a short run of it
writes loadable folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mm_moslora import demo_data as dd
from mm_moslora.model.build import build_llm, build_tokenizer
from mm_moslora.model.tiny_pretrain import (LM_DIR, PRETRAINED_DIR, VISION_DIR, describe_scene,
                                            first_answer_token_accuracy, patch_labels, pretrain_tiny_lm,
                                            pretrain_tiny_vision, text_batch)
from mm_moslora.model.vision import VisionTower


def scene(*objects) -> dd.Scene:
    return dd.Scene(tuple(dd.SceneObject(*o) for o in objects))


def test_committed_lm_answers_from_a_written_scene():
    """The shipped LM is the trained one: it reads answers off a scene description it has never seen."""
    llm, tokenizer = build_llm(str(LM_DIR)), build_tokenizer(str(LM_DIR))
    random_init = build_llm("tiny")
    assert llm.config.hidden_size == random_init.config.hidden_size
    assert not torch.equal(llm.model.embed_tokens.weight, random_init.model.embed_tokens.weight)
    accuracy = first_answer_token_accuracy(llm, tokenizer, held_out=False, device="cpu", n=256)
    assert accuracy["presence"] >= 0.9 and accuracy["color"] >= 0.9 and accuracy["shape"] >= 0.9, accuracy
    report = json.loads((PRETRAINED_DIR / "pretraining.json").read_text())
    assert report["lm"]["steps"] > 1000 and report["vision"]["steps"] > 1000


def test_committed_vision_tower_loads_as_an_open_clip_folder():
    tower = VisionTower(str(VISION_DIR), select_layer=-1)
    untrained = VisionTower("mm-tiny-vit", select_layer=-1)
    assert tower.num_tokens == untrained.num_tokens == 64
    assert not torch.equal(tower.visual.conv1.weight, untrained.visual.conv1.weight)


def test_patch_labels_mark_the_covering_object():
    s = scene(("circle", "red", 0.25, 0.25, 0.3), ("star", "blue", 0.75, 0.75, 0.3))
    colour, shape = patch_labels(s, grid=4)  # patch centres at 1/8, 3/8, 5/8, 7/8
    background_colour, background_shape = len(dd.COLORS), len(dd.SHAPES)
    red, blue = list(dd.COLORS).index("red"), list(dd.COLORS).index("blue")
    expected = torch.full((16,), background_colour)
    expected[[0, 1, 4, 5]] = red
    expected[[10, 11, 14, 15]] = blue
    assert torch.equal(colour, expected)
    assert shape[0] == dd.SHAPES.index("circle") and shape[15] == dd.SHAPES.index("star")
    assert (shape == background_shape).sum() == 8


def test_scene_description_and_text_batches():
    s = scene(("star", "blue", 0.75, 0.32, 0.2), ("circle", "red", 0.21, 0.55, 0.2))
    assert describe_scene(s) == "Scene: red circle at 2 5, blue star at 7 3."
    tokenizer = build_tokenizer("tiny")
    ids, labels, mask, kinds = text_batch(np.random.default_rng(0), tokenizer, 16)
    assert ids.shape == labels.shape == mask.shape and len(kinds) == 16
    assert {"caption"} < set(kinds)
    for k in range(16):  # labels cover only the answer, which follows the description; a caption stands alone
        answer_positions = (labels[k] != -100).nonzero().flatten()
        assert len(answer_positions) > 0 and mask[k, answer_positions].all()
        context = tokenizer.decode(ids[k, :answer_positions[0]])
        assert ("Scene:" in context) == (kinds[k] != "caption"), context


def test_short_pretraining_writes_loadable_folders(tmp_path):
    lm = pretrain_tiny_lm(tmp_path / "lm", steps=2, batch_size=4, log=lambda _: None)
    vision = pretrain_tiny_vision(tmp_path / "vision", steps=2, batch_size=4, log=lambda _: None)
    assert lm["steps"] == vision["steps"] == 2
    assert set(vision["accuracy_last_50_batches"]) == {"patch_colour", "shape_on_object_patches", "count"}
    llm = build_llm(str(tmp_path / "lm"))
    assert not torch.equal(llm.model.embed_tokens.weight, build_llm("tiny").model.embed_tokens.weight)
    assert build_tokenizer(str(tmp_path / "lm")).pad_token_id == build_tokenizer("tiny").pad_token_id
    assert VisionTower(str(tmp_path / "vision"), select_layer=-1).num_tokens == 64


@pytest.mark.parametrize("bad", ["max_steps", "model_name_or_path"])
def test_demo_reuses_a_stage_only_with_its_flags(tmp_path, bad):
    from mm_moslora import pipeline as demo  # the demo's (and the adapter study's) stage runner
    flags = {"max_steps": 3, "learning_rate": 1e-3}
    (tmp_path / "train_summary.json").write_text(json.dumps({"steps": 3}))
    (tmp_path / "mm_projector.safetensors").write_bytes(b"")  # a stage also needs its output to count as done
    assert not demo.stage_complete(tmp_path, flags)  # no record of its flags: run again
    (tmp_path / demo.STAGE_RECORD_FILE).write_text(json.dumps(demo.stage_record(flags)))
    assert demo.stage_complete(tmp_path, flags)
    assert not demo.stage_complete(tmp_path, {**flags, bad: 4})
    record = demo.stage_record(flags)  # same flags, other backbone weights under the same paths
    (tmp_path / demo.STAGE_RECORD_FILE).write_text(json.dumps({**record, "backbone_weights_sha256": "0" * 64}))
    assert not demo.stage_complete(tmp_path, flags)
