"""InferenceEngine: batched answers equal one-by-one answers, stopping, streaming, context limits."""
from __future__ import annotations

import pytest
import torch

from mm_moslora.adapters import adapter_modules
from mm_moslora.infer import InferenceEngine, PromptTooLongError, ReplyOptions, Request
from tests.helpers import mixed_requests

MAX_NEW = 4


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_files):
    return InferenceEngine.from_checkpoint(tiny_checkpoint_files[0])


def test_batch_16_answers_equal_batch_1(engine, tiny_checkpoint_files):
    requests = mixed_requests(tiny_checkpoint_files[1])
    batched = engine.generate(requests, max_new_tokens=MAX_NEW, batch_size=16)
    single = engine.generate(requests, max_new_tokens=MAX_NEW, batch_size=1)
    assert batched == single
    # Order is the input order: a request asked alone gets the answer at its index.
    for i in (0, 13, 14):
        assert engine.generate([requests[i]], max_new_tokens=MAX_NEW) == [batched[i]]
    # Non-trivial model: the image changes the answer.
    same_question = [Request([{"role": "user", "content": "<image>\nWhat is it?"}], [img])
                     for img in tiny_checkpoint_files[1]]
    assert len(set(engine.generate(same_question, max_new_tokens=MAX_NEW))) >= 3
    assert all(isinstance(a, str) and a for a in batched)


def test_adapter_is_merged_and_matters(engine, tiny_checkpoint_files):
    assert not adapter_modules(engine.model.llm)  # merged into the base weights, adapter layers dropped
    requests = mixed_requests(tiny_checkpoint_files[1])[:6]
    merged = engine.generate(requests, max_new_tokens=MAX_NEW)
    unmerged = InferenceEngine.from_checkpoint(tiny_checkpoint_files[0], merge=False)
    modules = adapter_modules(unmerged.model.llm)
    assert modules and not any(m.merged for m in modules.values())
    assert all(m.lora_B.abs().sum() > 0 for m in modules.values())
    assert unmerged.generate(requests, max_new_tokens=MAX_NEW) == merged
    with torch.no_grad():
        for module in modules.values():
            module.lora_B.zero_()
    assert unmerged.generate(requests, max_new_tokens=MAX_NEW) != merged


def test_stops_at_end_of_turn(engine, tiny_checkpoint_files):
    eos = engine.tokenizer.eos_token_id
    assert engine.stop_texts == ["</s>"] and eos in engine.stop_token_ids  # vicuna_v1 ends a reply with </s>
    ids = engine.tokenizer.encode(" a cat", add_special_tokens=False)
    assert engine._decode(ids + [eos] + ids) == engine._decode(ids) == "a cat"
    # A model whose lm_head always prefers eos stops at once.
    stopping = InferenceEngine.from_checkpoint(tiny_checkpoint_files[0])

    def prefer_eos(module, inputs, logits):
        logits[..., eos] = 1e4
        return logits
    stopping.model.llm.get_output_embeddings().register_forward_hook(prefer_eos)
    assert stopping.generate(mixed_requests(tiny_checkpoint_files[1])[:3], max_new_tokens=MAX_NEW) == ["", "", ""]

def test_streaming_pieces_make_the_answer(engine, tiny_checkpoint_files):
    requests = mixed_requests(tiny_checkpoint_files[1])[:4]
    n_pieces = []
    for request, answer in zip(requests, engine.generate(requests, max_new_tokens=MAX_NEW)):
        pieces = []
        assert engine.generate([request], max_new_tokens=MAX_NEW, stream=pieces.append) == [answer]
        assert "".join(pieces).strip() == answer
        n_pieces.append(len(pieces))
    assert max(n_pieces) >= 2  # text arrives while it is generated, not at the end
    with pytest.raises(ValueError, match="exactly one request"):
        engine.generate(requests[:2], stream=print)


