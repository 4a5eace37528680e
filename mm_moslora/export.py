"""Turn a training output into deployable forms: merged weights, a stock PEFT adapter, or a transformers LLaVA.

    python scripts/merge.py --checkpoint outputs/finetune-tiny --output outputs/merged-tiny
    python scripts/merge.py --checkpoint CKPT --output OUT --export peft
    python scripts/merge.py --checkpoint CKPT --output OUT --export hf-llava --dtype bf16 --overwrite

Formats, written into OUT (layouts of docs/architecture.md):
- `merged` (default): s·B·M·A added into every adapted base weight, in fp32, then cast once to the output dtype.
  OUT/mm_config.json ("merged": true), OUT/llm/ (save_pretrained of the merged LM, safetensors), OUT/tokenizer/,
  OUT/mm_projector.safetensors, OUT/vision_tower.safetensors when the tower was tuned. `load_checkpoint(OUT)`,
  chat and evaluation read it like any checkpoint.
- `peft`: OUT/llm_adapter/ is a standard PEFT LoRA folder (M folded into A: A' = M·A), so
  `PeftModel.from_pretrained(base_lm, "OUT/llm_adapter")` reproduces the adapted LM with no mm_moslora code. The
  projector, tokenizer and mm_config.json sit beside it, with our own adapter files too, so `load_checkpoint(OUT)`
  still rebuilds the full model.
- `hf-llava`: a `transformers.LlavaForConditionalGeneration` checkpoint plus its `LlavaProcessor` (adapters merged
  first), usable with `LlavaForConditionalGeneration.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)`:

      processor = AutoProcessor.from_pretrained(OUT); model = LlavaForConditionalGeneration.from_pretrained(OUT)
      prompt = processor.apply_chat_template(
          [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is red?"}]}],
          add_generation_prompt=True)
      inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
      answer = processor.decode(model.generate(**inputs, max_new_tokens=32)[0, inputs["input_ids"].shape[1]:],
                                skip_special_tokens=True)

  Requirements, each checked with an error that names what does not map: an open_clip `VisionTransformer` with
  standard pre-norm blocks (class token, ln_pre, LayerNorm, GELU / QuickGELU, no layer scale, no custom attention),
  converted to `CLIPVisionModel`; an `mlp2x_gelu` projector (HF Llava's projector is exactly Linear-GELU-Linear).
  The exported tower stops at the selected block, as ours does (later blocks are never used), so
  `vision_feature_layer` points at that block of the truncated tower (-1 for a negative select_layer).
  Chat template: ours for vicuna_v1 and plain; for chat_template, the LM's own template behind a prelude that
  renders list contents to strings. Every exported template takes both message forms: string contents with
  inline "<image>", and HF's content parts ({"type": "image"}, {"type": "text", "text"}) as transformers'
  `pipeline("image-text-to-text")`, llava-hf models and OpenAI-style clients send them.
  Preprocessing: `CLIPImageProcessor` cannot pad to a square, so for `image_aspect_ratio="pad"` (our default) it
  squashes non-square images instead; feed square images (or pad them with
  `mm_moslora.data.images.pad_to_square`, fill = the mean colour) to get our model's exact inputs.

Every export reads only the checkpoint's inference files (mm_config.json, tokenizer/, projector, adapter and tower
files). Training writes those already gathered, so checkpoints trained under ZeRO-3 (or in bf16) convert like any
other, and the DeepSpeed state under checkpoints/ is never read (`--checkpoint OUT/checkpoints/step-K` works too).

OUT is written into a fresh folder beside it and renamed into place at the end, and an existing OUT is replaced
only with `overwrite=True` (--overwrite) and only when it is an earlier export (its marker file): see
mm_moslora/export_folder.py, which also puts things back after an export killed midway.

Memory: the checkpoint is loaded in fp32 (exact merging, one rounding to the output dtype), so a 7B LM needs ~28 GB
of CPU memory.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm import tqdm

from .adapters.inject import adapter_modules, unload_adapters
from .adapters.io import (ADAPTER_CONFIG_NAME, adapter_state_dict, export_peft, export_peft_layers,
                          read_adapter_config, save_adapter)
from .adapters.vision import (VISION_ADAPTER_DIR, hf_clip_module_name, save_vision_adapter,
                              unload_vision_adapters)
from .adapters.moslora import AdapterConfig
from .data.conversation import IMAGE_PLACEHOLDER, VICUNA_SYSTEM, stop_markers
from . import __version__
from .checkpoint import (LLM_DIR, PROJECTOR_FILE, TOKENIZER_DIR, VISION_FILE, CheckpointConfig, load_checkpoint,
                         save_tensors)
from .errors import InputError
from .export_folder import OutputPathError, check_output_dir, recover_interrupted_export, staging_dir  # noqa: F401
from .model.build import DTYPE_NAMES, TINY, parse_dtype
from .model.mm_model import MultimodalLM
from .model.quantize import dequantize_linears
from .model.vision import VisionTower

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("merged", "peft", "hf-llava")
PEFT_DIR = "llm_adapter"
# peft exports of a checkpoint whose tower has an adapter too: stock PEFT adapts the transformers LLaVA model.
PEFT_LLAVA_BASE_DIR = "hf_llava_base"
PEFT_LLAVA_DIR = "llava_adapter"
_STEP_COUNTS = {"merged": 3, "peft": 2, "hf-llava": 4, "peft-llava": 4}  # progress steps of each writer, after loading


class ExportError(InputError):
    """The checkpoint cannot be expressed in the requested format; the message says what does not map."""


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def export_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path, export: str = "merged",
                      dtype: str | torch.dtype | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the training output `checkpoint_dir` into `export` format at `output_dir`; returns `output_dir`.

    dtype: dtype of the written weights (fp32 | bf16 | fp16); None keeps the base LM's stored dtype (fp32 for the
    tiny model). PEFT adapter tensors are always fp32.
    Raises OutputPathError (OUT exists without overwrite, or overlaps the checkpoint), ExportError (the checkpoint
    does not map to the format), FileNotFoundError (not a checkpoint). Nothing is written when it raises.
    """
    if export not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {export!r}; choose one of {EXPORT_FORMATS}")
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    recover_interrupted_export(output_dir)
    check_output_dir(checkpoint_dir, output_dir, overwrite)
    config = CheckpointConfig.read(checkpoint_dir)
    out_dtype = parse_dtype(dtype) if dtype is not None else stored_llm_dtype(checkpoint_dir, config)
    has_adapter = (checkpoint_dir / ADAPTER_CONFIG_NAME).is_file()
    if export == "peft" and not has_adapter:
        raise ExportError(f"{checkpoint_dir} holds no MoSLoRA adapter ({ADAPTER_CONFIG_NAME}): there is nothing to "
                          f"export as PEFT; use --export merged")
    has_vision_adapter = (checkpoint_dir / VISION_ADAPTER_DIR / ADAPTER_CONFIG_NAME).is_file()
    # A tower adapter has no place in a PEFT adapter of the bare LM: stock PEFT carries it only on the transformers
    # LLaVA form of the model (CLIP's q/k/v/out/fc1/fc2 projections), which the hf-llava conversion builds.
    writer = "peft-llava" if export == "peft" and has_vision_adapter else export
    if writer in ("hf-llava", "peft-llava") and config.mm_projector_type != "mlp2x_gelu":
        message = _projector_message(config.mm_projector_type)
        raise ExportError(message if writer == "hf-llava" else _peft_llava_message(message))

    steps = {"merged": _merged_steps, "peft": _peft_steps, "hf-llava": _hf_llava_steps,
             "peft-llava": _peft_llava_steps}[writer]
    with tqdm(total=1 + _STEP_COUNTS[writer], desc=f"export {export}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("loading the checkpoint")
        # fp32 whatever the output dtype: merging adds in fp32 and rounds once at the end.
        model, tokenizer, config = load_checkpoint(checkpoint_dir, dtype=torch.float32, device="cpu")
        # A QLoRA adapter's base is the quantized LM: every format gets dequant(quant(W)) in fp32, the weights the
        # adapter was trained against (merging adds to them exactly; the PEFT base is written with them).
        dequantize_linears(model.llm)
        bar.update()
        if writer == "hf-llava":  # fail before anything is written
            merge_vision_adapters(model)  # the conversion reads the plain (merged) tower
            check_llava_convertible(model, tokenizer, config)
        elif writer == "peft-llava":  # the base it writes: the tower without its adapters
            bare_tower = copy.deepcopy(model.vision)
            unload_vision_adapters(bare_tower.visual, merge=False)
            try:
                check_llava_convertible(SimpleNamespace(vision=bare_tower, projector=model.projector), tokenizer,
                                        config)
            except ExportError as err:
                raise ExportError(_peft_llava_message(str(err))) from None
            del bare_tower
        marker = {"format": export, "checkpoint": str(checkpoint_dir.resolve()), "mm_moslora": __version__}
        with staging_dir(output_dir, overwrite, marker) as staging:
            for step in steps(model, tokenizer, config, checkpoint_dir, staging, out_dtype):
                bar.set_postfix_str(step)
                bar.update()
    return output_dir


def stored_llm_dtype(checkpoint_dir: Path, config: CheckpointConfig) -> torch.dtype:
    """The dtype the checkpoint's LM is stored in (its config's dtype); fp32 for the tiny model or when unknown."""
    from transformers import AutoConfig

    source = str(checkpoint_dir / LLM_DIR) if config.merged else config.model_name_or_path
    if source == TINY:
        return torch.float32
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return torch.float32
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if value in DTYPE_NAMES else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


def merge_llm_adapters(llm: nn.Module) -> list[str]:
    """Fold every MoSLoRA layer of `llm` into its base weight (fp32 sum, cast to the weight's dtype) and put the
    plain nn.Linear back; returns the merged module names (empty for a model without adapters)."""
    return unload_adapters(llm, merge=True)


def merge_vision_adapters(model: MultimodalLM) -> bool:
    """Fold the tower's adapters into its weights and re-pack its attention (a plain open_clip tower again);
    returns whether it had any."""
    if not adapter_modules(model.vision.visual):
        return False
    unload_vision_adapters(model.vision.visual, merge=True)
    return True


def _write_common(model: MultimodalLM, tokenizer, checkpoint_dir: Path, out: Path, dtype: torch.dtype,
                  merged_tower: bool = False) -> None:
    """tokenizer/, the projector and, when the tower was tuned, its weights: copied as trained, or, when its
    adapters were merged (`merged_tower`), the merged tower's (fp32, as open_clip keeps towers)."""
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    save_tensors(model.projector.state_dict(), out / PROJECTOR_FILE, dtype)
    if merged_tower:
        save_tensors(model.vision.visual.state_dict(), out / VISION_FILE, torch.float32)
    elif (checkpoint_dir / VISION_FILE).is_file():
        shutil.copyfile(checkpoint_dir / VISION_FILE, out / VISION_FILE)


def _adapter_config(checkpoint_dir: Path) -> AdapterConfig | None:
    return read_adapter_config(checkpoint_dir) if (checkpoint_dir / ADAPTER_CONFIG_NAME).is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# merged


def _merged_steps(model: MultimodalLM, tokenizer, config: CheckpointConfig, checkpoint_dir: Path, out: Path,
                  dtype: torch.dtype) -> Iterator[str]:
    adapter_config = _adapter_config(checkpoint_dir)
    vision_config = _adapter_config(checkpoint_dir / VISION_ADAPTER_DIR)
    merge_llm_adapters(model.llm)
    merged_tower = merge_vision_adapters(model)
    model.llm.to(dtype)
    yield "merged the adapters"
    model.llm.save_pretrained(out / LLM_DIR)
    yield "wrote the LM"
    _write_common(model, tokenizer, checkpoint_dir, out, dtype, merged_tower=merged_tower)
    # The merged LM is no longer that base; the tower's adapter now lives in vision_tower.safetensors.
    # A QLoRA base was dequantized before merging: the merged LM is full precision (its bits go with the adapter).
    config.replace(llm_fingerprint=None, vision_adapter=None, bits=16, quant_type=None, double_quant=None,
                   quantized_from=None, merged=True, dtype=DTYPE_NAMES[dtype],
                   merged_adapter=adapter_config.to_dict() if adapter_config is not None else None,
                   merged_vision_adapter=vision_config.to_dict() if vision_config is not None else None).write(out)
    yield "wrote tokenizer, projector, mm_config"


# ---------------------------------------------------------------------------------------------------------------
# peft


def _peft_steps(model: MultimodalLM, tokenizer, config: CheckpointConfig, checkpoint_dir: Path, out: Path,
                dtype: torch.dtype) -> Iterator[str]:
    adapter_config = read_adapter_config(checkpoint_dir)
    state = adapter_state_dict(model.llm)  # as loaded (strictly checked) by load_checkpoint, fp32
    export_peft(out / PEFT_DIR, adapter_config, state, base_model_name_or_path=config.model_name_or_path)
    yield "wrote the PEFT adapter"
    # Our own adapter files too: without them load_checkpoint(OUT) would silently rebuild the bare base LM.
    save_adapter(out, adapter_config, state)
    _write_common(model, tokenizer, checkpoint_dir, out, dtype)
    config.replace(merged=False, peft_adapter=PEFT_DIR).write(out)
    yield "wrote tokenizer, projector, mm_config"


# ---------------------------------------------------------------------------------------------------------------
# hf-llava: vision tower


def _norm_problem(name: str, norm: nn.Module) -> str | None:
    # open_clip's LayerNorm / LayerNormFp32 subclass nn.LayerNorm and compute the same function.
    if not isinstance(norm, nn.LayerNorm):
        return f"{name} is {type(norm).__name__}, not a LayerNorm (HF CLIP has LayerNorms only)"
    if norm.weight is None or norm.bias is None:
        return f"{name} is a LayerNorm without affine weight/bias"
    return None


def _activation_name(act: nn.Module) -> str | None:
    import open_clip.transformer as oct

    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(act.approximate)
    if type(act) is oct.QuickGELU:
        return "quick_gelu"
    return None


def _vision_problems(visual: nn.Module) -> list[str]:
    """Why `visual` cannot become a HF CLIPVisionModel (empty when it can)."""
    import open_clip.transformer as oct

    if type(visual) is not oct.VisionTransformer:
        return [f"it is a {type(visual).__name__} (e.g. a timm/SigLIP tower), not open_clip's VisionTransformer"]
    problems = []
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        problems.append(f"non-square image {visual.image_size} or patch {visual.patch_size} size")
    conv = visual.conv1
    if conv.bias is not None or tuple(conv.stride) != tuple(conv.kernel_size) or any(conv.padding):
        problems.append("the patch embedding is not a bias-free conv with stride = kernel")
    if isinstance(visual.ln_pre, nn.Identity):
        problems.append("it has no ln_pre (no_ln_pre=True), HF CLIP always applies pre_layrnorm")
    elif (problem := _norm_problem("ln_pre", visual.ln_pre)):
        problems.append(problem)
    eps = {visual.ln_pre.eps} if isinstance(visual.ln_pre, nn.LayerNorm) else set()
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is not oct.ResidualAttentionBlock:
            problems.append(f"block {i} is a {type(block).__name__} (qk-norm / cosine attention / head or MLP "
                            f"scaling), which HF CLIP does not implement")
            continue
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            problems.append(f"block {i} has layer scale (ls_init_value), which HF CLIP does not implement")
        for name in ("ln_1", "ln_2"):
            norm = getattr(block, name)
            if (problem := _norm_problem(f"block {i} {name}", norm)):
                problems.append(problem)
            else:
                eps.add(norm.eps)
        attn = block.attn
        if (not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None
                or attn.add_zero_attn or attn.out_proj.bias is None):
            problems.append(f"block {i} attention is not a plain multi-head attention with packed, biased q/k/v")
        if _activation_name(block.mlp.gelu) is None:
            problems.append(f"block {i} MLP activation {block.mlp.gelu!r} has no HF CLIP equivalent "
                            f"(gelu, gelu_pytorch_tanh, quick_gelu)")
        if block.mlp.c_fc.bias is None or block.mlp.c_proj.bias is None:
            problems.append(f"block {i} MLP linears lack biases")
    if len(eps) > 1:
        problems.append(f"its LayerNorms use different eps values {sorted(eps)}")
    acts = {_activation_name(b.mlp.gelu) for b in visual.transformer.resblocks
            if type(b) is oct.ResidualAttentionBlock}
    if len(acts - {None}) > 1:
        problems.append(f"its blocks use different activations {sorted(acts - {None})}")
    return problems


def convert_open_clip_vision(vision: VisionTower):
    """open_clip ViT (already truncated at the selected block) -> (CLIPVisionConfig, CLIPVisionTransformer state).

    State keys are relative to the CLIP vision transformer (`embeddings.*`, `pre_layrnorm.*`, `encoder.layers.*`,
    `post_layernorm.*`); values are detached views of the tower's tensors (q/k/v are slices of in_proj). The
    post_layernorm is never used by LLaVA's features: the tower's final norm when it kept one, else an
    identity-initialised LayerNorm. Raises ExportError naming every part that does not map.
    """
    from transformers import CLIPVisionConfig

    check_vision_convertible(vision)
    visual = vision.visual
    blocks = visual.transformer.resblocks
    width = visual.transformer.width
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads, num_channels=visual.conv1.in_channels,
        image_size=visual.image_size[0], patch_size=visual.patch_size[0],
        hidden_act=_activation_name(blocks[0].mlp.gelu), layer_norm_eps=visual.ln_pre.eps)
    state = {
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        "pre_layrnorm.weight": visual.ln_pre.weight, "pre_layrnorm.bias": visual.ln_pre.bias,
    }
    for i, block in enumerate(blocks):
        prefix = f"encoder.layers.{i}."
        for part, weight, bias in zip(("q", "k", "v"), block.attn.in_proj_weight.chunk(3),
                                      block.attn.in_proj_bias.chunk(3)):
            state[f"{prefix}self_attn.{part}_proj.weight"], state[f"{prefix}self_attn.{part}_proj.bias"] = weight, bias
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for hf_name, module in pairs.items():
            state[f"{prefix}{hf_name}.weight"], state[f"{prefix}{hf_name}.bias"] = module.weight, module.bias
    final = visual.ln_post
    keep_final = isinstance(final, nn.LayerNorm) and final.weight is not None and final.weight.shape == (width,)
    state["post_layernorm.weight"] = final.weight if keep_final else torch.ones(width)
    state["post_layernorm.bias"] = final.bias if keep_final else torch.zeros(width)
    return config, {k: v.detach() for k, v in state.items()}


