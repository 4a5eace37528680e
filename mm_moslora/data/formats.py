"""Record formats of instruction data, each turned into one canonical sample.

Detected per file (every record votes; see `record_format`):
- `llava`:    {"id", "image"?: path | [paths] | Image, "conversations": [{"from": "human"|"gpt"|"system", "value"}]}
- `sharegpt`: {"conversations": [{"from", "value"} or {"role", "content"}], "images"?: [...], "system"?: str}
              (LLaMA-Factory's ShareGPT layout)
- `openai`:   {"messages": [{"role", "content": str | [parts]}], "images"?: [...]} with content parts
              {"type": "text", "text"}, {"type": "image", "image"?: path | bytes | Image} and
              {"type": "image_url", "image_url": {"url": path | file:// | data:image/...;base64,...}};
              an image part without a payload takes the record's next entry of "images" (Hugging Face's layout)
- `cauldron`: {"images": [...], "texts": [{"user", "assistant"}]} (HuggingFaceM4/the_cauldron)

An image is a path (joined to --image_folder, which it may not leave) or encoded bytes; `datasets.Image`
values arrive as {"bytes", "path"}. The canonical sample has LLaVA turns with one `<image>` per image, in order
(when a record has images but no placeholder, they go before the first user turn, as LLaVA does).
"""
from __future__ import annotations

import base64
import binascii
from collections import Counter
from dataclasses import dataclass

from .conversation import IMAGE_PLACEHOLDER, ConversationError

FORMATS = ("llava", "sharegpt", "openai", "cauldron")
ImageRef = str | bytes  # a path under --image_folder, or encoded image bytes


@dataclass
class Sample:
    turns: list[dict]        # [{"from": "human"|"gpt"|"system", "value": str}], `<image>` placeholders in place
    images: list[ImageRef]   # one per placeholder, in reading order


def record_format(record: dict) -> str | None:
    """The format a record is written in; None when it fits LLaVA and ShareGPT alike (text-only
    `conversations`) or none at all. Fields that are present but null (Arrow columns) do not count."""
    keys = {k for k, v in record.items() if v is not None}
    if "messages" in keys:
        return "openai"
    if "texts" in keys:
        return "cauldron"
    if "conversations" in keys:
        if "images" in keys or "system" in keys or _has_role_tags(record["conversations"]):
            return "sharegpt"
        if "image" in keys:
            return "llava"
    return None


def _has_role_tags(turns) -> bool:
    return isinstance(turns, list) and any(isinstance(t, dict) and "role" in t and "from" not in t for t in turns)


def detect_format(votes: Counter, fields: set[str], where: str) -> str:
    """The file's format from its records' votes (record_format), or an error naming what was found."""
    if votes:
        return votes.most_common(1)[0][0]
    if fields & {"conversations", "image"}:
        return "llava"  # text-only conversations: LLaVA and ShareGPT read them alike
    raise ConversationError(f"{where}: no known record format: expected 'conversations' (LLaVA, ShareGPT), "
                            f"'messages' (OpenAI) or 'texts' (the cauldron); found fields {sorted(fields)}")