@pytest.mark.parametrize("decode", ["hf", "static"])
def test_reply_options_per_request_in_one_batch(engine, tiny_checkpoint_files, decode, monkeypatch):
    """Budgets, stop strings, streaming and cancellation per request, all in one batch, on both decoders."""
    monkeypatch.setattr(engine, "decode", decode)
    requests = mixed_requests(tiny_checkpoint_files[1])[:6]
    alone = engine.generate(requests, max_new_tokens=12, batch_size=1)
    short = engine.generate(requests[:1], max_new_tokens=3)
    stop = alone[1][3:6]
    assert len(alone[1]) > 6 and alone[2] and alone[4] and alone[0] != short[0]
    pieces = [[] for _ in requests]
    options = [ReplyOptions(max_new_tokens=3), ReplyOptions(stop=["never there", stop]),
               ReplyOptions(on_text=pieces[2].append), ReplyOptions(cancelled=lambda: True, max_new_tokens=30),
               ReplyOptions(on_text=pieces[4].append, stop=[stop]), ReplyOptions()]
    answers = engine.generate(requests, max_new_tokens=12, batch_size=6, options=options)
    assert answers[0] == short[0] and options[0].finish_reason == "length" and options[0].n_tokens == 3
    assert answers[1] == alone[1].split(stop, 1)[0].strip() and options[1].finish_reason == "stop"
    assert answers[2] == alone[2] == "".join(pieces[2]) and len(pieces[2]) >= (2 if decode == "hf" else 1)
    # A cancelled row ends at the next check: after its first token (generate), at a sync point (static).
    assert options[3].finish_reason == "cancelled" and options[3].n_tokens <= (1 if decode == "hf" else 8)
    assert "".join(pieces[4]) == answers[4] == alone[4].split(stop, 1)[0].strip()
    assert answers[5] == alone[5] and options[5].finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="2 options for 6 requests"):
        engine.generate(requests, options=options[:2])


def test_prompt_longer_than_context(engine, tiny_checkpoint_files):
    long_text = "word " * (engine.context_length + 10)
    requests = [Request([{"role": "user", "content": "<image>\nhi"}], [tiny_checkpoint_files[1][0]]),
                Request([{"role": "user", "content": "<image>\n" + long_text}], [tiny_checkpoint_files[1][0]])]
    with pytest.raises(PromptTooLongError, match="request 1: the prompt has .* context holds 1024") as info:
        engine.generate(requests, max_new_tokens=2)
    assert info.value.index == 1 and info.value.n_tokens > engine.context_length
    # Truncation keeps the image and the end of the prompt, leaving room for the reply.
    ids = engine.prompt_ids(requests[1].messages, 1, truncate=True)
    assert len(ids) == engine.context_length - 1
    assert ids.count(-200) == engine.model.num_image_tokens
    assert " ".join(engine.tokenizer.decode(ids[-8:]).split()).endswith("word word ASSISTANT:")
    answers = engine.generate(requests, max_new_tokens=3, truncate=True)
    assert len(answers) == 2


def test_bad_requests(engine, tiny_checkpoint_files):
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        engine.generate([Request([{"role": "user", "content": "<image> hi"}], tiny_checkpoint_files[1][:2])])
    with pytest.raises(ValueError, match="last message must be the user's"):
        engine.generate([Request([{"role": "assistant", "content": "hi"}], [])])


def test_sampling_runs(engine, tiny_checkpoint_files):
    torch.manual_seed(0)
    answers = engine.generate(mixed_requests(tiny_checkpoint_files[1])[:4], max_new_tokens=3, temperature=0.7,
                              top_p=0.9)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


def test_a_batch_that_runs_out_of_gpu_memory_is_answered_in_halves(engine, tiny_checkpoint_files, monkeypatch, capsys):
    # One request has two images, one none: the split must keep them aligned.
    requests = mixed_requests(tiny_checkpoint_files[1])
    expected = engine.generate(requests, max_new_tokens=MAX_NEW, batch_size=1)
    real_batch = engine._generate_batch
    sizes = []

    def small_gpu(prompts, *args):
        sizes.append(len(prompts))
        if len(prompts) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_batch(prompts, *args)

    monkeypatch.setattr(engine, "_generate_batch", small_gpu)
    assert engine.generate(requests, max_new_tokens=MAX_NEW, batch_size=16) == expected
    assert sizes[:3] == [16, 8, 4] and max(s for s in sizes if s <= 3) == 2
    assert "out of GPU memory at batch size 16" in capsys.readouterr().err
