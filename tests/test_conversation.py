"""Conversation templates and label masks (mm_moslora.data.conversation).

Every template is checked the same way: the supervised tokens, decoded, are exactly the assistant
replies plus their end-of-turn marker; image placeholders become `num_image_tokens` IMAGE_TOKEN_ID
positions that are never supervised; the generation prompt is a token-level prefix of the training
sequence that stops where supervision starts. Tokenizers are the shipped tiny tokenizer, re-dressed
with other special tokens and chat templates (ChatML as in Qwen2, Llama-3) — nothing is downloaded.
"""
from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from mm_moslora.data.conversation import (IGNORE_INDEX, TEMPLATES, ConversationError, build_generation_prompt, render,
                                          to_messages, tokenize_conversation)
from mm_moslora.model.build import TINY_DIR, build_tokenizer
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID

N_IMG = 5  # image tokens per image: small, so sequences stay short

# Qwen2-Instruct's template (ChatML with a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3-Instruct's template: note `| trim` on the content.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def tiny_tokenizer_with(chat_template: str | None, **special) -> PreTrainedTokenizerFast:
    """The tiny BPE vocabulary with other special tokens and chat template (as a real model family ships)."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TINY_DIR / "tokenizer.json"), **special)
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tiny():
    return build_tokenizer("tiny")


@pytest.fixture(scope="module")
def chatml():
    return tiny_tokenizer_with(CHATML_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               additional_special_tokens=["<|im_start|>"])


@pytest.fixture(scope="module")
def llama3():
    return tiny_tokenizer_with(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                               additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])


# (template, tokenizer fixture, expected decoded supervised run for a reply)
CASES = {
    "plain": ("plain", "tiny", lambda reply: reply + "\n"),
    "vicuna_v1": ("vicuna_v1", "tiny", lambda reply: " " + reply + "</s>"),
    # "ASSISTANT: " + reply: the byte-level token for the first word carries the space before it.
    "chat_tiny": ("chat_template", "tiny", lambda reply: " " + reply + "</s>"),
    "chat_chatml": ("chat_template", "chatml", lambda reply: reply + "<|im_end|>"),
    "chat_llama3": ("chat_template", "llama3", lambda reply: reply.strip() + "<|eot_id|>"),
}
MULTI_TURN_CASES = [c for c in CASES if c != "plain"]  # plain is single-turn by definition


def conv(*values: str, system: str | None = None) -> list[dict]:
    """LLaVA turns alternating human/gpt from `values`."""
    turns = [{"from": "system", "value": system}] if system else []
    return turns + [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def supervised_runs(tokenizer, input_ids, labels) -> list[str]:
    """Decoded text of each maximal run of supervised positions; labels equal the ids there."""
    runs, current = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in runs]


def case(name, request):
    template, tokenizer_fixture, expected = CASES[name]
    return template, request.getfixturevalue(tokenizer_fixture), expected


@pytest.mark.parametrize("name", list(CASES))
def test_single_turn_labels_are_exactly_the_reply(name, request):
    template, tokenizer, expected = case(name, request)
    reply = "A red circle and a blue square."
    input_ids, labels = tokenize_conversation(conv("<image>\nWhat is in the image?", reply), tokenizer, template,
                                              N_IMG)
    assert input_ids.shape == labels.shape and input_ids.ndim == 1
    assert supervised_runs(tokenizer, input_ids, labels) == [expected(reply)]


# Replies that also occur in the template markup or in the question: a text search would find them
# in the wrong place ("A" inside "ASSISTANT", "assistant" inside ChatML's "<|im_start|>assistant").
TRICKY_REPLIES = ("A", "assistant", "USER", "yes", "Yes, the answer is A.  ")


@pytest.mark.parametrize("name", MULTI_TURN_CASES)
def test_multi_turn_labels_are_exactly_the_replies(name, request):
    template, tokenizer, expected = case(name, request)
    values = []
    for i, reply in enumerate(TRICKY_REPLIES):
        question = ("<image>\n" if i == 0 else "") + f"Question {i}: is it A or B? Say yes, assistant or USER."
        values += [question, reply]
    for system in (None, "You answer briefly."):
        input_ids, labels = tokenize_conversation(conv(*values, system=system), tokenizer, template, N_IMG)
        assert supervised_runs(tokenizer, input_ids, labels) == [expected(r) for r in TRICKY_REPLIES]


def test_plain_uses_only_the_caption(tiny):
    input_ids, labels = tokenize_conversation(conv("<image>\nDescribe the image briefly.", "Two circles."), tiny,
                                              "plain", N_IMG)
    assert input_ids.tolist() == ([tiny.bos_token_id] + [IMAGE_TOKEN_ID] * N_IMG
                                  + tiny("Two circles.\n", add_special_tokens=False)["input_ids"])
    assert "Describe" not in tiny.decode([t for t in input_ids.tolist() if t >= 0])
    # A system turn is not the human turn, and the image count follows the placeholders.
    ids2, _ = tokenize_conversation(conv("<image> <image> Describe.", "Two circles.", system="Be brief."), tiny,
                                    "plain", N_IMG)
    assert ids2.tolist().count(IMAGE_TOKEN_ID) == 2 * N_IMG
    with pytest.raises(ConversationError, match="one human turn and one gpt reply"):
        tokenize_conversation(conv("<image>\nq", "a", "q2", "a2"), tiny, "plain", N_IMG)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("n_images", [1, 2])
def test_image_placeholders_expand_unsupervised(name, n_images, request):
    template, tokenizer, _ = case(name, request)
    question = " and ".join(["<image>"] * n_images) + "\nCompare the pictures."
    input_ids, labels = tokenize_conversation(conv(question, "They differ."), tokenizer, template, N_IMG)
    positions = [i for i, t in enumerate(input_ids.tolist()) if t == IMAGE_TOKEN_ID]
    assert len(positions) == n_images * N_IMG
    assert all(labels[p] == IGNORE_INDEX for p in positions)
    # Each image is one contiguous block of N_IMG positions.
    blocks = [positions[i:i + N_IMG] for i in range(0, len(positions), N_IMG)]
    assert all(block == list(range(block[0], block[0] + N_IMG)) for block in blocks)
    text = tokenizer.decode([t for t in input_ids.tolist() if t >= 0])
    assert "<image>" not in text and "image>" not in text


@pytest.mark.parametrize("name", list(CASES))
def test_generation_prompt_is_a_prefix_of_training(name, request):
    template, tokenizer, _ = case(name, request)
    values = ["<image>\nWhat colour is the square?", "Blue."]
    if name != "plain":
        values += ["And the circle? Answer A or B.", "A"]
    input_ids, labels = tokenize_conversation(conv(*values), tokenizer, template, N_IMG)
    prompt = build_generation_prompt(to_messages(conv(*values))[:-1], tokenizer, template, N_IMG)
    assert input_ids.tolist()[:len(prompt)] == prompt
    # The prompt stops exactly where the supervised reply starts.
    assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX
    assert prompt.count(IMAGE_TOKEN_ID) == N_IMG


def test_system_prompt_of_vicuna(tiny):
    rendered = render(to_messages(conv("hi", "hello", system="Custom system.")), tiny, "vicuna_v1")
    assert rendered.text == "<s>Custom system. USER: hi ASSISTANT: hello</s>"
    default = render(to_messages(conv("hi", "hello", "bye", "ok")), tiny, "vicuna_v1").text
    assert default.startswith("<s>A chat between a curious human") and default.endswith(
        "USER: hi ASSISTANT: hello</s>USER: bye ASSISTANT: ok</s>")


@pytest.mark.parametrize("turns, message", [
    ([], "non-empty list"),
    ("not a list", "non-empty list"),
    ([{"from": "human"}], "'from' and 'value'"),
    ([{"from": "bot", "value": "hi"}, {"from": "gpt", "value": "x"}], "unknown role 'bot'"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "must be a string"),
    ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "hi"}], "out of order: turn 0"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "out of order: turn 1"),
    # With a system turn first, indices still count the record's turns.
    ([{"from": "system", "value": "s"}, {"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
     "out of order: turn 2"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}], "turn 1: empty assistant reply"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
     "must end with an assistant"),
    ([{"from": "system", "value": "s"}], "must end with an assistant"),
])
def test_to_messages_errors(turns, message):
    with pytest.raises(ConversationError, match=message):
        to_messages(turns)


def test_to_messages_maps_roles():
    assert to_messages(conv("q", "a", system="s")) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_unknown_template_and_missing_chat_template(tiny):
    with pytest.raises(ValueError, match="unknown conversation template"):
        tokenize_conversation(conv("q", "a"), tiny, "alpaca", N_IMG)
    bare = tiny_tokenizer_with(None, eos_token="</s>")
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_conversation(conv("q", "a"), bare, "chat_template", N_IMG)
    assert set(TEMPLATES) == {"plain", "vicuna_v1", "chat_template"}


def test_truncation_keeps_a_prefix(tiny):
    turns = conv("<image>\n" + "tell me about the shapes " * 4, "there are two circles " * 10)
    full_ids, full_labels = tokenize_conversation(turns, tiny, "vicuna_v1", N_IMG)
    cut = len(full_ids) - 7
    ids, labels = tokenize_conversation(turns, tiny, "vicuna_v1", N_IMG, max_length=cut)
    assert len(ids) == cut
    assert ids.tolist() == full_ids.tolist()[:cut] and labels.tolist() == full_labels.tolist()[:cut]
    same, _ = tokenize_conversation(turns, tiny, "vicuna_v1", N_IMG, max_length=len(full_ids))
    assert same.tolist() == full_ids.tolist()


def test_truncation_never_drops_image_tokens(tiny):
    # Cut inside the image block.
    with pytest.raises(ConversationError, match="cuts off image tokens"):
        tokenize_conversation(conv("<image>\nq", "a"), tiny, "plain", N_IMG, max_length=3)
    # Cut before an image that comes after a long text: the whole image would vanish.
    late_image = conv("look " * 30 + "<image>", "a square")
    with pytest.raises(ConversationError, match="cuts off image tokens"):
        tokenize_conversation(late_image, tiny, "vicuna_v1", N_IMG, max_length=20)
    # A cut right after a complete image is fine.
    ids, labels = tokenize_conversation(conv("<image>\nq", "a long caption"), tiny, "plain", N_IMG,
                                        max_length=1 + N_IMG)
    assert ids.tolist() == [tiny.bos_token_id] + [IMAGE_TOKEN_ID] * N_IMG
    assert (labels == IGNORE_INDEX).all()
