"""Sequence packing (mm_moslora.data.collate.collate_packed / packed_epoch_batches, model.packed_attention): a packed
batch gives every sample the loss and gradients it has alone, with each attention implementation; the packed
epoch order fills rows and is deterministic; the image count check holds per packed row."""
from __future__ import annotations

import pytest
import torch

from mm_moslora.adapters import AdapterConfig, inject_adapters
from mm_moslora.data.collate import best_fit_decreasing, collate, collate_packed, packed_epoch_batches
from mm_moslora.data.conversation import IGNORE_INDEX
from mm_moslora.model import packed_attention
from mm_moslora.model.build import build_model
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_counts", "position_ids",
              "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with a MoSLoRA adapter whose B is not zero (so adapter gradients are not trivially equal)."""
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    model.requires_grad_(False)
    inject_adapters(model.llm, AdapterConfig(r=4, alpha=8, dropout=0.0, base_model="tiny"))
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
    model.projector.requires_grad_(True)
    model.train()
    packed_attention.register()
    return model, tokenizer


def make_sample(tokenizer, n_img_tokens: int, image_size: int, n_text: int, n_images: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tokenizer.bos_token_id] + [IMAGE_TOKEN_ID] * (n_img_tokens * n_images)
                       + torch.randint(5, 700, (n_text,), generator=gen).tolist())
    labels = ids.clone()
    labels[:1 + n_img_tokens * n_images + n_text // 2] = IGNORE_INDEX  # the prompt; the reply is supervised
    pixels = torch.randn(n_images, 3, image_size, image_size, generator=gen) if n_images else None
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def forward(model, batch: dict, labels: torch.Tensor | None = None):
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    if labels is not None:
        inputs["labels"] = labels
    return model(**inputs).loss


def trainable_grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def supervised_count(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager", packed_attention.NAME])
def test_packed_rows_give_each_sample_its_unpacked_loss_and_gradients(tiny, attn):
    model, tokenizer = tiny
    n_img, size = model.num_image_tokens, model.vision.image_size
    shapes = [(10, 1), (23, 0), (7, 2), (15, 1), (30, 0), (12, 1)]  # (text tokens, images): multi-image, text-only
    samples = [make_sample(tokenizer, n_img, size, n, k, seed) for seed, (n, k) in enumerate(shapes)]
    rows = [0, 0, 1, 1, 1, 2]
    padded = collate(samples, tokenizer.pad_token_id)
    packed = collate_packed([{**s, "row": r} for s, r in zip(samples, rows)], tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] == 3 and "attention_mask" not in packed
    assert packed["image_counts"].tolist() == [1, 3, 1] and packed["n_samples"] == 6

    model.llm.set_attn_implementation("sdpa")
    reference_loss = forward(model, padded)
    reference_grads = trainable_grads(model, reference_loss)
    # Per sample: its own loss alone (a batch of one) against the packed batch with only its labels kept.
    with torch.no_grad():
        alone = [float(forward(model, collate([s], tokenizer.pad_token_id))) for s in samples]

    model.llm.set_attn_implementation(attn)
    try:
        packed_loss = forward(model, packed)
        torch.testing.assert_close(packed_loss, reference_loss, rtol=1e-5, atol=1e-6)
        grads = trainable_grads(model, packed_loss)
        assert grads.keys() == reference_grads.keys() and len(grads) > 10
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        width, flat_labels = packed["input_ids"].shape[1], packed["labels"].reshape(-1)
        for k, sample in enumerate(samples):
            start = rows[k] * width + sum(len(s["input_ids"]) for s, r in zip(samples[:k], rows[:k]) if r == rows[k])
            only_k = torch.full_like(flat_labels, IGNORE_INDEX)
            n = len(sample["input_ids"])
            only_k[start:start + n] = flat_labels[start:start + n]
            with torch.no_grad():
                per_sample = forward(model, packed, only_k.view_as(packed["labels"]))
            assert float(per_sample) == pytest.approx(alone[k], rel=1e-5), (attn, k)
    finally:
        model.llm.set_attn_implementation("sdpa")


def test_collate_packed_layout(tiny):
    model, tokenizer = tiny
    samples = [make_sample(tokenizer, model.num_image_tokens, model.vision.image_size, n, k, n)
               for n, k in ((5, 1), (9, 0), (3, 0))]
    items = [{**samples[0], "row": 0}, None, {**samples[1], "row": 0}, {**samples[2], "row": 1}]
    batch = collate_packed(items, pad_token_id=tokenizer.pad_token_id)
    lengths = [len(s["input_ids"]) for s in samples]
    width = lengths[0] + lengths[1]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, width)
    assert batch["n_skipped"] == 1 and batch["n_samples"] == 3 and batch["n_tokens"] == sum(lengths)
    assert batch["position_ids"][0].tolist() == list(range(lengths[0])) + list(range(lengths[1]))
    assert batch["position_ids"][1].tolist() == list(range(lengths[2])) + list(range(width - lengths[2]))
    assert batch["cu_seq_lens_q"].tolist() == [0, lengths[0], width, width + lengths[2], 2 * width]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == max(lengths[:2] + [width - lengths[2]])
    # Labels are each sample's own, except its first one (no sample predicts the next one's first token).
    second = batch["labels"][0, lengths[0]:width]
    assert second[0] == IGNORE_INDEX and torch.equal(second[1:], samples[1]["labels"][1:])
    assert (batch["labels"][1, lengths[2]:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, lengths[2]:] == tokenizer.pad_token_id).all()
    assert batch["pixel_values"].shape[0] == 1 and batch["image_counts"].tolist() == [1, 0]
    assert collate_packed([None], 0) == {"n_skipped": 1}


def test_the_image_count_check_holds_per_packed_row(tiny):
    model, tokenizer = tiny
    samples = [make_sample(tokenizer, model.num_image_tokens, model.vision.image_size, 6, k, k) for k in (1, 2)]
    batch = collate_packed([{**samples[0], "row": 0}, {**samples[1], "row": 1}], tokenizer.pad_token_id)
    with torch.no_grad():
        model.embed(batch["input_ids"], batch["pixel_values"], batch["image_counts"])  # right as collated
        # Same total, wrong rows: features would land in another sample's positions.
        with pytest.raises(ValueError, match=r"do not match in row 0: \d+ image-token positions vs 2 images"):
            model.embed(batch["input_ids"], batch["pixel_values"], torch.tensor([2, 1]))


LENGTHS = [(-1) ** i * (20 + (i * 37) % 300) for i in range(500)]  # image (+) and text-only (-) samples


def test_packed_epoch_order_fills_rows_deterministically():
    max_length, rows_per_rank, world = 512, 2, 3
    steps = packed_epoch_batches(LENGTHS, max_length, rows_per_rank, world, seed=1, epoch=0)
    assert steps == packed_epoch_batches(LENGTHS, max_length, rows_per_rank, world, seed=1, epoch=0)
    assert steps != packed_epoch_batches(LENGTHS, max_length, rows_per_rank, world, seed=1, epoch=1)
    assert steps != packed_epoch_batches(LENGTHS, max_length, rows_per_rank, world, seed=2, epoch=0)
    seen, fill = [], []
    for step in steps:
        assert len(step) == world
        for rank in step:
            rows = {}
            for row, index in rank:
                rows.setdefault(row, []).append(index)
            assert sorted(rows) == list(range(rows_per_rank))
            for members in rows.values():
                used = sum(abs(LENGTHS[i]) for i in members)
                assert used <= max_length
                fill.append(used / max_length)
            seen += [i for _, i in rank]
    assert len(seen) == len(set(seen))  # nobody twice in an epoch
    total_rows = len(best_fit_decreasing(list(range(len(LENGTHS))), LENGTHS, max_length))
    assert len(seen) >= len(LENGTHS) - (world * rows_per_rank) * (max_length // 20)  # only a last step is dropped
    assert sum(fill) / len(fill) > 0.9, sum(fill) / len(fill)  # rows are well filled
    assert total_rows <= sum(abs(n) for n in LENGTHS) / max_length * 1.1
    with pytest.raises(ValueError, match="more than a packed row holds"):
        best_fit_decreasing([0], [600], 512)
