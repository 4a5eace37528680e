"""Turn flags into modules: tokenizer, LM, vision tower, projector, and whole checkpoints.

`model_name_or_path="tiny"` is the built-in default: a tiny LLaMA-style LM (config and tokenizer in
mm_moslora/model/tiny/, weights drawn from a fixed seed) that trains on a CPU. Anything else goes
through `AutoModelForCausalLM.from_pretrained` (local folder or hub id), exactly as for real models.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .mm_model import MultimodalLM
from .projector import build_projector, load_projector_state
from .vision import TINY_VISION_NAME, VisionTower

TINY = "tiny"
TINY_DIR = Path(__file__).parent / "tiny"
MM_CONFIG = "mm_config.json"
PROJECTOR_FILE = "mm_projector.safetensors"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def build_tokenizer(model_name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Fast tokenizer with a pad token (LLaMA-family tokenizers ship none: reuse unk, else eos)."""
    source = str(TINY_DIR) if model_name_or_path == TINY else model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_name_or_path}: a fast tokenizer is required (offsets are used for label masks)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build_llm(model_name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
              trust_remote_code: bool = False, init_seed: int = 0, random_init: bool = False,
              init_device: str | torch.device = "cpu") -> torch.nn.Module:
    """`random_init`: weights drawn from the seed instead of loaded (the tiny default, and benchmarks at a real
    model's shape from a folder that holds only config.json), built directly on `init_device`."""
    if model_name_or_path == TINY or random_init:
        if model_name_or_path == TINY:
            config = AutoConfig.for_model(**json.loads((TINY_DIR / "llm_config.json").read_text()))
        else:
            config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        with torch.random.fork_rng(devices=[]), torch.device("cpu" if model_name_or_path == TINY else init_device):
            torch.manual_seed(init_seed)  # the tiny base is defined by its seed: rebuilt identically on load
            default_dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32 if model_name_or_path == TINY else dtype)
            try:
                llm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                         trust_remote_code=trust_remote_code)
            finally:
                torch.set_default_dtype(default_dtype)
        return llm.to(dtype)
    return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype, attn_implementation=attn_implementation,
                                                trust_remote_code=trust_remote_code)


