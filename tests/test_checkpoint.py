"""The checkpoint config's one home: every field typed, every bad mm_config.json refused in one line."""
from __future__ import annotations

import json

import pytest

from mm_moslora.checkpoint import (MM_CONFIG, PROJECTOR_FILE, CheckpointConfig, CheckpointError, load_checkpoint,
                                   load_tensors)
from tests.helpers import make_tiny_checkpoint

REQUIRED = {"model_name_or_path": "tiny", "vision_tower": "mm-tiny-vit", "mm_vision_select_layer": -2,
            "mm_projector_type": "mlp2x_gelu", "conv_mode": "vicuna_v1", "image_aspect_ratio": "pad"}


def test_round_trip_and_defaults_for_an_old_checkpoint(tmp_path):
    config = CheckpointConfig.from_dict(REQUIRED)  # what a checkpoint with only the required keys holds
    assert (config.mm_vision_select_feature, config.attn_implementation, config.merged) == ("patch", "sdpa", False)
    config.write(tmp_path)
    assert CheckpointConfig.read(tmp_path) == config
    assert CheckpointConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("values, message", [
    ([1, 2], "must hold a JSON object, found list"),
    (None, "must hold a JSON object, found NoneType"),
    ({k: v for k, v in REQUIRED.items() if k != "conv_mode"}, "missing key\\(s\\) conv_mode"),
    ({**REQUIRED, "lora_alpha": 3}, "unknown key\\(s\\) lora_alpha"),
    ({**REQUIRED, "mm_vision_select_layer": "-2"}, "mm_vision_select_layer must be int, found \"-2\""),
    ({**REQUIRED, "mm_vision_select_layer": True}, "mm_vision_select_layer must be int, found true"),
    ({**REQUIRED, "merged": "yes"}, "merged must be bool"),
    ({**REQUIRED, "format_version": 99}, "format_version 99 is newer"),
])
def test_bad_config_is_one_line_error_naming_the_file(tmp_path, values, message):
    (tmp_path / MM_CONFIG).write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match=message) as err:
        CheckpointConfig.read(tmp_path)
    assert str(tmp_path / MM_CONFIG) in str(err.value) and "\n" not in str(err.value)


def test_missing_conv_mode_is_refused_not_guessed(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", adapter=False)
    values = json.loads((ckpt / MM_CONFIG).read_text())
    del values["conv_mode"]
    (ckpt / MM_CONFIG).write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="missing key\\(s\\) conv_mode"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"\x10\x00\x00", "not a readable safetensors")])
def test_truncated_projector_is_one_line_error(tmp_path, content, reason):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", adapter=False)
    (ckpt / PROJECTOR_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=f"projector: {reason}"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="file not found"):
        load_tensors(tmp_path / "absent.safetensors", "projector")
