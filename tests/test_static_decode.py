"""StaticDecoder (static KV cache, fixed-shape steps) answers like Hugging Face generate, on the CPU path."""
from __future__ import annotations

import pytest
import torch

from mm_moslora.infer import CudaGraphCaptureError, InferenceEngine, Request, StaticDecoder, left_pad
from tests.helpers import mixed_requests

MAX_NEW = 5


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_files):
    return InferenceEngine.from_checkpoint(tiny_checkpoint_files[0], decode="static")


def answers(engine: InferenceEngine, decode: str, requests, **kwargs) -> list[str]:
    engine.decode = decode
    try:
        return engine.generate(requests, **kwargs)
    finally:
        engine.decode = "static"


def prompt_embeds(engine: InferenceEngine, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (inputs_embeds (B, T, H), attention_mask (B, T)) of text-only requests."""
    ids, mask = left_pad([engine.prompt_ids(r.messages, 0) for r in requests], engine.tokenizer.pad_token_id)
    with torch.inference_mode():
        return engine.model.embed(ids), mask


TEXT_REQUESTS = [Request([{"role": "user", "content": "Tell me a story" + " please" * i}], []) for i in range(3)]


def test_static_answers_equal_hf_answers(engine, tiny_checkpoint_files):
    requests = mixed_requests(tiny_checkpoint_files[1])  # mixed lengths: left padding at batch size 16
    assert engine.decode_path() == "static"
    hf = answers(engine, "hf", requests, max_new_tokens=MAX_NEW, batch_size=16)
    assert len(set(hf)) >= 4  # a non-trivial comparison
    assert engine.generate(requests, max_new_tokens=MAX_NEW, batch_size=16) == hf
    assert engine.generate(requests, max_new_tokens=MAX_NEW, batch_size=1) == hf
    # Eager attention takes an additive mask instead of a boolean one.
    eager = InferenceEngine.from_checkpoint(tiny_checkpoint_files[0], decode="static")
    eager.model.llm.config._attn_implementation = "eager"
    assert eager.generate(requests[:5], max_new_tokens=MAX_NEW) == hf[:5]


def test_row_budgets_and_stop_tokens(engine):
    embeds, mask = prompt_embeds(engine, TEXT_REQUESTS)
    decoder = StaticDecoder(engine.model.llm, sync_every=2)
    pad = engine.tokenizer.pad_token_id
    free = decoder.generate(embeds, mask, [6, 6, 6], [], pad)
    assert [len(row) for row in free] == [6, 6, 6]
    assert decoder.generate(embeds, mask, [1, 3, 6], [], pad) == [free[0][:1], free[1][:3], free[2]]
    stop = free[0][2]  # row 0 stops after its third token; the others at their first `stop`, if any
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in free]
    assert decoder.generate(embeds, mask, [6, 6, 6], [stop], pad) == expected
    assert len(expected[0]) == 3
    # stop_check runs at the sync points (every 2 steps here) on the tokens so far.
    checked = decoder.generate(embeds, mask, [6, 6, 6], [], pad, stop_check=lambda i, ids: len(ids) >= 3)
    assert checked == [row[:4] for row in free]


def test_multi_token_end_of_turn_text(tiny_checkpoint_files):
    requests = [Request([{"role": "user", "content": "<image>\n" + q}], [img])
                for q, img in zip(("What is it?", "Describe it.", "Colours?"), tiny_checkpoint_files[1])]
    engine = InferenceEngine.from_checkpoint(tiny_checkpoint_files[0], decode="static")
    plain = engine.generate(requests, max_new_tokens=10)
    ids = engine.tokenizer.encode(plain[0], add_special_tokens=False)
    pairs = [engine.tokenizer.decode(ids[k:k + 2]) for k in range(1, len(ids) - 1)]
    marker = next(pair for pair in pairs if pair.strip() and pair in plain[0])
    engine.stop_texts, engine.stop_strings = [marker], [marker]  # as a template with a 2-token end-of-turn text
    cut = engine.generate(requests, max_new_tokens=10)
    assert cut[0] == plain[0].split(marker, 1)[0].strip() and len(cut[0]) < len(plain[0])
    assert answers(engine, "hf", requests, max_new_tokens=10) == cut


def test_sampling_is_seeded_and_samples(engine):
    requests = TEXT_REQUESTS * 2
    greedy = engine.generate(requests, max_new_tokens=8)
    torch.manual_seed(0)
    first = engine.generate(requests, max_new_tokens=8, temperature=5.0)
    torch.manual_seed(0)
    assert engine.generate(requests, max_new_tokens=8, temperature=5.0) == first
    assert first != greedy
    torch.manual_seed(0)
    nucleus = engine.generate(requests, max_new_tokens=8, temperature=1.0, top_p=0.5)
    assert len(nucleus) == len(requests) and all(isinstance(a, str) for a in nucleus)


def test_cache_pool_reuses_slots_per_key(engine):
    embeds, mask = prompt_embeds(engine, TEXT_REQUESTS)
    decoder = StaticDecoder(engine.model.llm, bucket=64, max_slots=2)
    pad = engine.tokenizer.pad_token_id
    decoder.generate(embeds, mask, [8, 8, 8], [], pad)
    key = (3, decoder.cache_len(mask.shape[1], 8))
    assert list(decoder.slots) == [key] and key[1] % 64 == 0 and key[1] >= mask.shape[1] + 8
    slot = decoder.slots[key]
    # Another batch of the same key (shorter prompts, same bucket) reuses the cache.
    shorter_embeds, shorter_mask = embeds[:, 2:], mask[:, 2:]
    assert decoder.cache_len(shorter_mask.shape[1], 8) == key[1]
    decoder.generate(shorter_embeds, shorter_mask, [8, 8, 8], [], pad)
    assert list(decoder.slots) == [key] and decoder.slots[key] is slot
    # New keys are added; beyond max_slots the least recently used one is dropped.
    decoder.generate(embeds[:2], mask[:2], [8, 8], [], pad)
    decoder.generate(embeds[:1], mask[:1], [8], [], pad)
    assert list(decoder.slots) == [(2, key[1]), (1, key[1])]


def test_unsupported_setups_fail_clearly(engine, tiny_checkpoint_files):
    with pytest.raises(ValueError, match="choose one of"):
        InferenceEngine(engine.model, engine.tokenizer, "vicuna_v1", decode="fast")
    auto = InferenceEngine(engine.model, engine.tokenizer, "vicuna_v1")
    assert auto.decode == "auto" and auto.decode_path() == "hf"  # the CPU default
    embeds, mask = prompt_embeds(engine, TEXT_REQUESTS)
    with pytest.raises(CudaGraphCaptureError, match="decode='hf', or --decode hf"):
        StaticDecoder(engine.model.llm, use_cuda_graph=True).generate(embeds, mask, [2, 2, 2], [], 0)
    flash = InferenceEngine.from_checkpoint(tiny_checkpoint_files[0])
    flash.model.llm.config._attn_implementation = "flash_attention_2"
    assert flash.decode_path() == "hf"
    with pytest.raises(ValueError, match="4D mask"):
        StaticDecoder(flash.model.llm)
