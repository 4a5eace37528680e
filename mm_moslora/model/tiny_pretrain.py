"""Pretraining of the tiny backbones that the demo starts from (run by scripts/pretrain_tiny_backbones.py).

A real run starts from a pretrained LM (Vicuna, Qwen2, ...) and a pretrained CLIP tower; the tiny
defaults are random. Random backbones learn the demo's questions far too slowly for a CPU demo
(a frozen random tower does not tell shapes apart, a random LM cannot look things up in its
context), so the demo uses tiny backbones pretrained, like the real ones, on other data and tasks:

- the LM: all weights, on *text only* — 70 %: a written scene description ("Scene: red circle at
  2 5, ...") followed by a question of the demo's kinds and its answer; 30 %: a caption on its own.
  It never sees an image or an image token.
- the vision tower: all weights, on rendered scenes with *per-patch labels* (colour and shape of the
  object covering the patch, or background) and the object count from the mean token. It never
  sees a question or an answer.

Both draw scenes from `demo_data.sample_scene` without the held-out colour-shape combinations, with
their own random streams (no demo training or evaluation scene is reused). Outputs are saved in the
formats users load real checkpoints from: a Hugging Face LLaMA folder and an open_clip folder.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from .. import demo_data as dd
from ..data.collate import collate
from ..data.conversation import tokenize_conversation
from ..data.images import ImageProcessor
from .build import TINY_DIR, build_tokenizer
from .vision import TINY_VISION_NAME, VisionTower, open_clip, register_tiny_config

PRETRAINED_DIR = TINY_DIR / "pretrained"
LM_DIR = PRETRAINED_DIR / "lm"
VISION_DIR = PRETRAINED_DIR / "vision"
TRAIN_COMBOS = [c for c in dd.all_combinations() if c not in set(dd.HELD_OUT_COMBINATIONS)]
# LM shapes on top of model/tiny/llm_config.json (same tokenizer and vocabulary). "tiny" is the demo's committed LM;
# "8x512" the larger one of the adapter study (docs/adapter_study.md), pretrained the same way, weights not committed.
LM_SIZES: dict[str, dict] = {
    "tiny": {},
    "8x512": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
              "head_dim": 64, "intermediate_size": 1408},
}


def _stream_loader(make_batch: Callable[[np.random.Generator], tuple], seed: int, workers: int):
    """An endless iterator of batches made by `make_batch(rng)` in `workers` processes (0: this one)."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng([seed, info.id if info else 0])
            while True:
                yield make_batch(rng)

    return iter(torch.utils.data.DataLoader(Stream(), batch_size=None, num_workers=workers,
                                            prefetch_factor=4 if workers else None))


def _print_now(message: str) -> None:
    print(message, flush=True)  # progress shows at once even when the output goes to a file (runs take an hour on a CPU)


def _cosine(step: int, total: int, warmup: int) -> float:
    # Warmup times a cosine over all steps (not train.engine.lr_lambda's cosine after warmup): the schedule the
    # committed weights were made with, so that this module remakes them.
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


# ------------------------------------------------------------------------------------- the LM
def describe_scene(scene: dd.Scene) -> str:
    """Text stand-in for the image: objects left to right with centres in tenths of the side,
    e.g. "Scene: red circle at 2 5, blue square at 7 3." """
    parts = [f"{o.name} at {min(9, int(o.x * 10))} {min(9, int(o.y * 10))}"
             for o in sorted(scene.objects, key=lambda o: o.x)]
    return "Scene: " + ", ".join(parts) + "."


