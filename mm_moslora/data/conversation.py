"""Conversation templates and label masks derived from character spans.

A conversation is rendered to text while recording the character span of every assistant reply (and
its end-of-turn marker). The text is then tokenized with offset mappings, and a token is supervised
exactly when its characters overlap a reply span. No per-template token offsets are hand-tuned, so
the "tokenization mismatch" of LLaVA's preprocess functions cannot happen.

Templates:
- `plain`: LLaVA stage-1 alignment: `<image>` followed by the caption (the human text is dropped).
- `vicuna_v1`: LLaVA-1.5's template ("USER: ... ASSISTANT: ...</s>").
- `chat_template`: the tokenizer's own chat template (Llama-3, Qwen2, the tiny default, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..model.mm_model import IMAGE_TOKEN_ID

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
TEMPLATES = ("plain", "vicuna_v1", "chat_template")
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


class ConversationError(ValueError):
    """A record whose conversation cannot be rendered (bad roles, order, empty reply...)."""


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns [{"from": "human"|"gpt", "value"}] -> chat messages [{"role", "content"}], validated."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"turn {i} must be an object with 'from' and 'value'")
        role = ROLE_OF.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise ConversationError(f"turn {i}: unknown role {turn['from']!r} (expected human/gpt)")
        if not isinstance(turn["value"], str):
            raise ConversationError(f"turn {i}: 'value' must be a string")
        messages.append({"role": role, "content": turn["value"]})
    first = 1 if messages[0]["role"] == "system" else 0
    body = messages[first:]
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise ConversationError(f"turns out of order: turn {i + first} is from {msg['role']}, expected {expected}")
        if expected == "assistant" and not msg["content"].strip():
            raise ConversationError(f"turn {i + first}: empty assistant reply")
    if not body or body[-1]["role"] != "assistant":
        raise ConversationError("the conversation must end with an assistant (gpt) reply")
    return messages


@dataclass
class Rendered:
    text: str
    reply_spans: list[tuple[int, int]]  # character spans that are supervised


def _end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the chat template writes right after an assistant reply, up to the next turn (e.g. '</s>',
    '<|im_end|>', '<|eot_id|>'): it is supervised so the model learns to stop."""
    cached = getattr(tokenizer, "_mm_end_of_turn", None)  # one render per tokenizer, not one per conversation
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    sentinel = "XQZSENTINELQZX"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
                                         tokenize=False)
    tail = text[text.index(sentinel) + len(sentinel):].rstrip()
    tokenizer._mm_end_of_turn = (tokenizer.chat_template, tail)
    return tail


