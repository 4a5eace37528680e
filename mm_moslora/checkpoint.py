"""The checkpoint's one home: its typed config, its file names, and how it is written and read back.

Training writes a checkpoint folder; inference, evaluation, export, serving and the lmms-eval plugin read it,
all through this module, so a field and its default exist in exactly one place:

    OUT/mm_config.json             CheckpointConfig.to_dict()
    OUT/tokenizer/                 tokenizer.save_pretrained
    OUT/mm_projector.safetensors   projector state dict ("0.weight", ...)
    OUT/vision_tower.safetensors   the tower's weights, only when it was tuned
    OUT/moslora_adapter.safetensors + moslora_config.json   adapters (adapters/io.py owns their format)
    OUT/llm/                       merged checkpoints only: save_pretrained of the LM with adapters folded in

Every reading error is a CheckpointError whose message names the file and the reason in one line.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

MM_CONFIG = "mm_config.json"
PROJECTOR_FILE = "mm_projector.safetensors"
VISION_FILE = "vision_tower.safetensors"
TOKENIZER_DIR = "tokenizer"
LLM_DIR = "llm"
FORMAT_VERSION = 1


class CheckpointError(InputError):
    """A checkpoint folder or one of its files cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class CheckpointConfig:
    """How to rebuild a trained model. Fields without a default must be in every mm_config.json: answering
    with a guessed template or image mode would silently change the model's answers."""

    model_name_or_path: str            # base LM: "tiny", a local folder or a hub id
    vision_tower: str                  # open_clip name, ARCH:PRETRAINED, hf-hub:..., or a folder
    mm_vision_select_layer: int        # LLaVA convention: -2 = penultimate block
    mm_projector_type: str             # linear | mlpNx_gelu
    conv_mode: str                     # plain | vicuna_v1 | chat_template
    image_aspect_ratio: str            # pad | square
    vision_pretrained: str | None = None
    mm_vision_select_feature: str = "patch"
    attn_implementation: str = "sdpa"
    num_image_tokens: int | None = None   # informative: the tower decides
    stage: str | None = None              # pretrain | finetune
    llm_fingerprint: str | None = None    # weights_fingerprint of the base LM the adapter was trained on
    merged: bool = False                  # OUT/llm holds the LM with adapters folded in
    dtype: str | None = None              # dtype an export wrote its weights in
    merged_adapter: dict | None = None    # merged exports: the AdapterConfig that was folded in
    peft_adapter: str | None = None       # peft exports: the PEFT folder beside this file
    vision_adapter: dict | None = None    # the tower's AdapterConfig, when it has one (files in vision_adapter/)
    merged_vision_adapter: dict | None = None  # merged exports: the tower's AdapterConfig that was folded in
    bits: int = 16                        # QLoRA: the adapter's base is the LM quantized to 4 or 8 bits ...
    quant_type: str | None = None         # ... nf4 | fp4 (4 bits)
    double_quant: bool | None = None
    quantized_from: str | None = None     # ... from weights rounded to this dtype first
    format_version: int = FORMAT_VERSION

    # -- dict form ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any, source: str = MM_CONFIG) -> CheckpointConfig:
        """Validate and build; `source` names the file in error messages."""
        if not isinstance(values, dict):
            raise CheckpointError(f"{source}: must hold a JSON object, found {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise CheckpointError(f"{source}: unknown key(s) {', '.join(unknown)} (written by a newer mm_moslora?)")
        missing = [f.name for f in known.values() if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise CheckpointError(f"{source}: missing key(s) {', '.join(missing)}")
        _check_types(values, source)
        return cls(**values)

    def __post_init__(self):  # a writer cannot produce a file its readers would refuse
        _check_types(self.to_dict(), "checkpoint config")

    def replace(self, **changes) -> CheckpointConfig:
        return dataclasses.replace(self, **changes)

    # -- folder form ----------------------------------------------------------------------------------------

    @classmethod
    def read(cls, checkpoint_dir: str | Path) -> CheckpointConfig:
        path = Path(checkpoint_dir) / MM_CONFIG
        if not path.is_file():
            raise CheckpointError(f"{checkpoint_dir}: not an mm_moslora checkpoint (no {MM_CONFIG})")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: invalid JSON ({err})") from err
        return cls.from_dict(values, source=str(path))

    def write(self, out_dir: str | Path) -> None:
        Path(out_dir, MM_CONFIG).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model_name_or_path": (str,), "vision_tower": (str,), "mm_vision_select_layer": (int,),
    "mm_projector_type": (str,), "conv_mode": (str,), "image_aspect_ratio": (str,),
    "vision_pretrained": (str, type(None)), "mm_vision_select_feature": (str,), "attn_implementation": (str,),
    "num_image_tokens": (int, type(None)), "stage": (str, type(None)), "llm_fingerprint": (str, type(None)),
    "merged": (bool,), "dtype": (str, type(None)), "merged_adapter": (dict, type(None)),
    "peft_adapter": (str, type(None)), "vision_adapter": (dict, type(None)),
    "merged_vision_adapter": (dict, type(None)), "bits": (int,), "quant_type": (str, type(None)),
    "double_quant": (bool, type(None)), "quantized_from": (str, type(None)), "format_version": (int,),
}


def _check_types(values: dict[str, Any], source: str) -> None:
    for name, value in values.items():
        allowed = _FIELD_TYPES[name]
        # bool is an int in Python: a layer index of `true` is a typo, not 1.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise CheckpointError(f"{source}: {name} must be {names}, found {json.dumps(value, default=repr)}")
    if values.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {values['format_version']} is newer than this "
                              f"mm_moslora reads ({FORMAT_VERSION})")


