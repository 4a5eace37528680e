"""Vision-to-language projectors with LLaVA's names: `linear` and `mlp{N}x_gelu`, and the released stage-1
projector files they load from (`read_pretrained_projector`)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError


class ProjectorFileError(InputError):
    """A projector file or folder that cannot be read or does not fit the projector; the message names it."""


def build_projector(kind: str, vision_hidden: int, llm_hidden: int) -> nn.Module:
    """(B, n_tok, vision_hidden) -> (B, n_tok, llm_hidden).

    `mlp2x_gelu` is Linear, GELU, Linear: the same nn.Sequential layout as LLaVA-1.5, so its
    `mm_projector.bin` keys ("0.weight", "2.weight", ...) load directly.
    """
    if kind == "linear":
        return nn.Linear(vision_hidden, llm_hidden)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"--mm_projector_type {kind!r}: expected 'linear' or 'mlp<N>x_gelu' (e.g. mlp2x_gelu)")
    layers: list[nn.Module] = [nn.Linear(vision_hidden, llm_hidden)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden)]
    return nn.Sequential(*layers)


LLAVA_PREFIXES = ("base_model.model.model.mm_projector.", "model.mm_projector.", "mm_projector.")
XTUNER_PREFIXES = ("model.",)  # xtuner's ProjectorModel keeps its nn.Sequential as `self.model`


def load_projector_state(projector: nn.Module, state: dict[str, torch.Tensor],
                         prefixes: tuple[str, ...] = LLAVA_PREFIXES) -> None:
    """Load a projector state dict, accepting LLaVA's prefixed keys (`model.mm_projector.0.weight`), or the
    given `prefixes` (xtuner's `model.0.weight`).

    Raises ProjectorFileError (a ValueError) naming the keys on missing/unexpected keys, or the key and both
    shapes on a shape mismatch.
    """
    cleaned: dict[str, torch.Tensor] = {}
    source_key: dict[str, str] = {}  # cleaned key -> key as written in the checkpoint, for messages
    for key, value in state.items():
        short = key
        for prefix in prefixes:
            if key.startswith(prefix):
                short = key[len(prefix):]
                break
        cleaned[short], source_key[short] = value, key
    if isinstance(projector, nn.Linear) and set(cleaned) == {"0.weight", "0.bias"}:
        # A one-layer nn.Sequential checkpoint ("0.weight") for a bare nn.Linear. Only that exact
        # layout is renamed: an MLP checkpoint must not collapse onto "weight"/"bias" and load silently.
        cleaned = {k[2:]: v for k, v in cleaned.items()}
        source_key = {k[2:]: v for k, v in source_key.items()}
    expected = projector.state_dict()
    missing, unexpected = expected.keys() - cleaned.keys(), cleaned.keys() - expected.keys()
    if missing or unexpected:
        raise ProjectorFileError(f"projector weights do not fit the projector: missing {sorted(missing)}, "
                                 f"unexpected {sorted(source_key[k] for k in unexpected)}")
    for key, tensor in expected.items():
        if cleaned[key].shape != tensor.shape:
            raise ProjectorFileError(f"projector weight {source_key[key]}: checkpoint shape "
                                     f"{tuple(cleaned[key].shape)} != model shape {tuple(tensor.shape)}")
    projector.load_state_dict(cleaned)


# xtuner's ProjectorModel (xtuner/model/modules/projector): config.json with model_type "projector" and a
# save_pretrained state dict of `self.model`, an nn.Sequential of Linear (+ activation + Linear) * (depth - 1).
XTUNER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or from a torch.save file read with weights_only=True (never a full
    unpickling: LLaVA's mm_projector.bin is a plain dict of tensors)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reader error becomes one line naming the file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ProjectorFileError(f"--pretrain_mm_mlp_adapter {path}: cannot read it as a projector state dict "
                                 f"({reason[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ProjectorFileError(f"--pretrain_mm_mlp_adapter {path}: not a state dict (a mapping of names to "
                                 f"tensors)")
    return state


def _xtuner_projector_state(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    """xtuner's projector folder -> a state dict with our keys ("0.weight", ...), after checking its config."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ProjectorFileError(f"--pretrain_mm_mlp_adapter {config_path}: unreadable ({err})") from None
    depth, act, bias = config.get("depth"), config.get("hidden_act", "gelu"), config.get("bias", True)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    ours = (1, None) if kind == "linear" else (int(match.group(1)), "gelu") if match else (None, None)
    if depth != ours[0] or (depth and depth > 1 and act != ours[1]) or bias is not True:
        raise ProjectorFileError(
            f"--pretrain_mm_mlp_adapter {folder}: xtuner projector depth={depth}, hidden_act={act!r}, bias={bias} "
            f"does not match --mm_projector_type {kind} (depth {ours[0]}, gelu, with biases)")
    weights = next((folder / name for name in XTUNER_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise ProjectorFileError(f"--pretrain_mm_mlp_adapter {folder}: xtuner projector folder without "
                                 f"{' or '.join(XTUNER_WEIGHT_FILES)}")
    return _read_tensors(weights)


def read_pretrained_projector(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The state dict of a released or our own stage-1 projector, and the key prefixes its format uses.

    Accepted (`kind` is the model's --mm_projector_type, checked against an xtuner config):
    - our stage-1 output folder (mm_projector.safetensors) or that file;
    - LLaVA's mm_projector.bin (keys `model.mm_projector.0.weight`, ...), read with torch.load(weights_only=True);
    - xtuner's projector folder (config.json with model_type "projector" + model.safetensors, keys `model.0.weight`),
      or a folder holding it as `projector/` (xtuner's saved-iteration layout).
    Keys are as written in the file; load_projector_state strips the returned prefixes. Raises ProjectorFileError
    or FileNotFoundError.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "mm_projector.safetensors").is_file():
            return _read_tensors(p / "mm_projector.safetensors"), LLAVA_PREFIXES
        if (p / "mm_projector.bin").is_file():
            return _read_tensors(p / "mm_projector.bin"), LLAVA_PREFIXES
        for folder in (p, p / "projector"):
            config = folder / "config.json"
            if config.is_file():
                try:
                    model_type = json.loads(config.read_text()).get("model_type")
                except (OSError, json.JSONDecodeError, AttributeError):
                    model_type = None
                if model_type != "projector":
                    raise ProjectorFileError(f"--pretrain_mm_mlp_adapter {config}: model_type {model_type!r}, "
                                             f"not an xtuner projector ('projector')")
                return _xtuner_projector_state(folder, kind), XTUNER_PREFIXES
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter {path}: the folder holds no mm_projector.safetensors, "
                                f"mm_projector.bin or xtuner projector (config.json + model.safetensors)")
    if not p.is_file():
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter {path}: no such file or folder")
    return _read_tensors(p), LLAVA_PREFIXES


def load_pretrained_projector(projector: nn.Module, path: str | Path, kind: str) -> None:
    """--pretrain_mm_mlp_adapter: read `path` (see read_pretrained_projector) into `projector`; errors name `path`."""
    state, prefixes = read_pretrained_projector(path, kind)
    try:
        load_projector_state(projector, state, prefixes)
    except ProjectorFileError as err:
        raise ProjectorFileError(f"--pretrain_mm_mlp_adapter {path}: {err}") from None