def _reply_spans(messages: list[dict], tokenizer: PreTrainedTokenizerBase, text: str,
                 add_generation_prompt: bool) -> list[tuple[int, int]]:
    """Character spans of the assistant replies (+ end-of-turn marker) in `text`, the chat template's
    rendering of `messages`.

    The template is rendered once more with every content replaced by a unique sentinel; the text
    before each sentinel is the template's own markup ("gap") in front of that message. Walking `text`
    gap, content, gap, content... pins every reply at its real place, so a short reply such as "A" is
    never found inside markup such as "ASSISTANT:" or an earlier turn.
    """
    sentinels = [f"XQZ{i}SENTINELQZX" for i in range(len(messages))]
    skeleton = tokenizer.apply_chat_template([dict(m, content=s) for m, s in zip(messages, sentinels)],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)
    end_marker = _end_of_turn(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = skeleton_cursor = 0
    for msg, sentinel in zip(messages, sentinels):
        is_reply = msg["role"] == "assistant"
        at = skeleton.find(sentinel, skeleton_cursor)
        if at < 0:  # the template does not show this message (e.g. it drops a system prompt)
            if is_reply:
                raise ConversationError("the chat template drops an assistant reply; cannot build its label mask")
            continue
        gap, skeleton_cursor = skeleton[skeleton_cursor:at], at + len(sentinel)
        if text.startswith(gap, cursor):
            pos = cursor + len(gap)
        else:  # markup that depends on earlier content: find it further on, else search from here
            found = text.find(gap, cursor)
            pos = found + len(gap) if found >= 0 else cursor
        content = msg["content"]
        if text.startswith(content, pos):
            start, end = pos, pos + len(content)
        else:  # templates may rewrite content, e.g. Llama-3's `| trim`
            content = content.strip()
            start = text.find(content, pos) if content else -1
            if start < 0:
                if is_reply:
                    raise ConversationError("the chat template rewrote an assistant reply; cannot locate it for "
                                            "the label mask")
                cursor = pos
                continue
            end = start + len(content)
        if is_reply:  # the marker is supervised, yet belongs to the next gap of the skeleton
            marker = len(end_marker) if end_marker and text.startswith(end_marker, end) else 0
            spans.append((start, end + marker))
        cursor = end
    return spans


def render(messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: str,
           add_generation_prompt: bool = False) -> Rendered:
    """Messages -> text plus the spans of assistant replies. With `add_generation_prompt`, the last
    message must be a user turn and the text ends where the assistant's reply begins."""
    if template == "plain":
        body = [m for m in messages if m["role"] != "system"]
        # LLaVA's stage-1 format: the images, then the caption; the human text is dropped.
        text = (tokenizer.bos_token or "") + IMAGE_PLACEHOLDER * body[0]["content"].count(IMAGE_PLACEHOLDER)
        if add_generation_prompt:
            return Rendered(text, [])
        if len(body) != 2:
            raise ConversationError(f"the plain template takes one human turn and one gpt reply (captions), "
                                    f"got {len(body)} turns")
        reply = body[1]["content"] + "\n"
        return Rendered(text + reply, [(len(text), len(text) + len(reply))])
    if template == "vicuna_v1":
        system = next((m["content"] for m in messages if m["role"] == "system"), VICUNA_SYSTEM)
        text, spans = (tokenizer.bos_token or "") + system + " ", []
        for msg in messages:
            if msg["role"] == "user":
                text += "USER: " + msg["content"] + " ASSISTANT:"
            elif msg["role"] == "assistant":
                start = len(text)
                text += " " + msg["content"] + (tokenizer.eos_token or "</s>")
                spans.append((start, len(text)))
        return Rendered(text, spans)
    if template == "chat_template":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--conv_mode chat_template: this tokenizer has no chat template; use vicuna_v1 or plain")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return Rendered(text, _reply_spans(messages, tokenizer, text, add_generation_prompt))
    raise ValueError(f"unknown conversation template {template!r}; choose one of {TEMPLATES}")


@dataclass(frozen=True)
class StopMarkers:
    """What ends a reply. `texts`: what the template writes after it (e.g. '</s>', '<|im_end|>', '\\n' for plain);
    those of one token stop like eos and are in `token_ids` (with eos); longer ones are `strings`, matched on text."""
    texts: list[str]
    token_ids: list[int]
    strings: list[str]


def stop_markers(tokenizer: PreTrainedTokenizerBase, template: str) -> StopMarkers:
    """The one definition of a reply's end, used by generation and by the exports' generation configs."""
    if template == "plain":
        texts = ["\n"]  # stage-1 captions end with a newline and no eos
    else:
        sentinel = "XQZSENTINELQZX"
        rendered = render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
                          tokenizer, template)
        tail = rendered.text[rendered.text.index(sentinel) + len(sentinel):].strip()
        texts = [tail] if tail else []
    encoded = {text: tokenizer.encode(text, add_special_tokens=False) for text in texts}
    single = {ids[0] for ids in encoded.values() if len(ids) == 1}
    return StopMarkers(texts, sorted(single | ({tokenizer.eos_token_id} - {None})),
                       [text for text, ids in encoded.items() if len(ids) > 1])


def tokenize_rendered(rendered: Rendered, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int,
                      ) -> tuple[list[int], list[int]]:
    """Tokenize text (with `<image>` placeholders) -> (input_ids, labels) as Python lists.

    Each `<image>` becomes `num_image_tokens` IMAGE_TOKEN_ID positions (labels -100). A token is
    supervised when its character span overlaps a reply span.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    chunks = rendered.text.split(IMAGE_PLACEHOLDER)
    offset = 0
    for k, chunk in enumerate(chunks):
        if k > 0:
            input_ids += [IMAGE_TOKEN_ID] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            offset += len(IMAGE_PLACEHOLDER)
        if chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            for token_id, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
                a, b = a + offset, b + offset
                supervised = any(a < end and b > start for start, end in rendered.reply_spans)
                input_ids.append(token_id)
                labels.append(token_id if supervised else IGNORE_INDEX)
        offset += len(chunk)
    return input_ids, labels


def tokenize_conversation(conversations: list[dict], tokenizer: PreTrainedTokenizerBase, template: str,
                          num_image_tokens: int, max_length: int | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA conversation -> (input_ids (T,), labels (T,)), truncated to `max_length` tokens.

    Truncation never drops image tokens (such a record raises ConversationError instead).
    """
    rendered = render(to_messages(conversations), tokenizer, template)
    input_ids, labels = tokenize_rendered(rendered, tokenizer, num_image_tokens)
    if max_length is not None and len(input_ids) > max_length:
        # Cutting into or before an image would leave its features without positions (the model
        # then refuses the batch): such a record is an error, not a silent truncation.
        if IMAGE_TOKEN_ID in input_ids[max_length:]:
            raise ConversationError(f"--model_max_length {max_length} cuts off image tokens "
                                    f"(the conversation has {len(input_ids)} tokens)")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return torch.tensor(input_ids), torch.tensor(labels)


def build_generation_prompt(messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: str,
                            num_image_tokens: int) -> list[int]:
    """Prompt token ids for generating the next assistant reply (last message is the user's)."""
    if template == "vicuna_v1":
        rendered = render(messages + [{"role": "assistant", "content": "x"}], tokenizer, template)
        cut = rendered.reply_spans[-1][0]
        rendered = Rendered(rendered.text[:cut], [])
    else:
        rendered = render(messages, tokenizer, template, add_generation_prompt=True)
    input_ids, _ = tokenize_rendered(rendered, tokenizer, num_image_tokens)
    return input_ids