def check_vision_convertible(vision: VisionTower) -> None:
    """Raise ExportError naming every part of the tower that HF CLIPVisionModel cannot express."""
    problems = _vision_problems(vision.visual)
    if problems:
        raise ExportError(f"--export hf-llava: the vision tower {vision.name_or_path!r} cannot be converted to a "
                          f"Hugging Face CLIPVisionModel: " + "; ".join(problems))


def build_clip_vision_model(vision: VisionTower) -> nn.Module:
    """A transformers CLIPVisionModel holding `vision`'s weights (fp32)."""
    from transformers import CLIPVisionModel

    config, state = convert_open_clip_vision(vision)
    model = CLIPVisionModel(config)
    # Newer transformers put the transformer directly on CLIPVisionModel, older ones under .vision_model.
    getattr(model, "vision_model", model).load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def llava_vision_feature_layer(vision: VisionTower) -> int:
    """HF `vision_feature_layer` for the truncated tower: its last block, which is our selected one."""
    return vision.select_layer if vision.select_layer > 0 else -1


# ---------------------------------------------------------------------------------------------------------------
# hf-llava: projector, tokenizer, processor


def _projector_message(kind) -> str:
    return (f"--export hf-llava: the projector is {kind!r}, but transformers' LlavaMultiModalProjector is exactly "
            f"Linear-GELU-Linear (our mlp2x_gelu); a {kind!r} projector cannot be expressed in it")