assert set(_FIELD_TYPES) == {f.name for f in dataclasses.fields(CheckpointConfig)}, "every field needs its types"


def load_tensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file as a CPU state dict; a missing, empty or truncated file is a CheckpointError naming
    `what` (e.g. "projector") and the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        reason = "empty file" if path.stat().st_size == 0 else f"not a readable safetensors file ({err})"
        raise CheckpointError(f"{path}: {what}: {reason}") from err


def save_tensors(state: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def config_for_model(model, model_name_or_path: str, mm_projector_type: str, conv_mode: str,
                     image_aspect_ratio: str, attn_implementation: str = "sdpa", **fields) -> CheckpointConfig:
    """The config describing how to rebuild `model` (a MultimodalLM); `fields` sets the optional ones."""
    vision = model.vision
    return CheckpointConfig(model_name_or_path=model_name_or_path, vision_tower=vision.name_or_path,
                            vision_pretrained=vision.pretrained, mm_vision_select_layer=vision.select_layer,
                            mm_vision_select_feature=vision.select_feature, mm_projector_type=mm_projector_type,
                            image_aspect_ratio=image_aspect_ratio, conv_mode=conv_mode,
                            attn_implementation=attn_implementation, num_image_tokens=vision.num_tokens, **fields)


def save_inference_files(out_dir: str | Path, config: CheckpointConfig, tokenizer,
                         projector_state: dict[str, torch.Tensor], adapter: tuple | None = None,
                         vision_state: dict[str, torch.Tensor] | None = None,
                         vision_adapter: tuple | None = None) -> None:
    """Write what inference needs into `out_dir` (created if needed).

    adapter / vision_adapter: (AdapterConfig, state_dict) of the LM's / the tower's adapter (stage 2). State dicts
    must already be gathered (ZeRO-3) and on the CPU: the training loop owns that.
    """
    from .adapters.io import save_adapter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.write(out_dir)
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    save_tensors(projector_state, out_dir / PROJECTOR_FILE)
    if vision_state is not None:
        save_tensors(vision_state, out_dir / VISION_FILE)
    if adapter is not None:
        save_adapter(out_dir, adapter[0], adapter[1])
    if vision_adapter is not None:
        from .adapters.vision import save_vision_adapter

        save_vision_adapter(out_dir, *vision_adapter)


def load_checkpoint(checkpoint_dir: str | Path, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", merge: bool = False):
    """Rebuild a trained model from a training output (adapter or merged checkpoint).

    Returns (MultimodalLM in eval mode, tokenizer, CheckpointConfig). `merge=True` folds the adapters into the
    base weights after loading (faster inference, same outputs).
    """
    from .adapters.inject import merge_adapters
    from .adapters.io import ADAPTER_CONFIG_NAME, load_adapter
    from .model.build import build_llm, build_tokenizer, parse_dtype, weights_fingerprint
    from .model.mm_model import MultimodalLM
    from .model.projector import build_projector, load_projector_state
    from .model.quantize import dequantize_linears
    from .model.vision import VisionTower

    checkpoint_dir = Path(checkpoint_dir)
    dtype = parse_dtype(dtype)
    cfg = CheckpointConfig.read(checkpoint_dir)
    llm_source = str(checkpoint_dir / LLM_DIR) if cfg.merged else cfg.model_name_or_path
    tokenizer_dir = checkpoint_dir / TOKENIZER_DIR
    tokenizer = build_tokenizer(str(tokenizer_dir) if tokenizer_dir.exists() else cfg.model_name_or_path)
    # Build in fp32 and cast once: merging and loading stay exact.
    llm = build_llm(llm_source, torch.float32, cfg.attn_implementation)
    # The training run fingerprinted its own build: fp32/bf16 (one fingerprint) or fp16.
    if cfg.llm_fingerprint and not cfg.merged and cfg.llm_fingerprint not in (
            weights_fingerprint(llm), weights_fingerprint(llm, via_dtype=torch.float16)):
        raise CheckpointError(f"{checkpoint_dir}: the base LM at {llm_source!r} is not the one this adapter was "
                              f"trained on (weights fingerprint differs)")
    if cfg.bits != 16 and not cfg.merged:  # a QLoRA adapter: its base is the quantized LM
        _quantize_trained_base(llm, cfg, dtype, device)
    vision = VisionTower(cfg.vision_tower, cfg.vision_pretrained, cfg.mm_vision_select_layer,
                         cfg.mm_vision_select_feature)
    if (checkpoint_dir / VISION_FILE).exists():  # written when the tower was tuned
        vision.visual.load_state_dict(load_tensors(checkpoint_dir / VISION_FILE, "vision tower"))
    projector = build_projector(cfg.mm_projector_type, vision.hidden_size, llm.config.hidden_size)
    load_projector_state(projector, load_tensors(checkpoint_dir / PROJECTOR_FILE, "projector"))
    model = MultimodalLM(vision, projector, llm)
    if (checkpoint_dir / ADAPTER_CONFIG_NAME).exists():
        load_adapter(llm, checkpoint_dir)
        if merge:
            dequantize_linears(llm)  # QLoRA: merged into dequant(quant(W)) in fp32, what the adapter trained on
            merge_adapters(llm)
    _load_tower_adapter(vision, checkpoint_dir, cfg, merge)
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer, cfg


def _quantize_trained_base(llm, cfg: CheckpointConfig, dtype: torch.dtype, device) -> None:
    """Quantize `llm` as the QLoRA run did (bits, type, double quant, from weights rounded to its dtype)."""
    from .model.build import parse_dtype
    from .model.quantize import check_quantized_training, quantize_linears

    device = torch.device(device)
    quant_type = cfg.quant_type or "nf4"
    check_quantized_training(cfg.bits, quant_type, device, zero_stage=0)
    quantize_linears(llm, cfg.bits, quant_type, True if cfg.double_quant is None else cfg.double_quant,
                     compute_dtype=dtype, source_dtype=parse_dtype(cfg.quantized_from or "fp32"), device=device)


def _load_tower_adapter(vision, checkpoint_dir: Path, cfg: CheckpointConfig, merge: bool) -> None:
    """The tower's adapter folder, when the checkpoint has one; a config that names one whose folder is gone is an
    error, never a silently bare tower."""
    from .adapters.vision import VISION_ADAPTER_DIR, load_vision_adapter, unload_vision_adapters

    folder = checkpoint_dir / VISION_ADAPTER_DIR
    if not folder.is_dir():
        if cfg.vision_adapter:
            raise CheckpointError(f"{checkpoint_dir}: {MM_CONFIG} names a vision-tower adapter but "
                                  f"{VISION_ADAPTER_DIR}/ is missing")
        return
    load_vision_adapter(vision.visual, folder)
    if merge:
        unload_vision_adapters(vision.visual, merge=True)
