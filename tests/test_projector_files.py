"""Released stage-1 projectors as --pretrain_mm_mlp_adapter: LLaVA's mm_projector.bin, xtuner's projector folder,
our own stage-1 output; files that do not fit, or are not plain tensors, are refused with one line naming them.

The files are written here in the exact formats those projects save: LLaVA's train.py `torch.save`s a dict of
`model.mm_projector.*` tensors; xtuner's ProjectorModel.save_pretrained writes config.json (model_type
"projector") and model.safetensors with `model.<i>.*` keys (its nn.Sequential is `self.model`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mm_moslora.model.projector import (ProjectorFileError, build_projector, load_pretrained_projector,
                                        read_pretrained_projector)


VIS, LLM = 16, 32


def source_projector(kind: str = "mlp2x_gelu", vis: int = VIS, llm: int = LLM, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_projector(kind, vis, llm)


def write_llava_bin(path: Path, projector: torch.nn.Module) -> Path:
    # LLaVA saves the bf16 weights it trained; the loader casts on load_state_dict.
    torch.save({f"model.mm_projector.{k}": v.to(torch.bfloat16) for k, v in projector.state_dict().items()}, path)
    return path


def write_xtuner_folder(folder: Path, projector: torch.nn.Module, depth: int = 2, hidden_act: str = "gelu",
                        vis: int = VIS, llm: int = LLM) -> Path:
    folder.mkdir(parents=True)
    config = {"architectures": ["ProjectorModel"],
              "auto_map": {"AutoConfig": "configuration_projector.ProjectorConfig",
                           "AutoModel": "modeling_projector.ProjectorModel"},
              "bias": True, "depth": depth, "hidden_act": hidden_act, "llm_hidden_size": llm, "model_type": "projector",
              "torch_dtype": "float32", "transformers_version": "4.36.2", "visual_hidden_size": vis}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({f"model.{k}": v.contiguous() for k, v in projector.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def loads_equal(path, kind: str = "mlp2x_gelu", source=None, atol: float = 0.0) -> None:
    target = build_projector(kind, VIS, LLM)
    load_pretrained_projector(target, path, kind)
    for key, value in source.state_dict().items():
        assert torch.allclose(target.state_dict()[key], value.float(), atol=atol, rtol=0), key


def test_llava_mm_projector_bin_loads(tmp_path):
    source = source_projector()
    path = write_llava_bin(tmp_path / "mm_projector.bin", source)
    loads_equal(path, source=source, atol=1e-2)  # bf16 on disk
    loads_equal(tmp_path, source=source, atol=1e-2)  # a folder holding it (LLaVA's stage-1 output folder)


def test_xtuner_projector_folder_loads(tmp_path):
    source = source_projector()
    folder = write_xtuner_folder(tmp_path / "iter_2181" / "projector", source)
    loads_equal(folder, source=source)
    loads_equal(folder.parent, source=source)  # xtuner's saved-iteration folder holds it as projector/
    linear = source_projector("linear")
    loads_equal(write_xtuner_folder(tmp_path / "linear", linear, depth=1), "linear", source=linear)


def test_our_stage1_output_loads(tmp_path):
    source = source_projector()
    save_file(source.state_dict(), str(tmp_path / "mm_projector.safetensors"))
    loads_equal(tmp_path, source=source)
    loads_equal(tmp_path / "mm_projector.safetensors", source=source)


def test_a_projector_of_the_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    wide = write_llava_bin(tmp_path / "mm_projector.bin", source_projector(vis=24))
    with pytest.raises(ProjectorFileError, match=rf"{tmp_path}.*model\.mm_projector\.0\.weight: checkpoint shape "
                                                 r"\(32, 24\) != model shape \(32, 16\)"):
        load_pretrained_projector(build_projector("mlp2x_gelu", VIS, LLM), wide, "mlp2x_gelu")
    xtuner = write_xtuner_folder(tmp_path / "x", source_projector(llm=48), llm=48)
    with pytest.raises(ProjectorFileError, match=r"model\.0\.weight: checkpoint shape \(48, 16\) != model shape "
                                                 r"\(32, 16\)"):
        load_pretrained_projector(build_projector("mlp2x_gelu", VIS, LLM), xtuner, "mlp2x_gelu")


def test_an_xtuner_projector_of_another_depth_or_activation_is_refused(tmp_path):
    deep = write_xtuner_folder(tmp_path / "deep", source_projector("mlp3x_gelu"), depth=3)
    with pytest.raises(ProjectorFileError, match=r"depth=3.*does not match --mm_projector_type mlp2x_gelu"):
        read_pretrained_projector(deep, "mlp2x_gelu")
    relu = write_xtuner_folder(tmp_path / "relu", source_projector(), hidden_act="relu")
    with pytest.raises(ProjectorFileError, match=r"hidden_act='relu'"):
        read_pretrained_projector(relu, "mlp2x_gelu")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ProjectorFileError, match=r"model_type 'llama', not an xtuner projector"):
        read_pretrained_projector(other, "mlp2x_gelu")


class Payload:
    """Anything but a tensor: a full unpickling would construct it."""


def test_files_that_are_not_plain_tensors_are_refused_without_unpickling(tmp_path):
    pickled = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": Payload()}, pickled)
    with pytest.raises(ProjectorFileError, match=r"cannot read it as a projector state dict"):
        read_pretrained_projector(pickled, "mlp2x_gelu")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ProjectorFileError, match=r"garbage\.safetensors: cannot read it"):
        read_pretrained_projector(garbage, "mlp2x_gelu")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        read_pretrained_projector(tmp_path / "missing.bin", "mlp2x_gelu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no mm_projector.safetensors"):
        read_pretrained_projector(empty, "mlp2x_gelu")


def test_finetune_with_a_projector_that_does_not_fit_exits_2_with_one_line(tmp_path, small_demo_data,
                                                                         recipe_in_process):
    # The tiny model's projector is 128 -> 128 (vision width -> LM width); this file is 24 -> 128.
    path = write_llava_bin(tmp_path / "mm_projector.bin", source_projector(vis=24, llm=128))
    proc = recipe_in_process("finetune", ["--pretrain_mm_mlp_adapter", path, "--output_dir", tmp_path / "out",
                                          "--report_to", "none", "--data_path", small_demo_data / "finetune.json",
                                          "--image_folder", small_demo_data / "images"])
    assert proc.returncode == 2, proc.stderr[-3000:]  # bad input (mm_moslora.errors)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.mm_projector.0.weight: checkpoint shape (128, 24) != model shape (128, 128)" in errors[0]