def llava_projector_state(projector: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """Our mlp2x_gelu projector (nn.Sequential: Linear, GELU, Linear) as LlavaMultiModalProjector weights."""
    fits = (isinstance(projector, nn.Sequential) and len(projector) == 3 and type(projector[1]) is nn.GELU
            and projector[1].approximate == "none"
            and all(isinstance(projector[i], nn.Linear) and projector[i].bias is not None for i in (0, 2)))
    if not fits:
        raise ExportError(_projector_message(kind))
    return {"linear_1.weight": projector[0].weight, "linear_1.bias": projector[0].bias,
            "linear_2.weight": projector[2].weight, "linear_2.bias": projector[2].bias}


# Renders a message's content: a string as is (with inline "<image>"), or HF's list of {"type": "image"} /
# {"type": "text", "text"} items, an image becoming "<image>\n" (LLaVA puts the image before the question).
_CONTENT_MACRO = ("{%- macro content(message) -%}{%- if message['content'] is string -%}{{ message['content'] }}"
                  "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}"
                  "{{ '" + IMAGE_PLACEHOLDER + "\\n' }}{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
                  "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}")

# Put in front of an LM's own chat template: `messages` with every list content rendered to a string by
# _CONTENT_MACRO, so the template (written for string contents with inline "<image>") sees what our tools pass.
_STRING_CONTENTS = (_CONTENT_MACRO + "{%- set ns_contents = namespace(messages=[]) -%}{%- for m in messages -%}"
                    "{%- set ns_contents.messages = ns_contents.messages + [dict(m, content=content(m))] -%}"
                    "{%- endfor -%}{%- set messages = ns_contents.messages -%}")

# The same text as data.conversation.render's vicuna_v1 and plain templates.
VICUNA_V1_CHAT_TEMPLATE = (
    _CONTENT_MACRO
    + "{%- set ns = namespace(system=" + json.dumps(VICUNA_SYSTEM) + ", found=false) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' and not ns.found -%}"
    "{%- set ns.system = content(m) -%}{%- set ns.found = true -%}{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}{{ ns.system }}{{ ' ' }}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'USER: ' }}{{ content(m) }}{{ ' ASSISTANT:' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' }}{{ content(m) }}{{ eos_token }}{%- endif -%}{%- endfor -%}")
PLAIN_CHAT_TEMPLATE = (
    _CONTENT_MACRO
    + "{{ bos_token }}{%- if '" + IMAGE_PLACEHOLDER + "' in content(messages[0]) -%}{{ '" + IMAGE_PLACEHOLDER
    + "' }}{%- endif -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{{ content(m) }}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}")


def llava_chat_template(conv_mode: str, tokenizer) -> str:
    """A Jinja chat template producing the text our `conv_mode` template renders."""
    if conv_mode == "vicuna_v1":
        return VICUNA_V1_CHAT_TEMPLATE
    if conv_mode == "plain":
        return PLAIN_CHAT_TEMPLATE
    if conv_mode == "chat_template":
        if not getattr(tokenizer, "chat_template", None):
            raise ExportError("conv_mode chat_template, but the tokenizer has no chat template")
        if not isinstance(tokenizer.chat_template, str):
            raise ExportError("conv_mode chat_template: the tokenizer has several named chat templates; "
                              "hf-llava exports need one")
        # The LM's template prints a content list as text: turn list contents into strings first.
        return _STRING_CONTENTS + tokenizer.chat_template
    raise ExportError(f"unknown conv_mode {conv_mode!r} in mm_config.json")


def clip_image_processor(vision: VisionTower, image_aspect_ratio: str):
    """A CLIPImageProcessor with the tower's size, mean and std, resizing like our ImageProcessor's mode.

    `resize`: squash to S×S (same pixels). `square`: shortest side to S, then centre crop; same pixels when the
    resized long side minus S is even, else HF's crop sits one pixel before ours (HF floors half the margin,
    torchvision's CenterCrop, which open_clip and our ImageProcessor use, rounds it). `pad`: squashes too, as HF
    cannot pad to a square: same pixels for square images only.
    """
    from transformers import CLIPImageProcessor

    size = vision.image_size
    if image_aspect_ratio == "square":
        geometry = dict(size={"shortest_edge": size}, do_center_crop=True)
    else:
        geometry = dict(size={"height": size, "width": size}, do_center_crop=False)
    return CLIPImageProcessor(do_resize=True, resample=3, crop_size={"height": size, "width": size},  # 3 = bicubic
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=list(vision.image_mean), image_std=list(vision.image_std),
                              do_convert_rgb=True, **geometry)


def check_llava_convertible(model: MultimodalLM, tokenizer, config: CheckpointConfig) -> None:
    """Raise ExportError when the tower, the projector or the conversation template has no HF Llava equivalent."""
    check_vision_convertible(model.vision)
    llava_projector_state(model.projector, config.mm_projector_type)
    llava_chat_template(config.conv_mode, tokenizer)


def add_image_token(tokenizer, llm: nn.Module) -> int:
    """Add "<image>" as a special token (if missing) and make room for it in the LM's embeddings; returns its id.

    New embedding rows are set to the mean of the existing ones: the input row is always replaced by image features,
    and the output row's logit is the mean logit, so it never wins a greedy step.
    """
    from transformers import AddedToken

    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_id >= rows:
        llm.resize_token_embeddings(image_id + 1, mean_resizing=False)
        with torch.no_grad():
            for embedding in (llm.get_input_embeddings(), llm.get_output_embeddings()):  # tied: same rows twice
                embedding.weight[rows:] = embedding.weight[:rows].mean(dim=0)
    return image_id


def build_llava(model: MultimodalLM, tokenizer, checkpoint_config: CheckpointConfig):
    """(LlavaForConditionalGeneration, LlavaProcessor) equivalent to `model` (adapters already merged, fp32).

    Takes over `model.llm` (resized for the image token) and modifies `tokenizer`: pass copies to keep them.
    """
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    conv_mode = checkpoint_config.conv_mode
    vision, llm = model.vision, model.llm
    projector_state = llava_projector_state(model.projector, checkpoint_config.mm_projector_type)
    hf_vision = build_clip_vision_model(vision)
    template = llava_chat_template(conv_mode, tokenizer)
    image_id = add_image_token(tokenizer, llm)
    strategy = "full" if vision.select_feature == "cls_patch" else "default"
    config = LlavaConfig(vision_config=hf_vision.config, text_config=llm.config, image_token_index=image_id,
                         image_seq_length=vision.num_tokens, projector_hidden_act="gelu",
                         vision_feature_select_strategy=strategy,
                         vision_feature_layer=llava_vision_feature_layer(vision), multimodal_projector_bias=True)
    with torch.device("meta"):  # every part is replaced below: allocating random weights would be wasted work
        llava = LlavaForConditionalGeneration(config)
    base = llm.base_model
    if type(base) is not type(llava.model.language_model):
        raise ExportError(f"--export hf-llava: transformers builds a {type(llava.model.language_model).__name__} "
                          f"for this LM config, but the LM's decoder is a {type(base).__name__}")
    llava.model.vision_tower = hf_vision
    llava.model.language_model = base
    llava.lm_head = llm.get_output_embeddings()
    llava.model.multi_modal_projector.load_state_dict(
        {k: v.detach().clone() for k, v in projector_state.items()}, assign=True)
    left_on_meta = [name for name, t in chain(llava.named_parameters(), llava.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"LLaVA export left parameters unset: {left_on_meta[:5]}")
    markers = stop_markers(tokenizer, conv_mode)  # as InferenceEngine stops
    llava.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=markers.token_ids, pad_token_id=tokenizer.pad_token_id,
        **(dict(stop_strings=markers.strings) if markers.strings else {}))
    tokenizer.chat_template = template  # tokenizer and processor render alike
    processor = LlavaProcessor(
        image_processor=clip_image_processor(vision, checkpoint_config.image_aspect_ratio), tokenizer=tokenizer,
        patch_size=vision.visual.patch_size[0], vision_feature_select_strategy=strategy, chat_template=template,
        image_token=IMAGE_PLACEHOLDER, num_additional_image_tokens=1)  # CLIP's class token
    return llava.eval(), processor


def _hf_llava_steps(model: MultimodalLM, tokenizer, config: CheckpointConfig, checkpoint_dir: Path, out: Path,
                    dtype: torch.dtype) -> Iterator[str]:
    if (checkpoint_dir / VISION_FILE).is_file():
        log.info("using the tuned vision tower from %s", checkpoint_dir / VISION_FILE)
    if config.image_aspect_ratio == "pad":
        log.warning("image_aspect_ratio is 'pad', but CLIPImageProcessor cannot pad to a square: it will squash "
                    "non-square images. Pad them yourself (mm_moslora.data.images.pad_to_square, mean colour) "
                    "for the trained model's exact inputs.")
    merge_llm_adapters(model.llm)
    merge_vision_adapters(model)
    yield "merged the adapters"
    llava, processor = build_llava(model, copy.deepcopy(tokenizer), config)
    yield "converted to LLaVA"
    llava.to(dtype).save_pretrained(out)
    yield "wrote the model"
    processor.save_pretrained(out)
    yield "wrote the processor"


# ---------------------------------------------------------------------------------------------------------------
# peft, for a checkpoint whose vision tower has an adapter too


def _peft_llava_message(reason: str) -> str:
    return (f"--export peft: this checkpoint has a vision-tower adapter, which stock PEFT can carry only on the "
            f"transformers LLaVA form of the model, and that conversion is not possible here ({reason}); "
            f"use --export merged, which folds both adapters into the weights")


def llava_module_names(llava, lm_bases: dict[int, str], vision_names: list[str]) -> dict[str, str]:
    """Our adapter module names (`llm.<name>`, `vision.<name>`) -> the same modules' names in `llava`.

    LM modules are found by identity (build_llava takes over the LM's modules); tower modules by the open_clip ->
    HF CLIP naming of the converted tower, checked to exist.
    """
    names = {f"llm.{lm_bases[id(module)]}": name for name, module in llava.named_modules() if id(module) in lm_bases}
    if len(names) != len(lm_bases):
        raise ExportError(f"--export peft: {len(lm_bases) - len(names)} adapted LM modules are not in the LLaVA model")
    tower = llava.model.vision_tower
    clip = getattr(tower, "vision_model", tower)
    clip_prefix = next(name for name, module in llava.named_modules() if module is clip)
    for ours in vision_names:
        theirs = f"{clip_prefix}.{hf_clip_module_name(ours)}"
        llava.get_submodule(theirs)  # raises if the conversion named it otherwise
        names[f"vision.{ours}"] = theirs
    return names


def _peft_llava_steps(model: MultimodalLM, tokenizer, config: CheckpointConfig, checkpoint_dir: Path, out: Path,
                      dtype: torch.dtype) -> Iterator[str]:
    """OUT/hf_llava_base/: the hf-llava export of the model *without* its adapters (base LM, base tower, trained
    projector); OUT/llava_adapter/: a stock PEFT LoRA over it with both adapters, M folded into A, so

        PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(OUT/hf_llava_base), OUT/llava_adapter)

    answers as the checkpoint does. Our own files sit beside them, so load_checkpoint(OUT) still works."""
    lm_config = read_adapter_config(checkpoint_dir)
    vision_config = read_adapter_config(checkpoint_dir / VISION_ADAPTER_DIR)
    lm_state, vision_state = adapter_state_dict(model.llm), adapter_state_dict(model.vision.visual)
    save_adapter(out, lm_config, lm_state)
    save_vision_adapter(out, vision_config, vision_state)
    _write_common(model, tokenizer, checkpoint_dir, out, dtype)
    config.replace(merged=False, peft_adapter=PEFT_LLAVA_DIR).write(out)
    yield "wrote our own adapter files"
    lm_bases = {id(module.base): name for name, module in adapter_modules(model.llm).items()}
    vision_names = list(adapter_modules(model.vision.visual))
    unload_adapters(model.llm, merge=False)
    unload_vision_adapters(model.vision.visual, merge=False)
    llava, processor = build_llava(model, copy.deepcopy(tokenizer), config)
    names = llava_module_names(llava, lm_bases, vision_names)
    yield "converted the base to LLaVA"
    llava.to(dtype).save_pretrained(out / PEFT_LLAVA_BASE_DIR)
    processor.save_pretrained(out / PEFT_LLAVA_BASE_DIR)
    yield "wrote the LLaVA base"
    layers = {}
    for prefix, config, state in (("llm", lm_config, lm_state), ("vision", vision_config, vision_state)):
        for key, tensor in state.items():
            module, param = key.rsplit(".", 1)
            layers.setdefault(names[f"{prefix}.{module}"], {"config": config})[param] = tensor
    export_peft_layers(out / PEFT_LLAVA_DIR, layers, base_model_name_or_path=PEFT_LLAVA_BASE_DIR)  # beside it
    yield "wrote the PEFT adapter"
