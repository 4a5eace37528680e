"""Turn flags into modules: tokenizer, LM, vision tower, projector, and the assembled MultimodalLM.

Checkpoints (a trained model written and read back) live in mm_moslora/checkpoint.py.

`model_name_or_path="tiny"` is the built-in default: a tiny LLaMA-style LM (config and tokenizer in
mm_moslora/model/tiny/, weights drawn from a fixed seed) that trains on a CPU. Anything else goes
through `AutoModelForCausalLM.from_pretrained` (local folder or hub id), exactly as for real models.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .mm_model import MultimodalLM
from .projector import build_projector
from .vision import TINY_VISION_NAME, VisionTower

TINY = "tiny"
TINY_DIR = Path(__file__).parent / "tiny"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # the names we write


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