def image_ref(value, what: str = "image") -> ImageRef:
    """A path or encoded bytes from any of the ways records hold an image."""
    if isinstance(value, dict):  # datasets.Image storage, or an OpenAI {"url": ...} object
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return image_ref(value["path"], what)
        if value.get("url"):
            return image_ref(value["url"], what)
        raise ConversationError(f"{what} has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, str) and value:
        if value.startswith("data:"):
            header, _, payload = value.partition(",")
            if not header.endswith(";base64"):
                raise ConversationError(f"{what}: only base64 data URIs are read")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ConversationError(f"{what}: the data URI is not valid base64") from None
        if value.startswith(("http://", "https://")):
            raise ConversationError(f"{what} {value[:80]!r}: remote images are not fetched (nothing is downloaded "
                                    "at run time); download them and give paths under --image_folder")
        return value[len("file://"):] if value.startswith("file://") else value
    raise ConversationError(f"{what} must be a path or image bytes, got {type(value).__name__}")


def _image_list(value, field: str) -> list[ImageRef]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not isinstance(value, (list, str, dict, bytes)):
        raise ConversationError(f"'{field}' must be a path or a list of paths, got {value!r}")
    try:
        return [image_ref(v, f"'{field}' entry {i}") for i, v in enumerate(values)]
    except ConversationError as err:
        raise ConversationError(f"'{field}' must be a path or a list of paths ({err})") from None


def _imply_placeholders(turns: list[dict], n_images: int) -> list[dict]:
    """LLaVA's convention: images without any `<image>` go before the first human turn, one per image."""
    if n_images and not any(IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in turns):
        first_human = next((t for t in turns if t.get("from") in ("human", "user")), None)
        if first_human is not None and isinstance(first_human.get("value"), str):
            first_human["value"] = (IMAGE_PLACEHOLDER + "\n") * n_images + first_human["value"]
    return turns


def _turn_list(value, field: str) -> list:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConversationError(f"'{field}' must be a list of {{\"from\", \"value\"}} objects")
    return value


def _llava(record: dict) -> Sample:
    turns = [dict(t) for t in _turn_list(record.get("conversations"), "conversations")]
    images = _image_list(record.get("image"), "image")
    return Sample(_imply_placeholders(turns, len(images)), images)


def _sharegpt(record: dict) -> Sample:
    turns = []
    for t in _turn_list(record.get("conversations"), "conversations"):
        turns.append({"from": t["role"], "value": t.get("content")} if "role" in t and "from" not in t else dict(t))
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise ConversationError("'system' must be a string")
        if system.strip():
            turns.insert(0, {"from": "system", "value": system})
    images = _image_list(record.get("images"), "images")
    return Sample(_imply_placeholders(turns, len(images)), images)


def _openai(record: dict) -> Sample:
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ConversationError("'messages' must be a list of {\"role\", \"content\"} objects")
    column = _image_list(record.get("images"), "images")
    next_from_column, images, turns = 0, [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise ConversationError(f"message {i} part {j}: a text part needs a string 'text'")
                    pieces.append(part["text"])
                elif kind in ("image", "image_url"):
                    payload = part.get(kind)
                    if payload is None:  # Hugging Face layout: the next image of the "images" column
                        if next_from_column >= len(column):
                            raise ConversationError(f"message {i} part {j}: an image part without an image, and "
                                                    f"'images' has only {len(column)}")
                        images.append(column[next_from_column])
                        next_from_column += 1
                    else:
                        images.append(image_ref(payload, f"message {i} part {j}"))
                    pieces.append(IMAGE_PLACEHOLDER)
                else:
                    raise ConversationError(f"message {i} part {j}: unknown content part type {kind!r} "
                                            "(expected text, image or image_url)")
            text = "\n".join(pieces)
        else:
            raise ConversationError(f"message {i}: 'content' must be a string or a list of parts")
        turns.append({"from": message.get("role"), "value": text})
    if next_from_column < len(column):
        if next_from_column or any(IMAGE_PLACEHOLDER in t["value"] for t in turns):
            raise ConversationError(f"'images' has {len(column)} images but the messages use {next_from_column}")
        images = column  # plain-string contents: placeholders as written, or implied as in LLaVA
        turns = _imply_placeholders(turns, len(images))
    return Sample(turns, images)


def _cauldron(record: dict) -> Sample:
    texts = record.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, dict) for t in texts):
        raise ConversationError("'texts' must be a list of {\"user\", \"assistant\"} objects")
    turns = []
    for t in texts:
        turns += [{"from": "human", "value": t.get("user")}, {"from": "gpt", "value": t.get("assistant")}]
    images = _image_list(record.get("images"), "images")
    return Sample(_imply_placeholders(turns, len(images)), images)


NORMALIZERS = {"llava": _llava, "sharegpt": _sharegpt, "openai": _openai, "cauldron": _cauldron}


def to_sample(record, fmt: str) -> Sample:
    """One record of a file in format `fmt` -> Sample. Raises ConversationError naming what is wrong."""
    if record is None:
        raise ConversationError("record is null")
    if not isinstance(record, dict):
        raise ConversationError("record is not a JSON object")
    own = record_format(record)
    if own is not None and own != fmt:
        raise ConversationError(f"record is in {own} form, but the file is {fmt}")
    if fmt in ("llava", "sharegpt") and "conversations" not in record:
        raise ConversationError("missing 'conversations'")
    if fmt == "openai" and "messages" not in record:
        raise ConversationError("missing 'messages'")
    return NORMALIZERS[fmt](record)
