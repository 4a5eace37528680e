"""Batching: padding collator and the epoch order (modality/length grouped, sharded by rank)."""
from __future__ import annotations

import random

import torch

from .conversation import IGNORE_INDEX


def collate(samples: list[dict | None], pad_token_id: int) -> dict:
    """Right-pad a list of dataset items. Samples that failed to load (None) are dropped and counted.

    Returns input_ids/labels/attention_mask (B, T), pixel_values (n_images, 3, S, S) or None,
    n_skipped (int).
    """
    good = [s for s in samples if s is not None]
    batch: dict = {"n_skipped": len(samples) - len(good)}
    if not good:
        return batch
    length = max(len(s["input_ids"]) for s in good)
    input_ids = torch.full((len(good), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(good), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(good), length), dtype=torch.long)
    for row, sample in enumerate(good):
        n = len(sample["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = sample["input_ids"], sample["labels"], 1
    pixels = [s["pixel_values"] for s in good if s["pixel_values"] is not None]
    batch.update(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                 pixel_values=torch.cat(pixels) if pixels else None)
    return batch


def epoch_batches(lengths: list[int], batch_size: int, world_size: int, seed: int, epoch: int,
                  group_by_modality_length: bool = True) -> list[list[list[int]]]:
    """The order of one epoch: a list of global steps, each a list of `world_size` per-rank index lists.

    Deterministic in (seed, epoch), so a resumed run replays exactly the same batches. With grouping
    (LLaVA's group_by_modality_length), a global batch holds only image or only text samples, of
    similar length, which cuts padding. The last incomplete global batch is dropped.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    global_bs = batch_size * world_size
    if not group_by_modality_length:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        chunks = [order[i:i + global_bs] for i in range(0, len(order) - global_bs + 1, global_bs)]
    else:
        chunks = []
        for modality in (True, False):
            idx = [i for i, n in enumerate(lengths) if (n > 0) == modality]
            rng.shuffle(idx)
            for start in range(0, len(idx) - global_bs + 1, global_bs):
                chunk = sorted(idx[start:start + global_bs], key=lambda i: -abs(lengths[i]))
                # Interleave so every rank gets a similar length mix.
                chunks.append([i for r in range(world_size) for i in chunk[r::world_size]])
        rng.shuffle(chunks)
    return [[chunk[r * batch_size:(r + 1) * batch_size] for r in range(world_size)] for chunk in chunks]