def text_example(rng, tokenizer, caption_fraction: float = 0.3, held_out: bool = False):
    """(input_ids, labels, kind) of one text sample; `held_out`: half the scenes hold a held-out pair."""
    if held_out and rng.random() < 0.5:
        held = sorted(dd.HELD_OUT_COMBINATIONS)
        scene = dd.sample_scene(rng, required_combos=[held[int(rng.integers(len(held)))]])
    else:
        scene = dd.sample_scene(rng, allowed_combos=TRAIN_COMBOS)
    if not held_out and rng.random() < caption_fraction:
        # A caption on its own (LLaVA's plain template keeps only the reply): how captions read, for stage 1.
        conversation = [{"from": "human", "value": ""}, {"from": "gpt", "value": dd.caption(scene)}]
        return (*tokenize_conversation(conversation, tokenizer, "plain", 0, 512), "caption")
    qa = dd.ask_mixed(scene, rng, dd.TRAIN_QUESTION_MIX, None if held_out else TRAIN_COMBOS)
    text = dd.prompt_text(qa, context=qa.hint if qa.choices else None)
    conversation = [{"from": "human", "value": describe_scene(scene) + "\n" + text}, {"from": "gpt", "value": qa.answer}]
    return (*tokenize_conversation(conversation, tokenizer, "chat_template", 0, 512), dd.question_type_of(text))


def text_batch(rng, tokenizer, batch_size: int, held_out: bool = False):
    """Right-padded (input_ids, labels, attention_mask) (B, T) and the B sample kinds."""
    items = [text_example(rng, tokenizer, held_out=held_out) for _ in range(batch_size)]
    batch = collate([{"input_ids": ids, "labels": labels, "pixel_values": None} for ids, labels, _ in items],
                    tokenizer.pad_token_id)
    return batch["input_ids"], batch["labels"], batch["attention_mask"], [kind for _, _, kind in items]


@torch.no_grad()
def first_answer_token_accuracy(llm, tokenizer, held_out: bool, device, n: int = 512) -> dict[str, float]:
    """Teacher-forced accuracy of each answer's first token, per question kind, on fresh scenes."""
    llm.eval()
    hits = defaultdict(lambda: [0, 0])
    rng = np.random.default_rng([99, int(held_out)])
    for _ in range(n // 128):
        ids, labels, mask, kinds = text_batch(rng, tokenizer, 128, held_out)
        logits = llm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.cpu()
        for k, kind in enumerate(kinds):
            pos = int((labels[k] != -100).nonzero()[0])
            hits[kind][0] += int(logits[k, pos - 1].argmax() == labels[k, pos])
            hits[kind][1] += 1
    llm.train()
    per_kind = {kind: round(c / t, 3) for kind, (c, t) in sorted(hits.items())}
    per_kind["all"] = round(sum(c for c, _ in hits.values()) / sum(t for _, t in hits.values()), 3)
    return per_kind


def pretrain_tiny_lm(out_dir: Path, steps: int = 11000, batch_size: int = 128, lr: float = 1e-3,
                     device: str = "cpu", workers: int = 0, log: Callable[[str], None] = None, size: str = "tiny",
                     bf16: bool = False) -> dict:
    """Train a LLaMA of LM_SIZES[size] (the config of model/tiny, reshaped) from its seed-0 init and save a HF
    folder. bf16: autocast the forward pass (weights and optimizer stay fp32; for the larger sizes on a GPU)."""
    log = log or _print_now
    tokenizer = build_tokenizer("tiny")
    config = AutoConfig.for_model(**{**json.loads((TINY_DIR / "llm_config.json").read_text()), **LM_SIZES[size]})
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config).to(device)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, warmup))
    batches = _stream_loader(lambda rng: text_batch(rng, tokenizer, batch_size)[:3], seed=1, workers=workers)
    t0, running = time.time(), 0.0
    for step in range(1, steps + 1):
        ids, labels, mask = (t.to(device) for t in next(batches))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if step % 1000 == 0 or step == steps:
            log(f"LM step {step}/{steps} loss {running / (step % 1000 or 1000):.3f} {time.time() - t0:.0f}s")
            running = 0.0
    metrics = {"train_combinations": first_answer_token_accuracy(llm, tokenizer, False, device),
               "held_out_scenes": first_answer_token_accuracy(llm, tokenizer, True, device)}
    out_dir = Path(out_dir)
    llm.cpu().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"size": size, "shape": LM_SIZES[size], "parameters": sum(p.numel() for p in llm.parameters()),
            "bf16": bf16, "steps": steps, "batch_size": batch_size, "lr": lr, "seconds": round(time.time() - t0),
            "first_answer_token_accuracy": metrics}


