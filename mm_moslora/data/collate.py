"""Batching: the padding and packing collators, and the epoch order (modality/length grouped, or packed rows),
sharded by rank."""
from __future__ import annotations

import bisect
import random

import torch

from ..model.packed_attention import cu_seq_lens_from_positions
from .conversation import IGNORE_INDEX

PACKING_BUFFER = 4096  # samples packed together: large enough to fill rows well, small enough to keep them random


def collate(samples: list[dict | None], pad_token_id: int) -> dict:
    """Right-pad a list of dataset items. Samples that failed to load (None) are dropped and counted.

    Returns input_ids/labels/attention_mask (B, T), pixel_values (n_images, 3, S, S) or None, image_counts (B,)
    (images per row, for the model's per-row check), n_skipped, n_samples, n_tokens (ints).
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
    batch.update(input_ids=input_ids, labels=labels, attention_mask=attention_mask, **_images(good, [[s] for s in good]),
                 n_samples=len(good), n_tokens=sum(len(s["input_ids"]) for s in good))
    return batch


def _images(good: list[dict], rows: list[list[dict]]) -> dict:
    pixels = [s["pixel_values"] for row in rows for s in row if s["pixel_values"] is not None]
    counts = [sum(0 if s["pixel_values"] is None else len(s["pixel_values"]) for s in row) for row in rows]
    return {"pixel_values": torch.cat(pixels) if pixels else None, "image_counts": torch.tensor(counts)}


def collate_packed(samples: list[dict | None], pad_token_id: int) -> dict:
    """Concatenate samples into rows (each item's "row" says which), every sample attending only to itself.

    Returns input_ids/labels/position_ids (R, T) (positions restart at 0 for every sample and for the padding
    at a row's end), cu_seq_lens_q/_k (n_segments + 1,) int32 and max_length_q/_k (int) over the flattened
    R*T tokens (transformers' FlashAttention keyword arguments), pixel_values, image_counts (R,), n_skipped,
    n_samples, n_tokens. No attention_mask: packed rows are recognised by their positions. Each sample's labels
    are its own, except that its first label is ignored, so no sample is trained to predict the next one's
    first token (an unpacked sample never predicts its first token either).
    """
    good = [s for s in samples if s is not None]
    batch: dict = {"n_skipped": len(samples) - len(good)}
    if not good:
        return batch
    rows: dict[int, list[dict]] = {}
    for s in good:
        rows.setdefault(s["row"], []).append(s)
    grouped = [rows[r] for r in sorted(rows)]
    length = max(sum(len(s["input_ids"]) for s in row) for row in grouped)
    input_ids = torch.full((len(grouped), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(grouped), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(grouped), length), dtype=torch.long)
    for r, row in enumerate(grouped):
        at = 0
        for s in row:
            n = len(s["input_ids"])
            input_ids[r, at:at + n], labels[r, at:at + n] = s["input_ids"], s["labels"]
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(length - at)
    cu_seq_lens, longest = cu_seq_lens_from_positions(position_ids)
    batch.update(input_ids=input_ids, labels=labels, position_ids=position_ids, cu_seq_lens_q=cu_seq_lens,
                 cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest, **_images(good, grouped),
                 n_samples=len(good), n_tokens=sum(len(s["input_ids"]) for s in good))
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


def packed_epoch_batches(lengths: list[int], max_length: int, rows_per_rank: int, world_size: int, seed: int,
                         epoch: int) -> list[list[list[tuple[int, int]]]]:
    """The packed order of one epoch: global steps, each `world_size` per-rank lists of (row, sample index)
    pairs, `rows_per_rank` rows of at most `max_length` tokens per rank (the DataLoader's batch sampler format).

    Samples are shuffled (deterministically in seed and epoch), then packed PACKING_BUFFER at a time by
    best-fit decreasing, which leaves little of a row empty; the rows are shuffled again and dealt out.
    The last incomplete global step is dropped.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), PACKING_BUFFER):
        rows += best_fit_decreasing(order[start:start + PACKING_BUFFER], lengths, max_length)
    rng.shuffle(rows)
    per_step = rows_per_rank * world_size
    steps = []
    for start in range(0, len(rows) - per_step + 1, per_step):
        group = rows[start:start + per_step]
        steps.append([[(r, i) for r, row in enumerate(group[k * rows_per_rank:(k + 1) * rows_per_rank]) for i in row]
                      for k in range(world_size)])
    return steps


def best_fit_decreasing(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices, longest first, each into the fullest row it still fits (|length| <= capacity)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), sorted
    for i in sorted(indices, key=lambda i: -abs(lengths[i])):
        need = abs(lengths[i])
        if need > capacity:
            raise ValueError(f"sample {i} has {need} tokens, more than a packed row holds ({capacity})")
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            rows.append([i])
            room, row = capacity - need, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= need
        bisect.insort(free, (room, row))
    return rows