def weights_fingerprint(module: torch.nn.Module, via_dtype: torch.dtype | None = None) -> str:
    """Cheap identity of frozen weights (strided sample of every tensor), stored in checkpoints so an
    adapter is never silently applied to a different base model.

    Samples are bf16-rounded, so the fp32 and bf16 builds of one model share a fingerprint. An fp16
    build rounds differently: `via_dtype=torch.float16` fingerprints an fp32 build as its fp16 cast would be.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 64)]
        if via_dtype is not None and sample.is_floating_point():
            sample = sample.to(via_dtype)
        sample = sample.to(torch.bfloat16).float().cpu()
        digest.update(name.encode())
        digest.update(f"{tuple(tensor.shape)}:{sample.sum().item():.6e}:{sample.abs().sum().item():.6e}".encode())
    return digest.hexdigest()[:16]


def build_model(model_name_or_path: str = TINY, vision_tower: str = TINY_VISION_NAME,
                vision_pretrained: str | None = None, mm_vision_select_layer: int = -2,
                mm_vision_select_feature: str = "patch", mm_projector_type: str = "mlp2x_gelu",
                dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                trust_remote_code: bool = False, tune_vision_tower: bool = False, random_init_llm: bool = False,
                init_device: str | torch.device = "cpu") -> tuple[MultimodalLM, PreTrainedTokenizerBase]:
    """Assemble a fresh MultimodalLM (projector randomly initialised) and its tokenizer."""
    tokenizer = build_tokenizer(model_name_or_path, trust_remote_code)
    llm = build_llm(model_name_or_path, dtype, attn_implementation, trust_remote_code, random_init=random_init_llm,
                    init_device=init_device)
    vision = VisionTower(vision_tower, vision_pretrained, mm_vision_select_layer, mm_vision_select_feature,
                         trainable=tune_vision_tower).to(dtype)
    projector = build_projector(mm_projector_type, vision.hidden_size, llm.config.hidden_size).to(dtype)
    return MultimodalLM(vision, projector, llm), tokenizer


def read_mm_config(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / MM_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint_dir}: not an mm_moslora checkpoint (no {MM_CONFIG})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def load_checkpoint(checkpoint_dir: str | Path, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", merge: bool = False,
                    ) -> tuple[MultimodalLM, PreTrainedTokenizerBase, dict]:
    """Rebuild a trained model from a training output (adapter or merged checkpoint).

    Returns (model in eval mode, tokenizer, mm_config). `merge=True` folds the adapters into the base
    weights after loading (faster inference, same outputs).
    """
    from ..adapters.inject import merge_adapters
    from ..adapters.io import load_adapter
    from .quantize import dequantize_linears

    checkpoint_dir = Path(checkpoint_dir)
    dtype = parse_dtype(dtype)
    cfg = read_mm_config(checkpoint_dir)
    llm_source = str(checkpoint_dir / "llm") if cfg.get("merged") else cfg["model_name_or_path"]
    tokenizer_dir = checkpoint_dir / "tokenizer"
    tokenizer = build_tokenizer(str(tokenizer_dir) if tokenizer_dir.exists() else cfg["model_name_or_path"])
    # Build in fp32 and cast once: merging and loading stay exact.
    llm = build_llm(llm_source, torch.float32, cfg.get("attn_implementation", "sdpa"))
    expected = cfg.get("llm_fingerprint")
    # The training run fingerprinted its own build: fp32/bf16 (one fingerprint) or fp16.
    if expected and not cfg.get("merged") and expected not in (weights_fingerprint(llm),
                                                               weights_fingerprint(llm, via_dtype=torch.float16)):
        raise ValueError(f"{checkpoint_dir}: the base LM at {llm_source!r} is not the one this adapter was trained on "
                         f"(weights fingerprint differs)")
    if cfg.get("bits", 16) != 16 and not cfg.get("merged"):  # a QLoRA adapter: its base is the quantized LM
        quantize_trained_base(llm, cfg, dtype, device)
    vision = VisionTower(cfg["vision_tower"], cfg.get("vision_pretrained"), cfg["mm_vision_select_layer"],
                         cfg.get("mm_vision_select_feature", "patch"))
    vision_file = checkpoint_dir / "vision_tower.safetensors"
    if vision_file.exists():  # written when the tower was tuned
        vision.visual.load_state_dict(load_file(str(vision_file)))
    projector = build_projector(cfg["mm_projector_type"], vision.hidden_size, llm.config.hidden_size)
    load_projector_state(projector, load_file(str(checkpoint_dir / PROJECTOR_FILE)))
    model = MultimodalLM(vision, projector, llm)
    if (checkpoint_dir / "moslora_config.json").exists():
        load_adapter(llm, checkpoint_dir)
        if merge:
            dequantize_linears(llm)  # QLoRA: merged into dequant(quant(W)) in fp32, what the adapter trained on
            merge_adapters(llm)
    load_tower_adapter(vision, checkpoint_dir, cfg, merge)
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer, cfg


def quantize_trained_base(llm: torch.nn.Module, cfg: dict, dtype: torch.dtype, device) -> None:
    """Quantize `llm` as the QLoRA run did (bits, type, double quant, from weights rounded to its dtype)."""
    from .quantize import check_quantized_training, quantize_linears

    device = torch.device(device)
    check_quantized_training(cfg["bits"], cfg.get("quant_type", "nf4"), device, zero_stage=0)
    quantize_linears(llm, cfg["bits"], cfg.get("quant_type", "nf4"), cfg.get("double_quant", True),
                     compute_dtype=dtype, source_dtype=parse_dtype(cfg.get("quantized_from", "fp32")), device=device)


def load_tower_adapter(vision: VisionTower, checkpoint_dir: Path, cfg: dict, merge: bool) -> None:
    """The tower's adapter folder, when the checkpoint has one; an mm_config that names one whose folder is gone
    is an error, never a silently bare tower."""
    from ..adapters.vision import VISION_ADAPTER_DIR, load_vision_adapter, unload_vision_adapters

    folder = checkpoint_dir / VISION_ADAPTER_DIR
    if not folder.is_dir():
        if cfg.get("vision_adapter"):
            raise FileNotFoundError(f"{checkpoint_dir}: mm_config.json names a vision-tower adapter but "
                                    f"{VISION_ADAPTER_DIR}/ is missing")
        return
    load_vision_adapter(vision.visual, folder)
    if merge:
        unload_vision_adapters(vision.visual, merge=True)


def mm_config_for(model: MultimodalLM, model_name_or_path: str, mm_projector_type: str, conv_mode: str,
                  image_aspect_ratio: str, attn_implementation: str = "sdpa", **extra) -> dict:
    """The mm_config.json content describing how to rebuild `model` (see docs/architecture.md)."""
    vision = model.vision
    return {"model_name_or_path": model_name_or_path, "vision_tower": vision.name_or_path,
            "vision_pretrained": vision.pretrained, "mm_vision_select_layer": vision.select_layer,
            "mm_vision_select_feature": vision.select_feature, "mm_projector_type": mm_projector_type,
            "image_aspect_ratio": image_aspect_ratio, "conv_mode": conv_mode,
            "attn_implementation": attn_implementation, "num_image_tokens": vision.num_tokens,
            "merged": False, **extra}


def save_mm_checkpoint(out_dir: str | Path, mm_config: dict, tokenizer: PreTrainedTokenizerBase,
                       projector_state: dict[str, torch.Tensor], adapter: tuple | None = None,
                       vision_state: dict[str, torch.Tensor] | None = None,
                       vision_adapter: tuple | None = None) -> None:
    """Write the inference files of a checkpoint into `out_dir` (created if needed).

    adapter / vision_adapter: (AdapterConfig, state_dict) of the LM's / the tower's adapter (stage 2).
    State dicts must already be gathered
    (ZeRO-3) and on the CPU: the training loop owns that.
    """
    from safetensors.torch import save_file

    from ..adapters.io import save_adapter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MM_CONFIG).write_text(json.dumps(mm_config, indent=2))
    tokenizer.save_pretrained(out_dir / "tokenizer")
    save_file({k: v.detach().cpu().contiguous() for k, v in projector_state.items()}, str(out_dir / PROJECTOR_FILE))
    if vision_state is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in vision_state.items()},
                  str(out_dir / "vision_tower.safetensors"))
    if adapter is not None:
        save_adapter(out_dir, adapter[0], adapter[1])
    if vision_adapter is not None:
        from ..adapters.vision import save_vision_adapter

        save_vision_adapter(out_dir, *vision_adapter)