# ------------------------------------------------------------------------------- the tower
def patch_labels(scene: dd.Scene, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour ids, shape ids) of the object whose bounding box covers each patch centre, raster
    order (grid*grid,); background is len(COLORS) / len(SHAPES)."""
    colours, shapes = list(dd.COLORS), list(dd.SHAPES)
    col = torch.full((grid * grid,), len(colours))
    shp = torch.full((grid * grid,), len(shapes))
    for i in range(grid):
        for j in range(grid):
            cx, cy = (j + 0.5) / grid, (i + 0.5) / grid
            for o in scene.objects:
                if abs(cx - o.x) < o.size / 2 and abs(cy - o.y) < o.size / 2:
                    col[i * grid + j], shp[i * grid + j] = colours.index(o.color), shapes.index(o.shape)
    return col, shp


def pretrain_tiny_vision(out_dir: Path, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3,
                         device: str = "cpu", workers: int = 0, log: Callable[[str], None] = None) -> dict:
    """Train every block of the tiny open_clip ViT on patch labels and save an open_clip folder."""
    log = log or _print_now
    register_tiny_config()
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_VISION_NAME)  # the whole model is saved; only .visual is trained
    tower = VisionTower(TINY_VISION_NAME, select_layer=-1, trainable=True)
    tower.visual.load_state_dict(clip.visual.state_dict(), strict=False)
    processor = ImageProcessor.for_tower(tower, "pad")
    grid = tower.visual.grid_size[0]

    def make_batch(rng):
        scenes = [dd.sample_scene(rng, allowed_combos=TRAIN_COMBOS) for _ in range(batch_size)]
        labels = [patch_labels(s, grid) for s in scenes]
        return (torch.stack([processor(dd.render_scene(s, tower.image_size)) for s in scenes]),
                torch.stack([c for c, _ in labels]), torch.stack([s for _, s in labels]),
                torch.tensor([len(s.objects) for s in scenes]))

    width = tower.hidden_size
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(dd.COLORS) + 1),
                                 "shape": torch.nn.Linear(width, len(dd.SHAPES) + 1),
                                 "count": torch.nn.Linear(width, dd.MAX_OBJECTS + 1)})
    tower.to(device)
    heads.to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, warmup))
    batches = _stream_loader(make_batch, seed=7, workers=workers)
    ce = torch.nn.functional.cross_entropy
    t0, hits = time.time(), defaultdict(list)
    for step in range(1, steps + 1):
        pixels, colour, shape, count = (t.to(device) for t in next(batches))
        feats = tower(pixels)  # (B, grid*grid, width)
        logits = {name: head(feats if name != "count" else feats.mean(1)) for name, head in heads.items()}
        loss = (ce(logits["colour"].flatten(0, 1), colour.flatten()) + ce(logits["shape"].flatten(0, 1), shape.flatten())
                + ce(logits["count"], count))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step > steps - 50:  # accuracy on the last 50 training batches (fresh scenes each step)
            on_object = shape < len(dd.SHAPES)
            hits["patch_colour"].append((logits["colour"].argmax(-1) == colour).float().mean().item())
            hits["shape_on_object_patches"].append((logits["shape"].argmax(-1)[on_object] == shape[on_object]).float().mean().item())
            hits["count"].append((logits["count"].argmax(-1) == count).float().mean().item())
        if step % 500 == 0 or step == steps:
            log(f"vision step {step}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s")
    clip.visual.load_state_dict(tower.visual.state_dict(), strict=False)  # final norm and head stay as drawn
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()},
              str(out_dir / "open_clip_model.safetensors"))
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    (out_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": json.loads((TINY_DIR / f"{TINY_VISION_NAME}.json").read_text()),
         "preprocess_cfg": {"mean": list(preprocess["mean"]), "std": list(preprocess["std"])}}, indent=1))
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seconds": round(time.time() - t0),
            "accuracy_last_50_batches": {k: round(float(np.mean(v)), 3) for k, v in hits.items()}}
